"""The intervals behind the promotion decision: right on known answers, seeded, and covering the
true difference about 95 % of the time on synthetic paired replies."""

from __future__ import annotations

import random

import pytest

from automation.evaluation import check_policy, is_repetitive, model_eval
from automation.record import EvalPrompt, EvaluationPart
from automation.spec import PromotionSpec
from automation.stats import bootstrap_mean, paired_bootstrap, t_quantile, wilson


def test_a_constant_difference_has_no_spread_and_nothing_has_no_interval():
    interval = paired_bootstrap([0.5, 0.7, 0.2], [0.4, 0.6, 0.1])
    assert interval.estimate == pytest.approx(0.1) and interval.half_width == pytest.approx(0.0)
    assert paired_bootstrap([], []) is None and wilson(0, 0) is None
    with pytest.raises(ValueError, match="differ in length"):
        paired_bootstrap([1.0], [1.0, 2.0])


def test_the_bootstrap_is_seeded_and_its_interval_holds_the_estimate():
    rng = random.Random(3)
    a, b = [rng.random() for _ in range(32)], [rng.random() for _ in range(32)]
    first, second = paired_bootstrap(a, b), paired_bootstrap(a, b)
    assert first == second, "the same figures must give the same interval on every run"
    assert first.low < first.estimate < first.high and first.n == 32
    assert paired_bootstrap(a, b, seed=1) != first


def test_wilson_matches_the_textbook_values():
    # 0 of 8: the interval still admits up to ~32 % (the normal approximation would say 0 to 0)
    zero = wilson(0, 8)
    assert zero.low == 0.0 and zero.high == pytest.approx(0.3244, abs=1e-4)
    half = wilson(5, 10)
    assert (half.low, half.high) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))


@pytest.mark.parametrize("n", [8, 32])
def test_the_paired_interval_covers_the_true_difference_about_95_percent_of_the_time(n):
    """Synthetic replies: per-prompt scores of a baseline (prompt difficulty varies) and of a
    candidate that is better by a known amount plus noise. Over 300 seeded experiments the 95 %
    interval must contain the true difference 91-99 % of the time (3.5 binomial standard errors
    around 95 %). The plain percentile bootstrap covers 88.7 % here at n = 8; the expanded one 95.3 %."""
    rng = random.Random(n)
    true_difference, covered = 0.03, 0
    trials = 300
    for trial in range(trials):
        difficulty = [rng.uniform(0.05, 0.5) for _ in range(n)]
        baseline = [min(1.0, max(0.0, d + rng.gauss(0, 0.05))) for d in difficulty]
        candidate = [b + true_difference + rng.gauss(0, 0.08) for b in baseline]
        interval = paired_bootstrap(candidate, baseline, resamples=500, seed=trial)
        covered += interval.contains(true_difference)
    assert 0.91 <= covered / trials <= 0.99, covered / trials


def test_t_quantiles_match_the_tables():
    for df, table in ((1, 12.706), (2, 4.303), (3, 3.182), (7, 2.365), (31, 2.040), (127, 1.979)):
        assert t_quantile(0.975, df) == pytest.approx(table, abs=4e-3)


def test_the_interval_narrows_as_n_grows():
    rng = random.Random(0)
    widths = []
    for n in (8, 32, 128):
        base = [rng.random() for _ in range(n)]
        cand = [b + rng.gauss(0.02, 0.1) for b in base]
        widths.append(paired_bootstrap(cand, base).half_width)
    assert widths[0] > widths[1] > widths[2]
    assert bootstrap_mean([1.0]).half_width == 0.0


def _evaluation(candidate: list[str], baseline: list[str], n_prompts: int) -> EvaluationPart:
    reference = "bake the bread at 220 degrees for thirty minutes until golden"
    prompts = [EvalPrompt(messages=[{"role": "user", "content": f"q{i}"}], reference=reference)
               for i in range(n_prompts)]
    ev = EvaluationPart(test_split="test_sft", prompt_split="test_gen", max_new_tokens=16, prompts=prompts)
    ev.models["base"] = model_eval("base", prompts, baseline, 2.7)
    ev.models["candidate"] = model_eval("cand", prompts, candidate, 2.6)
    return ev


