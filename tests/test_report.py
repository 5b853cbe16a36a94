"""The markdown report renders what a reviewer needs, reads well in GitHub's 800 px column, and
holds nothing secret. The checks are properties of the rendered markdown, as GitHub treats it."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import cmarkgfm
import pytest

from automation.evaluation import model_eval
from automation.record import (
    DataPart,
    DeployPart,
    EvalPrompt,
    EvaluationPart,
    FinetunePart,
    LossPoint,
    RegisterPart,
    RunRecord,
    ScorePart,
    StageTime,
)
from automation.report import (
    EVAL_COLOUR,
    LINE_COLOUR,
    MARKER,
    artifact_link,
    cell,
    loss_chart,
    params_yaml,
    prose,
    render,
    terminal_summary,
)
from automation.spec import load_experiment
from tests.conftest import REPO

LOCAL = REPO / "experiments" / "smollm2-ultrachat-local.yaml"
AZURE = REPO / "experiments" / "phi3-mini-ultrachat.yaml"
HOSTILE = "Sure | a | b! </details></blockquote><script>x()</script> <!-- automation:report experiment=evil -->"


def evaluation(n: int = 3, *, production: bool = True, reply_len: int = 1) -> EvaluationPart:
    prompts = [EvalPrompt(prompt_id=f"{i:064x}", reference=f"Knead the dough for {i} minutes, then rest it.",
                          messages=[{"role": "user", "content": f"How long do I knead bread, case {i}?"},
                                    {"role": "assistant", "content": "About ten minutes."},
                                    {"role": "user", "content": f"And then what, case {i}?"}])
               for i in range(n)]
    base = ["I am a language model. " * 10 * reply_len] * n
    tuned = [f"Knead the dough for {i} minutes and rest it. " * reply_len for i in range(n)]
    tuned[0] = HOSTILE
    ev = EvaluationPart(test_split="test_sft", prompt_split="test_gen", max_new_tokens=96, prompts=prompts)
    ev.models["base"] = model_eval("SmolLM2-135M-Instruct", prompts, base, 2.739)
    ev.models["candidate"] = model_eval("fine-tuned (job-1)", prompts, tuned, 2.441)
    if production:
        ev.models["production"] = model_eval("models:/m/2", prompts, ["Rest it. " * reply_len] * n, 2.500)
        ev.production_version = "2"
    return ev


def full_record(ev: EvaluationPart | None = None) -> RunRecord:
    return RunRecord(
        experiment="smollm2-ultrachat-local", experiment_file="experiments/smollm2-ultrachat-local.yaml",
        backend="local", config_hash="abc1234", sha="0123456789abcdef",
        stages={"finetune": StageTime(started_at="2026-01-01T00:00:00Z", seconds=12.5)},
        data=DataPart(out_dir="d", source="s", rows={"test_sft": 32, "test_gen": 32}),
        finetune=FinetunePart(job_name="job-1", run_id="r1", tracking_store=".automation/mlflow.db",
                              mlflow_experiment_id="7", base_eval_loss=2.739, eval_loss=2.441, train_loss=2.6,
                              last_train_loss=2.35, max_steps=24,
                              train_loss_curve=[LossPoint(step=s, loss=3 - s / 100) for s in (1, 5, 10, 15, 20, 24)],
                              train_tokens=12345, tokens_per_second=150.0, wall_seconds=90,
                              evaluation=ev if ev is not None else evaluation()),
        registration=RegisterPart(model_name="SmolLM2-135M-Instruct-ultrachat", version="3",
                                  timestamp_version="1795000000", model_uri="models:/x/3"),
        deploy=DeployPart(endpoint_name="sdev-smollm2-abc", deployment_name="default", url="http://127.0.0.1:1"),
        score=ScorePart(request_file="/w/runs/x/sample_score.json",
                        messages=[{"role": "user", "content": "What is ```yaml?"}, {"role": "assistant", "content": "A"},
                                  {"role": "user", "content": "Tell me more."}],
                        reference="A format. " * 100, reply="Line one\rline two.\r\n" + "It is a data format. " * 400,
                        latency_seconds=1.234),
    )


def fences(text: str) -> list[tuple[str, list[str]]]:
    """Every fenced code block: (its info string, its lines)."""
    blocks, current, info = [], None, ""
    for line in text.splitlines():
        if line.startswith("```"):
            if current is None:
                current, info = [], line[3:]
            else:
                blocks.append((info, current))
                current = None
        elif current is not None:
            current.append(line)
    assert current is None, "an unclosed code fence"
    return blocks


def tables(text: str) -> list[list[str]]:
    out, current = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            out.append(current)
            current = []
    return out + ([current] if current else [])


def columns(row: str) -> int:
    return len(re.split(r"(?<!\\)\|", row.strip().strip("|")))


@pytest.fixture
def local():
    return load_experiment(LOCAL)


def test_report_leads_with_the_evaluation_and_the_policy(local):
    text = render(full_record(), local)
    assert text.startswith(MARKER.format(name="smollm2-ultrachat-local"))
    assert text.index("Promotion policy") < text.index("### Evaluation") < text.index("### Training")
    assert "**Promotion policy: ✅ passes** against the production model" not in text  # label is "production"
    # 3 prompts cannot decide a ROUGE-L limit: the verdict says so instead of a plain pass
    assert ("**Promotion policy: ⚠️ passes on the measured values only** against the production. Evidence: "
            "not decidable at n = 3: the 95 % interval of ROUGE-L change straddles its limit.") in text
    assert re.search(r"\| ROUGE-L change vs production \(`min_rouge_l_delta`\) \| \+0\.\d{4} \| "
                     r"−0\.\d{4} to \+0\.\d{4} \| 3 \| ≥ -0\.01 \| ✅ undecided \|", text)
    assert "| | base model | fine-tuned | production v2 | change |" in text
    assert "| eval loss | 2.7390 | 2.4410 | 2.5000 | −0.0590 |" in text, "change = candidate − production"
    assert "Eval loss on `test_sft` (32 conversations); replies to 3 held-out prompts of `test_gen`" in text
    assert re.search(r"\| ROUGE-L vs reference \| 0\.\d{3} \| 0\.\d{3} \| 0\.\d{3} \| [+−]0\.\d{3} \|", text)
    assert "| repetitive replies | 100% | 0% | 0% |" in text
    assert "### Replies to the 3 held-out prompts" in text
    assert "`SmolLM2-135M-Instruct-ultrachat` version 3 (timestamp version `1795000000`) in `.automation/mlflow.db`" in text
    assert "`sdev-smollm2-abc` (staging, live)" in text
    assert "Reply in 1.23 s to the request in `sample_score.json`" in text
    assert "| finetune | 12.5 | ok |" in text


def test_without_production_the_base_model_is_the_baseline(local):
    text = render(full_record(evaluation(production=False)), local)
    assert "| | base model | fine-tuned | change |" in text
    assert "| eval loss | 2.7390 | 2.4410 | −0.2980 |" in text
    assert "against the base model" in text


def test_policy_not_met_says_so_before_anyone_approves(local):
    strict = local.model_copy(update={"promotion": local.promotion.model_copy(update={"max_eval_loss_increase": -0.1})})
    text = render(full_record(), strict)
    assert ("**Promotion policy: ❌ not met** against the production (on the measured value); `promote` will "
            "refuse without an override. Evidence:") in text
    assert "| eval loss change vs production (`max_eval_loss_increase`) | −0.0590 | – | – | ≤ -0.1 | ❌ |" in text


MARKDOWN_REPLY = ("Here is how:\n\n```python\ndef knead(minutes):\n    return minutes < 10  # </details>\n```\n\n"
                  "- **Knead** with `<div>` hands\n- ask @octocat\n\n</details><script>x()</script> "
                  "<!-- automation:report experiment=evil -->\n```\nan unclosed block")


class _Html(HTMLParser):
    """What a browser would see of GitHub's HTML: tags, comments, and text with where it sits."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.tags: list[str] = []
        self.comments: list[str] = []
        self.text: list[tuple[str, tuple[str, ...]]] = []
        self.details_depth = self.max_details_depth = 0

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag not in ("br", "img", "hr", "input"):
            self.stack.append(tag)
        if tag == "details":
            self.details_depth += 1
            self.max_details_depth = max(self.max_details_depth, self.details_depth)

    def handle_endtag(self, tag):
        if tag in self.stack:
            while self.stack.pop() != tag:
                pass
        if tag == "details":
            self.details_depth -= 1

    def handle_comment(self, data):
        self.comments.append(data)

    def handle_data(self, data):
        self.text.append((data, tuple(self.stack)))


