"""The markdown report of a run: what a reviewer reads in the PR comment and the job summary.

Written for GitHub's 800 px comment column, light and dark themes:

- the evaluation first (base / fine-tuned / production on the same test split and held-out
  prompts, the change against the baseline) and whether the promotion policy passes;
- model text keeps its own markdown (code blocks, lists, bold) inside a markdown blockquote that it
  cannot break out of (`prose`: raw HTML and @mentions outside code escaped, a cut code block
  closed), or sits in a table cell with markdown's specials escaped; long texts sit in `<details>`;
- the loss curve is a Mermaid `xychart-beta` with explicit colours that read on both themes,
  over the whole step range, ending at the last step;
- the parameters list only the fields that apply to the run's backend;
- the body stays well under GitHub's 65,536 characters: each text gets a share of a fixed budget.

The endpoint's key never appears (the record does not hold it).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from pathlib import Path

from automation.evaluation import MODEL_LABELS, against, baseline_of, check_policy, delta
from automation.record import EvaluationPart, RunRecord
from automation.spec import Experiment

MARKER = "<!-- automation:report experiment={name} -->"
MARKER_PATTERN = re.compile(r"<!-- automation:report experiment=(?P<name>[a-z][a-z0-9-]*) -->")
MAX_TEXT = 1500  # characters of one model text in the report
TEXT_BUDGET = 36_000  # characters for all the per-prompt texts together
PREVIEW = 90  # characters of a reply in the side-by-side table (fewer when there are many prompts)
TABLE_BUDGET = 18_000  # characters of all the previews together
DETAILED_PROMPTS = 16  # prompts whose whole texts are shown; the rest are in the run's evaluation.json
MAX_PLAN = 20_000
# The chart is an opaque light card with its own colours, the same in GitHub's light and dark
# themes: no one text colour reaches 4.5:1 on both white and GitHub's dark #0d1117, so the chart
# brings its background. Text 7.6:1 on it; the two lines (training blue, eval orange) 5.2:1 and 5.0:1 (3:1 is the
# WCAG minimum for graphics; tests/test_report.py computes each ratio).
BACKGROUND, TEXT_COLOUR = "#ffffff", "#4d555e"
LINE_COLOUR, EVAL_COLOUR = "#0969da", "#bc4c00"
CHART_STYLE = {"xyChart": {
    "backgroundColor": BACKGROUND, "plotColorPalette": f"{LINE_COLOUR}, {EVAL_COLOUR}", "titleColor": TEXT_COLOUR,
    "xAxisLabelColor": TEXT_COLOUR, "xAxisTitleColor": TEXT_COLOUR, "xAxisTickColor": TEXT_COLOUR,
    "xAxisLineColor": TEXT_COLOUR, "yAxisLabelColor": TEXT_COLOUR, "yAxisTitleColor": TEXT_COLOUR,
    "yAxisTickColor": TEXT_COLOUR, "yAxisLineColor": TEXT_COLOUR}}
# Experiment fields that only one backend reads (the others apply to both).
AZURE_ONLY = {
    "compute": {"cluster", "size", "nodes", "gpus_per_node", "create_if_missing", "serverless", "preprocess_size",
                "shm_size"},
    "training": {"pad_to_max_length", "metric_for_best_model", "resume_from_checkpoint", "component_version"},
    "optimization": {"apply_deepspeed", "deepspeed_stage", "apply_ort"},
    "deployment": {"instance_type", "instance_count", "liveness_initial_delay_s", "liveness_failure_threshold",
                   "max_concurrent_requests_per_instance"},
}
LOCAL_ONLY = {"compute": {"device", "precision"}}
_MARKDOWN_SPECIALS = {c: f"&#{ord(c)};" for c in "\\`*_[]<>|~#!&"}


def _fmt(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _signed(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:+.{digits}f}".replace("-", "−")


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.0%}"


def _cut(text: str, limit: int) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text if len(text) <= limit else text[:limit].rstrip() + f" … ({len(text) - limit:,} more characters)"


def prose(text: str | None, limit: int = MAX_TEXT) -> str:
    """Model text as a markdown blockquote that keeps the model's own markdown (code blocks, lists,
    bold) but cannot break out of it: raw HTML outside code is escaped (so `</details>` stays text),
    `@name` outside code does not notify anyone, a code block cut short is closed, and an HTML
    comment opener is broken everywhere so no reply can carry another report's hidden marker.
    Every line sits behind `> `, so whatever the text does ends with the quote."""
    if text is None or not text.strip():
        return "> _(empty)_"
    out, fence = [], None
    text = text.replace("\r\n", "\n").replace("\r", "\n")  # CommonMark ends a line at \r too
    for line in _cut(text.strip(), limit).split("\n"):
        line = line.replace("<!--", "<!\u200b--")
        opener = _FENCE.match(line)
        if fence is None and opener:
            fence = opener.group(1)
        elif fence is not None and opener and opener.group(1)[0] == fence[0] and len(opener.group(1)) >= len(fence) \
                and not line.strip()[len(opener.group(1)):].strip():
            fence = None
        elif fence is None:
            line = _outside_code_spans(line, _quiet_markup)
        out.append(f"> {line}" if line.strip() else ">")
    if fence is not None:
        out.append(f"> {fence}")
    return "\n".join(out)


_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")


def _outside_code_spans(line: str, change) -> str:
    """`change` applied to the parts of a markdown line outside its inline code spans."""
    parts, at = [], 0
    for span in _CODE_SPAN.finditer(line):
        parts += [change(line[at:span.start()]), span.group(0)]
        at = span.end()
    return "".join(parts + [change(line[at:])])


def _quiet_markup(text: str) -> str:
    """Raw HTML shown as text, and @mentions that notify nobody: GitHub finds mentions in the
    rendered text (an entity such as &#64; is decoded first), so an invisible word joiner goes
    between the @ and the name."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") if "<" in text else text
    return re.sub(r"@(?=[A-Za-z0-9])", "@\u2060", text)


