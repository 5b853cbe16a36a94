"""Build the sample dataset's split files from the hand-written conversations in sources/.

    python data/ultrachat-sample/build.py

Each conversation gets `prompt` (its first user message) and `prompt_id` (sha256 of the prompt),
as in HuggingFaceH4/ultrachat_200k. Conversations are ordered by prompt_id and dealt into the four
splits 5:1:1:1 (train_sft, test_sft, train_gen, test_gen), so the result does not depend on file
order. tests/test_sample_dataset.py fails when the split files and the sources disagree.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
DEAL = ["train_sft"] * 5 + ["test_sft", "train_gen", "test_gen"]
SPLITS = ["train_sft", "test_sft", "train_gen", "test_gen"]


def conversations(sources: Path = HERE / "sources") -> list[dict]:
    rows = []
    for file in sorted(sources.glob("*.yaml")):
        for item in yaml.safe_load(file.read_text(encoding="utf-8")):
            messages = [{"role": m["role"], "content": m["content"].strip()} for m in item["messages"]]
            prompt = messages[0]["content"]
            rows.append({"prompt": prompt, "prompt_id": hashlib.sha256(prompt.encode("utf-8")).hexdigest(),
                         "messages": messages})
    return sorted(rows, key=lambda r: r["prompt_id"])


def splits(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {name: [] for name in SPLITS}
    for index, row in enumerate(rows):
        out[DEAL[index % len(DEAL)]].append(row)
    return out


def render(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def main() -> int:
    for name, rows in splits(conversations()).items():
        (HERE / f"{name}.jsonl").write_text(render(rows), encoding="utf-8")
        print(f"{name}: {len(rows)} conversations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
