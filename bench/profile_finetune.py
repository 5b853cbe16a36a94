"""Where a step of our CPU fine-tune goes: torch.profiler over forward + backward of packed rows.

    python bench/profile_finetune.py [--model DIR] [--rows 2]

Builds the trainer the product runs (as bench_finetune.py does, seq 512), takes its first packed
micro-batches, and profiles forward + backward (the loss the product uses) after one warm-up;
prints the operators by own CPU time, the counted FLOPs and what share of the time matrix
multiplies take and at what rate. Explains the gap between the achieved FLOP/s and the matmul peak.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import bench_finetune as bf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (default: the demo experiment's SmolLM2)")
    parser.add_argument("--rows", type=int, default=2, help="packed rows (micro-batches) to profile")
    args = parser.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    with tempfile.TemporaryDirectory() as out:
        trainer = bf._build("ours", args.model or bf.default_model(), 512, 10, Path(out), [])
        batches = list(itertools.islice(trainer.get_train_dataloader(), args.rows + 1))
        model = trainer.model
        model.train()

        def step(batch) -> None:
            trainer.compute_loss(model, dict(batch)).backward()

        step(batches[0])
        with FlopCounterMode(display=False) as counter:
            for batch in batches[1:]:
                step(batch)
        started = time.perf_counter()
        for batch in batches[1:]:
            step(batch)
        seconds = time.perf_counter() - started
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for batch in batches[1:]:
                step(batch)
    peak = bf.matmul_peak()
    tokens = sum(b["input_ids"].numel() for b in batches[1:])
    flops = counter.get_total_flops()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    mm = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm")) / 1e6
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    print(f"{tokens} tokens, forward + backward {seconds:.2f} s unprofiled: {tokens / seconds:.1f} tok/s, "
          f"{flops / 1e9:.1f} GFLOP counted, {flops / seconds / 1e9:.1f} GFLOP/s = "
          f"{flops / seconds / 1e9 / peak:.1%} of the {peak:.1f} GFLOP/s matmul peak")
    print(f"profiled: matrix multiplies {mm:.2f} s of {total:.2f} s ({mm / total:.0%}); everything else "
          f"{total - mm:.2f} s; if the multiplies ran at the peak: "
          f"{flops / 1e9 / peak:.2f} s of multiplies")
    print(f"torch threads: {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
