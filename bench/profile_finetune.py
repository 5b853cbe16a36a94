"""Where a step of our CPU fine-tune goes: torch.profiler over forward + backward of packed rows.

    python bench/profile_finetune.py [--model DIR] [--rows 2] [--max-length 256] [--precision auto|bf16|fp32]
                                     [--threads N]

Builds the trainer the product runs (as bench_finetune.py does; seq 256 is the demo experiment's),
in the precision asked (auto: bf16 where the CPU has native bf16), takes its first packed
micro-batches, and profiles forward + backward (the loss the product uses) after one warm-up;
prints the operators by own CPU time, the time by kind (matrix multiplies, attention, dtype casts
and copies, elementwise, log-softmax / cross-entropy, the rest), the counted FLOPs and the share
of the matmul peak (in the precision the step computes in). The optimizer step and data collation
are timed apart (they are outside forward + backward).
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import bench_finetune as bf

KINDS = {  # profiler operator names -> kind; the first match wins
    "attention": ("scaled_dot_product", "flash_attention", "_efficient_attention"),
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"),
    "log-softmax / cross-entropy": ("log_softmax", "nll_loss", "cross_entropy"),
    "dtype casts, copies": ("aten::copy_", "aten::_to_copy", "aten::to", "aten::clone", "aten::contiguous"),
    "elementwise (norms, rotary, SiLU, LoRA scaling, dropout)": (
        "aten::mul", "aten::add", "aten::silu", "aten::pow", "aten::mean", "aten::rsqrt", "aten::neg", "aten::cat",
        "aten::div", "aten::sum", "aten::bernoulli", "aten::native_dropout", "aten::fill_", "aten::zero_",
        "aten::where", "aten::sub", "aten::embedding", "aten::index", "aten::slice", "aten::masked_fill"),
}


def kind_of(name: str) -> str:
    for kind, keys in KINDS.items():
        if any(key in name for key in keys):
            return kind
    return "the rest"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (default: the demo experiment's SmolLM2)")
    parser.add_argument("--rows", type=int, default=2, help="packed rows (micro-batches) to profile")
    parser.add_argument("--max-length", type=int, default=256, help="packed row length (the demo's: 256)")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (default: all CPUs, as training uses). On a machine other jobs share, "
                             "1 keeps the shares meaningful: with 2 threads on 2 busy cores every small operator "
                             "waits for a descheduled thread at its barrier")
    args = parser.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    from automation.backends.local.precision import choose

    chosen = choose(args.precision, "cpu")
    with tempfile.TemporaryDirectory() as out:
        trainer = bf._build("ours", args.model or bf.default_model(), args.max_length, 10, Path(out), [],
                            args.precision)
        loader = trainer.get_train_dataloader()
        started = time.perf_counter()
        batches = list(itertools.islice(loader, args.rows + 1))
        collate_s = (time.perf_counter() - started) / len(batches)
        if args.threads:
            torch.set_num_threads(args.threads)
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
        optimizer = trainer.create_optimizer()
        optimizer.step()  # warm (state allocated)
        started = time.perf_counter()
        for _ in range(3):
            optimizer.step()
        optimizer_s = (time.perf_counter() - started) / 3
    peak = bf.matmul_peak("bf16" if chosen.bf16 else "fp32")
    tokens = sum(b["input_ids"].numel() for b in batches[1:])
    flops = counter.get_total_flops()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    by_kind: dict[str, float] = {}
    for event in events:
        by_kind[kind_of(event.key)] = by_kind.get(kind_of(event.key), 0.0) + event.self_cpu_time_total / 1e6
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    print(f"precision: {chosen.name} ({chosen.reason}); {args.rows} packed row(s) of {args.max_length}")
    print("| kind | seconds | share |\n|---|---:|---:|")
    for kind, spent in sorted(by_kind.items(), key=lambda item: -item[1]):
        print(f"| {kind} | {spent:.2f} | {spent / total:.0%} |")
    print(f"| (profiled forward + backward) | {total:.2f} | |")
    print(f"outside forward + backward, per micro-batch: collation {collate_s * 1000:.0f} ms; per optimizer step: "
          f"AdamW over the trainable parameters {optimizer_s * 1000:.0f} ms")
    print(f"{tokens} tokens, forward + backward {seconds:.2f} s unprofiled: {tokens / seconds:.1f} tok/s, "
          f"{flops / 1e9:.1f} GFLOP counted, {flops / seconds / 1e9:.1f} GFLOP/s = "
          f"{flops / seconds / 1e9 / peak:.1%} of the {peak:.1f} GFLOP/s {chosen.name} matmul peak")
    mm = by_kind.get("matmul", 0.0)
    print(f"profiled: matrix multiplies {mm:.2f} s of {total:.2f} s ({mm / total:.0%}); if all counted FLOPs ran "
          f"at the peak: {flops / 1e9 / peak:.2f} s")
    print(f"torch threads: {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
