"""The whole local flow through the CLI: train, register, deploy, score, report, teardown."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from automation.cli import main
from automation.record import RunRecord
from automation.serving import process
from tests.conftest import REPO


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").is_dir() and "Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1][:3]


def test_run_keep_endpoint_list_teardown(workspace, tiny_experiment, capsys):
    assert main(["run", str(tiny_experiment), "--keep-endpoint"]) == 0
    out = capsys.readouterr().out
    record = RunRecord.load(workspace / "runs" / "tiny-local" / "record.json")
    assert "MLflow UI: mlflow ui --backend-store-uri sqlite:///" in out
    assert f"report:   {record.report_file}" in out and "endpoint: " in out

    report = Path(record.report_file).read_text()
    assert "| eval loss (test_sft) |" in report and "```mermaid" in report
    reply = record.score.reply.replace("\r\n", "\n").replace("\r", "\n")  # the report's line ends
    assert reply.strip()[:200] in report
    assert record.registration.version == "1"
    assert set(record.stages) >= {"validate", "data", "finetune", "register", "deploy", "score", "report"}
    key = process.read_key(process.get_endpoint(record.deploy.endpoint_name))
    assert key not in report and key not in out
    request = (workspace / "runs" / "tiny-local" / "sample_score.json").read_text()
    assert '"input_string"' in request and '"params": {}' in request

    assert main(["endpoints", "list"]) == 0
    listing = capsys.readouterr().out
    assert record.deploy.endpoint_name in listing and "live" in listing and "experiment=tiny-local" in listing
    pid = process.get_endpoint(record.deploy.endpoint_name).pid
    assert alive(pid)

    assert main(["teardown", str(tiny_experiment)]) == 0
    assert f"deleted: {record.deploy.endpoint_name}" in capsys.readouterr().out
    assert not alive(pid)
    assert main(["endpoints", "list"]) == 0
    assert "no endpoints" in capsys.readouterr().out
    assert main(["teardown", str(tiny_experiment)]) == 0
    assert "already gone" in capsys.readouterr().out


def test_run_tears_down_by_default_and_rerun_reuses(workspace, tiny_experiment, capsys):
    assert main(["run", str(tiny_experiment)]) == 0
    record = RunRecord.load(workspace / "runs" / "tiny-local" / "record.json")
    assert record.torn_down and process.list_endpoints() == []
    assert "(staging, torn down)" in Path(record.report_file).read_text()
    job = record.finetune.job_name
    assert main(["run", str(tiny_experiment)]) == 0  # same config and commit: job and version reused
    again = RunRecord.load(workspace / "runs" / "tiny-local" / "record.json")
    assert again.finetune.job_name == job and again.registration.version == "1"
    assert process.list_endpoints() == []


def test_promote_blue_green(workspace, tiny_experiment, capsys):
    assert main(["run", str(tiny_experiment)]) == 0
    assert main(["promote", str(tiny_experiment)]) == 0
    first = RunRecord.load(workspace / "runs" / "tiny-local" / "record.json").promote
    live = process.list_endpoints({"production_endpoint": first.endpoint_name})
    assert [e.name for e in live] == [f"{first.endpoint_name}-v1"]
    # A second version (another learning rate = another config) replaces the first after its smoke test.
    assert main(["run", str(tiny_experiment), "--set", "training.learning_rate=0.02"]) == 0
    assert main(["promote", str(tiny_experiment), "--set", "training.learning_rate=0.02"]) == 0
    second = RunRecord.load(workspace / "runs" / "tiny-local" / "record.json").promote
    assert second.model_version == "2" and second.previous_deployment == "v1"
    live = process.list_endpoints({"production_endpoint": first.endpoint_name})
    assert [e.name for e in live] == [f"{first.endpoint_name}-v2"]
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{workspace / 'mlflow.db'}")
    alias = mlflow.MlflowClient().get_model_version_by_alias("tiny-ultrachat-sample", "production")
    assert str(alias.version) == "2"


@pytest.mark.slow
def test_main_job_on_smollm2(workspace, capsys):
    """The README's main job, for real: SmolLM2-135M-Instruct learns from the sample data."""
    assert main(["run", str(REPO / "experiments" / "smollm2-ultrachat-local.yaml")]) == 0
    record = RunRecord.load(workspace / "runs" / "smollm2-ultrachat-local" / "record.json")
    assert record.finetune.eval_loss < record.finetune.base_eval_loss
    assert record.score.reply.strip()
    assert process.list_endpoints() == []
