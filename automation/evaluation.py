"""The held-out evaluation behind the promotion decision, whatever the backend.

Held-out prompts are a seeded choice of `evaluation.prompts` conversations of the sample split
(never trained on): each is cut before its last assistant turn, which becomes the reference.
Every model answers the same prompts with greedy decoding, so the replies are comparable. Per
model:

- eval loss and perplexity on the test split (computed by the backend);
- ROUGE-L F1 of each reply against its reference, averaged: Google's `rouge-score` (its tokenizer,
  nltk's Porter stemmer, the longest common subsequence), written out here so that every install
  computes it without torch (`rouge_l_f1`);
- mean reply length in words;
- empty rate: replies with no text once whitespace is stripped;
- repetitive rate: replies stuck in a loop (`is_repetitive`): a line or sentence of four or more
  words said three times or more, repeated lines or sentences making up a third of the reply, or
  12 or more word/punctuation tokens of which fewer than half of the 4-grams are distinct
  (normal prose keeps ~95 % distinct).

Every compared figure carries its sample size and a 95 % interval (automation/stats.py): a paired
bootstrap of the candidate − baseline difference over prompts (ROUGE-L) and conversations (eval
loss, where the backend records it per conversation), a Wilson interval for the candidate's shares.

The baseline is the production model when one exists, else the base model (none when neither was
evaluated: an Azure run before the first promotion); `promote` checks the experiment's
`promotion:` limits against it (`check_policy`).

Where the fine-tune does not evaluate (Azure: the pipeline component's evaluation steps are
commented out), the replies come from the deployed endpoints (`endpoint_replies`), one scoring
request per prompt in the seed's request form.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from automation.errors import AutomationError, BackendError, ConfigError
from automation.record import EvalPrompt, EvaluationPart, FinetunePart, ModelEval
from automation.spec import PromotionSpec
from automation.stats import Interval, paired_bootstrap, wilson
from automation.workspace import write_text_atomic

MODEL_LABELS = {"base": "base model", "candidate": "fine-tuned", "production": "production", "none": "no baseline"}
_TOKEN = re.compile(r"\w+|[^\w\s]")
_NOT_ALPHANUMERIC = re.compile(r"[^a-z0-9]+")
REPETITION_MIN_TOKENS, REPETITION_NGRAM, REPETITION_MIN_DISTINCT = 12, 4, 0.5
REPETITION_UNIT_WORDS, REPETITION_UNIT_TIMES, REPETITION_UNIT_SHARE = 4, 3, 1 / 3
_UNIT_SPLIT = re.compile(r"\n+|(?<=[.!?])\s+")  # lines, and sentences within a line
_TOKEN_WORD = re.compile(r"[^\W_]+")
_LIST_MARKER = re.compile(r"^\s*(?:[-*+•]|\d+[.)])\s+")  # "1. ", "- ": the same step numbered twice


def held_out_prompts(split_file: Path, count: int, seed: int) -> list[EvalPrompt]:
    """`count` conversations of the split, chosen with `seed`, in file order; each cut at its last
    user turn, with the assistant answer that followed as the reference. The choice is the first
    `count` of one seeded order of the rows, so a larger count keeps every prompt of a smaller one
    (n = 8 is within n = 32): growing n adds evidence, it does not swap the prompts."""
    if count <= 0:
        return []
    try:
        rows = [json.loads(line) for line in Path(split_file).open(encoding="utf-8") if line.strip()]
    except OSError as err:
        raise ConfigError(f"cannot read the evaluation prompts from {split_file}: {err}") from None
    if not rows:
        raise ConfigError(f"{split_file} is empty: no conversations to evaluate the models on")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    chosen = sorted(order[:count])
    prompts = []
    for index in chosen:
        messages = rows[index]["messages"]
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        reference = messages[last_user + 1]["content"] if last_user + 1 < len(messages) else None
        prompts.append(EvalPrompt(prompt_id=rows[index].get("prompt_id"), reference=reference,
                                  messages=[{"role": m["role"], "content": m["content"]}
                                            for m in messages[: last_user + 1]]))
    return prompts


def rouge_l(references: list[str | None], replies: list[str]) -> list[float]:
    """ROUGE-L F1 of each reply against its reference (0.0 where either is empty)."""
    return [rouge_l_f1(ref, reply) if ref and ref.strip() and reply.strip() else 0.0
            for ref, reply in zip(references, replies, strict=True)]


def rouge_l_f1(reference: str, reply: str) -> float:
    """ROUGE-L F1 as Google's rouge-score computes it with `use_stemmer=True` (and torchmetrics'
    port of it): the longest common subsequence of the two token lists, over the reply's length
    (precision) and the reference's (recall). rouge-score itself ships only as an sdist, and no
    install here builds from source; tests/test_evaluation.py holds this to torchmetrics' port."""
    ref, hyp = rouge_tokens(reference), rouge_tokens(reply)
    if not ref or not hyp:
        return 0.0
    common = lcs_length(hyp, ref)
    if common == 0:
        return 0.0
    precision, recall = common / len(hyp), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's tokenizer: lowercased, every run of characters outside [a-z0-9] a space (so
    accented letters and other scripts split words), split, and words longer than 3 characters
    Porter-stemmed (nltk's default mode, as rouge-score uses it)."""
    words = _NOT_ALPHANUMERIC.sub(" ", text.lower()).split()
    return [token for token in (_stem(w) if len(w) > 3 else w for w in words) if token]


@functools.lru_cache(maxsize=65536)
def _stem(word: str) -> str:
    return _porter_stemmer().stem(word)


@functools.cache
def _porter_stemmer():
    from nltk.stem.porter import PorterStemmer  # nltk's package import takes a second or more

    return PorterStemmer()


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of `a` and `b` (one row of the table at a time)."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def is_repetitive(text: str) -> bool:
    """A reply stuck in a loop: the same line or sentence over and over, or a run of repeated n-grams."""
    return _repeats_units(text) or _repeats_ngrams(text)


def _repeats_ngrams(text: str) -> bool:
    tokens = _TOKEN.findall(text.lower())
    if len(tokens) < REPETITION_MIN_TOKENS:
        return False
    grams = [tuple(tokens[i:i + REPETITION_NGRAM]) for i in range(len(tokens) - REPETITION_NGRAM + 1)]
    return len(set(grams)) / len(grams) < REPETITION_MIN_DISTINCT


def _repeats_units(text: str) -> bool:
    """A line or sentence of 4+ words said 3+ times, or repeats (every copy after the first) that
    make up a third or more of the reply's words. Units are compared by their words, lowercased, so
    a repeat that differs only in punctuation, numbering or spacing still counts."""
    units = [words for part in _UNIT_SPLIT.split(text)
             if len(words := tuple(_TOKEN_WORD.findall(_LIST_MARKER.sub("", part.lower()))))
             >= REPETITION_UNIT_WORDS]
    if len(units) < 2:
        return False
    counts: dict[tuple[str, ...], int] = {}
    for unit in units:
        counts[unit] = counts.get(unit, 0) + 1
    if max(counts.values()) >= REPETITION_UNIT_TIMES:
        return True
    repeated_words = sum(len(unit) * (times - 1) for unit, times in counts.items())
    return repeated_words / sum(len(unit) for unit in units) >= REPETITION_UNIT_SHARE


def perplexity(loss: float | None) -> float | None:
    return None if loss is None else math.exp(min(loss, 50.0))


def model_eval(model: str, prompts: list[EvalPrompt], replies: list[str], eval_loss: float | None,
               eval_loss_each: list[float] | None = None) -> ModelEval:
    """Every figure of one model from its replies to `prompts` and its eval loss (with the loss of
    each test conversation behind it, where the backend measured them)."""
    scores = rouge_l([p.reference for p in prompts], replies) if replies else []
    n = len(replies)
    return ModelEval(
        model=model, eval_loss=eval_loss, perplexity=perplexity(eval_loss),
        rouge_l=sum(scores) / n if n else None,
        mean_words=sum(len(r.split()) for r in replies) / n if n else None,
        empty_rate=sum(not r.strip() for r in replies) / n if n else None,
        repetitive_rate=sum(is_repetitive(r) for r in replies) / n if n else None,
        replies=replies, rouge_l_each=[round(s, 4) for s in scores],
        eval_loss_each=[round(x, 5) for x in eval_loss_each or []],
    )


def greedy_parameters(max_new_tokens: int) -> dict[str, Any]:
    """The scoring parameters of an evaluation request: greedy, so every model's replies compare."""
    return {"do_sample": False, "max_new_tokens": max_new_tokens}


def _prompt_key(prompt: EvalPrompt) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(prompt.messages, sort_keys=True).encode()).hexdigest()[:16]


