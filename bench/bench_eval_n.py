"""Held-out prompts, interval width and time (issue 24, items 2 and 5).

How the 95 % intervals of the policy's two compared changes (fine-tuned − base: ROUGE-L over
held-out prompts, eval loss over test conversations) narrow as n grows, and what each n costs in
evaluation time, on the sample experiment (experiments/smollm2-ultrachat-local.yaml).

One fine-tune, evaluated at every n: the script fine-tunes once with `automation data` +
`automation finetune` into a workspace of its own, or reuses `--home`, a workspace where the
sample experiment's fine-tune already ran (its record gives the merged model and the
per-conversation eval losses).

- Replies: the base model and the merged fine-tuned model, loaded in the job's precision, answer
  the prompts a job with `evaluation.prompts: N` would choose (N = `--generate-n`, default the
  sample split's rows), with the job's batched greedy generation
  (automation/backends/local/evaluate.py: generate_replies), timed (wall clock and the process's
  CPU time). `--time-ns` times other n on their own (above the split's rows, its prompts repeated
  to n); any other n is N's time scaled by the batches it needs ("extrapolated").
- ROUGE-L width at n <= N: the paired differences over the first n prompts of the seeded order
  (`held_out_prompts`, so they are among N's); above N, N's width scaled by sqrt(N / n)
  ("extrapolated").
- Eval-loss width: the job's per-conversation losses (base and fine-tuned, on the test split)
  over the first n of a seeded order of the conversations; above their count, scaled likewise.

The machine's CPU (`lscpu`: amx_bf16, avx512_bf16) and the load average before and after each
timing are printed; a timing is labelled "under load" when the 1-minute load average was over 1.5
at the start, or over 1.5 plus one per core (this process's own threads) after it.

    nice .venv/bin/python bench/bench_eval_n.py --ns 8,32,128 [--home DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
EXPERIMENT = REPO / "experiments" / "smollm2-ultrachat-local.yaml"
UNDER_LOAD = 1.5


def cpu_facts() -> dict:
    text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("Flags")), [])
    return {"model": model, "cpus": os.cpu_count(), "amx_bf16": "amx_bf16" in flags,
            "avx512_bf16": "avx512_bf16" in flags}


def load_average() -> float:
    return os.getloadavg()[0]


def finetune(home: Path) -> None:
    env = {**os.environ, "AUTOMATION_HOME": str(home)}
    cli = [str(REPO / ".venv" / "bin" / "automation")]
    for verb in ("data", "finetune"):
        subprocess.run([*cli, verb, str(EXPERIMENT)], env=env, check=True, cwd=REPO)


def paired_widths(candidate: list[float], baseline: list[float], ns: list[int], seed: int) -> dict[int, dict]:
    """The interval of candidate − baseline over the first n items of a seeded order, per n."""
    from automation.stats import paired_bootstrap

    order = list(range(len(candidate)))
    random.Random(seed).shuffle(order)
    out = {}
    cap = len(order)
    at_cap = None
    for n in sorted(ns):
        if n <= cap:
            chosen = sorted(order[:n])
            interval = paired_bootstrap([candidate[i] for i in chosen], [baseline[i] for i in chosen])
            out[n] = {"n": n, "estimate": interval.estimate, "low": interval.low, "high": interval.high,
                      "width": interval.high - interval.low, "extrapolated": False}
            if n == cap:
                at_cap = out[n]
        else:
            if at_cap is None:
                interval = paired_bootstrap(candidate, baseline)
                at_cap = {"n": cap, "width": interval.high - interval.low}
            out[n] = {"n": n, "width": at_cap["width"] * math.sqrt(cap / n), "extrapolated": True}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ns", default="8,32,128")
    parser.add_argument("--home", type=Path, help="a workspace where the fine-tune already ran")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--generate-n", type=int, help="replies generated (and timed) at this n; widths "
                        "at smaller n from its subsets (default: the sample split's rows)")
    parser.add_argument("--time-ns", default="", help="other n to time on their own (e.g. 8,128); any other n "
                        "is the measured cost per batch times its batches")
    parser.add_argument("--replies", type=Path, help="write the generated replies here")
    args = parser.parse_args()
    ns = sorted(int(n) for n in args.ns.split(","))
    args.time_ns = {int(n) for n in args.time_ns.split(",") if n}

    start_load = load_average()
    home = args.home or Path(tempfile.mkdtemp(prefix="bench-eval-n-"))
    os.environ["AUTOMATION_HOME"] = str(home)
    if args.home is None:
        finetune(home)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from automation.backends.local.chat_template import apply_training_template
    from automation.backends.local.evaluate import generate_replies
    from automation.backends.local.model_source import resolve_model_dir
    from automation.backends.local.precision import choose as choose_precision
    from automation.evaluation import held_out_prompts
    from automation.record import RunRecord
    from automation.spec import load_experiment

    experiment = load_experiment(EXPERIMENT)
    record = RunRecord.model_validate_json((home / "runs" / experiment.name / "record.json").read_text())
    part = record.finetune
    evaluation = part.evaluation
    split = Path(record.data.out_dir) / f"{experiment.data.sample_split}.jsonl"
    rows = sum(1 for line in split.open() if line.strip())
    seed = experiment.evaluation.seed

    precision = choose_precision(experiment.compute.precision, "cpu")
    dtype = torch.bfloat16 if precision.bf16 else torch.float32
    facts = {"cpu": cpu_facts(), "precision": precision.name, "sample_split_rows": rows,
             "test_conversations": len(evaluation.models["base"].eval_loss_each), "batch_size": args.batch_size,
             "load_at_start": start_load}
    print(json.dumps(facts), flush=True)

    models = {}
    base_dir = resolve_model_dir(experiment.model)
    for label, folder in (("base", base_dir), ("candidate", part.output_dir)):
        tokenizer = AutoTokenizer.from_pretrained(folder)
        apply_training_template(tokenizer)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        models[label] = (model, tokenizer)

    torch.set_num_threads(max(1, os.cpu_count() or 1))

    def timed(n: int) -> tuple[dict, dict]:
        """Base and fine-tuned replies to the n prompts a job with evaluation.prompts: n chooses (the
        split's prompts repeated to n above its rows), with wall and CPU time and the load."""
        prompts = held_out_prompts(split, n, seed)
        repeated = n > len(prompts)
        if repeated:
            prompts = (prompts * math.ceil(n / len(prompts)))[:n]
        entry = {"n": n, "repeated_prompts": repeated, "load_before": load_average()}
        replies = {}
        for label, (model, tokenizer) in models.items():
            started, cpu = time.monotonic(), time.process_time()
            replies[label] = generate_replies(model, tokenizer, prompts, label=label, batch_size=args.batch_size,
                                              max_new_tokens=experiment.evaluation.max_new_tokens)
            entry[f"{label}_s"] = time.monotonic() - started
            entry[f"{label}_cpu_s"] = time.process_time() - cpu
        entry["load_after"] = load_average()
        # The load average counts this process's own threads (one per core) while it generates.
        entry["under_load"] = start_load > UNDER_LOAD or entry["load_after"] > UNDER_LOAD + (os.cpu_count() or 1)
        entry["total_s"] = entry["base_s"] + entry["candidate_s"]
        entry["total_cpu_s"] = entry["base_cpu_s"] + entry["candidate_cpu_s"]
        print(json.dumps(entry), flush=True)
        return entry, {"prompts": prompts, **replies}

    generate_n = min(args.generate_n or rows, rows)
    timings = {}
    timings[generate_n], generated = timed(generate_n)
    for n in ns:
        if n not in timings and n in args.time_ns:
            timings[n] = timed(n)[0]
    # Not timed: generate_n's cost per batch times the batches n needs (marked extrapolated); above
    # the split's rows each batch is like one of generate_n's (its prompts repeated, by length).
    at = timings[generate_n]
    for n in ns:
        if n not in timings:
            scale = math.ceil(n / args.batch_size) / math.ceil(generate_n / args.batch_size)
            timings[n] = {"n": n, "extrapolated": True, "total_s": at["total_s"] * scale,
                          "total_cpu_s": at["total_cpu_s"] * scale, "under_load": at["under_load"]}

    # ROUGE-L widths from the replies at generate_n: the prompts at a smaller n are its first n of
    # the seeded order, so their replies are among these; above, scaled by sqrt(generate_n / n).
    from automation.evaluation import rouge_l
    from automation.stats import paired_bootstrap

    def key(prompt) -> str:
        return json.dumps(prompt.messages)

    place = {key(p): i for i, p in enumerate(generated["prompts"])}
    references = [p.reference for p in generated["prompts"]]
    cand_rouge, base_rouge = rouge_l(references, generated["candidate"]), rouge_l(references, generated["base"])
    rouge_widths = {}
    for n in ns:
        if n <= generate_n:
            index = [place[key(p)] for p in held_out_prompts(split, n, seed)]
            interval = paired_bootstrap([cand_rouge[i] for i in index], [base_rouge[i] for i in index])
            rouge_widths[n] = {"n": n, "estimate": interval.estimate, "low": interval.low, "high": interval.high,
                               "width": interval.high - interval.low, "extrapolated": False}
    at_cap = paired_bootstrap(cand_rouge, base_rouge)
    for n in ns:
        if n > generate_n:
            rouge_widths[n] = {"n": n, "width": (at_cap.high - at_cap.low) * math.sqrt(generate_n / n),
                               "extrapolated": True}
    loss_widths = paired_widths(evaluation.models["candidate"].eval_loss_each,
                                evaluation.models["base"].eval_loss_each, ns, seed)
    if args.replies:
        args.replies.write_text(json.dumps({"prompts": [p.model_dump(mode="json") for p in generated["prompts"]],
                                            "base": generated["base"], "candidate": generated["candidate"]}))

    print()
    print("| n | ROUGE-L Δ, 95 % interval | width | eval-loss Δ, 95 % interval | width | "
          "generation, base + fine-tuned |")
    print("|---:|---|---:|---|---:|---|")
    for n in ns:
        r, lo, t = rouge_widths.get(n), loss_widths.get(n), timings.get(n)
        rc = ("extrapolated" if r["extrapolated"] else f"{r['estimate']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}]")
        lc = ("extrapolated" if lo["extrapolated"] else f"{lo['estimate']:+.3f} [{lo['low']:+.3f}, {lo['high']:+.3f}]")
        if t is None:
            tc = "not timed"
        else:
            tc = f"{t['total_s']:.0f} s wall, {t['total_cpu_s']:.0f} s CPU"
            tc += " (extrapolated per batch)" if t.get("extrapolated") else (
                f" ({t['base_s']:.0f} + {t['candidate_s']:.0f})" + (" repeated prompts" if t["repeated_prompts"] else ""))
            if t["under_load"]:
                tc += ", under load" + ("" if t.get("extrapolated") else f" ({t['load_before']:.1f}/{t['load_after']:.1f})")
        print(f"| {n} | {rc} | {r['width']:.3f} | {lc} | {lo['width']:.3f} | {tc} |")
    if args.json:
        args.json.write_text(json.dumps({"facts": facts, "timings": timings, "rouge_l": rouge_widths,
                                         "eval_loss": loss_widths}, indent=1))


if __name__ == "__main__":
    main()