def cell(text: str | None, limit: int = PREVIEW) -> str:
    """Text for a table cell: one line, cut, with markdown's and HTML's specials escaped."""
    if text is None or not text.strip():
        return "_(empty)_"
    flat = " ".join(text.split())
    flat = flat if len(flat) <= limit else flat[:limit].rstrip() + "…"
    return "".join(_MARKDOWN_SPECIALS.get(c, c) for c in flat)


def loss_chart(points: list[tuple[int, float]], max_points: int = 60, last_step: int | None = None,
               eval_points: list[tuple[int, float]] | None = None) -> str:
    """A Mermaid xychart of the training loss and, where measured, the eval loss, on a true step axis.

    xychart-beta spreads a line's values evenly over the x range, so both lines are sampled on one
    even grid of steps (at most `max_points`), each value interpolated between the measured points
    on either side; before its first measured point a line holds that value. Measured steps are
    named in the title, so nothing reads as measured that was not."""
    eval_points = sorted(eval_points or [])
    if not points:
        return "_no training loss was logged_"
    first = min(points[0][0], eval_points[0][0]) if eval_points else points[0][0]
    last = max(points[-1][0], eval_points[-1][0]) if eval_points else points[-1][0]
    count = min(max_points, last - first + 1)
    grid = [first + (last - first) * i / max(count - 1, 1) for i in range(count)]
    lines = [[_interpolate(points, step) for step in grid]]
    if eval_points:
        lines.append([_interpolate(eval_points, step) for step in grid])
    values = [v for line in lines for v in line]
    low, high = min(values), max(values)
    pad = max((high - low) * 0.1, 0.01)
    title = f"Loss by step {first}–{last}" + (f" of {last_step}" if last_step and last_step > last else "")
    title += ": training (blue)"
    if eval_points:
        measured = ", ".join(str(s) for s, _ in eval_points[:6]) + ("…" if len(eval_points) > 6 else "")
        title += f", eval (orange; measured at steps {measured})"
    body = [
        "```mermaid",
        f"%%{{init: {json.dumps({'themeVariables': CHART_STYLE})}}}%%",
        "xychart-beta",
        f'    title "{title}"',
        f'    x-axis "step" {first} --> {last}',
        f'    y-axis "loss" {max(low - pad, 0):.3f} --> {high + pad:.3f}',
    ]
    body += ["    line [" + ", ".join(f"{v:.4f}" for v in line) + "]" for line in lines]
    return "\n".join(body + ["```"])