def test_a_small_noisy_gain_is_undecided_and_the_interval_rule_refuses_it():
    """8 prompts, the candidate a little better on some and worse on others: the point rule passes,
    the verdict says the limit is not decidable at this n, and `decide_on: interval` fails it."""
    good, bad = "bake the bread at 220 degrees for thirty minutes", "the weather is nice"
    candidate = [good, bad, good, bad, bad, good, bad, good]
    baseline = [bad, good, bad, good, bad, good, good, bad]
    ev = _evaluation(candidate, baseline, 8)
    point = check_policy(ev, PromotionSpec(max_eval_loss_increase=None, min_rouge_l_delta=0.0))
    check = point.checks[0]
    assert point.passed and check.value >= 0 and check.interval.n == 8
    assert check.evidence == "undecided" and point.undecided() == [check]
    assert point.strength().startswith("not decidable at n = 8")
    assert "95 % interval" in check.describe() and "n = 8" in check.describe()
    strict = check_policy(ev, PromotionSpec(max_eval_loss_increase=None, min_rouge_l_delta=0.0, decide_on="interval"))
    assert not strict.passed and "on the whole interval" in strict.failures()[0].describe()


def test_a_clear_gain_passes_the_interval_rule():
    good, bad = "bake the bread at 220 degrees for thirty minutes", "the weather is nice"
    ev = _evaluation([good] * 16, [bad] * 15 + [good], 16)
    result = check_policy(ev, PromotionSpec(max_eval_loss_increase=None, min_rouge_l_delta=0.0, decide_on="interval"))
    assert result.passed and result.checks[0].evidence == "clear"
    assert result.strength() == "clear at 95 % confidence"


def test_shares_carry_a_wilson_interval_and_losses_without_per_item_figures_say_so():
    ev = _evaluation(["", "bake", "bake", "bake"], ["x"] * 4, 4)
    result = check_policy(ev, PromotionSpec(max_empty_rate=0.5))
    by_rule = {c.rule: c for c in result.checks}
    assert by_rule["promotion.max_empty_rate"].interval.n == 4
    assert by_rule["promotion.max_empty_rate"].evidence == "undecided", "1 of 4 empty: 0.25 cannot rule out > 0.5"
    assert by_rule["promotion.max_eval_loss_increase"].interval is None
    assert by_rule["promotion.max_eval_loss_increase"].evidence == "no interval"
    ev.models["base"].eval_loss_each[:] = [2.8, 2.6, 2.7, 2.7]
    ev.models["candidate"].eval_loss_each[:] = [2.7, 2.5, 2.6, 2.6]
    paired = check_policy(ev, PromotionSpec()).checks[0]
    assert paired.interval is not None and paired.evidence == "clear"


def test_repetition_catches_repeated_lines_and_sentences():
    """The shapes of the two fine-tuned replies the 4-gram rule missed (issue 24): one line said
    three times inside otherwise varied text, 66 % distinct 4-grams."""
    reply_2 = ("To make a sourdough starter, mix equal parts flour and water in a jar.\n"
               "Feed it every day with fresh flour and water.\n"
               "Feed it every day with fresh flour and water.\n"
               "Feed it every day with fresh flour and water.\n"
               "After about a week it should smell sour and bubble.")
    reply_6 = ("Paris is the capital of France. It is known for the Eiffel Tower. It is known for the "
               "Eiffel Tower. It is known for the Eiffel Tower. Many tourists visit every year.")
    for reply in (reply_2, reply_6):
        assert is_repetitive(reply), reply
    assert not is_repetitive("Mix the flour. Add the water. Knead for ten minutes. Let it rest for an hour.")
    assert not is_repetitive("1. Mix the flour and water.\n2. Mix the flour and water.\n3. Let it rest for an hour.")
    assert is_repetitive("1. Mix the flour and water.\n2. Mix the flour and water.\n3. Mix the flour and water.")