def endpoint_replies(invoke: Callable[[dict], dict], prompts: list[EvalPrompt], *, max_new_tokens: int,
                     label: str, kept: Path, key: str) -> list[str]:
    """One greedy reply per prompt from a deployed endpoint: `invoke(request)` sends one scoring
    request (`score_request`, the seed's form) per prompt and returns the parsed answer.

    Each reply is kept in `kept` (a JSON file, under `key`: what was asked of which model) as it
    arrives, so a failure loses nothing: the error names the prompt, and a rerun asks only for the
    replies still missing."""
    from automation.serving.contract import score_request

    log = logging.getLogger(__name__)
    store = json.loads(kept.read_text(encoding="utf-8")) if kept.is_file() else {}
    done: dict[str, str] = store.get(key, {})
    replies: list[str] = []
    started = time.monotonic()
    for i, prompt in enumerate(prompts):
        pkey = f"{i}:{_prompt_key(prompt)}"
        if pkey not in done:
            try:
                answer = invoke(score_request([prompt.messages], greedy_parameters(max_new_tokens)))
            except AutomationError as err:
                raise BackendError(
                    f"evaluation: the {label} failed on held-out prompt {i + 1} of {len(prompts)}"
                    + (f" (prompt_id {prompt.prompt_id[:12]})" if prompt.prompt_id else "") + f": {err}. "
                    f"The {len(done)} replies so far are kept in {kept}; a rerun asks only for the rest") from err
            reply = answer.get("output")
            if isinstance(reply, list) and len(reply) == 1:
                reply = reply[0]
            if not isinstance(reply, str):
                raise BackendError(f"evaluation: the {label} answered held-out prompt {i + 1} of {len(prompts)} "
                                   f"without a text output: {str(answer)[:200]!r}")
            done[pkey] = reply
            store[key] = done
            write_text_atomic(kept, json.dumps(store, indent=1, ensure_ascii=False))
            log.info("evaluation: %s replied to %d/%d prompts (%.0f s)", label, i + 1, len(prompts),
                     time.monotonic() - started)
        replies.append(done[pkey])
    return replies


