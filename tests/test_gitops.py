"""The pull-request verbs through the CLI: changed (real git), comment (fake GitHub), and cleanup,
sweep and the teardown of removed experiments against real local endpoints."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import yaml

from automation.cli import main
from automation.gitops import expiry
from automation.naming import resource_tags
from automation.serving.process import get_endpoint, list_endpoints, start_endpoint, stop_endpoint
from tests.conftest import LOCAL_EXPERIMENT, REPO
from tests.fake_github import READ_TOKEN, WRITE_TOKEN, FakeGitHub, parse_file_commands

EVENTS = Path(__file__).parent / "events"
REPO_NAME = "acme-ml/chat-finetune"
AZURE_ENV = {"AZURE_CLIENT_ID": "00000000-0000-0000-0000-00000000c1d0", "AZURE_TENANT_ID": "tenant",
             "AZURE_SUBSCRIPTION_ID": "sub", "AZURE_RESOURCE_GROUP": "rg", "AZURE_ML_WORKSPACE": "ws"}


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.com", "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}
    return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True).stdout.strip()


def commit(repo: Path, message: str) -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "--allow-empty", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def local_experiment(name: str, **changes) -> str:
    return yaml.safe_dump({**LOCAL_EXPERIMENT, "name": name, **changes}, sort_keys=False)


def azure_experiment(name: str) -> str:
    text = (REPO / "experiments" / "phi3-mini-ultrachat.yaml").read_text()
    return text.replace("name: phi3-mini-ultrachat", f"name: {name}")


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    """A git repository with experiments, as the working directory; GitHub's job files set up."""
    root = tmp_path / "repo"
    (root / "experiments").mkdir(parents=True)
    git(root, "init", "-q", "-b", "main")
    shutil.copy(REPO / "experiments" / "experiment.schema.json", root / "experiments")
    monkeypatch.chdir(root)
    monkeypatch.setenv("AUTOMATION_HOME", str(tmp_path / "ws"))
    monkeypatch.setenv("GITHUB_REPOSITORY", REPO_NAME)
    for name in ("GITHUB_EVENT_PATH", "GITHUB_ACTIONS", *AZURE_ENV):
        monkeypatch.delenv(name, raising=False)
    for name in ("GITHUB_OUTPUT", "GITHUB_STEP_SUMMARY"):
        (tmp_path / name).touch()
        monkeypatch.setenv(name, str(tmp_path / name))
    return root


def outputs(tmp_path: Path) -> dict:
    values = parse_file_commands((tmp_path / "GITHUB_OUTPUT").read_text())
    return {k: json.loads(v) if v.startswith("{") else v for k, v in values.items()}


def names(matrix: dict) -> list[str]:
    return [e["experiment"] for e in matrix["include"]]


def event_file(tmp_path: Path, template: str, base: str, head: str) -> Path:
    event = json.loads((EVENTS / template).read_text())
    event["pull_request"]["base"]["sha"], event["pull_request"]["head"]["sha"] = base, head
    path = tmp_path / template
    path.write_text(json.dumps(event))
    return path


# ---------------------------------------------------------------------------------------------
# changed


