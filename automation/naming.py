"""Deterministic names and tags for jobs, models and endpoints.

Names are a pure function of (repository, PR, experiment, commit, config), so a rerun of any stage
finds what the last run created instead of creating a second one, and teardown can find every
resource of a PR by its tags alone.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

ENDPOINT_MAX = 32
ENDPOINT_PATTERN = re.compile(r"^[a-z][a-z0-9-]{1,30}[a-z0-9]$")
TAG_KEYS = ("repo", "pr", "experiment", "sha", "stage", "created_at", "ttl_hours")
MANAGED_BY = "gitops-finetune"


EXPERIMENTS_DIR = "experiments"
SUFFIXES = (".yaml", ".yml")


def current_repo() -> str:
    """The repo tag of resources: GITHUB_REPOSITORY, or "local" at a desk."""
    import os

    return os.environ.get("GITHUB_REPOSITORY") or "local"


def is_experiment_path(path: str) -> bool:
    """A file under experiments/ (any depth) with a YAML suffix: one experiment."""
    from pathlib import PurePosixPath

    parts = PurePosixPath(path).parts
    return len(parts) >= 2 and parts[0] == EXPERIMENTS_DIR and PurePosixPath(path).suffix in SUFFIXES


def _digest(*parts: object, length: int) -> str:
    joined = "\x1f".join(str(p) for p in parts)
    return hashlib.sha256(joined.encode("utf-8")).hexdigest()[:length]


def config_hash(config: BaseModel | dict[str, Any], length: int = 7) -> str:
    """Hash of a config's canonical JSON: same settings, same hash, whatever the key order."""
    data = config.model_dump(mode="json") if isinstance(config, BaseModel) else config
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:length]


def _slug(text: str) -> str:
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]", "-", text.lower())).strip("-")


def job_name(experiment: str, sha: str, cfg_hash: str) -> str:
    """`<exp>-<sha7>-<cfghash7>`: one job per experiment, commit and configuration."""
    return f"{experiment}-{(sha or 'nosha')[:7]}-{cfg_hash[:7]}"


def dataset_slug(dataset: str) -> str:
    """`HuggingFaceH4/ultrachat_200k` -> `ultrachat-200k`; `data/ultrachat-sample` -> `ultrachat-sample`."""
    return _slug(dataset.rstrip("/").split("/")[-1]) or "data"


def model_name(base_model: str, dataset: str) -> str:
    """`<model>-<dataset-slug>`, slashes turned into dashes (the reference's registered name)."""
    return f"{base_model.replace('/', '-')}-{dataset_slug(dataset)}"


def timestamp_version(now: float | None = None) -> str:
    """The reference's model version: whole UTC seconds since the epoch, as a string."""
    return str(int(time.time() if now is None else now))


def _endpoint(prefix: str, middle: str, digest: str) -> str:
    room = ENDPOINT_MAX - len(prefix) - len(digest) - 2
    body = _slug(middle)[: max(room, 0)].strip("-")
    name = f"{prefix}-{body}-{digest}" if body else f"{prefix}-{digest}"
    assert ENDPOINT_PATTERN.match(name), name  # the construction guarantees it; see tests/test_naming.py
    return name


def staging_endpoint_name(repo: str, pr: int | None, experiment: str) -> str:
    """At most 32 chars, `[a-z][a-z0-9-]*`, distinct for each (repo, PR, experiment).

    Azure endpoint names are unique per region, not per workspace, so the repository takes part
    through the digest; the readable part (PR number, experiment) helps a person in the portal.
    """
    pr_part = f"pr{pr}" if pr is not None else "dev"
    return _endpoint(f"s{pr_part}"[:12], experiment, _digest("staging", repo, pr, experiment, length=8))


def production_endpoint_name(repo: str, experiment: str) -> str:
    return _endpoint("prod", experiment, _digest("production", repo, experiment, length=8))


def resource_tags(
    *, repo: str, pr: int | None, experiment: str, sha: str, stage: str, ttl_hours: float,
    created_at: datetime | None = None,
) -> dict[str, str]:
    """The tags every created resource carries; teardown and sweep select by them."""
    created = (created_at or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "repo": repo, "pr": "" if pr is None else str(pr), "experiment": experiment, "sha": sha,
        "stage": stage, "created_at": created, "ttl_hours": f"{ttl_hours:g}", "managed_by": MANAGED_BY,
    }