METRICS = ("eval_loss", "perplexity", "rouge_l", "mean_words", "empty_rate", "repetitive_rate")


def against(baseline: str) -> str:
    """`against the production` / `against the base model` / `with no baseline`."""
    return "with no baseline" if baseline == "none" else f"against the {MODEL_LABELS[baseline]}"


def baseline_of(evaluation: EvaluationPart) -> str:
    """The model the candidate is judged against: production when it exists, else the base model,
    else "none" (an Azure run without a production endpoint: the base model is not deployed)."""
    for label in ("production", "base"):
        if label in evaluation.models:
            return label
    return "none"


def delta(evaluation: EvaluationPart, metric: str, against: str | None = None) -> float | None:
    """Candidate minus `against` (default: the baseline) for one metric; None when either is missing."""
    models = evaluation.models
    other = models.get(against or baseline_of(evaluation))
    candidate = models.get("candidate")
    if other is None or candidate is None:
        return None
    a, b = getattr(candidate, metric), getattr(other, metric)
    return None if a is None or b is None else a - b


def mlflow_metrics(evaluation: EvaluationPart) -> dict[str, float]:
    """Flat metric names for the tracking store: `<model>_<metric>` and `delta_<metric>` (vs the baseline)."""
    names = {"base": "base", "candidate": "finetuned", "production": "production"}
    out = {}
    for label, result in evaluation.models.items():
        for metric in METRICS:
            value = getattr(result, metric)
            if value is not None and math.isfinite(value):
                out[f"{names[label]}_{metric}"] = float(value)
    for metric in ("eval_loss", "rouge_l", "mean_words", "empty_rate", "repetitive_rate"):
        value = delta(evaluation, metric)
        if value is not None:
            out[f"delta_{metric}"] = value
    return out


@dataclass(frozen=True)
class PolicyCheck:
    rule: str  # the experiment key, e.g. promotion.max_eval_loss_increase
    what: str  # e.g. "eval loss change vs production"
    value: float | None
    limit: float
    passed: bool
    interval: Interval | None = None  # 95 % interval of `value`, where per-item figures exist
    decide_on: str = "point"

    @property
    def measured(self) -> bool:
        return self.value is not None

    @property
    def upper_limit(self) -> bool:
        return self.rule.split(".")[-1].startswith("max")

    @property
    def evidence(self) -> str:
        """How the interval stands to the limit: "clear" (all of it passes), "against" (none of it
        does), "undecided" (it straddles the limit), or "no interval" (no per-item figures)."""
        if self.interval is None:
            return "no interval"
        low, high = self.interval.low, self.interval.high
        if self.upper_limit:
            return "clear" if high <= self.limit + 1e-12 else ("against" if low > self.limit + 1e-12 else "undecided")
        return "clear" if low >= self.limit - 1e-12 else ("against" if high < self.limit - 1e-12 else "undecided")

    def describe(self) -> str:
        sign = "≤" if self.upper_limit else "≥"
        if self.value is None:
            return f"{self.what}: not measured in this run, so not enforced (needs {sign} {self.limit:g}; {self.rule})"
        shown = f"{self.value:+.4f}"
        if self.interval is not None:
            i = self.interval
            shown += f" (95 % interval {i.low:+.4f} to {i.high:+.4f}, n = {i.n}; {self.evidence})"
        rule = self.rule + (", on the whole interval" if self.decide_on == "interval" else "")
        return f"{self.what}: {shown} (needs {sign} {self.limit:g}; {rule})"