def _interpolate(points: list[tuple[int, float]], step: float) -> float:
    """The value at `step` on the polyline through `points` (sorted by step), held flat outside them."""
    if step <= points[0][0]:
        return points[0][1]
    for (s0, v0), (s1, v1) in itertools.pairwise(points):
        if step <= s1:
            return v0 + (v1 - v0) * (step - s0) / (s1 - s0) if s1 != s0 else v1
    return points[-1][1]


def artifact_link(record: RunRecord) -> str | None:
    """Where the uploaded record of a GitHub Actions run is: the artifact's own page when its id is
    known (AUTOMATION_ARTIFACT_ID), else the run's page, which lists its artifacts."""
    run_id, repo = os.environ.get("GITHUB_RUN_ID"), os.environ.get("GITHUB_REPOSITORY")
    if not run_id or not repo:
        return None
    server = os.environ.get("GITHUB_SERVER_URL", "https://github.com").rstrip("/")
    url = f"{server}/{repo}/actions/runs/{run_id}"
    artifact_id = os.environ.get("AUTOMATION_ARTIFACT_ID", "").strip()
    name = artifact_name(record.experiment)
    if artifact_id.isdigit():
        return f"[artifact `{name}`]({url}/artifacts/{artifact_id})"
    return f"artifact `{name}` of [workflow run {run_id}]({url})"


def artifact_name(experiment: str) -> str:
    return os.environ.get("AUTOMATION_ARTIFACT_NAME") or f"automation-run-{experiment}"


# ---------------------------------------------------------------------------------------------


def render(record: RunRecord, experiment: Experiment) -> str:
    ft, reg, dep, score = record.finetune, record.registration, record.deploy, record.score
    evaluation = ft.evaluation if ft else None
    title = f"## Experiment `{record.experiment}` ({record.backend})"
    lines = [MARKER.format(name=record.experiment), title, ""]
    lines.append(f"**Model** {experiment.model.name} · **data** `{experiment.data.dataset}` "
                 f"({experiment.data.sample_percent:g} % of each split) · **config** `{record.config_hash}`"
                 + (f" · **commit** `{record.sha[:7]}`" if record.sha else ""))
    lines.append("")
    if ft:
        lines += _policy_line(record, experiment)
        lines += _evaluation(ft, evaluation, experiment, record)
        lines += _training(ft)
    lines += _where(record, reg, dep)
    if evaluation and evaluation.prompts:
        lines += _replies(evaluation)
    if score:
        lines += _sample(score)
    if record.promote:
        p = record.promote
        how = "" if p.policy_override is None else f"; policy overridden: {cell(p.policy_override, 200)}"
        lines += [f"**Promoted** version {p.model_version} to `{p.endpoint_name}` (deployment `{p.deployment_name}`"
                  + (f", replacing `{p.previous_deployment}`" if p.previous_deployment else "") + how + ")", ""]
    if record.stages:
        lines += ["<details><summary>Time per stage</summary>", "", "| stage | seconds | status |", "|---|---:|---|"]
        lines += [f"| {name} | {t.seconds:.1f} | {t.status} |" for name, t in record.stages.items()]
        lines += ["", "</details>", ""]
    if record.plan_file and Path(record.plan_file).is_file():
        plan = Path(record.plan_file).read_text(encoding="utf-8")
        lines += ["<details><summary>Plan: every operation the run makes (dry run)</summary>", "",
                  "```yaml", plan.rstrip()[:MAX_PLAN], "```", "", "</details>", ""]
    lines += [f"<details><summary>Parameters ({record.backend} backend)</summary>", "", "```yaml",
              params_yaml(experiment), "```", "", "</details>"]
    return "\n".join(lines) + "\n"


