"""Each workflow job kind's verbs, run in a venv installed exactly as that job installs it
(`make setup-core`, `make setup-azure`, `make setup-local`: tests/job_venvs.py), with every import
audited. A verb that imports a package its job does not install fails here, not on a runner after
the fine-tune, the endpoint and the scoring have already been paid for.

Which job runs which verbs (.github/workflows/): core (plan, validate, local-plan): changed,
validate, reconcile --plan --backend local; local (preflight, local): run --dry-run, preflight,
report, comment, reconcile --backend local; azure (azure-plan, azure, promote, sweeper):
reconcile [--plan] --backend azure [--promote], sweep --backend azure. The core verbs are in
tests/test_installs.py, the local leg's reconcile in the workflow replay
(tests/test_workflow_replay.py), the Azure verbs against a stand-in of Azure in
tests/test_azure_wire.py; here: what runs offline in the azure and local venvs, and the venvs
themselves.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import job_venvs
from tests.conftest import REPO
from tests.fake_github import WRITE_TOKEN, FakeGitHub
from tests.job_venvs import (
    KINDS,
    audit_env,
    audit_problems,
    clean_env,
    installed_names,
    job_venv,
    normalized,
)
from tests.test_installs import uv

REPO_NAME = "acme-ml/chat-finetune"
azure_venv, local_venv = job_venvs.azure_venv, job_venvs.local_venv  # fixtures


def verb(venv: Path, record: Path, *args: str, cwd: Path, timeout: int = 300, **env: str):
    """`automation ARGS` from the venv's bin, as a workflow step runs it, with its imports audited."""
    return subprocess.run([str(venv / "bin" / "automation"), *args], cwd=cwd, capture_output=True, text=True,
                          env=audit_env(clean_env(**env), record), timeout=timeout)


def ok(done: subprocess.CompletedProcess) -> bool:
    return done.returncode == 0


def shown(done: subprocess.CompletedProcess) -> str:
    return f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


@pytest.mark.parametrize("kind", KINDS)
def test_each_job_venv_holds_exactly_its_locked_packages(kind):
    venv = job_venv(kind)
    listed = subprocess.run([uv(), "pip", "list", "--format", "json", "--python", str(venv / "bin" / "python")],
                            check=True, capture_output=True, text=True).stdout
    names = {normalized(p["name"]) for p in json.loads(listed)}
    assert names == installed_names(kind), (names ^ installed_names(kind))
    assert (kind == "local") == ("torch" in names) and (kind == "core") == ("datasets" not in names)


def azure_experiment(folder: Path) -> Path:
    """The azure reference experiment, its data pointed at the bundled sample (no hub here)."""
    text = (REPO / "experiments" / "phi3-mini-ultrachat.yaml").read_text()
    path = folder / "experiments" / "phi3-mini-ultrachat.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.replace("HuggingFaceH4/ultrachat_200k", str(REPO / "data" / "ultrachat-sample")))
    return path


# Every module of the project (the Azure jobs import them lazily, verb by verb), then what the
# evaluate stage does with the endpoints' replies: the figures, the policy, the tracking metrics.
AZURE_EVALUATION = """
import importlib, json, pkgutil, sys
from pathlib import Path

import automation
from automation.evaluation import (check_policy, endpoint_replies, held_out_prompts, mlflow_metrics,
                                   model_eval)
from automation.record import EvaluationPart
from automation.spec import PromotionSpec

for module in pkgutil.walk_packages(automation.__path__, "automation."):
    if not module.name.endswith("__main__"):
        importlib.import_module(module.name)

prompts = held_out_prompts(Path(sys.argv[1]), 6, 42)
answers = {"candidate": lambda request: {"output": ["Knead the dough, then let it rise; bake it at 220 degrees."]},
           "production": lambda request: {"output": "I am not sure."}}
evaluation = EvaluationPart(test_split="test_sft", prompt_split="test_gen", max_new_tokens=32, prompts=prompts)
for label, invoke in answers.items():
    replies = endpoint_replies(invoke, prompts, max_new_tokens=32, label=label, kept=Path("replies.json"), key=label)
    evaluation.models[label] = model_eval(label, prompts, replies, None)
result = check_policy(evaluation, PromotionSpec())
print(json.dumps({"rouge_l": {k: m.rouge_l for k, m in evaluation.models.items()},
                  "passed": result.passed, "metrics": sorted(mlflow_metrics(evaluation))}))
"""


