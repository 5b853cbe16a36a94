"""Where the data stage's time goes at 100 %, and what a verbatim-copy writer would save.

    python bench/profile_data.py DATASET_DIR [--rows 50000]

1. cProfile of `automation.data._write_split` (parse, check, re-serialise, write) on the first
   --rows rows of train_sft: the top functions by own time.
2. A what-if, not the product: the same loop writing the input line verbatim once the parsed row
   passes `check_row` (the line is already valid JSON of exactly that row), i.e. no
   `json.dumps` per row. Both timed alternately, 3 times each, medians.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import tempfile
import time
from pathlib import Path

from automation.chat_rows import CANONICAL
from automation.data import Source, _write_split, check_row, iter_rows


def write_split(source: Source, limit: int, out: Path) -> None:
    """The data stage's work on one split of ultrachat rows (read, check, write as read)."""
    _write_split(iter_rows(source, "train_sft", limit), "train_sft", limit, out, CANONICAL, sft=True, progress=False)


def verbatim(path: Path, limit: int, out: Path) -> int:
    kept = 0
    with path.open("r", encoding="utf-8") as src, out.open("w", encoding="utf-8") as dst:
        for index, line in enumerate(src):
            if index >= limit:
                break
            row = json.loads(line)
            if not check_row(row, sft=True):
                dst.write(line if line.endswith("\n") else line + "\n")
                messages = row["messages"]
                _ = (sum(1 for m in messages if m["role"] == "user"), sum(len(m["content"]) for m in messages))
                kept += 1
    return kept


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--rows", type=int, default=50_000)
    args = parser.parse_args()
    path = args.dataset / "train_sft.jsonl"
    source = Source(description="bench", files={"train_sft": [path]})
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.jsonl"
        profiler = cProfile.Profile()
        profiler.enable()
        write_split(source, args.rows, out)
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(8)
        print("\n".join(line for line in text.getvalue().splitlines() if line.strip())[:3000])

        now, alt = [], []
        for rep in range(3):
            for kind in (("now", "alt") if rep % 2 == 0 else ("alt", "now")):
                start = time.perf_counter()
                if kind == "now":
                    write_split(source, args.rows, out)
                    now.append(time.perf_counter() - start)
                else:
                    verbatim(path, args.rows, out)
                    alt.append(time.perf_counter() - start)
        a, b = statistics.median(now), statistics.median(alt)
        print(f"{args.rows} rows: _write_split {args.rows / a:,.0f} rows/s; verbatim copy {args.rows / b:,.0f} rows/s "
              f"({a / b:.2f}x)")


if __name__ == "__main__":
    main()
