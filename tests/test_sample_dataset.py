"""The bundled sample dataset: ultrachat_200k layout, enough conversations, in sync with its sources."""

from __future__ import annotations

import hashlib
import importlib.util
from collections import Counter

from automation.data import check_row, read_jsonl
from tests.conftest import REPO

FOLDER = REPO / "data" / "ultrachat-sample"
SPLITS = ("train_sft", "test_sft", "train_gen", "test_gen")


def load_builder():
    spec = importlib.util.spec_from_file_location("build_sample", FOLDER / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_split_files_are_built_from_the_sources():
    builder = load_builder()
    for split, rows in builder.splits(builder.conversations()).items():
        assert (FOLDER / f"{split}.jsonl").read_text(encoding="utf-8") == builder.render(rows), (
            f"{split}.jsonl is stale: run python data/ultrachat-sample/build.py")


def test_every_row_fits_the_ultrachat_schema():
    prompts: list[str] = []
    turns: Counter[int] = Counter()
    for split in SPLITS:
        rows = read_jsonl(FOLDER / f"{split}.jsonl")
        assert rows, split
        for row in rows:
            assert check_row(row, sft=True) == [], (split, row["prompt"][:60])
            assert set(row) == {"prompt", "prompt_id", "messages"}
            assert row["prompt"] == row["messages"][0]["content"]
            assert row["prompt_id"] == hashlib.sha256(row["prompt"].encode("utf-8")).hexdigest()
            prompts.append(row["prompt"])
            turns[sum(m["role"] == "user" for m in row["messages"])] += 1
    assert len(prompts) >= 240
    assert len(set(prompts)) == len(prompts), "prompts are unique, so no conversation is in two splits"
    assert set(turns) == {1, 2, 3, 4}, turns