def _policy_line(record: RunRecord, experiment: Experiment) -> list[str]:
    ev = record.finetune.evaluation if record.finetune else None
    result = check_policy(ev, experiment.promotion, record.finetune)
    if not result.checks:
        return ["**Promotion policy:** no limits set (`promotion:` in the experiment file).", ""]
    versus = against(result.baseline)
    rule = "whole 95 % interval" if result.decide_on == "interval" else "measured value"
    if result.passed and result.undecided():
        head = f"**Promotion policy: ⚠️ passes on the measured values only** {versus}"
    elif result.passed:
        head = f"**Promotion policy: ✅ passes** {versus} (on the {rule})"
    else:
        head = f"**Promotion policy: ❌ not met** {versus} (on the {rule}); `promote` will refuse without an override"
    head += f". Evidence: {result.strength()}."
    rows = ["| rule | value | 95 % interval | n | limit | |", "|---|---:|---:|---:|---:|:-:|"]
    for c in result.checks:
        sign = "≤" if c.upper_limit else "≥"
        rate = c.rule.endswith("_rate")
        value = _pct(c.value) if rate else _signed(c.value)
        span = "–" if c.interval is None else (
            f"{_pct(c.interval.low)} to {_pct(c.interval.high)}" if rate
            else f"{_signed(c.interval.low)} to {_signed(c.interval.high)}")
        n = "–" if c.interval is None else str(c.interval.n)
        limit = _pct(c.limit) if rate else f"{c.limit:g}"
        mark = "not measured" if not c.measured else ("✅" if c.passed else "❌")
        if c.measured and c.evidence == "undecided":
            mark += " undecided"
        rows.append(f"| {c.what} (`{c.rule.split('.')[-1]}`) | {value} | {span} | {n} | {sign} {limit} | {mark} |")
    return [head, "", *rows, ""]


def _evaluation(ft, evaluation: EvaluationPart | None, experiment: Experiment, record: RunRecord) -> list[str]:
    lines = ["### Evaluation", ""]
    if evaluation is None:  # a backend or run without the held-out evaluation: the losses alone
        change = None if ft.base_eval_loss is None or ft.eval_loss is None else ft.eval_loss - ft.base_eval_loss
        ppl = (None if ft.base_eval_loss is None else math.exp(min(ft.base_eval_loss, 50)),
               None if ft.eval_loss is None else math.exp(min(ft.eval_loss, 50)))
        return lines + ["| | base model | fine-tuned | change |", "|---|---:|---:|---:|",
                        f"| eval loss ({experiment.data.test_split}) | {_fmt(ft.base_eval_loss)} | {_fmt(ft.eval_loss)} "
                        f"| {_signed(change)} |",
                        f"| perplexity | {_fmt(ppl[0], 2)} | {_fmt(ppl[1], 2)} | |", ""]
    models = evaluation.models
    base = baseline_of(evaluation)
    columns = [k for k in ("base", "candidate", "production") if k in models]
    names = {"base": "base model", "candidate": "fine-tuned",
             "production": f"production v{evaluation.production_version}" if evaluation.production_version
             else "production", "none": "no baseline"}
    test_rows = (record.data.rows.get(evaluation.test_split) if record.data else None)
    where = " from the endpoints" if evaluation.source == "endpoints" else ""
    change = (f"Change = fine-tuned − {names[base]}." if base != "none"
              else "No baseline to compare with, so no change (see below).")
    lines.append(f"Eval loss on `{evaluation.test_split}`" + (f" ({test_rows} conversations)" if test_rows else "")
                 + f"; replies{where} to {len(evaluation.prompts)} held-out prompts of `{evaluation.prompt_split}`, "
                 f"greedy, up to {evaluation.max_new_tokens} new tokens. {change}")
    lines += ["", "| | " + " | ".join(names[c] for c in columns) + " | change |",
              "|---|" + "---:|" * len(columns) + "---:|"]
    rows = [("eval loss", "eval_loss", _fmt, _signed), ("perplexity", "perplexity", lambda v: _fmt(v, 2),
                                                        lambda v: _signed(v, 2)),
            ("ROUGE-L vs reference", "rouge_l", lambda v: _fmt(v, 3), lambda v: _signed(v, 3)),
            ("reply length (words)", "mean_words", lambda v: _fmt(v, 1), lambda v: _signed(v, 1)),
            ("empty replies", "empty_rate", _pct, lambda v: "–" if v is None else f"{v * 100:+.0f} pts"),
            ("repetitive replies", "repetitive_rate", _pct, lambda v: "–" if v is None else f"{v * 100:+.0f} pts")]
    for label, metric, show, show_delta in rows:
        values = [show(getattr(models[c], metric)) for c in columns]
        lines.append(f"| {label} | " + " | ".join(values) + f" | {show_delta(delta(evaluation, metric))} |")
    lines.append("")
    if evaluation.notes:
        lines += [f"- {note}" for note in evaluation.notes] + [""]  # the project's own words: markdown
    return lines


