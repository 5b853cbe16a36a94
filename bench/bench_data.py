"""Data stage at full scale: ours (`automation.data.prepare_data`) against the reference's approach.

    python bench/make_ultrachat_like.py /tmp/uc200k          # once: ~2 GB, ~30 s
    python bench/bench_data.py /tmp/uc200k [--percent 5 100] [--reps 3]
    python bench/bench_data.py /tmp/uc200k --baseline /tmp/old   # against another version's code

`--baseline DIR` compares ours with the `automation` package under DIR (e.g. `git archive <commit>
automation | tar -x -C DIR`) instead of pandas, alternating the same way: a change's cost measured
in the same minutes on the same machine.

The reference's approach, per split: `pandas.read_json(path, lines=True)`, the first N % of the
rows, `to_json(out, orient="records", lines=True)`. Ours: `prepare_data(...)` on the same folder
(samples the first N % of every split, checks every row against the ultrachat_200k schema, writes
{split}.jsonl and a manifest), into a fresh output folder each time so nothing is reused.

Each run is a fresh child process, so its peak memory is its own (ru_maxrss of the child, from
os.wait4). Time is the stage itself, measured in the child (imports excluded: pandas' import
would only help ours). Runs alternate ours/reference, order flipped every repetition; the figures
are medians. Targets (issue 6): ours >= 3x the rows/s and <= 1/3 of the peak memory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPLITS = ("train_sft", "test_sft", "train_gen", "test_gen")
REPO = Path(__file__).resolve().parents[1]


def child(kind: str, dataset: Path, percent: float, out: Path) -> None:
    """Run one stage in this (fresh) process and print {"seconds", "rows"} as JSON."""
    if kind in ("ours", "base"):  # the same code path; PYTHONPATH says which version is imported
        from automation.data import prepare_data

        start = time.perf_counter()
        result = prepare_data(
            dataset=str(dataset), sample_percent=percent,
            required_splits={"train_split": "train_sft", "test_split": "test_sft", "sample_split": "test_gen"},
            sft_splits={"train_sft", "test_sft"}, out_dir=out, search_from=[Path.cwd()], progress=False,
        )
        seconds = time.perf_counter() - start
        rows = sum(s.rows for s in result.splits.values())
    else:
        import pandas as pd

        start = time.perf_counter()
        out.mkdir(parents=True, exist_ok=True)
        rows = 0
        for split in SPLITS:
            df = pd.read_json(dataset / f"{split}.jsonl", lines=True)
            n = int(round(len(df) * percent / 100.0))
            df.head(n).to_json(out / f"{split}.jsonl", orient="records", lines=True, force_ascii=False)
            rows += n
            del df
        seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "rows": rows}))


class _TreeMemory:
    """Peak of the summed RSS of a process and all its descendants, sampled in a thread."""

    def __init__(self, pid: int):
        import threading

        import psutil

        self.peak_mib, self._done = 0.0, threading.Event()
        self._root = psutil.Process(pid)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        import psutil

        while not self._done.wait(0.02):
            total = 0
            try:
                for process in [self._root, *self._root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        total += process.memory_info().rss
            except psutil.Error:
                return
            self.peak_mib = max(self.peak_mib, total / 2**20)

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def run_once(kind: str, dataset: Path, percent: float, baseline: Path | None = None) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"bench-data-{kind}-"))
    env = {**os.environ, "PYTHONPATH": str(baseline if kind == "base" else REPO)}
    try:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--child", kind, str(dataset), "--percent", str(percent), "--out", str(out / "o")],
            stdout=subprocess.PIPE, cwd=REPO, env=env)
        tree = _TreeMemory(proc.pid)
        stdout = proc.stdout.read()
        tree.stop()
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{kind} at {percent} % failed (exit {os.waitstatus_to_exitcode(status)})")
        result = json.loads(stdout.decode().strip().splitlines()[-1])
        # The largest single process (Linux: KiB), and the whole process tree sampled every 20 ms
        # (ours may run worker processes; their memory adds up while they run together).
        result["peak_mib"] = max(usage.ru_maxrss / 1024, tree.peak_mib)
        result["largest_process_mib"] = usage.ru_maxrss / 1024
        # CPU seconds of the child and its worker processes (waited for, so counted in the child's
        # usage), imports included: on a busy machine this moves far less than the wall time.
        result["cpu_s"] = usage.ru_utime + usage.ru_stime
        result["rows_per_s"] = result["rows"] / result["seconds"]
        return result
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--percent", type=float, nargs="+", default=[5.0, 100.0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--baseline", type=Path, help="a folder holding another version's automation package")
    parser.add_argument("--child", choices=["ours", "ref", "base"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    dataset = args.dataset.resolve()
    if args.child:
        child(args.child, dataset, args.percent[0], args.out)
        return

    size = sum((dataset / f"{s}.jsonl").stat().st_size for s in SPLITS)
    print(f"dataset {dataset}: {size / 1e9:.2f} GB in {len(SPLITS)} splits; {args.reps} repetitions each")
    if args.baseline and not (args.baseline / "automation" / "data.py").is_file():
        raise SystemExit(f"--baseline {args.baseline}: no automation/data.py there")
    other = "base" if args.baseline else "ref"
    summary = {}
    for percent in args.percent:
        runs: dict[str, list[dict]] = {"ours": [], other: []}
        for rep in range(args.reps):
            order = ("ours", other) if rep % 2 == 0 else (other, "ours")
            for kind in order:
                r = run_once(kind, dataset, percent, args.baseline)
                runs[kind].append(r)
                print(f"  {percent:g} % rep {rep + 1} {kind:4}: {r['rows']} rows in {r['seconds']:.2f} s = "
                      f"{r['rows_per_s']:,.0f} rows/s, {r['cpu_s']:.2f} CPU s, peak {r['peak_mib']:,.0f} MiB",
                      flush=True)
        med = {k: {m: statistics.median(r[m] for r in v) for m in ("seconds", "rows_per_s", "peak_mib", "cpu_s")}
               for k, v in runs.items()}
        speed = med["ours"]["rows_per_s"] / med[other]["rows_per_s"]
        memory = med["ours"]["peak_mib"] / med[other]["peak_mib"]
        summary[percent] = (med, speed, memory)
        if args.baseline:
            print(f"{percent:g} %: ours {med['ours']['rows_per_s']:,.0f} rows/s, {med['ours']['peak_mib']:,.0f} MiB | "
                  f"baseline {med['base']['rows_per_s']:,.0f} rows/s, {med['base']['peak_mib']:,.0f} MiB | "
                  f"ours/baseline: {speed:.3f}x rows/s, {memory:.3f}x memory, "
                  f"{med['ours']['cpu_s'] / med['base']['cpu_s']:.3f}x CPU seconds", flush=True)
            continue
        print(f"{percent:g} %: ours {med['ours']['rows_per_s']:,.0f} rows/s, {med['ours']['peak_mib']:,.0f} MiB | "
              f"pandas {med['ref']['rows_per_s']:,.0f} rows/s, {med['ref']['peak_mib']:,.0f} MiB | "
              f"speed {speed:.2f}x (target >= 3x: {'met' if speed >= 3 else 'MISSED'}), "
              f"memory {memory:.3f} of pandas (target <= 0.333: {'met' if memory <= 1 / 3 else 'MISSED'})",
              flush=True)


if __name__ == "__main__":
    main()
