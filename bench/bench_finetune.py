"""Fine-tune throughput on the CPU: ours against a plain TRL `SFTTrainer`, and against the matmul peak.

    python bench/bench_finetune.py [--reps 2] [--steps 2] [--max-length 512] [--precision auto|bf16|fp32]
                                   [--kinds ours,trl] [--model DIR] [--json FILE]

Both sides LoRA-tune SmolLM2-135M-Instruct (the demo experiment's model, r 16, alpha 32, all
linear layers) on data/ultrachat-sample train_sft, without gradient checkpointing, with the loss
on assistant tokens only, 4 conversations' worth of rows per optimizer step (the demo's batch 2 x
accumulation 2):

- ours: the trainer the product runs (`automation.backends.local.train.build_trainer`) in the
  precision `--precision` asks for (auto: bf16 where the CPU has native bf16, as the product
  chooses; fp32: the path of a CPU without it, e.g. GitHub's runners): packed, padding-free rows
  (best-fit decreasing, per-conversation position ids), one packed row per micro-batch on a CPU,
  and the model's own cross-entropy over full logits;
- plain TRL: `SFTTrainer` with `SFTConfig(bf16=False, gradient_checkpointing=False, use_cpu=True,
  assistant_only_loss=True, max_length=..., per_device_train_batch_size=2,
  gradient_accumulation_steps=2)`, otherwise TRL's defaults (fp32, padded batches, no packing,
  TRL's fused LM head): what a user gets from TRL's defaults on a CPU.

Each run is a fresh child process: it first measures this machine's matmul peaks, fp32 and bf16
(square `torch.mm`, n = 1024/2048/4096, all threads, the best size's median; bf16 only where
oneDNN says the CPU does it natively), then trains one untimed warm-up step and `--steps` timed
optimizer steps (wall time from step begin to step end, optimizer included). Every micro-batch the
collator hands over is recorded: tokens in the tensor, pad tokens (attention mask zeros),
supervised tokens. The FLOPs are counted, not estimated: the first repetition replays the timed
micro-batches (forward + backward, the same loss) under `torch.utils.flop_counter.FlopCounterMode`;
the runs are seeded, so every repetition sees the same batches (checked) and reuses that count.
Achieved FLOP/s = counted FLOPs / timed seconds; "of peak" is against the peak of the precision
the run computes in (bf16 for ours in bf16, fp32 otherwise).

Runs alternate the kinds, the order flipped every repetition; the figures are medians. Targets
(issue 23): ours >= 3.5x plain TRL's useful (non-pad) tokens/s, with its share of the bf16 matmul
peak. About 4 minutes with the defaults on a 2-core AVX512-BF16 EPYC, idle.
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
EXPERIMENT = REPO / "experiments" / "smollm2-ultrachat-local.yaml"
SAMPLE = REPO / "data" / "ultrachat-sample"


def matmul_peak(dtype: str = "fp32") -> float:
    """GFLOP/s of square matrix multiplies in `dtype` ("fp32" or "bf16"): the best size's median of 5
    timed runs."""
    import torch

    best = 0.0
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    for n in (1024, 2048, 4096):
        a, b = torch.randn(n, n, dtype=torch_dtype), torch.randn(n, n, dtype=torch_dtype)
        for _ in range(2):
            a @ b
        times = []
        for _ in range(5):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        best = max(best, 2 * n**3 / statistics.median(times) / 1e9)
    return best


def _experiment(max_length: int, steps: int, precision: str = "auto"):
    from automation.spec import load_experiment

    exp = load_experiment(EXPERIMENT)
    training = exp.training.model_copy(update={
        "max_seq_length": max_length, "max_steps": steps, "evaluation_strategy": "no",
        "logging_steps": steps, "warmup_steps": 0, "save_total_limit": 1})
    compute = exp.compute.model_copy(update={"precision": precision})
    return exp.model_copy(update={"training": training, "compute": compute})


def _build(kind: str, model_dir: str, max_length: int, steps: int, out: Path, callbacks: list,
           precision: str = "auto"):
    exp = _experiment(max_length, steps, precision)
    if kind == "ours":
        from automation.backends.local.train import build_trainer

        trainer, *_ = build_trainer(exp, base_model=model_dir, train_file=SAMPLE / "train_sft.jsonl",
                                    test_file=SAMPLE / "test_sft.jsonl", output_dir=out, callbacks=callbacks)
        return trainer
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from automation.backends.local.chat_template import apply_training_template
    from automation.backends.local.train import _chat_dataset, lora_config

    torch.set_num_threads(os.cpu_count() or 1)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    apply_training_template(tokenizer)  # the same template, so assistant-only loss works for both
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    t = exp.training
    args = SFTConfig(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type, seed=t.seed, max_length=max_length, assistant_only_loss=True,
        bf16=False, gradient_checkpointing=False, use_cpu=True, report_to=[], save_strategy="no",
        logging_steps=steps, disable_tqdm=True)
    return SFTTrainer(model=model, args=args, processing_class=tokenizer,
                      train_dataset=_chat_dataset(SAMPLE / "train_sft.jsonl"), peft_config=lora_config(exp),
                      callbacks=callbacks)


def child(kind: str, model_dir: str, max_length: int, steps: int, count_flops: bool, precision: str) -> dict:
    """One run in this (fresh) process; returns the figures as a dict."""
    import torch
    from transformers import TrainerCallback

    from automation.backends.local.precision import choose, onednn_bf16

    torch.set_num_threads(os.cpu_count() or 1)
    peak = matmul_peak("fp32")
    peak_bf16 = matmul_peak("bf16") if onednn_bf16() else None
    computes = choose(precision, "cpu").name if kind == "ours" else "fp32"
    step_times: list[float] = []
    step_starts: list[int] = []
    micro: list[dict] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            step_starts.append(len(micro))
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step_times.append(time.perf_counter() - self.started)

    with tempfile.TemporaryDirectory() as out:
        trainer = _build(kind, model_dir, max_length, steps + 1, Path(out), [Timer()], precision)
        collate = trainer.data_collator
        kept: list[dict] = []

        def recording(examples):
            batch = collate(examples)
            ids = batch["input_ids"]
            pad = int((batch["attention_mask"] == 0).sum()) if "attention_mask" in batch else 0
            micro.append({"tokens": ids.numel(), "pad": pad, "supervised": int((batch["labels"] != -100).sum()),
                          "shape": list(ids.shape)})
            kept.append({k: v.clone() if hasattr(v, "clone") else v for k, v in batch.items()})
            return batch

        trainer.data_collator = recording
        trainer.train()
        # The dataloader may prefetch one micro-batch beyond the last step: keep the trained ones.
        accumulation = trainer.args.gradient_accumulation_steps
        timed = micro[accumulation:accumulation * (steps + 1)]
        flops = None
        if count_flops:
            from torch.utils.flop_counter import FlopCounterMode

            model = trainer.model
            model.train()
            with FlopCounterMode(display=False) as counter:
                for batch in kept[accumulation:accumulation * (steps + 1)]:
                    loss = trainer.compute_loss(model, dict(batch))
                    loss.backward()
            flops = counter.get_total_flops()
    seconds = sum(step_times[1:steps + 1])
    tokens = sum(m["tokens"] for m in timed)
    pad = sum(m["pad"] for m in timed)
    return {"kind": kind, "precision": computes, "peak_gflops": peak, "peak_bf16_gflops": peak_bf16,
            "own_peak_gflops": peak_bf16 if computes == "bf16" and peak_bf16 else peak, "seconds": seconds, "step_seconds": step_times,
            "tokens": tokens, "pad": pad, "useful": tokens - pad,
            "supervised": sum(m["supervised"] for m in timed), "micro_batches": timed, "flops": flops}


def run_child(kind: str, model_dir: str, max_length: int, steps: int, count_flops: bool, precision: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, __file__, "--child", kind, "--model", model_dir, "--max-length", str(max_length),
           "--steps", str(steps), "--precision", precision] + (["--count-flops"] if count_flops else [])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{kind} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def default_model() -> str:
    from automation.backends.local.model_source import resolve_model_dir
    from automation.spec import load_experiment

    return str(resolve_model_dir(load_experiment(EXPERIMENT).model))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="timed optimizer steps per run (after 1 warm-up)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="ours: auto (the product's choice: bf16 where the CPU has it natively), or forced; "
                             "fp32 gives the path of a CPU without native bf16. Plain TRL is always fp32")
    parser.add_argument("--kinds", default="ours,trl", help="comma-separated: ours, trl")
    parser.add_argument("--model", help="model folder (default: the demo experiment's SmolLM2, converted once)")
    parser.add_argument("--json", type=Path, help="write every run's figures here")
    parser.add_argument("--child", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--count-flops", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = child(args.child, args.model, args.max_length, args.steps, args.count_flops, args.precision)
        print(json.dumps(result))
        return

    kinds = [k for k in args.kinds.split(",") if k]
    if not kinds or any(k not in ("ours", "trl") for k in kinds):
        raise SystemExit(f"--kinds: ours and/or trl, got {args.kinds!r}")
    model_dir = args.model or default_model()
    from automation.backends.local.precision import choose, cpu_flags

    chosen = choose(args.precision, "cpu")
    flags = sorted(f for f in cpu_flags() if f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2"))
    print(f"CPU flags seen: {', '.join(flags) or 'none of amx_bf16/avx512_bf16/avx512f/avx2'}; "
          f"ours computes in {chosen.name} ({chosen.reason})", flush=True)
    runs: dict[str, list[dict]] = {kind: [] for kind in kinds}
    flops: dict[str, int] = {}
    for rep in range(args.reps):
        order = kinds if rep % 2 == 0 else kinds[::-1]
        for kind in order:
            result = run_child(kind, model_dir, args.max_length, args.steps, count_flops=kind not in flops,
                               precision=args.precision)
            if result["flops"] is not None:
                flops[kind] = result["flops"]
            else:
                first = runs[kind][0]
                if [m["shape"] for m in result["micro_batches"]] != [m["shape"] for m in first["micro_batches"]]:
                    raise SystemExit(f"{kind}: rep {rep + 1} saw different batches than rep 1; the FLOP count "
                                     "cannot be reused")
            result["flops"] = flops[kind]
            runs[kind].append(result)
            print(f"rep {rep + 1} {kind:4} ({result['precision']}): {result['useful'] / result['seconds']:7.1f} "
                  f"useful tok/s, {result['flops'] / result['seconds'] / 1e9:6.1f} GFLOP/s of its "
                  f"{result['precision']} peak {result['own_peak_gflops']:.1f}, padding "
                  f"{result['pad'] / result['tokens']:.1%}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))

    def med(kind: str, fn) -> float:
        return statistics.median(fn(r) for r in runs[kind])

    print(f"\nSmolLM2-135M LoRA, seq {args.max_length}, {args.steps} timed steps x {args.reps} reps; medians")
    peak32 = statistics.median(r["peak_gflops"] for rs in runs.values() for r in rs)
    peaks16 = [r["peak_bf16_gflops"] for rs in runs.values() for r in rs if r["peak_bf16_gflops"]]
    print(f"matmul peaks in the same runs: fp32 {peak32:.1f} GFLOP/s"
          + (f", bf16 {statistics.median(peaks16):.1f} GFLOP/s" if peaks16 else ", bf16 not native here"))
    print(f"{'':10} {'prec':>5} {'tok/s':>8} {'useful/s':>9} {'GFLOP/s':>8} {'its peak':>8} {'of peak':>8} "
          f"{'of fp32':>8} {'padding':>8} {'FLOP/tok':>9}")
    for kind in kinds:
        print(f"{kind:10} {runs[kind][0]['precision']:>5} {med(kind, lambda r: r['tokens'] / r['seconds']):8.1f} "
              f"{med(kind, lambda r: r['useful'] / r['seconds']):9.1f} "
              f"{med(kind, lambda r: r['flops'] / r['seconds'] / 1e9):8.1f} "
              f"{med(kind, lambda r: r['own_peak_gflops']):8.1f} "
              f"{med(kind, lambda r: r['flops'] / r['seconds'] / 1e9 / r['own_peak_gflops']):8.1%} "
              f"{med(kind, lambda r: r['flops'] / r['seconds'] / 1e9 / r['peak_gflops']):8.1%} "
              f"{med(kind, lambda r: r['pad'] / r['tokens']):8.1%} "
              f"{med(kind, lambda r: r['flops'] / r['tokens'] / 1e6):8.0f}M")
    if "ours" in runs and "trl" in runs:
        ratio = statistics.median(o["useful"] / o["seconds"] / (t["useful"] / t["seconds"])
                                  for o, t in zip(runs["ours"], runs["trl"], strict=True))
        print(f"\nuseful tokens/s, ours ({runs['ours'][0]['precision']}) / plain TRL (fp32 defaults), median of "
              f"per-rep ratios: {ratio:.2f}x  (issue 23 target >= 3.5x)")
    if "ours" in runs:
        share = med("ours", lambda r: r["flops"] / r["seconds"] / 1e9 / r["own_peak_gflops"])
        print(f"ours, achieved / {runs['ours'][0]['precision']} matmul peak of the same run: {share:.1%}")


if __name__ == "__main__":
    main()
