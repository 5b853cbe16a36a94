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
    # one workflow for every trigger of the reconcile loop; no paths filter: closing a PR whose last
    # diff no longer touches experiments/ must still prune what its earlier pushes started
    assert pr["pull_request"] == {"types": ["opened", "synchronize", "reopened", "closed"]}
    (cron,) = pr["schedule"]
    minute = cron["cron"].split()[0]
    assert minute.startswith("*/") and 10 <= int(minute[2:]) <= 15, cron
    assert set(pr["workflow_dispatch"]["inputs"]) == {"pr", "promote"}
    assert "experiment-cleanup.yml" not in BY_NAME  # closing is a tick like any other
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


def uses_azure(job: dict) -> bool:
    """Azure is reached through the job's OIDC token: AZURE_CLIENT_ID in its env (or Azure/login)."""
    return "AZURE_CLIENT_ID" in (job.get("env") or {}) or bool(steps_using(job, "azure/login"))


def comments(job: dict) -> bool:
    """The verbs that write the PR comment: `comment`, and `reconcile` for a leg (not --plan/--promote)."""
    for step in job.get("steps", []):
        words = str(step.get("run", "")).split()
        if words[:1] == [".venv/bin/automation"] and (words[1] == "comment" or (
                words[1] == "reconcile" and "--plan" not in words and "--promote" not in words)):
            return True
    return False


def test_each_job_gets_the_least_it_needs():
    for workflow, name, job in all_jobs():
        where = f"{workflow}:{name}"
        perms = job.get("permissions")
        assert isinstance(perms, dict), f"{where}: permissions must be granted per job"
        writes = {k for k, v in perms.items() if v == "write"}
        assert writes <= {"id-token", "pull-requests"}, where
        assert ("id-token" in writes) == uses_azure(job), f"{where}: id-token: write exactly where Azure is used"
        assert ("pull-requests" in writes) == comments(job), f"{where}: pull-requests: write exactly where it comments"
        # reconcile reads the pull requests and their comments
        assert ("pull-requests" in perms) == ("reconcile" in verbs(job) or comments(job)), where
        assert perms.get("contents") == "read", where


def test_azure_only_for_this_repository_and_only_through_a_refreshing_oidc_credential():
    for workflow, name, job in all_jobs():
        if not uses_azure(job):
            continue
        where = f"{workflow}:{name}"
        # no Azure CLI session: it cannot refresh after its first hour (Azure/azure-cli#28708)
        assert not steps_using(job, "azure/login"), where
        condition = " ".join(str(job.get("if", "")).split())
        if "pull_request" in load(BY_NAME[workflow])[True]:
            assert f"(github.event_name != 'pull_request' || {SAME_REPO})" in condition or \
                "github.event_name == 'workflow_dispatch'" in condition, where
        client = "AZURE_CLIENT_ID_PRODUCTION" if job.get("environment") == "production" else "AZURE_CLIENT_ID"
        for setting in (client, "AZURE_TENANT_ID", "AZURE_SUBSCRIPTION_ID", "AZURE_RESOURCE_GROUP",
                        "AZURE_ML_WORKSPACE"):
            assert f"vars.{setting} != ''" in condition, f"{where}: skipped when {setting} is not set"
        assert job["env"]["AZURE_CLIENT_ID"] == f"${{{{ vars.{client} }}}}", where
        assert job["env"]["AZURE_TENANT_ID"] == "${{ vars.AZURE_TENANT_ID }}", where


def test_the_production_identity_is_only_in_the_production_job():
    holders = []
    for path in WORKFLOWS:
        for line in path.read_text().splitlines():
            if "AZURE_CLIENT_ID_PRODUCTION" in line:
                assert line.strip().startswith(("AZURE_CLIENT_ID:", "&& vars.AZURE_CLIENT_ID_PRODUCTION",
                                                "github.event_name")), line
        for name, job in load(path)["jobs"].items():
            if "AZURE_CLIENT_ID_PRODUCTION" in json.dumps(job):
                holders.append((path.name, name, job.get("environment")))
    assert holders == [("experiment-pr.yml", "promote", "production")]
    promote = jobs_of("experiment-pr.yml")["promote"]
    assert verbs(promote) == ["reconcile"] and "--promote" in promote["steps"][-1]["run"]
    # every other Azure job holds the pull-request identity, in the staging environment
    for workflow, name, job in all_jobs():
        if uses_azure(job) and name != "promote":
            assert job.get("environment") == "staging", f"{workflow}:{name}"


def test_forks_get_validation_and_the_local_flow_without_cloud_access():
    jobs = jobs_of("experiment-pr.yml")
    for name in ("plan", "validate", "preflight", "local-plan", "local"):
        job = jobs[name]
        assert SAME_REPO not in str(job.get("if", "")) and "environment" not in job, name
        assert "id-token" not in job["permissions"], name
    assert verbs(jobs["local"]) == ["reconcile"] and "--backend local" in [s for s in jobs["local"]["steps"] if "run" in s][-1]["run"]
    assert verbs(jobs["validate"]) == ["validate"] and verbs(jobs["plan"]) == ["changed"]


def test_the_reconcile_legs_are_one_per_pull_request_and_experiment():
    jobs = jobs_of("experiment-pr.yml")
    for leg, plan in (("local", "local-plan"), ("azure", "azure-plan")):
        job = jobs[leg]
        assert job["needs"] == plan and job["strategy"]["fail-fast"] is False  # experiments independent
        assert job["strategy"]["matrix"] == f"${{{{ fromJSON(needs.{plan}.outputs.{leg}) }}}}"
        assert job["concurrency"] == {"group": "experiment-pr-${{ matrix.pr }}-${{ matrix.experiment }}",
                                      "cancel-in-progress": False}  # serialized, never cancelled midway
        assert job["timeout-minutes"] <= 120  # a tick is bounded: no job waits on a fine-tune
        assert "--plan" in jobs[plan]["steps"][-1]["run"] and f"--backend {leg}" in jobs[plan]["steps"][-1]["run"]
    with_environment = {n: j["environment"] for n, j in jobs.items() if "environment" in j}
    assert with_environment == {"azure-plan": "staging", "azure": "staging", "promote": "production"}


def test_concurrency_per_pull_request_and_experiment_cancelling_only_validation():
    for workflow, name, job in all_jobs():
        if workflow == "ci.yml":
            continue
        concurrency = job.get("concurrency") or load(BY_NAME[workflow]).get("concurrency")
        assert concurrency, f"{workflow}:{name}: needs a concurrency group"
        cancels = concurrency.get("cancel-in-progress")
        if workflow != "endpoint-sweeper.yml":
            assert re.search(r"github\.event\.pull_request\.number|matrix\.pr|github\.event\.inputs\.(pr|promote)",
                             concurrency["group"]), f"{workflow}:{name}"
        if "strategy" in job:
            assert "matrix.experiment" in concurrency["group"], f"{workflow}:{name}: one group per experiment"
        creates = set(verbs(job)) & {"run", "deploy", "promote", "cleanup", "sweep", "finetune", "register",
                                     "reconcile"}
        if cancels:
            assert name in ("plan", "validate", "preflight") and not creates and "environment" not in job, \
                f"{workflow}:{name}"
        else:
            assert cancels is False, f"{workflow}:{name}: say cancel-in-progress: false explicitly"
    assert jobs_of("experiment-pr.yml")["validate"]["concurrency"]["cancel-in-progress"] is True