def test_azure_jobs_run_with_only_the_azure_extra(azure_venv, tmp_path):
    """What an Azure job does without the cloud, in the venv `make setup-azure` installs: validate
    and plan the experiment, prepare its data, evaluate replies as the endpoints would give them,
    report. Nothing imports a package outside the azure extra (torch, torchmetrics, transformers,
    the full MLflow...)."""
    record = tmp_path / "imports.jsonl"
    experiment = azure_experiment(tmp_path)
    home = {"AUTOMATION_HOME": str(tmp_path / "ws"), "HF_HUB_OFFLINE": "1"}
    runs = [verb(azure_venv, record, "validate", str(experiment), cwd=tmp_path),
            verb(azure_venv, record, "run", str(experiment), "--dry-run", "--pr", "7", cwd=tmp_path),
            verb(azure_venv, record, "data", str(experiment), cwd=tmp_path, **home),
            verb(azure_venv, record, "report", str(experiment), "--out", "report.md", cwd=tmp_path, **home)]
    split = tmp_path / "ws" / "runs" / "phi3-mini-ultrachat"
    splits = list(split.rglob("test_gen.jsonl"))
    assert splits, f"the data stage wrote no test_gen.jsonl under {split}\n{shown(runs[2])}"
    evaluate = subprocess.run([str(azure_venv / "bin" / "python"), "-c", AZURE_EVALUATION, str(splits[0])],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300,
                              env=audit_env(clean_env(**home), record))
    assert audit_problems(record, "azure") == []
    for done in [*runs, evaluate]:
        assert ok(done), shown(done)
    assert "ok: " in runs[0].stdout and "chat_completion_pipeline" in runs[1].stdout
    figures = json.loads(evaluate.stdout.strip().splitlines()[-1])
    assert 0 < figures["rouge_l"]["candidate"] < 1 and figures["rouge_l"]["production"] < 0.2
    assert "delta_rouge_l" in figures["metrics"]
    assert (tmp_path / "report.md").read_text().startswith("<!-- automation:report")


def test_the_audit_catches_an_import_outside_the_extra(azure_venv, tmp_path):
    """The audit itself: the project's code importing what the job does not install is named
    with its file and line, whether the import failed (azure venv) or not."""
    record = tmp_path / "imports.jsonl"
    code = ("import automation.evaluation as e\n"
            "try:\n    exec(compile('import torchmetrics', e.__file__, 'exec'))\n"
            "except ImportError:\n    pass\n")
    done = subprocess.run([str(azure_venv / "bin" / "python"), "-c", code], capture_output=True, text=True,
                          env=audit_env(clean_env(), record), timeout=120)
    assert ok(done), shown(done)
    (problem,) = audit_problems(record, "azure")
    assert "automation/evaluation.py:1 imports torchmetrics" in problem and "setup-azure" in problem
    dev = tmp_path / "dev.jsonl"
    subprocess.run([sys.executable, "-c", "import automation, hypothesis"], check=True, timeout=120,
                   env=audit_env(clean_env(), dev))
    assert any("imported hypothesis" in p for p in audit_problems(dev, "azure")), "found in a venv that has it"


def test_the_preflight_job_runs_with_only_the_local_extra(local_venv, tiny_model_dir, tmp_path):
    """The preflight job's steps in the venv `make setup-local` installs: the plan, data and two
    training steps on the stand-in model, the report, the PR comment."""
    record = tmp_path / "imports.jsonl"
    experiment = azure_experiment(tmp_path)
    env = {"AUTOMATION_HOME": str(tmp_path / "ws"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "GITHUB_REPOSITORY": REPO_NAME}
    with FakeGitHub() as github:
        env.update(GITHUB_TOKEN=WRITE_TOKEN, GITHUB_API_URL=github.url)
        runs = [verb(local_venv, record, "run", str(experiment), "--dry-run", "--pr", "5", cwd=tmp_path, **env),
                verb(local_venv, record, "preflight", str(experiment), "--pr", "5", "--steps", "2",
                     "--stand-in", str(tiny_model_dir), cwd=tmp_path, timeout=600, **env),
                verb(local_venv, record, "report", str(experiment), "--pr", "5", cwd=tmp_path, **env),
                verb(local_venv, record, "comment", "phi3-mini-ultrachat", "--pr", "5", cwd=tmp_path, **env)]
        assert audit_problems(record, "local") == []
        for done in runs:
            assert ok(done), shown(done)
        assert "preflight ok: 2 training step(s)" in runs[1].stdout
        (comment,) = github.issue_comments(REPO_NAME, 5)
        assert comment["body"].startswith("<!-- automation:report experiment=phi3-mini-ultrachat -->")


@pytest.mark.skipif(not shutil.which("make"), reason="make is not installed")
def test_job_venvs_are_reused_while_the_lock_holds(tmp_path):
    """A second session finds the venv built, without running make again."""
    first = job_venv("core")
    stamp = (first / ".installed-core").stat().st_mtime_ns
    assert job_venv("core") == first and (first / ".installed-core").stat().st_mtime_ns == stamp
    assert os.access(first / "bin" / "automation", os.X_OK) and (first / "bin" / "python").exists()