def test_changed_turns_a_diff_into_matrices(repo, tmp_path, capsys):
    exp = repo / "experiments"
    for name in ("bravo", "charlie", "delta", "foxtrot", "kilo"):
        (exp / f"{name}.yaml").write_text(local_experiment(name))
    (exp / "azure-kept.yaml").write_text(azure_experiment("azure-kept"))
    base = commit(repo, "base")
    (exp / "alpha.yaml").write_text(local_experiment("alpha"))                       # added
    (exp / "bravo.yaml").write_text(local_experiment("bravo", description="tuned"))   # modified
    (exp / "charlie.yaml").unlink()                                                   # deleted
    git(repo, "mv", "experiments/delta.yaml", "experiments/echo.yaml")                # renamed away
    (exp / "echo.yaml").write_text(local_experiment("echo"))
    (exp / "team").mkdir()
    git(repo, "mv", "experiments/foxtrot.yaml", "experiments/team/foxtrot.yaml")     # moved, same name
    (repo / "archive").mkdir()
    git(repo, "mv", "experiments/kilo.yaml", "archive/kilo.yaml")                     # moved out
    (exp / "golf.yaml").write_text(local_experiment("golf", training={"learning_rate": -1}))  # invalid
    (exp / "hotel.yaml").write_text(azure_experiment("hotel"))                        # azure
    (exp / "odd name; $(id).yaml").write_text(local_experiment("odd"))                # invalid name
    (exp / "evil\n::error::pwned|`x`.yaml").write_text("name: evil\n")              # a log injection try
    (exp / "README.md").write_text("not an experiment")
    (exp / "experiment.schema.json").write_text("{}")
    (repo / "elsewhere").mkdir()
    (repo / "elsewhere" / "india.yaml").write_text(local_experiment("india"))
    head = commit(repo, "head")

    assert main(["changed", "--base", base, "--head", head]) == 0
    out = outputs(tmp_path)
    assert sorted(names(out["matrix"])) == ["alpha", "bravo", "echo", "evil\n::error::pwned|`x`", "foxtrot", "golf",
                                            "hotel", "odd name; $(id)"]
    entries = {e["experiment"]: e for e in out["matrix"]["include"]}
    assert entries["alpha"] == {"experiment": "alpha", "file": "experiments/alpha.yaml", "change": "added",
                                "backend": "local", "valid": True}
    assert entries["bravo"]["change"] == "modified" and entries["foxtrot"]["change"] == "modified"
    assert entries["foxtrot"]["file"] == "experiments/team/foxtrot.yaml" and entries["echo"]["change"] == "added"
    assert entries["golf"]["valid"] is False and entries["golf"]["backend"] == "local"
    assert entries["odd name; $(id)"]["valid"] is False
    assert out["any"] == "true" and out["any_local"] == "true"
    assert sorted(names(out["local"])) == ["alpha", "bravo", "echo", "foxtrot"]  # valid ones only
    assert names(out["azure"]) == ["hotel"] and out["azure_run"] == {"include": []}
    assert sorted(names(out["removed"])) == ["charlie", "delta", "kilo"]
    assert {e["backend"] for e in out["removed"]["include"]} == {"local"}
    printed = capsys.readouterr().out
    assert "removed: experiments/charlie.yaml" in printed and "added: experiments/golf.yaml (local, invalid)" in printed
    assert "added: experiments/evil\\n::error::pwned|`x`.yaml (unknown, invalid)" in printed
    assert not any(line.startswith("::error") for line in printed.splitlines())
    summary = (tmp_path / "GITHUB_STEP_SUMMARY").read_text()
    assert "| `experiments/evil\\n::error::pwned\\|'x'.yaml` |" in summary
    assert "| `alpha` | `experiments/alpha.yaml` | local | added |" in summary
    assert "validate (fails: see the annotations)" in summary and "Removed `experiments/charlie.yaml`" in summary


def test_changed_with_nothing_relevant(repo, tmp_path):
    (repo / "experiments" / "alpha.yaml").write_text(local_experiment("alpha"))
    base = commit(repo, "base")
    (repo / "notes.md").write_text("hello")
    head = commit(repo, "docs")
    assert main(["changed", "--base", base, "--head", head]) == 0
    out = outputs(tmp_path)
    assert out["any"] == "false" and out["matrix"] == {"include": []} and out["any_removed"] == "false"


def test_changed_from_the_event_payload_and_the_azure_gate(repo, tmp_path, monkeypatch, capsys):
    base = commit(repo, "base")
    (repo / "experiments" / "hotel.yaml").write_text(azure_experiment("hotel"))
    (repo / "experiments" / "alpha.yaml").write_text(local_experiment("alpha"))
    head = commit(repo, "head")
    monkeypatch.setenv("GITHUB_ACTIONS", "true")

    # A fork: even with the Azure settings present, nothing goes to Azure.
    for name, value in AZURE_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("GITHUB_EVENT_PATH", str(event_file(tmp_path, "pull_request.fork.opened.json", base, head)))
    assert main(["changed"]) == 0
    out = outputs(tmp_path)
    assert names(out["azure"]) == ["hotel"] and out["any_azure_run"] == "false" and names(out["local"]) == ["alpha"]
    printed = capsys.readouterr().out
    assert "::notice file=experiments/hotel.yaml,title=Azure skipped::Azure jobs for hotel skipped: the pull " \
           "request comes from a fork" in printed
    assert "comes from a fork: no secrets, no Azure" in (tmp_path / "GITHUB_STEP_SUMMARY").read_text()

    # This repository, settings present: the Azure jobs run.
    (tmp_path / "GITHUB_OUTPUT").write_text("")
    monkeypatch.setenv("GITHUB_EVENT_PATH", str(event_file(tmp_path, "pull_request.opened.json", base, head)))
    assert main(["changed"]) == 0
    assert names(outputs(tmp_path)["azure_run"]) == ["hotel"] and "::notice" not in capsys.readouterr().out

    # This repository, settings missing: skipped with a notice that names them.
    (tmp_path / "GITHUB_OUTPUT").write_text("")
    monkeypatch.delenv("AZURE_ML_WORKSPACE")
    monkeypatch.setenv("AZURE_RESOURCE_GROUP", "")
    assert main(["changed"]) == 0
    assert outputs(tmp_path)["any_azure_run"] == "false"
    assert "(repository variables AZURE_RESOURCE_GROUP, AZURE_ML_WORKSPACE)" in capsys.readouterr().out


