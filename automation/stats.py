"""How sure a comparison is: intervals for the figures the promotion decision compares.

- A change between two models measured on the same items (ROUGE-L per held-out prompt, eval loss
  per conversation) gets a **paired bootstrap** interval of the mean difference: resample the
  items with replacement, keep each item's pair together, and take the percentiles of the
  resampled means. Seeded, so the same figures give the same interval on every machine. The
  plain percentile interval is too narrow for small n (it covers ~89 % instead of 95 % at n = 8),
  so the percentiles are the *expanded* ones (Hesterberg, "What teachers should know about the
  bootstrap", 2015): the tail probability is widened so that the normal quantile, scaled by
  sqrt(n / (n - 1)), equals Student's t quantile with n - 1 degrees of freedom.
- A share of the candidate's replies (empty, repetitive) gets a **Wilson score** interval, which
  stays inside [0, 1] and is honest at n = 8, where the normal approximation is not.

Pure Python on purpose: the core install (validate, report rendering) has no numpy, and n is at
most a few hundred items, so 2,000 resamples take milliseconds.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

CONFIDENCE = 0.95
RESAMPLES = 2000
SEED = 20240611  # any fixed value: the interval must not change between runs of the same figures


@dataclass(frozen=True)
class Interval:
    """An estimate with its `confidence` interval, over `n` items."""

    estimate: float
    low: float
    high: float
    n: int
    confidence: float = CONFIDENCE

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def paired_bootstrap(candidate: Sequence[float], baseline: Sequence[float], *, confidence: float = CONFIDENCE,
                     resamples: int = RESAMPLES, seed: int = SEED) -> Interval | None:
    """The mean of `candidate[i] - baseline[i]` with its percentile-bootstrap interval; None when
    there is nothing to pair. The two lists must pair item by item (same prompts, same order)."""
    if len(candidate) != len(baseline):
        raise ValueError(f"paired figures differ in length: {len(candidate)} vs {len(baseline)}")
    differences = [float(c) - float(b) for c, b in zip(candidate, baseline, strict=True)]
    return bootstrap_mean(differences, confidence=confidence, resamples=resamples, seed=seed)


def bootstrap_mean(values: Sequence[float], *, confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
                   seed: int = SEED) -> Interval | None:
    """The mean of `values` with its percentile-bootstrap interval (None for no values)."""
    n = len(values)
    if n == 0:
        return None
    mean = math.fsum(values) / n
    if n == 1 or max(values) == min(values):
        return Interval(mean, mean, mean, n, confidence)
    rng = random.Random(seed)
    means = sorted(math.fsum(rng.choices(values, k=n)) / n for _ in range(resamples))
    tail = expanded_tail(confidence, n)
    return Interval(mean, _quantile(means, tail), _quantile(means, 1 - tail), n, confidence)


def expanded_tail(confidence: float, n: int) -> float:
    """The lower percentile the expanded bootstrap takes for a `confidence` interval over n items:
    Phi(-sqrt(n / (n - 1)) * t(1 - alpha / 2, n - 1)); it tends to alpha / 2 as n grows."""
    alpha = 1 - confidence
    return NormalDist().cdf(-math.sqrt(n / (n - 1)) * t_quantile(1 - alpha / 2, n - 1))


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile by the Cornish-Fisher expansion around the normal one (four terms:
    within 0.002 of the exact value for df >= 3, e.g. 2.3646 at p = 0.975, df = 7; exact enough to
    pick a bootstrap percentile). df = 1 and 2 have closed forms."""
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    z = NormalDist().inv_cdf(p)
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
            + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * df**4))


def wilson(successes: int, n: int, *, confidence: float = CONFIDENCE) -> Interval | None:
    """The share `successes / n` with its Wilson score interval (None for n = 0)."""
    if n == 0:
        return None
    if not 0 <= successes <= n:
        raise ValueError(f"{successes} successes out of {n}")
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    share = successes / n
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    spread = z * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return Interval(share, max(0.0, centre - spread), min(1.0, centre + spread), n, confidence)


def _quantile(ordered: Sequence[float], q: float) -> float:
    """The q-quantile of sorted values, interpolated linearly (numpy's default method)."""
    position = q * (len(ordered) - 1)
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)
