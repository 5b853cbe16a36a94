"""The workflows: one per trigger, pinned actions, least privilege, a line budget, no unread output,
and clean actionlint and zizmor reports."""

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

GITHUB = REPO / ".github"
WORKFLOWS = sorted((GITHUB / "workflows").glob("*.yml"))
ACTIONS = sorted((GITHUB / "actions").glob("*/action.yml"))
PINNED = re.compile(r"^[\w.-]+/[\w./-]+@[0-9a-f]{40}$")
SELF = re.compile(r"^\$/(\.github/(actions/[\w-]+|workflows/[\w-]+\.yml))$")  # GitHub's self-repository syntax
SETUP = "$/.github/actions/setup"
BUDGET = 250  # lines of YAML in all the workflows together, comments and blank lines not counted
RUNNER = "ubuntu-24.04"  # a pinned image with Python 3.11 in its tool cache (ubuntu-latest moved on)


def tool(name: str) -> str:
    found = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(found).exists():
        pytest.fail(f"{name} is not installed; it comes with the dev extra (make setup)")
    return found


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def triggers(doc: dict) -> dict:
    on = doc.get(True, doc.get("on"))  # PyYAML reads the key `on` as True
    return {on: None} if isinstance(on, str) else on


BY_NAME = {path.name: path for path in WORKFLOWS}


def jobs_of(name: str) -> dict:
    return load(BY_NAME[name])["jobs"]


def all_jobs():
    return [(path.name, name, job) for path in WORKFLOWS for name, job in load(path)["jobs"].items()]


def step_jobs():
    """The jobs that run on a runner (not the calls of a reusable workflow)."""
    return [(w, n, j) for w, n, j in all_jobs() if "steps" in j]


def commands(job: dict) -> list[str]:
    return [" ".join(str(s["run"]).split()) for s in job.get("steps", []) if "run" in s]


def verbs(job: dict) -> list[str]:
    return [c.split()[1] for c in commands(job) if c.startswith(".venv/bin/automation ")]


def steps_using(job: dict, action: str) -> list[dict]:
    return [s for s in job.get("steps", []) if str(s.get("uses", "")).lower().startswith(action.lower() + "@")]


def test_there_are_the_workflows_one_per_trigger():
    assert set(BY_NAME) == {"checks.yml", "loop.yml", "tick.yml", "promote.yml", "endpoint-sweeper.yml", "ci.yml"}
    assert "experiment-pr.yml" not in BY_NAME  # split by trigger (issue 21)


# ---------------------------------------------------------------------------------------------
# Supply chain and the linters