def test_changed_without_the_base_commit_says_how_to_fetch_it(repo, capsys):
    head = commit(repo, "only")
    assert main(["changed", "--base", "1" * 40, "--head", head]) == 2
    assert "fetch-depth: 0" in capsys.readouterr().err
    assert main(["changed"]) == 2  # no event, no shas
    assert "pass --base and --head" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# comment


@pytest.fixture
def fake(monkeypatch):
    with FakeGitHub() as server:
        monkeypatch.setenv("GITHUB_API_URL", server.url)
        monkeypatch.setenv("GITHUB_TOKEN", WRITE_TOKEN)
        monkeypatch.delenv("AUTOMATION_COMMENT_AUTHOR", raising=False)
        yield server


def report(tmp_path: Path, text: str, name: str = "report.md") -> Path:
    path = tmp_path / name
    path.write_text(f"<!-- automation:report experiment=tiny-pr -->\n## Experiment `tiny-pr`\n\n{text}\n")
    return path


def test_comment_creates_then_updates_one_comment(repo, tmp_path, fake, monkeypatch, capsys):
    monkeypatch.setenv("GITHUB_EVENT_PATH", str(event_file(tmp_path, "pull_request.opened.json", "a" * 40, "b" * 40)))
    assert main(["comment", "tiny-pr", "--body-file", str(report(tmp_path, "first push"))]) == 0
    assert "comment created on pull request #42" in capsys.readouterr().out
    assert main(["comment", "experiments/tiny-pr.yaml", "--body-file", str(report(tmp_path, "second push"))]) == 0
    assert "comment updated on pull request #42" in capsys.readouterr().out
    (comment,) = fake.issue_comments(REPO_NAME, 42)
    assert "second push" in comment["body"] and "first push" not in comment["body"]
    assert "PR comment updated: https://github.com/acme-ml/chat-finetune/pull/42#issuecomment-" in \
        (tmp_path / "GITHUB_STEP_SUMMARY").read_text()


def test_comment_default_body_is_the_workspace_report(repo, tmp_path, fake):
    folder = tmp_path / "ws" / "runs" / "tiny-pr"
    folder.mkdir(parents=True)
    report(folder, "from the run")
    assert main(["comment", "tiny-pr", "--pr", "9"]) == 0
    assert "from the run" in fake.issue_comments(REPO_NAME, 9)[0]["body"]


def test_comment_with_a_read_only_token_goes_to_the_job_summary(repo, tmp_path, fake, monkeypatch, capsys):
    monkeypatch.setenv("GITHUB_TOKEN", READ_TOKEN)
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    assert main(["comment", "tiny-pr", "--pr", "57", "--body-file", str(report(tmp_path, "eval loss 1.23"))]) == 0
    assert fake.issue_comments(REPO_NAME, 57) == []
    summary = (tmp_path / "GITHUB_STEP_SUMMARY").read_text()
    assert "could not be posted as a PR comment" in summary and "eval loss 1.23" in summary
    assert "::notice title=report in the job summary::could not comment on pull request #57" in capsys.readouterr().out


def test_a_long_comment_is_cut_and_the_whole_report_goes_to_the_summary(repo, tmp_path, fake):
    long = "\n".join(f"row {i} " + "x" * 90 for i in range(1200))
    assert main(["comment", "tiny-pr", "--pr", "3", "--body-file", str(report(tmp_path, long))]) == 0
    (comment,) = fake.issue_comments(REPO_NAME, 3)
    assert len(comment["body"]) <= 65_536 and "**Cut:**" in comment["body"]
    assert f"row 1199 {'x' * 90}" in (tmp_path / "GITHUB_STEP_SUMMARY").read_text()