def _training(ft) -> list[str]:
    curve = [(p.step, p.loss) for p in ft.train_loss_curve]
    last_step = ft.max_steps or (curve[-1][0] if curve else None)
    last = ft.last_train_loss if ft.last_train_loss is not None else (curve[-1][1] if curve else None)
    facts = [f"last train loss {_fmt(last)}" + (f" at step {curve[-1][0]}" if curve else ""),
             f"mean over the run {_fmt(ft.train_loss)}",
             f"{ft.train_tokens or 0:,} tokens at {_fmt(ft.tokens_per_second, 1)} tokens/s",
             f"{_fmt(ft.wall_seconds, 0)} s", f"job `{ft.job_name}`"]
    if ft.resumed_from:
        facts.append(f"resumed from `{Path(ft.resumed_from).name}`")
    evals = [] if ft.base_eval_loss is None or ft.eval_loss is None or not curve else [
        (0, ft.base_eval_loss), (curve[-1][0], ft.eval_loss)]
    return ["### Training", "", "Training: " + " · ".join(facts), "",
            loss_chart(curve, last_step=last_step, eval_points=evals), ""]


def _where(record: RunRecord, reg, dep) -> list[str]:
    lines = []
    link = artifact_link(record)
    ft = record.finetune
    if reg:
        if record.backend != "local":
            store = "the Azure ML workspace"
        elif link:
            store = "the MLflow store of " + link
        else:
            store = f"`{_shown_path(ft.tracking_store)}`" if ft and ft.tracking_store else "the local MLflow store"
        lines += [f"**Registered** `{reg.model_name}` version {reg.version} (timestamp version "
                  f"`{reg.timestamp_version}`) in {store}", ""]
    if ft and ft.run_id:
        lines += [_mlflow_run_line(record, ft, bool(link)), ""]
    if dep:
        state = "torn down" if record.torn_down else "live"
        lines += [f"**Endpoint** `{dep.endpoint_name}` ({dep.stage}, {state})", ""]
    if link:
        lines += [f"**Record:** the MLflow store, report, scoring request and run record are in {link} "
                  "(open it with `mlflow ui --backend-store-uri sqlite:///mlflow.db` inside the unpacked folder).", ""]
    return lines


def _mlflow_run_line(record: RunRecord, ft, bundled: bool) -> str:
    """Where a reviewer opens the fine-tune's MLflow run: Azure ML studio, or a local `mlflow ui`."""
    if record.backend != "local":
        return (f"**Run** `{ft.run_id}` in [Azure ML studio]({ft.studio_url})" if ft.studio_url
                else f"**Run** `{ft.run_id}` in the Azure ML workspace")
    page = (f"/#/experiments/{ft.mlflow_experiment_id}/runs/{ft.run_id}" if ft.mlflow_experiment_id
            else f"/#/runs/{ft.run_id}")
    store = "mlflow.db" if bundled or not ft.tracking_store else _shown_path(ft.tracking_store)
    return (f"**MLflow run** `{ft.run_id}`: `mlflow ui --backend-store-uri sqlite:///{store}`, then "
            f"http://127.0.0.1:5000{page}")