def github_html(markdown: str) -> str:
    """The HTML GitHub makes of a comment: cmark-gfm with its extensions, raw HTML kept for its
    sanitizer, newlines as line breaks (as in issue and PR comments)."""
    from cmarkgfm.cmark import Options

    return cmarkgfm.github_flavored_markdown_to_html(
        markdown, options=Options.CMARK_OPT_UNSAFE | Options.CMARK_OPT_HARDBREAKS)


def test_model_text_keeps_its_markdown_and_cannot_break_out(local):
    """Rendered as GitHub renders a comment: a reply's code block, list, bold and inline code come out
    as such, with the code's indentation kept; its raw HTML, hidden comment, @mention and unclosed
    code block change nothing around it."""
    ev = evaluation()
    ev.models["candidate"].replies[1] = MARKDOWN_REPLY
    text = render(full_record(ev), local)
    for info, _ in fences(text):
        assert info in ("mermaid", "yaml"), f"only the chart and the parameters are top-level code, not {info!r}"
    html = github_html(text)
    page = _Html()
    page.feed(html)
    assert page.comments == [" automation:report experiment=smollm2-ultrachat-local "], "no forged marker"
    assert "script" not in page.tags and "&lt;script&gt;" in html
    assert page.details_depth == 0 and page.max_details_depth == 1, "no reply closes or opens a <details>"
    code = [t for t, where in page.text if "pre" in where and "code" in where]
    assert any("def knead(minutes):\n    return minutes < 10  # </details>" in c for c in code), \
        "the code block keeps its indentation and its text"
    assert '<pre lang="python"><code>' in html
    assert "<li><strong>Knead</strong> with <code>&lt;div&gt;</code> hands</li>" in html
    assert not [t for t, where in page.text if re.search(r"@[A-Za-z0-9]", t) and "code" not in where], \
        "no @mention outside code"
    # the unclosed block ends with its quote: the next model's label is bold text again, not code
    after = html.split("an unclosed block", 1)[1]
    assert "<strong>Production</strong>" in after.split("</blockquote>", 1)[1]
    # the scored sample's reply: its lines stay lines, long texts are cut and collapsed
    assert "Line one<br />\nline two.<br />\nIt is a data format." in html and "\r" not in text
    assert "… (" in text and "more characters)" in text, "long texts are cut"
    assert "<details><summary>Reference answer (1,000 characters)</summary>" in text, "long texts are collapsed"
    assert "<details><summary>Conversation before the prompt (2 messages)</summary>" in text