def test_comment_survives_a_server_error(repo, tmp_path, fake):
    fake.fail_next("GET", r"/comments$", 502, message="Bad Gateway")
    assert main(["comment", "tiny-pr", "--pr", "4", "--body-file", str(report(tmp_path, "ok"))]) == 0
    assert len(fake.issue_comments(REPO_NAME, 4)) == 1


def test_comment_with_a_broken_token_fails(repo, tmp_path, fake, monkeypatch, capsys):
    monkeypatch.setenv("GITHUB_TOKEN", "ghs_revoked")
    assert main(["comment", "tiny-pr", "--pr", "4", "--body-file", str(report(tmp_path, "x"))]) == 1
    assert "401 Bad credentials" in capsys.readouterr().err


def test_comment_bad_input(repo, tmp_path, fake, monkeypatch, capsys):
    body = str(report(tmp_path, "x"))
    assert main(["comment", "tiny-pr", "--body-file", body]) == 2
    assert "no pull request" in capsys.readouterr().err
    assert main(["comment", "tiny-pr", "--pr", "1", "--body-file", str(tmp_path / "missing.md")]) == 2
    monkeypatch.delenv("GITHUB_TOKEN")
    assert main(["comment", "tiny-pr", "--pr", "1", "--body-file", body]) == 2
    assert "GITHUB_TOKEN not set" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# cleanup, sweep and removed experiments, on real local endpoints


def tags(pr: int, experiment: str, *, age_h: float = 0, ttl: float = 48, stage: str = "staging",
         managed: bool = True) -> dict[str, str]:
    made = resource_tags(repo=REPO_NAME, pr=pr, experiment=experiment, sha="0" * 40, stage=stage, ttl_hours=ttl,
                         created_at=datetime.now(UTC) - timedelta(hours=age_h))
    if not managed:
        del made["managed_by"]
    return made


ENDPOINTS = {
    "pr7-alpha-expired": tags(7, "alpha", age_h=3, ttl=1),
    "pr7-beta": tags(7, "beta"),
    "pr7-not-ours": tags(7, "alpha", age_h=3, ttl=1, managed=False),
    "pr7-production": tags(7, "alpha", age_h=3, ttl=1, stage="production"),
}


@pytest.fixture(scope="module")
def endpoints(tmp_path_factory, tiny_model_dir):
    """Four real endpoint processes with the tags above, started together. (Cleanup deleting a
    live endpoint is shown by the replay of the closed event in test_workflow_replay.py.)"""
    home = tmp_path_factory.mktemp("endpoints")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AUTOMATION_HOME", str(home))
        patch.setenv("OMP_NUM_THREADS", "1")
        with ThreadPoolExecutor(len(ENDPOINTS)) as pool:
            started = dict(zip(ENDPOINTS, pool.map(
                lambda item: start_endpoint(item[0], tiny_model_dir, tags=item[1], max_new_tokens_cap=8),
                ENDPOINTS.items()), strict=True))
        yield home, started
        for record in list_endpoints():
            stop_endpoint(record.name)