def _shown_path(path: str) -> str:
    """A path as a person at this checkout types it: relative to the working folder when inside it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return path


def _replies(evaluation: EvaluationPart) -> list[str]:
    models = [k for k in ("base", "candidate", "production") if k in evaluation.models]
    names = {"base": "base model", "candidate": "fine-tuned", "production": "production"}
    n = len(evaluation.prompts)
    preview = max(30, min(PREVIEW, TABLE_BUDGET // (n * (len(models) + 1))))
    lines = [f"### Replies to the {n} held-out prompts", "",
             "| # | prompt | " + " | ".join(names[m] for m in models) + " |", "|---|---|" + "---|" * len(models)]
    for i, prompt in enumerate(evaluation.prompts):
        last_user = prompt.messages[-1]["content"] if prompt.messages else ""
        cells = []
        for m in models:
            ev = evaluation.models[m]
            reply = ev.replies[i] if i < len(ev.replies) else None
            score = f" <sub>{ev.rouge_l_each[i]:.2f}</sub>" if i < len(ev.rouge_l_each) else ""
            cells.append(cell(reply, preview) + score)
        lines.append(f"| {i + 1} | {cell(last_user, min(70, preview))} | " + " | ".join(cells) + " |")
    lines += ["", "<sub>Small figures: ROUGE-L of each reply against the reference.</sub>", ""]
    shown = min(n, DETAILED_PROMPTS)
    limit = max(120, min(MAX_TEXT, TEXT_BUDGET // (shown * (len(models) + 2))))
    if shown < n:
        where = ("`evaluation.json` of the run's record" if evaluation.source == "endpoints"
                 else "`evaluation/evaluation.json` of the fine-tune's MLflow run")
        lines += [f"The whole texts of the first {shown} prompts; all {n} are in {where}.", ""]
    for i, prompt in enumerate(evaluation.prompts[:shown]):
        last_user = prompt.messages[-1]["content"] if prompt.messages else ""
        lines += [f"<details><summary>{i + 1}. {cell(last_user, 80)}</summary>", ""]
        if len(prompt.messages) > 1:
            lines += [f"**Conversation** ({len(prompt.messages)} messages, the last shown above)", "",
                      prose("\n\n".join(f"[{m['role']}] {m['content']}" for m in prompt.messages[:-1]), limit), ""]
        lines += ["**Prompt**", "", prose(last_user, limit), "", "**Reference**", "", prose(prompt.reference, limit), ""]
        for m in models:
            ev = evaluation.models[m]
            lines += [f"**{names[m].capitalize()}**", "", prose(ev.replies[i] if i < len(ev.replies) else None, limit), ""]
        lines += ["</details>", ""]
    return lines


def _sample(score) -> list[str]:
    lines = ["### Sample scored on the staging endpoint", "",
             f"Reply in {score.latency_seconds:.2f} s to the request in `{Path(score.request_file).name}`"
             + (f" · prompt_id `{score.prompt_id[:12]}`" if score.prompt_id else ""), ""]
    earlier, last = score.messages[:-1], score.messages[-1] if score.messages else {"content": ""}
    if earlier:
        lines += [f"<details><summary>Conversation before the prompt ({len(earlier)} messages)</summary>", "",
                  prose("\n\n".join(f"[{m['role']}] {m['content']}" for m in earlier), 3000), "", "</details>", ""]
    lines += ["**Prompt**", "", prose(last["content"]), ""]
    lines += _collapsible("Reference answer", score.reference)
    lines += ["**Reply**", "", prose(score.reply), ""]
    return lines


def _collapsible(title: str, text: str | None, open_below: int = 400) -> list[str]:
    if text and len(text) > open_below:
        return [f"<details><summary>{title} ({len(text):,} characters)</summary>", "", prose(text), "", "</details>", ""]
    return [f"**{title}**", "", prose(text), ""]


def params_yaml(experiment: Experiment) -> str:
    """The run's settings, only the fields its backend reads."""
    import yaml

    sections = ("training", "optimization", "compute", "deployment", "sample", "evaluation", "promotion")
    data = experiment.model_dump(mode="json", include=set(sections))
    other = AZURE_ONLY if experiment.backend == "local" else LOCAL_ONLY
    for section, keys in other.items():
        for key in keys:
            data.get(section, {}).pop(key, None)
    return yaml.safe_dump(data, sort_keys=False, width=88).rstrip()


