"""Write a dataset shaped like HuggingFaceH4/ultrachat_200k, for benchmarking the data stage.

    python bench/make_ultrachat_like.py OUT_DIR [--rows 200000] [--seed 0]

Writes OUT_DIR/{train_sft,test_sft,train_gen,test_gen}.jsonl with the ultrachat_200k schema
(prompt, prompt_id = sha256 hex of the prompt, messages alternating user/assistant, starting with
the user and ending with the assistant). `--rows` is the size of train_sft; the other splits keep
the real dataset's ratios (207865 / 23110 / 256032 / 28304).

Length distribution (like the real one): 1-4 user turns (weights 35/30/20/15 %), conversations
log-normally distributed around a median of ~3,500 characters, clipped to 1,000-6,000; user turns
take ~12 % of the characters. Text is random words from a fixed vocabulary, cut as slices of one
pre-built word pool, so generation is fast (a few seconds per 100,000 rows). Seeded: the same
arguments give byte-identical files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np

REAL_SIZES = {"train_sft": 207865, "test_sft": 23110, "train_gen": 256032, "test_gen": 28304}
VOCAB = (
    "the of and to a in is that for it as with was on be by this are or at from an which have not "
    "they you we can has more one their also will were been other all but would there when these "
    "model data training language learning system time people work use first new example like "
    "how what why could should about into some than them only over such most make after well "
    "world process research health business water energy history city music student teacher "
    "market customer product design network story family support important different however "
    "because through between during several including provide information example service social "
    "community environment development experience management quality technology government "
    "recipe travel budget salary interview garden exercise sleep climate ocean mountain river "
    "please explain summarize describe compare write list steps ideas benefits risks reasons"
).split()
TURN_WEIGHTS = np.array([0.35, 0.30, 0.20, 0.15])


def split_sizes(rows: int) -> dict[str, int]:
    scale = rows / REAL_SIZES["train_sft"]
    return {split: rows if split == "train_sft" else int(round(n * scale)) for split, n in REAL_SIZES.items()}


class WordPool:
    """One long string of random words; text of length n is a slice starting at a word."""

    def __init__(self, rng: np.random.Generator, words: int = 2_000_000):
        vocab = np.array(VOCAB)
        picks = vocab[rng.integers(0, len(vocab), size=words)]
        # Sentence-ish punctuation every ~12 words, paragraph breaks now and then.
        seps = np.full(words, " ", dtype=object)
        seps[rng.random(words) < 1 / 12] = ". "
        seps[rng.random(words) < 1 / 150] = ".\n\n"
        self.text = "".join(w + s for w, s in zip(picks.tolist(), seps.tolist(), strict=True))
        starts = np.flatnonzero(np.frombuffer(self.text.encode("ascii"), dtype=np.uint8) == ord(" ")) + 1
        self.starts = starts[starts < len(self.text) - 10_000]

    def texts(self, rng: np.random.Generator, lengths: np.ndarray) -> list[str]:
        offsets = self.starts[rng.integers(0, len(self.starts), size=len(lengths))]
        text = self.text
        out = []
        for off, n in zip(offsets.tolist(), lengths.tolist(), strict=True):
            piece = text[off:off + n].strip()
            out.append(piece[:1].upper() + piece[1:] if piece else "Hello")
        return out


def make_split(rng: np.random.Generator, pool: WordPool, n: int) -> list[str]:
    turns = rng.choice(4, size=n, p=TURN_WEIGHTS) + 1
    total = np.clip(rng.lognormal(mean=np.log(3500), sigma=0.35, size=n), 1000, 6000).astype(np.int64)
    # Characters per message: user messages share ~12 % of the total, assistant ones the rest,
    # each message's share jittered.
    n_msgs = 2 * turns
    msg_count = int(n_msgs.sum())
    row_of_msg = np.repeat(np.arange(n), n_msgs)
    pos = np.arange(msg_count) - np.repeat(np.cumsum(n_msgs) - n_msgs, n_msgs)
    is_user = pos % 2 == 0
    weight = np.where(is_user, 0.12, 0.88) * rng.uniform(0.6, 1.4, size=msg_count)
    weight_sum = np.bincount(row_of_msg, weights=weight, minlength=n)
    lengths = np.maximum(20, (total[row_of_msg] * weight / weight_sum[row_of_msg]).astype(np.int64))
    contents = pool.texts(rng, lengths)
    lines = []
    i = 0
    dumps = json.dumps
    for t in turns.tolist():
        msgs = contents[i:i + 2 * t]
        i += 2 * t
        prompt = msgs[0]
        row = {
            "prompt": prompt,
            "prompt_id": hashlib.sha256(prompt.encode("utf-8")).hexdigest(),
            "messages": [{"role": "user" if k % 2 == 0 else "assistant", "content": c}
                         for k, c in enumerate(msgs)],
        }
        lines.append(dumps(row, ensure_ascii=False))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--rows", type=int, default=200_000, help="rows of train_sft (default 200000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    pool = WordPool(rng)
    chunk = 50_000
    for split, n in split_sizes(args.rows).items():
        path = args.out_dir / f"{split}.jsonl"
        with path.open("w", encoding="utf-8") as out:
            for begin in range(0, n, chunk):
                out.write("\n".join(make_split(rng, pool, min(chunk, n - begin))) + "\n")
        print(f"{split}: {n} rows, {path.stat().st_size / 1e6:.0f} MB")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