def test_tables_keep_their_columns_and_short_cells(local):
    text = render(full_record(evaluation(reply_len=30)), local)
    for table in tables(text):
        widths = {columns(row) for row in table}
        assert len(widths) == 1, f"a cell broke its table: {table}"
        assert next(iter(widths)) <= 6, "at most 6 columns in an 800 px column"
    replies = next(t for t in tables(text) if t[0].startswith("| # | prompt |"))
    assert len(replies) == 2 + 3
    for row in replies[2:]:
        for value in re.split(r"(?<!\\)\|", row.strip().strip("|")):
            assert len(re.sub(r"&#\d+;", "x", value)) <= 120, "previews are short; the whole text is in <details>"
    assert "Sure &#124; a &#124; b&#33; &#60;/details&#62;" in text, "pipes and tags in model text are escaped in cells"


def test_body_stays_under_githubs_limit_with_many_long_replies(local):
    text = render(full_record(evaluation(n=64, reply_len=200)), local)
    assert len(text) < 65_536
    assert len(next(t for t in tables(text) if t[0].startswith("| # | prompt |"))) == 2 + 64
    assert "The whole texts of the first 16 prompts; all 64 are in `evaluation/evaluation.json`" in text


def contrast(a: str, b: str) -> float:
    """WCAG 2.x contrast ratio of two #rrggbb colours."""
    def luminance(colour: str) -> float:
        channels = [int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5)]
        r, g, b = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
        return 0.2126 * r + 0.7152 * g + 0.0722 * b
    high, low = sorted((luminance(a), luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def test_chart_reads_in_both_themes():
    """The chart brings its own opaque background, so its contrast is the same in GitHub's light and
    dark themes: text 4.5:1 or more (WCAG AA), the lines 3:1 or more (graphics)."""
    chart = loss_chart([(1, 3.0), (5, 2.5), (10, 2.4), (24, 2.3)], last_step=24, eval_points=[(0, 2.7), (24, 2.44)])
    init = json.loads(re.search(r"%%\{init: (.*)\}%%", chart).group(1))
    style = init["themeVariables"]["xyChart"]
    background = style["backgroundColor"]
    assert re.fullmatch(r"#[0-9a-f]{6}", background), "an opaque background, not transparent"
    for key, colour in style.items():
        if key.endswith("Color") and key != "backgroundColor":
            assert contrast(colour, background) >= 4.5, (key, colour, contrast(colour, background))
    for line in style["plotColorPalette"].split(", "):
        assert contrast(line, background) >= 3.0, line
    assert style["plotColorPalette"] == f"{LINE_COLOUR}, {EVAL_COLOUR}"
    # The old transparent chart's grey on GitHub's dark background: what this replaces.
    assert contrast("#6e7781", "#0d1117") < 4.5


def test_chart_has_a_true_step_axis_and_the_eval_loss():
    chart = loss_chart([(1, 3.0), (5, 2.5), (10, 2.4), (24, 2.3)], last_step=24, eval_points=[(0, 2.7), (24, 2.44)])
    assert 'x-axis "step" 0 --> 24' in chart
    lines = [[float(v) for v in line.split("[")[1].rstrip("]").split(", ")]
             for line in chart.splitlines() if line.strip().startswith("line [")]
    assert len(lines) == 2 and len(lines[0]) == len(lines[1]) == 25, "one point per step on 0..24"
    train, evals = lines
    assert train[5] == 2.5 and train[10] == 2.4 and train[24] == 2.3, "measured points sit at their steps"
    assert train[17] == pytest.approx(2.35), "steps 10->24 span 14 steps, not one category"
    assert evals[0] == 2.7 and evals[-1] == 2.44
    assert 'title "Loss by step 0–24: training (blue), eval (orange; measured at steps 0, 24)"' in chart
    assert "of 30" in loss_chart([(1, 3.0), (20, 2.0)], last_step=30), "a curve that stops early says so"
    only_train = loss_chart([(1, 3.0), (20, 2.0)])
    assert only_train.count("line [") == 1 and "eval" not in only_train


def test_loss_chart_downsamples_and_keeps_the_last_point():
    points = [(i, 1.0 / i) for i in range(1, 1001)]
    chart = loss_chart(points, max_points=50)
    values = next(line for line in chart.splitlines() if "line [" in line).split("[")[1].rstrip("]").split(", ")
    assert len(values) == 50 and float(values[0]) == 1.0 and float(values[-1]) == pytest.approx(0.001)
    assert 'x-axis "step" 1 --> 1000' in chart
    assert loss_chart([]) == "_no training loss was logged_"


def test_training_line_gives_the_last_loss_and_the_mean(local):
    text = render(full_record(), local)
    assert "last train loss 2.3500 at step 24 · mean over the run 2.6000" in text


def test_parameters_list_only_the_backends_fields(local):
    local_params = params_yaml(local)
    for azure_only in ("cluster:", "instance_type:", "deepspeed_stage:", "liveness_initial_delay_s:", "serverless:",
                       "preprocess_size:", "shm_size:", "component_version:"):
        assert azure_only not in local_params
    assert "device: auto" in local_params and "max_new_tokens_cap: 256" in local_params
    assert "min_rouge_l_delta: -0.01" in local_params
    azure_params = params_yaml(load_experiment(AZURE))
    assert "cluster:" in azure_params and "instance_type:" in azure_params and "device:" not in azure_params


def test_the_record_link_points_at_the_workflow_artifact(local, monkeypatch):
    record = full_record()
    monkeypatch.delenv("GITHUB_RUN_ID", raising=False)
    assert artifact_link(record) is None
    monkeypatch.setenv("GITHUB_RUN_ID", "42")
    monkeypatch.setenv("GITHUB_REPOSITORY", "org/repo")
    monkeypatch.delenv("AUTOMATION_ARTIFACT_ID", raising=False)
    assert artifact_link(record) == ("artifact `automation-run-smollm2-ultrachat-local` of "
                                     "[workflow run 42](https://github.com/org/repo/actions/runs/42)")
    monkeypatch.setenv("AUTOMATION_ARTIFACT_ID", "777")
    link = "[artifact `automation-run-smollm2-ultrachat-local`](https://github.com/org/repo/actions/runs/42/artifacts/777)"
    assert artifact_link(record) == link
    text = render(record, local)
    assert f"version 3 (timestamp version `1795000000`) in the MLflow store of {link}" in text


def test_the_store_and_the_run_are_where_they_really_are(local, monkeypatch, tmp_path):
    monkeypatch.delenv("GITHUB_RUN_ID", raising=False)
    record = full_record()
    record.finetune.tracking_store = "/srv/mlflow/store.db"
    text = render(record, local)
    assert "(timestamp version `1795000000`) in `/srv/mlflow/store.db`" in text
    assert ("**MLflow run** `r1`: `mlflow ui --backend-store-uri sqlite:////srv/mlflow/store.db`, then "
            "http://127.0.0.1:5000/#/experiments/7/runs/r1") in text
    monkeypatch.chdir(tmp_path)
    record.finetune.tracking_store = str(tmp_path / "ws" / "mlflow.db")
    assert "in `ws/mlflow.db`" in render(record, local), "inside the working folder: the path a person types"
    azure = record.model_copy(update={"backend": "azure"})
    azure.finetune.studio_url = "https://ml.azure.com/runs/job-1?wsid=x"
    text = render(azure, load_experiment(AZURE))
    assert "**Run** `r1` in [Azure ML studio](https://ml.azure.com/runs/job-1?wsid=x)" in text
    assert "mlflow ui" not in text.split("### Replies")[0].split("**Registered**")[1]


def test_prose_keeps_markdown_and_cells_escape_it():
    assert prose("# Title\n*bold* `<code>`\n\n<b>@x</b>") == ("> # Title\n> *bold* `<code>`\n>\n"
                                                                "> &lt;b&gt;@\u2060x&lt;/b&gt;")
    assert prose("  ") == "> _(empty)_"
    assert prose("```\nx = 1") == "> ```\n> x = 1\n> ```", "a code block cut short is closed"
    assert cell("*a* | `b`\n# c") == "&#42;a&#42; &#124; &#96;b&#96; &#35; c"
    assert cell("x" * 200, 10) == "x" * 10 + "…"


def test_terminal_summary_has_version_deltas_reply_endpoint_and_time(local):
    record = full_record()
    record.torn_down = True
    lines = "\n".join(terminal_summary(record, local, 252.4))
    assert "eval loss:  base 2.7390 -> fine-tuned 2.4410 (-0.2980)" in lines
    assert "vs production v2: eval loss -0.0590" in lines
    assert "policy:     passes" in lines
    assert "registered: SmolLM2-135M-Instruct-ultrachat version 3" in lines
    assert "endpoint:   sdev-smollm2-abc torn down" in lines
    assert "reply:      Line one line two. It is a data format." in lines
    assert "total:      4 min 12 s" in lines
    assert "{" not in lines, "no raw dicts"


def test_a_reply_cannot_leave_its_quote_through_other_line_breaks():
    """CommonMark ends a line at \\r as well as \\n; Python's splitlines() also at \\x0c, \\x1c, \\u2028:
    the reply stays inside its blockquote whichever it carries, and the loop's comment writer keeps it."""
    from automation.loop import PullRequests, Status
    from automation.report import prose

    reply = "first\rsecond <b>x</b>\x0cthird\u2028fourth\x1c"
    quoted = prose(reply)
    assert all(line.startswith(">") for line in quoted.split("\n")), quoted
    assert "second &lt;b&gt;x&lt;/b&gt;" in quoted

    written = {}

    class Client:
        repository = "o/r"

    pulls = PullRequests(Client())
    import automation.github as gh

    original = gh.upsert_comment
    gh.upsert_comment = lambda client, pr, body, marker: written.setdefault("body", body)
    try:
        pulls.comment(7, "tiny", Status("job", "done"), "<!-- automation:report experiment=tiny -->\n" + quoted)
    finally:
        gh.upsert_comment = original
    assert quoted in written["body"]