def mlflow_markdown(report: str) -> str:
    """The report as MLflow's artifact view shows it: plain markdown, without what only GitHub
    renders (hidden comments, `<details>` and `<sub>` HTML, the Mermaid chart, whose curves the run
    charts itself)."""
    out, in_chart = [], False
    for line in report.split("\n"):  # not splitlines(): a reply's \x0c or \u2028 is not a line end
        if in_chart:
            in_chart = line.strip() != "```"
            continue
        if line.strip() == "```mermaid":
            in_chart = True
            out.append("_The loss curves are the run's own charts: `loss` and `*_eval_loss` under Model metrics._")
            continue
        if re.fullmatch(r"\s*<!--.*-->\s*", line) or line.strip() == "</details>":
            continue
        summary = re.fullmatch(r"\s*<details><summary>(.*)</summary>\s*", line)
        if summary:
            line = f"**{summary.group(1)}**"
        out.append(re.sub(r"</?sub>", "", line))
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------


def terminal_summary(record: RunRecord, experiment: Experiment, total_seconds: float | None = None) -> list[str]:
    """The lines `automation run` ends with: what a person at the terminal wants to know."""
    ft, reg, dep, score = record.finetune, record.registration, record.deploy, record.score
    lines = []
    ev = ft.evaluation if ft else None
    if ft and ft.base_eval_loss is not None and ft.eval_loss is not None:
        lines.append(f"eval loss:  base {ft.base_eval_loss:.4f} -> fine-tuned {ft.eval_loss:.4f} "
                     f"({ft.eval_loss - ft.base_eval_loss:+.4f})")
    if ev and "candidate" in ev.models:
        lines += evaluation_summary(ev)
    if ft:
        policy = check_policy(ev, experiment.promotion, ft)
        if policy.checks:
            lines.append("policy:     " + ("passes" if policy.passed else "NOT MET: " + "; ".join(
                c.describe() for c in policy.failures())))
    if reg:
        lines.append(f"registered: {reg.model_name} version {reg.version} (timestamp version {reg.timestamp_version})")
    if dep:
        lines.append(f"endpoint:   {dep.endpoint_name} " + ("torn down" if record.torn_down else f"live at {dep.url}"))
    if score:
        reply = " ".join(score.reply.split())
        lines.append(f"reply:      {reply[:160]}{'…' if len(reply) > 160 else ''} ({score.latency_seconds:.1f} s)")
    if record.report_file:
        lines.append(f"report:     {record.report_file}")
    if record.bundle_dir:
        lines.append(f"artifact:   {record.bundle_dir} (the folder to upload)")
    if total_seconds is not None:
        minutes, seconds = divmod(int(round(total_seconds)), 60)
        lines.append(f"total:      {minutes} min {seconds:02d} s")
    return lines


def evaluation_summary(ev: EvaluationPart) -> list[str]:
    """The held-out evaluation in two terminal lines: the candidate's figures and its change."""
    c = ev.models["candidate"]
    base = baseline_of(ev)
    versus = "no baseline" if base == "none" else f"{_plain_delta(delta(ev, 'rouge_l'))} vs {MODEL_LABELS[base]}"
    lines = [f"ROUGE-L:    {_fmt(c.rouge_l, 3)} on {len(ev.prompts)} held-out prompts ({versus}); "
             f"empty {_pct(c.empty_rate)}, repetitive {_pct(c.repetitive_rate)}"]
    if "production" in ev.models:
        lines.append(f"vs production v{ev.production_version}: eval loss {_plain_delta(delta(ev, 'eval_loss'))}")
    return lines


def _plain_delta(value: float | None) -> str:
    return "–" if value is None else f"{value:+.4f}"
