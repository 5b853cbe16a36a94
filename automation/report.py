"""The markdown report of a run: what a reviewer reads in the PR comment and the job summary.

It renders on GitHub as is: the loss curve is a Mermaid chart (no image hosting), long texts
sit in <details>, and the endpoint's key never appears (the record does not hold it).
"""

from __future__ import annotations

import math
from pathlib import Path

from automation.record import RunRecord
from automation.spec import Experiment

MARKER = "<!-- automation:report experiment={name} -->"
MAX_TEXT = 4000
MAX_PLAN = 20_000


def _fmt(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _ppl(loss: float | None) -> float | None:
    return None if loss is None else math.exp(min(loss, 50.0))


def _quote(text: str | None) -> str:
    if not text:
        return "_(none)_"
    # Model text may carry bare carriage returns; the report is a text file, so line ends are one kind.
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if len(text) > MAX_TEXT:
        text = text[:MAX_TEXT] + f"\n\n… (cut: {len(text) - MAX_TEXT} more characters)"
    # A fenced block keeps the model's markdown from rendering as ours; widen the fence if needed.
    fence = "```"
    while fence in text:
        fence += "`"
    return f"{fence}text\n{text}\n{fence}"


def loss_chart(points: list[tuple[int, float]], max_points: int = 60) -> str:
    """A Mermaid xychart of the training loss (down-sampled to keep the comment small)."""
    if not points:
        return "_no training loss was logged_"
    if len(points) > max_points:
        stride = math.ceil(len(points) / max_points)
        points = points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])
    steps = ", ".join(str(s) for s, _ in points)
    losses = ", ".join(f"{v:.4f}" for _, v in points)
    low, high = min(v for _, v in points), max(v for _, v in points)
    pad = max((high - low) * 0.1, 0.01)
    return (
        "```mermaid\nxychart-beta\n"
        '    title "Training loss"\n'
        f'    x-axis "step" [{steps}]\n'
        f'    y-axis "loss" {max(low - pad, 0):.3f} --> {high + pad:.3f}\n'
        f"    line [{losses}]\n```"
    )


def render(record: RunRecord, experiment: Experiment) -> str:
    ft, reg, dep, score = record.finetune, record.registration, record.deploy, record.score
    lines = [MARKER.format(name=record.experiment), f"## Experiment `{record.experiment}` ({record.backend})", ""]
    lines.append(f"**Model** {experiment.model.name} · **data** `{experiment.data.dataset}` "
                 f"({experiment.data.sample_percent:g} % of each split) · **config** `{record.config_hash}`"
                 + (f" · **commit** `{record.sha[:7]}`" if record.sha else ""))
    lines.append("")
    if ft:
        lines += ["### Metrics", "", "| | base model | fine-tuned | change |", "|---|---:|---:|---:|"]
        change = (None if ft.base_eval_loss is None or ft.eval_loss is None else ft.eval_loss - ft.base_eval_loss)
        lines.append(f"| eval loss ({experiment.data.test_split}) | {_fmt(ft.base_eval_loss)} | {_fmt(ft.eval_loss)} | "
                     f"{'–' if change is None else f'{change:+.4f}'} |")
        lines.append(f"| perplexity | {_fmt(_ppl(ft.base_eval_loss), 2)} | {_fmt(_ppl(ft.eval_loss), 2)} | |")
        lines += ["", f"Final train loss {_fmt(ft.train_loss)} · {ft.train_tokens or 0:,} tokens at "
                      f"{_fmt(ft.tokens_per_second, 1)} tokens/s · {_fmt(ft.wall_seconds, 0)} s · job `{ft.job_name}`"
                      + (f" · resumed from `{ft.resumed_from}`" if ft.resumed_from else ""), ""]
        lines += [loss_chart([(p.step, p.loss) for p in ft.train_loss_curve]), ""]
    if reg:
        lines += [f"**Registered** `{reg.model_name}` version {reg.version} (timestamp version `{reg.timestamp_version}`, "
                  f"`{reg.model_uri}`)", ""]
    if dep:
        state = "torn down" if record.torn_down else "live"
        lines += [f"**Endpoint** `{dep.endpoint_name}` ({dep.stage}, {state})", ""]
    if score:
        lines += ["### Sample", "", f"Reply in {score.latency_seconds:.2f} s"
                  + (f" · prompt_id `{score.prompt_id[:12]}`" if score.prompt_id else ""), ""]
        conversation = "\n\n".join(f"[{m['role']}] {m['content']}" for m in score.messages)
        lines += ["**Prompt**", "", _quote(conversation), "", "**Reference answer**", "", _quote(score.reference), "",
                  "**Model reply**", "", _quote(score.reply), ""]
    if record.promote:
        p = record.promote
        lines += [f"**Promoted** version {p.model_version} to `{p.endpoint_name}` (deployment `{p.deployment_name}`"
                  + (f", replacing `{p.previous_deployment}`" if p.previous_deployment else "") + ")", ""]
    if record.stages:
        lines += ["<details><summary>Time per stage</summary>", "", "| stage | seconds | status |", "|---|---:|---|"]
        lines += [f"| {name} | {t.seconds:.1f} | {t.status} |" for name, t in record.stages.items()]
        lines += ["", "</details>", ""]
    if record.plan_file and Path(record.plan_file).is_file():
        plan = Path(record.plan_file).read_text(encoding="utf-8")
        lines += ["<details><summary>Plan: every operation the run makes (dry run)</summary>", "",
                  "```yaml", plan.rstrip()[:MAX_PLAN], "```", "", "</details>", ""]
    lines += ["<details><summary>Parameters</summary>", "", "```yaml", _params_yaml(experiment), "```", "", "</details>"]
    return "\n".join(lines) + "\n"


def _params_yaml(experiment: Experiment) -> str:
    import yaml

    data = experiment.model_dump(mode="json", include={"training", "optimization", "compute", "deployment", "sample"})
    return yaml.safe_dump(data, sort_keys=False).rstrip()
