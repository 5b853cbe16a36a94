"""The held-out evaluation's figures and the promotion policy, on known inputs."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from automation.errors import ConfigError
from automation.evaluation import (
    PolicyNotMet,
    check_policy,
    delta,
    held_out_prompts,
    is_repetitive,
    mlflow_metrics,
    model_eval,
    rouge_l,
    rouge_l_f1,
    rouge_tokens,
)
from automation.record import EvalPrompt, EvaluationPart
from automation.spec import PromotionSpec
from tests.conftest import REPO, chat_row, write_jsonl

SAMPLE = REPO / "data" / "ultrachat-sample" / "test_gen.jsonl"


def test_held_out_prompts_are_seeded_cut_at_the_last_user_turn(tmp_path):
    first = held_out_prompts(SAMPLE, 8, 42)
    assert first == held_out_prompts(SAMPLE, 8, 42) and first != held_out_prompts(SAMPLE, 8, 7)
    assert len(first) == 8 and len({p.prompt_id for p in first}) == 8
    for prompt in first:
        assert prompt.messages[-1]["role"] == "user" and prompt.reference
    rows = write_jsonl(tmp_path / "s.jsonl", [chat_row("Q1?", "A1.", "Q2?", "A2."), chat_row("Only a question?")])
    prompts = held_out_prompts(rows, 5, 0)
    assert len(prompts) == 2, "no more prompts than rows"
    assert [m["content"] for m in prompts[0].messages] == ["Q1?", "A1.", "Q2?"] and prompts[0].reference == "A2."
    assert prompts[1].reference is None
    assert held_out_prompts(rows, 0, 0) == []
    with pytest.raises(ConfigError, match="empty"):
        held_out_prompts(write_jsonl(tmp_path / "e.jsonl", []), 3, 0)


def test_a_larger_n_keeps_the_prompts_of_a_smaller_one():
    """Growing evaluation.prompts adds prompts to the same seeded order: n = 8 sits inside n = 32,
    and the same n on the same data is the same prompts."""
    ids = {n: [p.prompt_id for p in held_out_prompts(SAMPLE, n, 42)] for n in (1, 8, 16, 32, 500)}
    assert set(ids[1]) < set(ids[8]) < set(ids[16]) < set(ids[32]) == set(ids[500])
    assert len(ids[32]) == 32 and len(ids[500]) == 32, "the sample split caps n at its rows"
    assert ids[8] == sorted(ids[8], key=ids[32].index), "file order at every n"


def test_rouge_l_against_the_reference():
    scores = rouge_l(["The cat sat on the mat.", "Knead the dough.", None, "x"],
                     ["the cats sat on the mat", "Fly a kite.", "anything", "   "])
    assert scores[0] == pytest.approx(1.0), "case and stemming (cats -> cat) do not count"
    assert scores[1] == 0.0 and scores[2] == 0.0 and scores[3] == 0.0


def test_rouge_tokens_follow_rouge_score():
    assert rouge_tokens("The cats' RUNNING-shoes, 2x faster!") == ["the", "cat", "run", "shoe", "2x", "faster"]
    assert rouge_tokens("café naïve \u212a") == ["caf", "na", "ve", "k"], "outside [a-z0-9] splits; K (Kelvin) lowers to k"
    assert rouge_tokens("  ...  ") == [] and rouge_tokens("") == []


# Pairs that share words in many forms, so the scores spread over (0, 1) rather than sit at 0.
WORDS = ("the a an of to in running runs ran runner connection connected connecting generously generous "
         "happiness happy relational conditional rational caresses ponies ties caress cats cat sky skies "
         "dying lying agreed feed plastered bled motoring sing hopping tanned falling hissing fizzed failing "
         "filing happily universal university 2024 3.14 x86_64 gpt-4 o'clock can't U.S.A. e-mail").split()
ODD = ["", " ", "\n\t", "...", "!!", "—", "café", "naïve", "İstanbul", "straße", "ﬁnance", "\u212aelvin",
       "東京", "😀", "ÀÉÎÕÜ", "1,000.5", "#hashtag", "@user", "(nested [brackets])", "\u00a0", "\u200b"]


def random_text(rng: random.Random) -> str:
    pool = WORDS + ODD if rng.random() < 0.5 else WORDS
    words = [rng.choice(pool) for _ in range(rng.choice((0, 1, 2, 5, 12, 30, 80)))]
    return rng.choice((" ", "  ", ", ", "\n")).join(w.upper() if rng.random() < 0.1 else w for w in words)


@pytest.fixture
def torchmetrics_rouge_l():
    """torchmetrics' ROUGE-L F1 (its port of rouge-score, stemmed), computed in float64 so the two
    figures can be compared exactly (its tensors are float32 by default)."""
    torch = pytest.importorskip("torch")
    from torchmetrics.functional.text.rouge import rouge_score

    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield lambda reference, reply: float(rouge_score(reply, reference, rouge_keys="rougeL",
                                                     use_stemmer=True)["rougeL_fmeasure"])
    torch.set_default_dtype(dtype)


def test_rouge_l_equals_torchmetrics_on_seeded_pairs(torchmetrics_rouge_l):
    rng = random.Random(20)
    pairs = [(random_text(rng), random_text(rng)) for _ in range(400)]
    pairs += [(r, r) for r, _ in pairs[:20]] + [("", ""), ("a", ""), ("", "a"), ("The cat.", "the CATS!")]
    scores = {(ref, reply): rouge_l_f1(ref, reply) for ref, reply in pairs}
    assert sum(0 < s < 1 for s in scores.values()) > 150, "the pairs exercise partial matches"
    mismatches = [(ref, reply, mine, torchmetrics_rouge_l(ref, reply)) for (ref, reply), mine in scores.items()
                  if mine != torchmetrics_rouge_l(ref, reply)]
    assert mismatches == []


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(reference=st.text(max_size=60), reply=st.text(max_size=60))
def test_rouge_l_equals_torchmetrics_on_any_text(torchmetrics_rouge_l, reference, reply):
    assert rouge_l_f1(reference, reply) == torchmetrics_rouge_l(reference, reply)


def test_repetitive_replies_are_loops_not_prose():
    assert is_repetitive("I am a model. " * 10)
    assert is_repetitive("!!!! " * 20)
    assert not is_repetitive("Knead the dough for ten minutes, then let it rest in a warm place until it doubles.")
    assert not is_repetitive("ok ok ok"), "too short to judge"


def evaluation(production: bool) -> EvaluationPart:
    prompts = [EvalPrompt(messages=[{"role": "user", "content": "q"}], reference="bake the bread at 220 degrees")] * 4
    ev = EvaluationPart(test_split="test_sft", prompt_split="test_gen", max_new_tokens=16, prompts=prompts)
    ev.models["base"] = model_eval("base", prompts, ["hello there friend"] * 4, 2.7)
    ev.models["candidate"] = model_eval("cand", prompts, ["bake the bread at 220 degrees", "bake it", "", "hi"], 2.4)
    if production:
        ev.models["production"] = model_eval("models:/m/1", prompts, ["bake the bread"] * 4, 2.3)
        ev.production_version = "1"
    return ev


def test_model_figures_and_deltas_against_the_baseline():
    ev = evaluation(production=True)
    c = ev.models["candidate"]
    assert c.empty_rate == 0.25 and c.mean_words == pytest.approx((6 + 2 + 0 + 1) / 4)
    assert c.rouge_l_each[0] == 1.0 and c.rouge_l_each[2] == 0.0
    assert c.perplexity == pytest.approx(11.0231763806416)
    assert delta(ev, "eval_loss") == pytest.approx(0.1), "production is the baseline when it exists"
    assert delta(ev, "eval_loss", "base") == pytest.approx(-0.3)
    assert delta(evaluation(production=False), "eval_loss") == pytest.approx(-0.3)
    metrics = mlflow_metrics(ev)
    assert metrics["production_eval_loss"] == 2.3 and metrics["delta_eval_loss"] == pytest.approx(0.1)
    assert metrics["finetuned_empty_rate"] == 0.25 and "base_rouge_l" in metrics


def test_policy_against_production_and_against_base():
    policy = PromotionSpec(max_eval_loss_increase=0.0, min_rouge_l_delta=-0.01, max_empty_rate=0.0)
    result = check_policy(evaluation(production=True), policy)
    assert result.baseline == "production" and not result.passed
    failed = {c.rule for c in result.failures()}
    assert failed == {"promotion.max_eval_loss_increase", "promotion.min_rouge_l_delta", "promotion.max_empty_rate"}
    assert result.checks[0].describe() == ("eval loss change vs production: +0.1000 "
                                           "(needs ≤ 0; promotion.max_eval_loss_increase)")
    message = str(PolicyNotMet(result))
    assert "not met against the production" in message and "--override-policy" in message
    against_base = check_policy(evaluation(production=False), PromotionSpec())
    assert against_base.baseline == "base" and against_base.passed
    assert check_policy(evaluation(production=True), PromotionSpec(max_eval_loss_increase=None,
                                                                   min_rouge_l_delta=None)).checks == []


def test_policy_without_an_evaluation_uses_the_losses_and_says_what_it_did_not_measure():
    from automation.record import FinetunePart

    unmeasured = check_policy(None, PromotionSpec())
    assert unmeasured.passed and not any(c.measured for c in unmeasured.checks)
    assert "not measured in this run, so not enforced" in unmeasured.checks[0].describe()
    worse = FinetunePart(job_name="j", base_eval_loss=2.0, eval_loss=2.5)  # e.g. an Azure job's metrics
    result = check_policy(None, PromotionSpec(), worse)
    assert not result.passed and [c.rule for c in result.failures()] == ["promotion.max_eval_loss_increase"]
    assert result.failures()[0].value == pytest.approx(0.5)


def test_the_experiment_file_holds_the_evaluation_and_the_policy(tmp_path):
    from automation.errors import ExperimentInvalid
    from automation.spec import load_experiment
    from tests.conftest import LOCAL_EXPERIMENT, write_experiment

    body = {**LOCAL_EXPERIMENT, "evaluation": {"prompts": 4}, "promotion": {"max_eval_loss_increase": 0.05,
                                                                            "min_rouge_l_delta": None}}
    exp = load_experiment(write_experiment(tmp_path, body))
    assert exp.evaluation.prompts == 4 and exp.evaluation.max_new_tokens == 96
    assert exp.promotion.max_eval_loss_increase == 0.05 and exp.promotion.min_rouge_l_delta is None
    bad = {**LOCAL_EXPERIMENT, "promotion": {"min_rouge_l_delta": 2, "max_loss_increase": 0}}
    with pytest.raises(ExperimentInvalid) as err:
        load_experiment(write_experiment(tmp_path, bad))
    text = "\n".join(str(i) for i in err.value.issues)
    assert "promotion.min_rouge_l_delta" in text and "less than or equal to 1" in text
    assert "promotion.max_loss_increase" in text and "did you mean promotion.max_eval_loss_increase?" in text
    default = {k: v for k, v in LOCAL_EXPERIMENT.items() if k != "evaluation"}
    assert load_experiment(write_experiment(tmp_path, default)).evaluation.prompts == 32, "the measured default"
    assert load_experiment(write_experiment(tmp_path, default), ["evaluation.prompts=128"]).evaluation.prompts == 128
    with pytest.raises(ExperimentInvalid, match="less than or equal to 256"):
        load_experiment(write_experiment(tmp_path, {**LOCAL_EXPERIMENT, "evaluation": {"prompts": 257}}))



class _CharTokenizer:
    """One token per character (0 pads, 1 ends); the chat template is the last message's text."""

    pad_token_id, eos_token_id, padding_side = 0, 1, "right"

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return messages[-1]["content"]

    def __call__(self, texts, return_tensors=None, padding=False, add_special_tokens=True):
        import torch

        ids = [[ord(c) for c in text] for text in texts]
        if return_tensors is None:
            return {"input_ids": ids}
        width = max(map(len, ids))
        assert self.padding_side == "left"
        return {"input_ids": torch.tensor([[0] * (width - len(r)) + r for r in ids]),
                "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids])}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids.tolist() if i > 1)


class _ReverseModel:
    """Replies with the prompt reversed; records each batch's padded width and rows."""

    training, device = False, "cpu"

    def __init__(self):
        self.batches = []

    def eval(self):
        return self

    def train(self, mode=True):
        self.training = mode

    def generate(self, input_ids, attention_mask, generation_config):
        import torch

        self.batches.append((input_ids.shape[1], input_ids.shape[0]))
        replies = [row[mask == 1].flip(0).tolist() for row, mask in zip(input_ids, attention_mask, strict=True)]
        width = max(map(len, replies))
        return torch.cat([input_ids, torch.tensor([r + [1] * (width - len(r)) for r in replies])], dim=1)


def test_replies_batched_by_length_come_back_in_the_prompts_order():
    """generate_replies batches the prompts by length (less padding) and returns each reply at its
    prompt's place."""
    from automation.backends.local.evaluate import generate_replies

    texts = ["a long prompt of many words", "hi", "a middling one", "ok", "the longest prompt of them all, by far"]
    prompts = [EvalPrompt(messages=[{"role": "user", "content": t}]) for t in texts]
    model, tokenizer = _ReverseModel(), _CharTokenizer()
    replies = generate_replies(model, tokenizer, prompts, max_new_tokens=8, label="t", batch_size=2)
    assert replies == [t[::-1] for t in texts]
    assert model.batches == [(2, 2), (27, 2), (38, 1)], "by length: (hi, ok), (middling, long), (longest)"
    assert tokenizer.padding_side == "right" and model.training is False, "both left as they were"

