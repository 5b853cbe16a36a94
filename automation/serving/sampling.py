"""Per-request sampling for the continuous-batching engine: one row of logits in, one token out.

Every value the request schema allows must give a token, never a 5xx: a temperature or a
repetition penalty of 1e-38 divides the logits into infinities, so both are floored at
`SMALLEST_DIVISOR` (below it a temperature is greedy in all but ties), and a row whose
probabilities still come out non-finite falls back to greedy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# 30 (a large logit) / 1e-4 = 3e5: far from float32's limit, and already greedy for any real model.
SMALLEST_DIVISOR = 1e-4


@dataclass(frozen=True)
class Sampling:
    """What one request asks of the sampler. temperature 0 (or do_sample false) is greedy."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    repetition_penalty: float | None = None  # Hugging Face's: over the prompt and the reply
    presence_penalty: float = 0.0  # OpenAI's: over the reply only
    frequency_penalty: float = 0.0

    @classmethod
    def make(cls, do_sample: bool, temperature: float, top_p: float, **rest: Any) -> Sampling:
        greedy = not do_sample or temperature < SMALLEST_DIVISOR
        return cls(do_sample=not greedy, temperature=temperature, top_p=top_p, **rest)


def next_token(torch, logits, sampling: Sampling, seen: list[int], generated: list[int], generator) -> int:
    """The next token of one row. `seen` is prompt + reply so far, `generated` the reply alone."""
    scores = logits.float().clone()
    if sampling.repetition_penalty is not None and sampling.repetition_penalty != 1.0 and seen:
        penalty = max(sampling.repetition_penalty, SMALLEST_DIVISOR)
        index = torch.tensor(sorted(set(seen)), dtype=torch.long)
        picked = scores[index]
        scores[index] = torch.where(picked > 0, picked / penalty, picked * penalty)
    if generated and (sampling.presence_penalty or sampling.frequency_penalty):
        index, counts = torch.unique(torch.tensor(generated, dtype=torch.long), return_counts=True)
        scores[index] -= sampling.frequency_penalty * counts.float() + sampling.presence_penalty
    if not sampling.do_sample:
        return int(torch.argmax(torch.nan_to_num(scores, nan=-float("inf"))))
    scores = scores / max(sampling.temperature, SMALLEST_DIVISOR)
    if sampling.top_k:
        k = min(sampling.top_k, scores.numel())
        threshold = torch.topk(scores, k).values[-1]
        scores = scores.masked_fill(scores < threshold, -float("inf"))
    probs = torch.softmax(scores - scores.max(), dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= sampling.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    total = probs.sum()
    if not torch.isfinite(total) or total <= 0:
        return int(torch.argmax(torch.nan_to_num(logits.float(), nan=-float("inf"))))
    return int(torch.multinomial(probs / total, 1, generator=generator))
