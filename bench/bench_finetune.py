"""Fine-tune throughput on the CPU: ours against a plain TRL `SFTTrainer`, and against the matmul peak.

    python bench/bench_finetune.py [--reps 3] [--steps 4] [--max-length 512] [--model DIR]

Both sides LoRA-tune SmolLM2-135M-Instruct (the demo experiment's model, r 16, alpha 32, all
linear layers) on data/ultrachat-sample train_sft, in fp32 without gradient checkpointing, with
the loss on assistant tokens only, at sequence length 512, 4 conversations' worth of rows per
optimizer step (the demo's batch 2 x accumulation 2):

- ours: the trainer the product runs (`automation.backends.local.train.build_trainer`): packed,
  padding-free rows (best-fit decreasing, per-conversation position ids), one packed row per
  micro-batch on a CPU, and the model's own cross-entropy over full logits;
- plain TRL: `SFTTrainer` with `SFTConfig(bf16=False, gradient_checkpointing=False, use_cpu=True,
  assistant_only_loss=True, max_length=512, per_device_train_batch_size=2,
  gradient_accumulation_steps=2)`, otherwise TRL's defaults (padded batches, no packing, TRL's
  fused LM head).

Each run is a fresh child process: it first measures the fp32 matmul peak of this machine
(square `torch.mm`, n = 1024/2048/4096, all threads, the best size's median), then trains one
untimed warm-up step and `--steps` timed optimizer steps (wall time from step begin to step end,
optimizer included). Every micro-batch the collator hands over is recorded: tokens in the tensor,
pad tokens (attention mask zeros), supervised tokens. The FLOPs are counted, not estimated: the
first repetition replays the timed micro-batches (forward + backward, the same loss) under
`torch.utils.flop_counter.FlopCounterMode`; the runs are seeded, so every repetition sees the same
batches (checked) and reuses that count. Achieved FLOP/s = counted FLOPs / timed seconds.

Runs alternate ours / plain TRL, the order flipped every repetition; the figures are medians.
Targets (issue 6, item 2): >= 60 % of the matmul peak, <= 5 % padding, >= 1.3x the plain TRL
baseline's useful (non-pad) tokens/s.
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


def matmul_peak() -> float:
    """fp32 GFLOP/s of square matrix multiplies: the best size's median of 5 timed runs."""
    import torch

    best = 0.0
    for n in (1024, 2048, 4096):
        a, b = torch.randn(n, n), torch.randn(n, n)
        for _ in range(2):
            a @ b
        times = []
        for _ in range(5):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        best = max(best, 2 * n**3 / statistics.median(times) / 1e9)
    return best


def _experiment(max_length: int, steps: int):
    from automation.spec import load_experiment

    exp = load_experiment(EXPERIMENT)
    training = exp.training.model_copy(update={
        "max_seq_length": max_length, "max_steps": steps, "evaluation_strategy": "no",
        "logging_steps": steps, "warmup_steps": 0, "save_total_limit": 1})
    return exp.model_copy(update={"training": training})


def _build(kind: str, model_dir: str, max_length: int, steps: int, out: Path, callbacks: list):
    exp = _experiment(max_length, steps)
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


def child(kind: str, model_dir: str, max_length: int, steps: int, count_flops: bool) -> dict:
    """One run in this (fresh) process; returns the figures as a dict."""
    import torch
    from transformers import TrainerCallback

    torch.set_num_threads(os.cpu_count() or 1)
    peak = matmul_peak()
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
        trainer = _build(kind, model_dir, max_length, steps + 1, Path(out), [Timer()])
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
    return {"kind": kind, "peak_gflops": peak, "seconds": seconds, "step_seconds": step_times,
            "tokens": tokens, "pad": pad, "useful": tokens - pad,
            "supervised": sum(m["supervised"] for m in timed), "micro_batches": timed, "flops": flops}


def run_child(kind: str, model_dir: str, max_length: int, steps: int, count_flops: bool) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, __file__, "--child", kind, "--model", model_dir, "--max-length", str(max_length),
           "--steps", str(steps)] + (["--count-flops"] if count_flops else [])
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
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per run (after 1 warm-up)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--model", help="model folder (default: the demo experiment's SmolLM2, converted once)")
    parser.add_argument("--json", type=Path, help="write every run's figures here")
    parser.add_argument("--child", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--count-flops", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = child(args.child, args.model, args.max_length, args.steps, args.count_flops)
        print(json.dumps(result))
        return

    model_dir = args.model or default_model()
    runs: dict[str, list[dict]] = {"ours": [], "trl": []}
    flops: dict[str, int] = {}
    for rep in range(args.reps):
        order = ("ours", "trl") if rep % 2 == 0 else ("trl", "ours")
        for kind in order:
            result = run_child(kind, model_dir, args.max_length, args.steps, count_flops=kind not in flops)
            if result["flops"] is not None:
                flops[kind] = result["flops"]
                first = result
            else:
                first = runs[kind][0]
                if [m["shape"] for m in result["micro_batches"]] != [m["shape"] for m in first["micro_batches"]]:
                    raise SystemExit(f"{kind}: rep {rep + 1} saw different batches than rep 1; the FLOP count "
                                     "cannot be reused")
            result["flops"] = flops[kind]
            runs[kind].append(result)
            print(f"rep {rep + 1} {kind:4}: {result['useful'] / result['seconds']:7.1f} useful tok/s, "
                  f"{result['flops'] / result['seconds'] / 1e9:6.1f} GFLOP/s of peak "
                  f"{result['peak_gflops']:.1f}, padding {result['pad'] / result['tokens']:.1%}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))

    def med(kind: str, fn) -> float:
        return statistics.median(fn(r) for r in runs[kind])

    print(f"\nSmolLM2-135M LoRA, seq {args.max_length}, {args.steps} timed steps x {args.reps} reps; medians")
    print(f"{'':10} {'tok/s':>8} {'useful/s':>9} {'GFLOP/s':>8} {'peak':>7} {'of peak':>8} {'padding':>8} "
          f"{'FLOP/tok':>9}")
    for kind in ("ours", "trl"):
        print(f"{kind:10} {med(kind, lambda r: r['tokens'] / r['seconds']):8.1f} "
              f"{med(kind, lambda r: r['useful'] / r['seconds']):9.1f} "
              f"{med(kind, lambda r: r['flops'] / r['seconds'] / 1e9):8.1f} "
              f"{med(kind, lambda r: r['peak_gflops']):7.1f} "
              f"{med(kind, lambda r: r['flops'] / r['seconds'] / 1e9 / r['peak_gflops']):8.1%} "
              f"{med(kind, lambda r: r['pad'] / r['tokens']):8.1%} "
              f"{med(kind, lambda r: r['flops'] / r['tokens'] / 1e6):8.0f}M")
    ratio = statistics.median(o["useful"] / o["seconds"] / (t["useful"] / t["seconds"])
                              for o, t in zip(runs["ours"], runs["trl"], strict=True))
    print(f"\nuseful tokens/s, ours / plain TRL (median of per-rep ratios): {ratio:.2f}x  (target >= 1.3x)")
    share = med("ours", lambda r: r["flops"] / r["seconds"] / 1e9 / r["peak_gflops"])
    print(f"ours, achieved / matmul peak: {share:.1%}  (target >= 60 %)")


if __name__ == "__main__":
    main()