@pytest.mark.parametrize("path", WORKFLOWS + ACTIONS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_actions_are_pinned_to_full_shas(path):
    for ref, comment in re.findall(r"^[ -]*uses:\s*(\S+)(.*)", path.read_text(), re.M):  # not in comments
        if ref.startswith(("./", "$/")):
            match = SELF.match(ref)
            assert match, f"{path.name}: {ref}: a local action or workflow through the self-repository syntax `$/`"
            target = REPO / match[1]
            assert (target / "action.yml").is_file() if "/actions/" in ref else target.is_file(), ref
            continue
        assert PINNED.match(ref), f"{path.name}: {ref} is not pinned to a full commit SHA"
        assert re.search(r"#\s*v\d", comment), f"{path.name}: {ref} needs a version comment"


def test_actionlint_is_clean():
    result = subprocess.run([tool("actionlint"), "-oneline"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_zizmor_is_clean():
    """The workflows and the local composite actions (zizmor collects both from .github)."""
    result = subprocess.run([tool("zizmor"), "--offline", "--format", "plain", ".github"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# Lean: a line budget, every output read, one setup action


def yaml_lines(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip() and not line.strip().startswith("#"))


def test_all_the_workflows_fit_the_line_budget():
    counts = {path.name: yaml_lines(path) for path in WORKFLOWS}
    assert sum(counts.values()) <= BUDGET, f"{sum(counts.values())} lines of YAML > {BUDGET}: {counts}"


NEEDS_OUTPUT = re.compile(r"needs\.([\w-]+)\.outputs\.([\w-]+)")


def needs_of(job: dict) -> list[str]:
    needs = job.get("needs", [])
    return [needs] if isinstance(needs, str) else list(needs)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_every_output_is_read_and_every_read_output_exists(path):
    jobs = load(path)["jobs"]
    read = set()
    for name, job in jobs.items():
        for producer, output in NEEDS_OUTPUT.findall(json.dumps(job)):
            assert producer in needs_of(job), f"{path.name}:{name} reads {producer} without needing it"
            assert output in (jobs[producer].get("outputs") or {}), \
                f"{path.name}:{name} reads needs.{producer}.outputs.{output}, which {producer} does not have"
            read.add((producer, output))
        for output, value in (job.get("outputs") or {}).items():
            step = re.fullmatch(r"\$\{\{\s*steps\.([\w-]+)\.outputs\.[\w-]+\s*\}\}", value)
            assert step and step[1] in [s.get("id") for s in job["steps"]], f"{path.name}:{name}.{output}"
    unread = {(n, o) for n, j in jobs.items() for o in (j.get("outputs") or {})} - read
    assert not unread, f"{path.name}: outputs nobody reads: {sorted(unread)}"


def test_every_job_runs_on_the_pinned_image_and_sets_up_through_the_one_action():
    for workflow, name, job in step_jobs():
        where = f"{workflow}:{name}"
        assert job["runs-on"] == RUNNER, where
        assert 0 < job["timeout-minutes"] <= 120, where
        uses = [str(s.get("uses", "")).split("@")[0] for s in job["steps"]]
        assert uses[:2] == ["actions/checkout", SETUP], f"{where}: checkout, then the setup action: {uses}"
        assert uses.count(SETUP) == 1 and "actions/setup-python" not in uses and "actions/cache" not in uses, where
        kind = job["steps"][1]["with"]["kind"]
        assert kind in ("core", "local", "azure", "all") or kind == "${{ matrix.kind }}", where
        assert not any(c.startswith("make setup") for c in commands(job)), f"{where}: the setup action installs"


# what each verb needs installed at least; reconcile: what its --backend needs, the plan only GitHub
KIND = {"changed": "core", "preflight": "local", "sweep": "azure"}


def kind_of(command: str) -> str:
    words = command.split()
    if words[1] in ("reconcile", "release"):  # a plan reads GitHub only; release defaults to azure
        if "--plan" in words:
            return "core"
        return words[words.index("--backend") + 1] if "--backend" in words else "azure"
    return KIND[words[1]]


def test_each_job_installs_the_kind_its_verbs_need():
    for workflow, name, job in step_jobs():
        if workflow == "ci.yml":
            continue
        kinds = {kind_of(c) for c in commands(job) if c.startswith(".venv/bin/automation ")}
        assert len(kinds) == 1, f"{workflow}:{name}: {kinds}"
        assert job["steps"][1]["with"]["kind"] == kinds.pop(), f"{workflow}:{name}"


# ---------------------------------------------------------------------------------------------
# Triggers and cost


def cron_minutes(workflow: str) -> list[str]:
    return [entry["cron"].split()[0] for entry in triggers(load(BY_NAME[workflow])).get("schedule") or []]


def test_the_triggers():
    checks, loop, tick = (triggers(load(BY_NAME[n])) for n in ("checks.yml", "loop.yml", "tick.yml"))
    assert checks == {"pull_request": {"types": ["opened", "synchronize", "reopened"]}}
    # no paths filter: closing a PR whose last diff no longer touches experiments/ must still prune
    assert loop["pull_request"] == {"types": ["opened", "synchronize", "reopened", "closed"]}
    assert set(loop) == {"pull_request", "workflow_dispatch", "workflow_call"}  # the schedule is tick.yml's
    assert set(loop["workflow_dispatch"]["inputs"]) == {"pr"} and not loop["workflow_dispatch"]["inputs"]["pr"].get(
        "required")
    assert set(tick) == {"schedule", "workflow_dispatch"}
    (call,) = jobs_of("tick.yml").values()
    assert call["uses"] == "$/.github/workflows/loop.yml"
    promote = triggers(load(BY_NAME["promote.yml"]))
    assert promote["push"] == {"branches": ["main"]}  # a merge; the code checks the repository's default branch
    assert set(promote["workflow_dispatch"]["inputs"]) == {"experiment", "pr", "commit", "override", "rollback"}
    assert set(triggers(load(BY_NAME["endpoint-sweeper.yml"]))) == {"schedule", "workflow_dispatch"}
    assert "make test" in BY_NAME["ci.yml"].read_text()


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_schedules_run_off_the_hour(path):
    """GitHub names the start of every hour as the time scheduled runs are delayed or dropped."""
    for minute in cron_minutes(path.name):
        values = set()
        for part in minute.split(","):
            assert not part.startswith("*") and "/" not in part, f"{path.name}: {minute} fires at minute 0"
            low, _, high = part.partition("-")
            values |= set(range(int(low), int(high or low) + 1))
        assert 0 not in values and values <= set(range(60)), f"{path.name}: {minute}"


def test_the_tick_runs_every_ten_minutes_and_the_sweeper_hourly():
    (minutes,) = cron_minutes("tick.yml")
    ticks = sorted(int(m) for m in minutes.split(","))
    assert len(ticks) == 6 and {b - a for a, b in zip(ticks, ticks[1:], strict=False)} == {10}
    (sweep,) = cron_minutes("endpoint-sweeper.yml")
    assert sweep.isdigit()


def test_the_first_annotation_needs_one_runner_pickup():
    """checks.yml: one job, needing nothing, that plans and validates the changed experiments."""
    (validate,) = jobs_of("checks.yml").values()
    assert "needs" not in validate and "if" not in validate
    assert commands(validate) == [".venv/bin/automation changed --validate --no-teardown"]
    assert validate["steps"][0]["with"]["fetch-depth"] == 0  # both ends of the pull request, for the diff
    assert load(BY_NAME["checks.yml"])["concurrency"] == {"group": "checks-${{ github.event.pull_request.number }}",
                                                          "cancel-in-progress": True}


# ---------------------------------------------------------------------------------------------
# Security


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_least_privilege(path):
    workflow = load(path)
    assert workflow.get("permissions") == {}, f"{path.name}: top-level permissions must be {{}}"
    assert "pull_request_target" not in triggers(workflow) and "workflow_run" not in triggers(workflow)
    for name, job in workflow["jobs"].items():
        assert isinstance(job.get("permissions"), dict), f"{path.name}:{name}: permissions granted per job"
        for step in steps_using(job, "actions/checkout"):
            assert step.get("with", {}).get("persist-credentials") is False, f"{path.name}:{name}"


UNTRUSTED = re.compile(r"github\.(head_ref|event\.(pull_request\.(title|body|head\.(ref|label))|"
                       r"head_commit|commits|comment|review|issue))")
THIN_RUN = re.compile(r"^\.venv/bin/automation [a-z]+( [^\n;&|`$]*(\"\$[A-Z_]+\"[^\n;&|`$]*)*)?$")


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_steps_are_thin_and_scripts_hold_no_expressions(path):
    for name, job in load(path)["jobs"].items():
        for step in job.get("steps", []):
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
        for step in job.get("steps", []):
            outside_env = {k: v for k, v in step.items() if k != "env"}
            assert not UNTRUSTED.search(json.dumps(outside_env)), f"{path.name}:{name}"
        assert not UNTRUSTED.search(json.dumps({k: v for k, v in job.items() if k not in ("steps", "env")}))
    assert "secrets." not in path.read_text(), f"{path.name}: no stored secrets (OIDC, and github.token)"


def uses_azure(job: dict) -> bool:
    """Azure is reached with the job's OIDC token: a verb on the azure backend, the production job's
    release (or Azure/login)."""
    return any("--backend azure" in c or (c.split()[1:2] == ["release"] and "--plan" not in c)
               for c in commands(job)) or bool(steps_using(job, "azure/login"))


def comments(job: dict) -> bool:
    """A reconcile leg writes the experiment's PR comment; release its promotion comment."""
    return any(c.split()[1:2] in (["reconcile"], ["release"]) and "--plan" not in c
               for c in commands(job) if c.startswith(".venv/bin/automation "))


def test_each_job_gets_the_least_it_needs():
    for workflow, name, job in step_jobs():
        where = f"{workflow}:{name}"
        perms = job["permissions"]
        writes = {k for k, v in perms.items() if v == "write"}
        assert writes <= {"id-token", "pull-requests", "actions"}, where
        assert ("id-token" in writes) == uses_azure(job), f"{where}: id-token: write exactly where Azure is used"
        assert ("pull-requests" in writes) == comments(job), f"{where}: pull-requests: write exactly where it comments"
        reads_prs = {"reconcile", "release"} & set(verbs(job)) or any("--self-workflow" in c for c in commands(job))
        assert ("pull-requests" in perms) == bool(reads_prs), f"{where}: reconcile, release and the sweeper read PRs"
        # tick.yml and the sweeper are enabled or disabled through the Actions API
        assert ("actions" in writes) == any("--tick-workflow tick.yml" in c or "--self-workflow" in c
                                            for c in commands(job)), where
        assert perms.get("contents") == "read" and set(perms) <= {"contents", "pull-requests", "id-token", "actions"}


def test_the_tick_grants_the_loop_exactly_what_its_jobs_ask_for():
    (call,) = jobs_of("tick.yml").values()
    wanted: dict[str, str] = {}
    for job in jobs_of("loop.yml").values():
        for scope, level in job["permissions"].items():
            wanted[scope] = "write" if "write" in (level, wanted.get(scope)) else level
    assert call["permissions"] == wanted
    assert "secrets" not in call and "with" not in call


def test_azure_only_through_a_refreshing_oidc_credential_in_its_environment():
    for workflow, name, job in step_jobs():
        if not uses_azure(job):
            continue
        where = f"{workflow}:{name}"
        # no Azure CLI session: it cannot refresh after its first hour (Azure/azure-cli#28708)
        assert not steps_using(job, "azure/login"), where
        # the settings arrive as `vars` (in a job with an environment: that environment's, which win)
        env = {**(load(BY_NAME[workflow]).get("env") or {}), **(job.get("env") or {})}
        assert env["AUTOMATION_VARS"] == "${{ toJSON(vars) }}", where
        assert not [k for k in env if k.startswith("AZURE_")], f"{where}: one object, not variable by variable"
        assert job.get("environment") in ("staging", "production"), where


def test_the_production_identity_is_only_in_the_production_job():
    """Production's identity, workspace and registry are variables of the production environment:
    only a job in that environment sees them. No workflow names a production variable by hand."""
    for path in WORKFLOWS:
        assert "AZURE_CLIENT_ID_PRODUCTION" not in path.read_text(), path.name
    jobs = jobs_of("promote.yml")
    assert set(jobs) == {"plan", "promote"}
    assert "environment" not in jobs["plan"] and "id-token" not in jobs["plan"]["permissions"]
    assert commands(jobs["plan"]) == [".venv/bin/automation release --plan"]
    promote = jobs["promote"]
    assert needs_of(promote) == ["plan"] and promote["if"] == "needs.plan.outputs.promote == 'true'"
    assert commands(promote) == [".venv/bin/automation release"]
    assert promote["permissions"]["actions"] == "read"  # to read the environment's protection, and refuse
    # every other Azure job holds the pull-request identity, in the staging environment
    for workflow, name, job in step_jobs():
        if uses_azure(job) and name != "promote":
            assert job.get("environment") == "staging", f"{workflow}:{name}"
    environments = {(w, n): j["environment"] for w, n, j in step_jobs() if "environment" in j}
    assert environments == {("loop.yml", "azure"): "staging", ("promote.yml", "promote"): "production",
                            ("endpoint-sweeper.yml", "azure"): "staging"}


def test_forks_and_dependabot_get_checks_preflight_and_the_local_flow_without_a_red_check():
    """A fork's or Dependabot's pull request runs with a read-only token and no OIDC token (GitHub
    downgrades every write permission to read, id-token included). The jobs that run for it ask
    for no environment and no id-token; the plan gives them no Azure leg (a notice), so the one
    job that needs OIDC is skipped, not failed; and a plan that cannot disable tick.yml only warns."""
    jobs = jobs_of("loop.yml")
    for name in ("plan", "preflight", "local"):
        assert "environment" not in jobs[name] and "id-token" not in jobs[name]["permissions"], name
    (validate,) = jobs_of("checks.yml").values()
    assert validate["permissions"] == {"contents": "read"} and "environment" not in validate
    assert "needs.plan.outputs.any_azure == 'true'" in jobs["azure"]["if"]
    assert commands(jobs["plan"]) == [".venv/bin/automation reconcile --plan --tick-workflow tick.yml"]


# ---------------------------------------------------------------------------------------------
# The loop: one leg per (PR, experiment), the preflight gating the Azure legs


def test_the_legs_are_one_per_pull_request_and_experiment():
    jobs = jobs_of("loop.yml")
    assert set(jobs) == {"plan", "preflight", "local", "azure"}
    for leg in ("preflight", "local", "azure"):
        job = jobs[leg]
        assert job["strategy"] == {"fail-fast": False,  # experiments are independent
                                   "matrix": f"${{{{ fromJSON(needs.plan.outputs.{leg}) }}}}"}, leg
        assert f"needs.plan.outputs.any_{leg} == 'true'" in job["if"], leg
        assert job["concurrency"]["group"] == f"loop-${{{{ matrix.pr }}}}-${{{{ matrix.experiment }}}}-{leg}", leg
    assert commands(jobs["preflight"]) == ['.venv/bin/automation preflight "$FILE" --pr "$PR"']
    assert commands(jobs["local"]) == ['.venv/bin/automation reconcile --backend local --pr "$PR" '
                                       '--experiment "$EXPERIMENT"']
    # the run's record outlives the runner: the artifact the comment names, replaced on a re-run
    (upload,) = steps_using(jobs["local"], "actions/upload-artifact")
    assert upload["with"]["overwrite"] is True and upload["if"] == "success() || failure()"
    assert upload["with"]["name"] == jobs["local"]["steps"][2]["env"]["AUTOMATION_ARTIFACT_NAME"]


def test_a_newer_push_cancels_a_superseded_local_leg_and_never_an_azure_step():
    jobs = jobs_of("loop.yml")
    assert jobs["preflight"]["concurrency"]["cancel-in-progress"] is True
    # a pull_request event (a push, a reopen, the close) supersedes; a dispatch's leg waits its turn
    assert jobs["local"]["concurrency"]["cancel-in-progress"] == "${{ github.event_name == 'pull_request' }}"
    assert jobs["azure"]["concurrency"]["cancel-in-progress"] is False  # serialized, never cancelled midway
    assert "concurrency" not in jobs["plan"] and "concurrency" not in load(BY_NAME["loop.yml"])


def test_the_preflight_gates_the_azure_submission():
    jobs = jobs_of("loop.yml")
    azure = jobs["azure"]
    assert needs_of(azure) == ["plan", "preflight"]
    condition = azure["if"]
    # runs after a failed preflight (to say so), not after one a newer push cancelled (that run takes it)
    assert condition.startswith("!cancelled() && ") and "needs.preflight.result != 'cancelled'" in condition
    (step,) = [s for s in azure["steps"] if "run" in s]
    assert step["env"]["PREFLIGHT"] == "${{ needs.preflight.result }}"
    assert commands(azure) == ['.venv/bin/automation reconcile --backend azure --legs "$LEGS" --gate "$PREFLIGHT" '
                               '--tick-workflow tick.yml --sweeper-workflow endpoint-sweeper.yml']
    assert step["env"]["LEGS"] == "${{ matrix.legs }}"  # a tick's entry holds all its azure legs
    assert "pull-requests" not in jobs["preflight"]["permissions"]  # never writes the loop's status


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_every_job_that_changes_something_is_in_a_concurrency_group(path):
    doc = load(path)
    for name, job in doc["jobs"].items():
        if path.name in ("ci.yml", "checks.yml", "tick.yml") or name == "plan":
            continue
        concurrency = job.get("concurrency") or doc.get("concurrency")
        assert concurrency and "cancel-in-progress" in concurrency, f"{path.name}:{name}"
        if "strategy" in job:
            assert "matrix.pr" in concurrency["group"] and "matrix.experiment" in concurrency["group"], name
