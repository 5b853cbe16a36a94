"""The workflows: pinned actions, least privilege, and clean actionlint and zizmor reports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.yml"))
PINNED = re.compile(r"^[\w.-]+/[\w./-]+@[0-9a-f]{40}$")


def tool(name: str) -> str:
    found = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(found).exists():
        pytest.fail(f"{name} is not installed; it comes with the dev extra (make setup)")
    return found


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_there_are_workflows():
    assert WORKFLOWS


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_actions_are_pinned_to_full_shas(path):
    text = path.read_text()
    for line in re.findall(r"uses:\s*(\S+)(.*)", text):
        ref, comment = line
        assert PINNED.match(ref), f"{path.name}: {ref} is not pinned to a full commit SHA"
        assert re.search(r"#\s*v\d", comment), f"{path.name}: {ref} needs a version comment"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_least_privilege(path):
    workflow = load(path)
    assert workflow.get("permissions") == {}, f"{path.name}: top-level permissions must be {{}}"
    triggers = workflow.get(True, workflow.get("on"))  # PyYAML reads the key `on` as True
    assert "pull_request_target" not in triggers and "workflow_run" not in triggers
    for name, job in workflow["jobs"].items():
        for step in job.get("steps", []):
            if str(step.get("uses", "")).startswith("actions/checkout@"):
                assert step.get("with", {}).get("persist-credentials") is False, f"{path.name}:{name}"


def test_actionlint_is_clean():
    result = subprocess.run([tool("actionlint"), "-oneline"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_zizmor_is_clean():
    result = subprocess.run([tool("zizmor"), "--offline", "--format", "plain", ".github/workflows"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# The security rules of the PR workflows, read from the YAML

BY_NAME = {path.name: path for path in WORKFLOWS}
UNTRUSTED = re.compile(r"github\.(head_ref|event\.(pull_request\.(title|body|head\.(ref|label))|"
                       r"head_commit|commits|comment|review|issue))")
THIN_RUN = re.compile(r"^(make setup(-core|-local|-azure)?|\.venv/bin/automation [a-z]+( [^\n;&|`$]*(\"\$[A-Z_]+\"[^\n;&|`$]*)*)?)$")
SAME_REPO = "github.event.pull_request.head.repo.full_name == github.repository"


def jobs_of(name: str) -> dict:
    return load(BY_NAME[name])["jobs"]


def steps_using(job: dict, action: str) -> list[dict]:
    return [s for s in job.get("steps", []) if str(s.get("uses", "")).lower().startswith(action.lower() + "@")]


def verbs(job: dict) -> list[str]:
    """The automation verbs a job runs; `run --dry-run` only prints a plan, so it counts as `plan`."""
    found = []
    for step in job.get("steps", []):
        words = str(step.get("run", "")).split()
        if words and words[0] == ".venv/bin/automation":
            found.append("plan" if words[1] == "run" and "--dry-run" in words else words[1])
    return found


def all_jobs():
    return [(path.name, name, job) for path in WORKFLOWS for name, job in load(path)["jobs"].items()]


def test_the_workflows_are_there_with_their_triggers():
    pr = load(BY_NAME["experiment-pr.yml"])[True]
    # experiment files only: a change to the schema or a README under experiments/ starts nothing
    assert list(pr) == ["pull_request"] and pr["pull_request"]["paths"] == ["experiments/*.yaml", "experiments/*.yml"]
    cleanup = load(BY_NAME["experiment-cleanup.yml"])[True]
    assert cleanup == {"pull_request": {"types": ["closed"]}}  # every closed PR, whatever its last diff
    sweeper = load(BY_NAME["endpoint-sweeper.yml"])[True]
    assert set(sweeper) == {"schedule", "workflow_dispatch"}
    assert "make test" in BY_NAME["ci.yml"].read_text()


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_steps_are_thin_and_scripts_hold_no_expressions(path):
    for name, job in load(path)["jobs"].items():
        for step in job["steps"]:
            assert ("uses" in step) != ("run" in step), f"{path.name}:{name}"
            if "run" in step:
                script = step["run"].strip()
                assert "${{" not in script, f"{path.name}:{name}: pass values through env:, not {script!r}"
                if path.name != "ci.yml":
                    assert THIN_RUN.match(script), f"{path.name}:{name}: not one `automation <verb>`: {script!r}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_untrusted_event_fields_only_in_env(path):
    workflow = load(path)
    for name, job in workflow["jobs"].items():
        for step in job["steps"]:
            outside_env = {k: v for k, v in step.items() if k != "env"}
            assert not UNTRUSTED.search(json.dumps(outside_env)), f"{path.name}:{name}"
        assert not UNTRUSTED.search(json.dumps({k: v for k, v in job.items() if k not in ("steps", "env")}))
    assert "secrets." not in path.read_text(), f"{path.name}: no stored secrets (OIDC, and github.token)"


def test_each_job_gets_the_least_it_needs():
    for workflow, name, job in all_jobs():
        where = f"{workflow}:{name}"
        perms = job.get("permissions")
        assert isinstance(perms, dict), f"{where}: permissions must be granted per job"
        writes = {k for k, v in perms.items() if v == "write"}
        logs_in = bool(steps_using(job, "azure/login"))
        comments = "comment" in verbs(job)
        assert writes <= {"id-token", "pull-requests"}, where
        assert ("id-token" in writes) == logs_in, f"{where}: id-token: write exactly where Azure/login runs"
        assert ("pull-requests" in writes) == comments, f"{where}: pull-requests: write exactly where it comments"
        assert perms.get("contents") == "read", where


def test_azure_only_for_this_repository_and_only_through_oidc():
    for workflow, name, job in all_jobs():
        logins = steps_using(job, "azure/login")
        if not logins:
            continue
        condition = " ".join(str(job.get("if", "")).split())
        if workflow != "endpoint-sweeper.yml":  # the schedule has no pull request, and no fork
            assert SAME_REPO in condition, f"{workflow}:{name}"
        for setting in ("AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_SUBSCRIPTION_ID"):
            assert f"vars.{setting} != ''" in condition, f"{workflow}:{name}: skipped when {setting} is not set"
        for login in logins:
            assert login["with"] == {"client-id": "${{ vars.AZURE_CLIENT_ID }}",
                                     "tenant-id": "${{ vars.AZURE_TENANT_ID }}",
                                     "subscription-id": "${{ vars.AZURE_SUBSCRIPTION_ID }}"}, f"{workflow}:{name}"


def test_forks_get_validation_and_the_local_flow_without_cloud_access():
    jobs = jobs_of("experiment-pr.yml")
    for name in ("plan", "validate", "local", "preflight"):
        job = jobs[name]
        assert SAME_REPO not in str(job.get("if", "")) and "environment" not in job, name
        assert "id-token" not in job["permissions"], name
    assert verbs(jobs["local"]) == ["run", "report", "comment"]
    assert verbs(jobs["validate"]) == ["validate"] and verbs(jobs["plan"]) == ["changed"]


def test_environments_gate_staging_and_production():
    jobs = jobs_of("experiment-pr.yml")
    with_environment = {n: j["environment"] for n, j in jobs.items() if "environment" in j}
    assert with_environment == {"azure-deploy": "staging", "azure-promote": "production"}
    assert verbs(jobs["azure-deploy"]) == ["deploy"] and verbs(jobs["azure-promote"]) == ["promote", "report", "comment"]
    chain = ["azure-finetune", "azure-register", "azure-deploy", "azure-score", "azure-comment", "azure-promote"]
    for before, after in zip(chain, chain[1:], strict=False):
        assert before in jobs[after]["needs"], f"{after} must wait for {before}"


def test_records_pass_between_jobs_as_artifacts():
    jobs = jobs_of("experiment-pr.yml")
    uploaded = {}
    for name, job in jobs.items():
        for step in steps_using(job, "actions/upload-artifact"):
            assert step["with"]["name"] not in uploaded.values(), "one artifact name per job"
            uploaded[name] = step["with"]["name"]

    def ancestors(name: str) -> set[str]:
        needs = jobs[name].get("needs", [])
        needs = [needs] if isinstance(needs, str) else needs
        return set(needs).union(*(ancestors(n) for n in needs)) if needs else set()

    for name, job in jobs.items():
        for step in steps_using(job, "actions/download-artifact"):
            producers = [n for n, artifact in uploaded.items() if artifact == step["with"]["name"]]
            assert producers and producers[0] in ancestors(name), f"{name} downloads what no earlier job uploads"


def test_concurrency_per_pull_request_and_experiment_cancelling_only_validation():
    for workflow, name, job in all_jobs():
        if workflow == "ci.yml":
            continue
        concurrency = job.get("concurrency") or load(BY_NAME[workflow]).get("concurrency")
        assert concurrency, f"{workflow}:{name}: needs a concurrency group"
        cancels = concurrency.get("cancel-in-progress")
        if workflow != "endpoint-sweeper.yml":
            assert "github.event.pull_request.number" in concurrency["group"], f"{workflow}:{name}"
        if "strategy" in job:
            assert "matrix.experiment" in concurrency["group"], f"{workflow}:{name}: one group per experiment"
        creates = set(verbs(job)) & {"run", "deploy", "promote", "cleanup", "sweep", "changed", "finetune", "register"}
        if cancels:
            assert name in ("validate", "preflight") and not creates and "environment" not in job, f"{workflow}:{name}"
        else:
            assert cancels is False, f"{workflow}:{name}: say cancel-in-progress: false explicitly"
    assert jobs_of("experiment-pr.yml")["validate"]["concurrency"]["cancel-in-progress"] is True
