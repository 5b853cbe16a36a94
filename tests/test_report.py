"""The markdown report renders what a reviewer needs, and nothing secret."""

from __future__ import annotations

from automation.record import (
    DeployPart,
    FinetunePart,
    LossPoint,
    RegisterPart,
    RunRecord,
    ScorePart,
    StageTime,
)
from automation.report import MARKER, loss_chart, render
from automation.spec import load_experiment
from tests.conftest import REPO


def full_record() -> RunRecord:
    return RunRecord(
        experiment="smollm2-ultrachat-local", experiment_file="experiments/smollm2-ultrachat-local.yaml",
        backend="local", config_hash="abc1234", sha="0123456789abcdef",
        stages={"finetune": StageTime(started_at="2026-01-01T00:00:00Z", seconds=12.5)},
        finetune=FinetunePart(job_name="job-1", run_id="r1", base_eval_loss=2.5, eval_loss=2.25, train_loss=2.3,
                              train_loss_curve=[LossPoint(step=i, loss=3 - i / 100) for i in range(1, 201)],
                              train_tokens=12345, tokens_per_second=150.0, wall_seconds=90),
        registration=RegisterPart(model_name="SmolLM2-135M-Instruct-ultrachat-sample", version="3",
                                  timestamp_version="1795000000", model_uri="models:/x/3"),
        deploy=DeployPart(endpoint_name="sdev-smollm2-abc", deployment_name="default", url="http://127.0.0.1:1"),
        score=ScorePart(request_file="sample_score.json", messages=[{"role": "user", "content": "What is ```yaml?"}],
                        reference="A format.", reply="Line one\rline two.\r\n" + "It is a data format. " * 400,
                        latency_seconds=1.234),
    )


def test_report_has_metrics_curve_model_endpoint_and_sample():
    exp = load_experiment(REPO / "experiments" / "smollm2-ultrachat-local.yaml")
    text = render(full_record(), exp)
    assert text.startswith(MARKER.format(name="smollm2-ultrachat-local"))
    assert "| eval loss (test_sft) | 2.5000 | 2.2500 | -0.2500 |" in text
    assert "| perplexity | 12.18 | 9.49 | |" in text
    assert "```mermaid\nxychart-beta" in text
    assert "`SmolLM2-135M-Instruct-ultrachat-sample` version 3 (timestamp version `1795000000`" in text
    assert "`sdev-smollm2-abc` (staging, live)" in text
    assert "Reply in 1.23 s" in text and "A format." in text
    assert "(cut: " in text, "long replies are cut"
    assert "Line one\nline two.\nIt is" in text and "\r" not in text
    assert "````text\n[user] What is ```yaml?\n````" in text, "fences are widened around model text"
    assert "| finetune | 12.5 | ok |" in text
    assert "learning_rate: 0.001" in text


def test_loss_chart_downsamples_and_keeps_the_last_point():
    points = [(i, 1.0 / i) for i in range(1, 1001)]
    chart = loss_chart(points, max_points=50)
    steps = chart.split('x-axis "step" [')[1].split("]")[0].split(", ")
    assert len(steps) <= 51 and steps[0] == "1" and steps[-1] == "1000"
    assert loss_chart([]) == "_no training loss was logged_"