def serving(record) -> bool:
    try:
        return httpx.get(f"{record.url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_sweep_cleanup_and_removed_experiments(endpoints, repo, tmp_path, monkeypatch, capsys):
    home, endpoints = endpoints
    monkeypatch.setenv("AUTOMATION_HOME", str(home))  # the endpoints' workspace
    assert all(serving(r) for r in endpoints.values())

    # sweep: only the managed staging endpoint past its ttl_hours.
    assert main(["sweep", "--dry-run"]) == 0
    assert "expired (dry run, kept): pr7-alpha-expired (local)" in capsys.readouterr().out
    assert serving(endpoints["pr7-alpha-expired"])
    assert main(["sweep"]) == 0
    assert "deleted: pr7-alpha-expired (local)" in capsys.readouterr().out
    assert not serving(endpoints["pr7-alpha-expired"]) and get_endpoint("pr7-alpha-expired") is None
    for name in ("pr7-beta", "pr7-not-ours", "pr7-production"):
        assert serving(endpoints[name]), name

    # cleanup of another pull request: none of these.
    assert main(["cleanup", "--pr", "8"]) == 0
    assert "pull request #8: 0 staging endpoint(s) deleted" in capsys.readouterr().out

    # changed: the experiment beta removed from pull request 7 takes its endpoint with it, and
    # only it (the alpha ones left are not ours, or not staging).
    (repo / "experiments" / "beta.yaml").write_text(local_experiment("beta"))
    (repo / "experiments" / "alpha.yaml").write_text(local_experiment("alpha"))
    base = commit(repo, "base")
    (repo / "experiments" / "beta.yaml").unlink()
    (repo / "experiments" / "alpha.yaml").unlink()
    head = commit(repo, "remove beta and alpha")
    assert main(["changed", "--base", base, "--head", head, "--pr", "7"]) == 0
    printed = capsys.readouterr().out
    assert "removed: experiments/beta.yaml; deleted endpoints pr7-beta" in printed
    assert "removed: experiments/alpha.yaml\n" in printed
    assert not serving(endpoints["pr7-beta"]) and get_endpoint("pr7-beta") is None

    # cleanup of pull request 7: what is left is not ours, or not staging.
    assert main(["cleanup", "--pr", "7"]) == 0
    assert "pull request #7: 0 staging endpoint(s) deleted" in capsys.readouterr().out
    assert serving(endpoints["pr7-not-ours"]) and serving(endpoints["pr7-production"])
    assert "Cleanup of pull request #7 on local: nothing was running" in \
        (tmp_path / "GITHUB_STEP_SUMMARY").read_text()


def test_expiry_reads_the_tags_or_leaves_the_endpoint_alone():
    made = datetime(2026, 8, 21, 8, 0, tzinfo=UTC)
    assert expiry({"created_at": "2026-08-21T08:00:00Z", "ttl_hours": "4"}) == made + timedelta(hours=4)
    assert expiry({"created_at": "2026-08-21T08:00:00", "ttl_hours": "0.5"}) == made + timedelta(minutes=30)
    assert expiry({"created_at": "2026-08-21T10:00:00+02:00", "ttl_hours": "1"}) == made + timedelta(hours=1)
    for ttl in ("", "0", "-1", "nan", "inf", "1e300", "four"):
        assert expiry({"created_at": "2026-08-21T08:00:00Z", "ttl_hours": ttl}) is None, ttl
    for tags in ({}, {"created_at": "2026-08-21T08:00:00Z"}, {"ttl_hours": "4"}, {"created_at": "soon", "ttl_hours": "4"}):
        assert expiry(tags) is None, tags


def test_cleanup_and_sweep_bad_input(repo, capsys):
    assert main(["cleanup"]) == 2
    assert "no pull request" in capsys.readouterr().err
    assert main(["cleanup", "--pr", "1", "--backend", "gcp"]) == 2
    assert main(["sweep", "--backend", "gcp"]) == 2
    assert "unknown backend 'gcp'" in capsys.readouterr().err


def test_cleanup_in_actions_says_when_azure_was_not_looked_at(repo, monkeypatch, capsys):
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    assert main(["cleanup", "--pr", "5"]) == 0
    assert "::notice title=Azure skipped::Azure settings are not configured (AZURE_CLIENT_ID" in capsys.readouterr().out


def test_changed_validates_in_the_same_job(repo, tmp_path, monkeypatch, capsys):
    """`changed --validate`: the plan and every changed file's validation in one job, so the first
    annotation on the diff needs one runner pickup; an invalid file fails it with exit code 2."""
    base = commit(repo, "base")
    (repo / "experiments" / "alpha.yaml").write_text(local_experiment("alpha"))
    (repo / "experiments" / "golf.yaml").write_text(local_experiment("golf", training={"learning_rate": -1}))
    head = commit(repo, "head")
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    assert main(["changed", "--base", base, "--head", head, "--validate"]) == 2
    printed = capsys.readouterr()
    assert "::error file=experiments/golf.yaml" in printed.out and "learning_rate" in printed.out
    assert "ok: experiments/alpha.yaml" in printed.out
    assert outputs(tmp_path)["any"] == "true"  # the matrices are still written
    (repo / "experiments" / "golf.yaml").write_text(local_experiment("golf"))
    fixed = commit(repo, "fix")
    assert main(["changed", "--base", base, "--head", fixed, "--validate"]) == 0
