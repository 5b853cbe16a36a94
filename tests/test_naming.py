"""Names are deterministic, valid for Azure, and distinct where they must be."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from automation.naming import (
    ENDPOINT_PATTERN,
    config_hash,
    dataset_slug,
    job_name,
    model_name,
    production_endpoint_name,
    resource_tags,
    staging_endpoint_name,
    timestamp_version,
)

experiment_names = st.from_regex(r"[a-z][a-z0-9-]{2,39}", fullmatch=True)
any_text = st.text(min_size=0, max_size=120)
repos = st.from_regex(r"[A-Za-z0-9_.-]{1,39}/[A-Za-z0-9_.-]{1,100}", fullmatch=True)
prs = st.one_of(st.none(), st.integers(min_value=1, max_value=10**9))


def assert_valid_endpoint(name: str) -> None:
    assert 3 <= len(name) <= 32, name
    assert ENDPOINT_PATTERN.match(name), name
    assert name[0].isalpha() and name[-1].isalnum()


@settings(max_examples=400)
@given(repo=st.one_of(repos, any_text), pr=prs, experiment=st.one_of(experiment_names, any_text))
def test_staging_endpoint_names_follow_azure_rules(repo, pr, experiment):
    name = staging_endpoint_name(repo, pr, experiment)
    assert_valid_endpoint(name)
    assert name == staging_endpoint_name(repo, pr, experiment), "deterministic"


@settings(max_examples=300)
@given(a=st.tuples(repos, prs, experiment_names), b=st.tuples(repos, prs, experiment_names))
def test_staging_endpoint_names_are_distinct_per_repo_pr_experiment(a, b):
    if a != b:
        assert staging_endpoint_name(*a) != staging_endpoint_name(*b)


def test_endpoint_names_distinct_where_truncation_would_collide():
    long = "a-very-long-experiment-name-that-gets-cut"
    names = {staging_endpoint_name("org/repo", 7, long + suffix) for suffix in ("-one", "-two", "")}
    names |= {staging_endpoint_name("org/other", 7, long), staging_endpoint_name("org/repo", 8, long)}
    assert len(names) == 5


@given(repo=st.one_of(repos, any_text), experiment=st.one_of(experiment_names, any_text))
def test_production_endpoint_names_follow_azure_rules(repo, experiment):
    name = production_endpoint_name(repo, experiment)
    assert_valid_endpoint(name)
    assert name != staging_endpoint_name(repo, None, experiment)


def test_endpoint_names_stay_readable():
    name = staging_endpoint_name("org/repo", 12, "phi3-mini-ultrachat")
    assert name.startswith("spr12-phi3-mini-ultrach-") and len(name) == 32, name


@given(experiment=experiment_names, sha=st.from_regex(r"[0-9a-f]{40}", fullmatch=True))
def test_job_names_are_deterministic(experiment, sha):
    cfg = config_hash({"a": 1})
    assert job_name(experiment, sha, cfg) == f"{experiment}-{sha[:7]}-{cfg}"


def test_config_hash_ignores_key_order_and_sees_values():
    assert config_hash({"a": 1, "b": 2}) == config_hash({"b": 2, "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})
    assert len(config_hash({"a": 1})) == 7


def test_model_name_and_version_follow_the_reference():
    assert dataset_slug("HuggingFaceH4/ultrachat_200k") == "ultrachat-200k"
    assert model_name("Phi-3-mini-4k-instruct", "HuggingFaceH4/ultrachat_200k") == "Phi-3-mini-4k-instruct-ultrachat-200k"
    assert model_name("org/Model", "data/ultrachat-sample/") == "org-Model-ultrachat-sample"
    assert timestamp_version(1_700_000_000.9) == "1700000000"


def test_resource_tags_carry_every_key():
    tags = resource_tags(repo="org/repo", pr=3, experiment="exp", sha="abc", stage="staging", ttl_hours=48,
                         created_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    for key in ("repo", "pr", "experiment", "sha", "stage", "created_at", "ttl_hours"):
        assert key in tags and isinstance(tags[key], str)
    assert tags["created_at"] == "2026-01-02T03:04:05Z" and tags["ttl_hours"] == "48" and tags["pr"] == "3"