@dataclass(frozen=True)
class PolicyResult:
    baseline: str
    checks: list[PolicyCheck]
    decide_on: str = "point"

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def failures(self) -> list[PolicyCheck]:
        return [c for c in self.checks if not c.passed]

    def undecided(self) -> list[PolicyCheck]:
        """Measured checks whose interval straddles the limit: this n cannot tell pass from fail."""
        return [c for c in self.checks if c.measured and c.evidence == "undecided"]

    def strength(self) -> str:
        """One phrase for the verdict line: how strong the evidence behind it is."""
        measured = [c for c in self.checks if c.measured]
        if not measured:
            return "nothing the policy limits was measured"
        with_interval = [c for c in measured if c.interval is not None]
        if not with_interval:
            return "point estimates only (no per-item figures for an interval)"
        undecided = self.undecided()
        if undecided:
            n = max(c.interval.n for c in undecided)
            names = ", ".join(c.what.split(" vs ")[0] for c in undecided)
            return f"not decidable at n = {n}: the 95 % interval of {names} straddles its limit"
        if len(with_interval) < len(measured):
            return "clear at 95 % where an interval exists; point estimates elsewhere"
        return "clear at 95 % confidence"


def _paired(evaluation: EvaluationPart, attribute: str, baseline: str) -> Interval | None:
    candidate, other = evaluation.models.get("candidate"), evaluation.models.get(baseline)
    if candidate is None or other is None:
        return None
    a, b = getattr(candidate, attribute), getattr(other, attribute)
    if not a or len(a) != len(b):
        return None
    return paired_bootstrap(a, b)


def _share(candidate: ModelEval | None, test: Callable[[str], bool]) -> Interval | None:
    if candidate is None or not candidate.replies:
        return None
    return wilson(sum(bool(test(r)) for r in candidate.replies), len(candidate.replies))


def check_policy(evaluation: EvaluationPart | None, policy: PromotionSpec,
                 finetune: FinetunePart | None = None) -> PolicyResult:
    """The experiment's promotion limits against the baseline. Without a held-out evaluation (a
    backend that does not run one) the eval losses of `finetune` stand in. A figure the run did not
    measure (no eval split, no prompts) is shown as such and its limit is not enforced.

    Each check carries the 95 % interval of its figure where per-item figures exist. With
    `decide_on: point` the measured figure must meet the limit; with `interval` the whole interval
    must (a check without an interval then falls back to its point, and says so)."""
    if evaluation is None or "candidate" not in evaluation.models:
        evaluation = EvaluationPart(test_split="", prompt_split="", max_new_tokens=0)
        if finetune is not None:
            evaluation.models["base"] = ModelEval(model="base", eval_loss=finetune.base_eval_loss)
            evaluation.models["candidate"] = ModelEval(model="candidate", eval_loss=finetune.eval_loss)
    base = baseline_of(evaluation)
    candidate = evaluation.models.get("candidate")
    checks = []

    def add(rule: str, what: str, value: float | None, limit: float | None, interval: Interval | None) -> None:
        if limit is None:
            return
        check = PolicyCheck(f"promotion.{rule}", what, value, limit, True, interval, policy.decide_on)
        if value is None:
            passed = True
        elif policy.decide_on == "interval" and interval is not None:
            passed = check.evidence == "clear"
        else:
            passed = value <= limit + 1e-12 if check.upper_limit else value >= limit - 1e-12
        checks.append(dataclasses.replace(check, passed=passed))

    add("max_eval_loss_increase", f"eval loss change vs {MODEL_LABELS[base]}", delta(evaluation, "eval_loss"),
        policy.max_eval_loss_increase, _paired(evaluation, "eval_loss_each", base))
    add("min_rouge_l_delta", f"ROUGE-L change vs {MODEL_LABELS[base]}", delta(evaluation, "rouge_l"),
        policy.min_rouge_l_delta, _paired(evaluation, "rouge_l_each", base))
    add("max_empty_rate", "empty replies (share)", candidate.empty_rate if candidate else None,
        policy.max_empty_rate, _share(candidate, lambda r: not r.strip()))
    add("max_repetitive_rate", "repetitive replies (share)", candidate.repetitive_rate if candidate else None,
        policy.max_repetitive_rate, _share(candidate, is_repetitive))
    return PolicyResult(base, checks, policy.decide_on)


class PolicyNotMet(AutomationError):
    """`promote` refused: the candidate does not meet the experiment's promotion policy."""

    exit_code = 1

    def __init__(self, result: PolicyResult) -> None:
        lines = [f"the promotion policy is not met {against(result.baseline)}:"]
        lines += [f"  {c.describe()}" for c in result.failures()]
        lines.append("promote anyway with --override-policy 'REASON' (the reason is kept as the "
                     "promotion_override tag), or change the experiment's promotion: limits")
        super().__init__("\n".join(lines))
        self.result = result
