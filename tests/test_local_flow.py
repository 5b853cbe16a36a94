"""The whole local flow through the CLI: train, register, deploy, score, report, teardown."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from automation.cli import main
from automation.record import RunRecord
from automation.report import prose
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
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    assert f"MLflow UI:  {mlflow_bin} ui --backend-store-uri sqlite:///" in out, "the venv's mlflow, runnable as printed"
    assert f"report:     {record.report_file}" in out and "endpoint:   " in out
    assert "registered: tiny-ultrachat-sample version 1" in out and "total:      " in out
    assert "reply:      " in out and "{'loss'" not in out, "a summary, no raw dicts"

    report = Path(record.report_file).read_text()
    assert "### Evaluation" in report and "```mermaid" in report and "Promotion policy" in report
    assert prose(record.score.reply) in report, "the reply, quoted as the report quotes model text"
    assert prose(record.score.reply).startswith("> "), "a markdown quote (tests/test_report.py checks its HTML)"
    # The run's record, gathered in one folder for the workflow to upload, opens in MLflow from there.
    bundle = Path(record.bundle_dir)
    assert {"record.json", "report.md", "sample_score.json", "tiny-local.yaml", "mlflow.db"} <= {
        p.name for p in bundle.iterdir()}
    assert not list(bundle.rglob("*.safetensors")), "no weights unless asked"
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{bundle / 'mlflow.db'}")
    os.chdir(bundle)  # artifact paths in the copy are relative to the folder
    files = {a.path for a in client.list_artifacts(record.finetune.run_id, "run")}
    assert files == {"run/report.md", "run/sample_score.json", "run/tiny-local.yaml"}
    previewed = Path(client.download_artifacts(record.finetune.run_id, "run/report.md", str(workspace.parent)))
    text = previewed.read_text()
    assert "### Evaluation" in text and "<sub>" not in text and "<!--" not in text and "```mermaid" not in text, \
        "the report as MLflow previews it: plain markdown"
    local = client.download_artifacts(record.finetune.run_id, "evaluation/evaluation.json", str(workspace.parent))
    assert json.loads(Path(local).read_text())["prompt_split"] == "test_gen"
    logged = client.get_logged_model(record.finetune.model_uri.removeprefix("models:/"))
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [{"name": "tiny-ultrachat-sample", "version": "1"}], \
        "the logged model is linked to its registered version"
    os.chdir(workspace.parent)
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
    # The run warmed a standby before its fine-tune (prepare_deploy) and the deploy claimed it.
    assert process.get_endpoint(record.deploy.endpoint_name).standby_id
    assert process.get_standby() is None or not process.get_standby().alive

    assert main(["teardown", str(tiny_experiment)]) == 0
    assert f"deleted: {record.deploy.endpoint_name}" in capsys.readouterr().out
    assert not alive(pid)
    assert main(["endpoints", "list"]) == 0
    assert "no endpoints" in capsys.readouterr().out
    assert main(["teardown", str(tiny_experiment)]) == 0
    assert "already gone" in capsys.readouterr().out


def test_run_tears_down_by_default_and_rerun_reuses(workspace, tiny_experiment, capsys, caplog):
    caplog.set_level("INFO", logger="automation.serving.process")
    assert main(["run", str(tiny_experiment)]) == 0
    record = RunRecord.load(workspace / "runs" / "tiny-local" / "record.json")
    assert record.torn_down and process.list_endpoints() == []
    assert "(staging, torn down)" in Path(record.report_file).read_text()
    job = record.finetune.job_name
    assert main(["run", str(tiny_experiment)]) == 0  # same config and commit: job and version reused
    again = RunRecord.load(workspace / "runs" / "tiny-local" / "record.json")
    assert again.finetune.job_name == job and again.registration.version == "1"
    assert process.list_endpoints() == []
    # the rerun's deploy claimed a standby too, though its record holds the first run's torn-down deploy
    claims = [r.getMessage() for r in caplog.records if ": warm standby (pid" in r.getMessage()]
    assert len(claims) == 2 and all("claimed for" in claim for claim in claims), claims


def test_promote_blue_green(workspace, tiny_experiment, capsys):
    import yaml

    body = yaml.safe_load(tiny_experiment.read_text())
    body["promotion"] = {"max_eval_loss_increase": -100.0, "min_rouge_l_delta": None}  # cannot pass
    tiny_experiment.write_text(yaml.safe_dump(body))
    assert main(["run", str(tiny_experiment)]) == 0
    capsys.readouterr()
    assert main(["promote", str(tiny_experiment)]) == 1, "the policy is checked before anything moves"
    err = capsys.readouterr().err
    assert "the promotion policy is not met against the base model:" in err
    assert "eval loss change vs base model: -" in err and "(needs ≤ -100; promotion.max_eval_loss_increase)" in err
    assert process.list_endpoints() == []
    assert main(["promote", str(tiny_experiment), "--override-policy", " "]) == 2, "an override needs a reason"
    assert main(["promote", str(tiny_experiment), "--override-policy", "first model of this experiment"]) == 0
    assert "promotion policy overridden: first model of this experiment" in capsys.readouterr().out
    first = RunRecord.load(workspace / "runs" / "tiny-local" / "record.json").promote
    assert first.policy_passed is False and first.policy_override == "first model of this experiment"
    live = process.list_endpoints({"production_endpoint": first.endpoint_name})
    assert [e.name for e in live] == [f"{first.endpoint_name}-v1"]
    # A second version (another learning rate = another config) replaces the first after its smoke test.
    body["promotion"] = {"max_eval_loss_increase": None, "min_rouge_l_delta": None}
    tiny_experiment.write_text(yaml.safe_dump(body))
    assert main(["run", str(tiny_experiment), "--set", "training.learning_rate=0.02"]) == 0
    # The second candidate was evaluated against the production model (v1) on the same data and prompts.
    evaluation = RunRecord.load(workspace / "runs" / "tiny-local" / "record.json").finetune.evaluation
    assert evaluation.production_version == "1" and set(evaluation.models) == {"base", "candidate", "production"}
    production = evaluation.models["production"]
    assert production.model == "models:/tiny-ultrachat-sample/1" and len(production.replies) == 3
    assert production.eval_loss is not None and production.eval_loss != evaluation.models["base"].eval_loss
    report = Path(RunRecord.load(workspace / "runs" / "tiny-local" / "record.json").report_file).read_text()
    assert "| | base model | fine-tuned | production v1 | change |" in report
    assert main(["promote", str(tiny_experiment), "--set", "training.learning_rate=0.02"]) == 0
    second = RunRecord.load(workspace / "runs" / "tiny-local" / "record.json").promote
    assert second.model_version == "2" and second.previous_deployment == "v1"
    # evaluated in place: v2 beside v1 on the production endpoint, before the traffic moved
    assert second.evaluation.production_version == "1" and len(second.evaluation.models["production"].replies) == 3
    assert any("evaluated in place" in note for note in second.evaluation.notes)
    live = process.list_endpoints({"production_endpoint": first.endpoint_name})
    assert [e.name for e in live] == [f"{first.endpoint_name}-v1", f"{first.endpoint_name}-v2"]  # v1 kept
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{workspace / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    alias = client.get_model_version_by_alias("tiny-ultrachat-sample", "production")
    assert str(alias.version) == "2" and alias.tags["promotion_policy"] == "passed"
    # one step back: v1 takes the traffic again and the alias follows
    assert main(["rollback", str(tiny_experiment), "--set", "training.learning_rate=0.02"]) == 0
    assert "serves v1 (version 1) again" in capsys.readouterr().out
    assert str(client.get_model_version_by_alias("tiny-ultrachat-sample", "production").version) == "1"
    from automation.backends.local.backend import LocalBackend

    assert LocalBackend().serving_model(first.endpoint_name).version == "1"
    first_version = client.get_model_version("tiny-ultrachat-sample", "1")
    assert first_version.tags["promotion_policy"] == "overridden"
    assert first_version.tags["promotion_override"] == "first model of this experiment"


@pytest.mark.slow
def test_main_job_on_smollm2(workspace, capsys):
    """The README's main job, for real: SmolLM2-135M-Instruct learns from the sample data."""
    assert main(["run", str(REPO / "experiments" / "smollm2-ultrachat-local.yaml")]) == 0
    record = RunRecord.load(workspace / "runs" / "smollm2-ultrachat-local" / "record.json")
    assert record.finetune.eval_loss < record.finetune.base_eval_loss
    assert record.score.reply.strip()
    assert process.list_endpoints() == []
