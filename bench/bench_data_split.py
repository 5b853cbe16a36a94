"""One split of the data stage, ours against another version's code: CPU seconds, alternating.

    python bench/bench_data_split.py DATASET_DIR --baseline DIR [--split train_sft] [--percent 100] [--pairs 4]

Each run is a fresh process that times `automation.data._run_split` on the split (count, parse,
check, write, statistics, hash) with `time.process_time()`: CPU seconds of that process, which
moves far less than wall time on a shared machine. Runs alternate ours / baseline, order flipped
every pair; prints both medians, the median of the per-pair ratios, and whether every run wrote
the same bytes (the split's sha256). `--baseline DIR` holds the other version's `automation`
package (e.g. `git archive <commit> automation | tar -x -C DIR`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(dataset: Path, split: str, percent: float) -> None:
    from automation import data

    source = data.Source(description="bench", files={split: [dataset / f"{split}.jsonl"]})
    with tempfile.TemporaryDirectory() as tmp:
        job = data._SplitJob(source=source, split=split, percent=percent, tmp=Path(tmp) / "out.jsonl",
                             sft=split.endswith("_sft"), required=True, drop_invalid=False, progress=False, slot=0)
        start = time.process_time()
        done = data._run_split(job)
        cpu = time.process_time() - start
    print(json.dumps({"module": data.__file__, "cpu_s": cpu, "sha256": done.stats.sha256, "rows": done.stats.rows}))


def run(root: Path, dataset: Path, split: str, percent: float) -> dict:
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, __file__, str(dataset), "--child", "--split", split, "--percent", str(percent)],
                         env=env, cwd=tempfile.gettempdir(), capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not result["module"].startswith(str(root)):
        raise SystemExit(f"imported {result['module']}, not the code under {root}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--baseline", type=Path)
    parser.add_argument("--split", default="train_sft")
    parser.add_argument("--percent", type=float, default=100.0)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--child", action="store_true")
    args = parser.parse_args()
    dataset = args.dataset.resolve()
    if args.child:
        child(dataset, args.split, args.percent)
        return
    if args.baseline is None or not (args.baseline / "automation" / "data.py").is_file():
        raise SystemExit("--baseline DIR: a folder holding another version's automation package")
    roots = {"ours": REPO, "base": args.baseline.resolve()}
    cpu: dict[str, list[float]] = {"ours": [], "base": []}
    digests = set()
    for pair in range(args.pairs):
        for kind in ("base", "ours") if pair % 2 == 0 else ("ours", "base"):
            result = run(roots[kind], dataset, args.split, args.percent)
            cpu[kind].append(result["cpu_s"])
            digests.add(result["sha256"])
        print(f"  pair {pair + 1}: ours {cpu['ours'][-1]:.3f} s, base {cpu['base'][-1]:.3f} s CPU", flush=True)
    ratios = [o / b for o, b in zip(cpu["ours"], cpu["base"], strict=True)]
    print(f"{args.split} {args.percent:g} %: ours {statistics.median(cpu['ours']):.3f} s, base "
          f"{statistics.median(cpu['base']):.3f} s CPU (medians); ours/base median of pairs "
          f"{statistics.median(ratios):.3f} ({', '.join(f'{r:.3f}' for r in ratios)}); "
          f"same bytes every run: {len(digests) == 1}")


if __name__ == "__main__":
    main()
