"""Serving: tokens/s and p50/p95 latency of the local endpoint, batching (ours) against one request at a time.

    python bench/bench_serving.py [--model DIR | --model tiny] [--reps 3] [--clients 1 4 16]
                                  [--max-tokens 64] [--requests-per-client 2] [--threads N] [--json PATH]
                                  [--ours batch_window_ms=50]   # to try other batching settings

The model is SmolLM2-135M-Instruct by default, resolved through the product exactly as the demo
experiment (experiments/smollm2-ultrachat-local.yaml) resolves it: `resolve_model_dir` converts the
packaged GGUF once into the workspace ($AUTOMATION_HOME, else ./.automation) and reuses it after.
`--model DIR` takes any Hugging Face model folder; `--model tiny` builds a tiny random model (for
checking this script in seconds, not for figures). HF_HUB_OFFLINE=1 is set.

Two server configurations, each started the way the product deploys (`process.start_endpoint`:
a detached `python -m automation.serving` on 127.0.0.1, a free port, a fresh key, in a temporary
AUTOMATION_HOME), one server at a time, always stopped at the end:

- ours: the product's defaults (the batching worker: up to 16 requests, each arriving within
  10 ms of the one before and within 100 ms of the first, share one left-padded `generate` call);
- one at a time: the same server with `start_endpoint(max_batch_size=1)`; GET /stats checks that
  no batch was above 1.

`--ours` changes ours' batching settings (e.g. 'batch_wait_ms=10,batch_window_ms=10' for the
fixed 10 ms window of before), to see what another setting gives.

Both get request_timeout_ms = --request-timeout-s (600 s by default, above the experiment schema's
180 s): in the one-at-a-time server a request queues behind up to 15 others, and the product cuts
generation short at 80 % of the timeout. Replies cut short (finish_reason "length" with fewer than
--max-tokens tokens) are counted and reported. Each server's torch threads come from
OMP_NUM_THREADS, set to --threads (default: OMP_NUM_THREADS if set, else the CPUs available);
the product itself sets no thread count for the server.

Per server: deploy-to-ready = wall time of `start_endpoint` (it returns once GET /ready answers
200, i.e. the model is loaded), then one untimed warm-up request, then for each client count c:
c threads, each with its own keep-alive httpx client, released together by a barrier, send
POST /v1/chat/completions in a closed loop (the next request once the previous reply is in),
--requests-per-client each (raised so that every phase has at least 4 requests; 2 per client at
16 clients is two full batches). Client k's j-th request asks about the first user message of row
(j*c + k) mod 32 of data/ultrachat-sample/test_gen.jsonl, greedy (temperature 0), max_tokens =
--max-tokens, so both configurations get the same requests. Latency = send to full reply per
request; tokens/s = the sum of usage.completion_tokens / phase wall time (first send to last
reply); p50/p95 interpolate linearly between the sorted latencies; mean batch = replies / generate
calls, from GET /stats before and after the phase.

Repetitions alternate the two configurations' order (ours first in even ones); figures are medians
over repetitions. Targets (issue 6, item 3): ours >= 5x the tokens/s of one at a time at 16
clients; deploy-to-ready <= 10 s with the model cached.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file: make the project importable without installing it
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from automation.serving import process  # noqa: E402

EXPERIMENT = REPO / "experiments" / "smollm2-ultrachat-local.yaml"
PROMPTS = REPO / "data" / "ultrachat-sample" / "test_gen.jsonl"
CONFIGS: dict[str, dict[str, Any]] = {"ours": {}, "one-at-a-time": {"max_batch_size": 1}}
MIN_REQUESTS = 4
TARGET_SPEEDUP = 5.0
TARGET_READY_S = 10.0


# --------------------------------------------------------------------------------------------
# Inputs

def load_prompts() -> list[str]:
    prompts = []
    for line in PROMPTS.read_text(encoding="utf-8").splitlines():
        if line.strip():
            messages = json.loads(line)["messages"]
            prompts.append(next(m["content"] for m in messages if m["role"] == "user"))
    if not prompts:
        raise SystemExit(f"no prompts in {PROMPTS}")
    return prompts


def resolve_model(arg: str | None, scratch: Path) -> tuple[Path, str]:
    """The model folder and a line saying where it came from."""
    if arg == "tiny":
        from automation.backends.local.tiny import build_tiny_model

        texts = [m["content"] for line in (REPO / "data" / "ultrachat-sample" / "train_sft.jsonl").open()
                 for m in json.loads(line)["messages"]]
        return build_tiny_model(scratch / "tiny-model", texts), "a tiny random model (checks the script only)"
    if arg:
        folder = Path(arg).resolve()
        if not (folder / "config.json").is_file():
            raise SystemExit(f"--model {arg}: not a Hugging Face model folder (no config.json)")
        return folder, f"{folder} (--model)"
    from automation.backends.local.model_source import resolve_model_dir
    from automation.spec import load_experiment

    experiment = load_experiment(EXPERIMENT)
    folder = resolve_model_dir(experiment.model)
    if not isinstance(folder, Path):
        raise SystemExit(f"{EXPERIMENT.name} names a hub model ({folder}); pass --model DIR")
    return folder.resolve(), f"{folder} ({experiment.model.name} of {EXPERIMENT.name}, via resolve_model_dir)"


# --------------------------------------------------------------------------------------------
# Servers

def start(config: str, model_dir: Path, args: argparse.Namespace) -> tuple[process.EndpointRecord, float]:
    """Start one server the way `deploy` does; the seconds until it answered /ready."""
    began = time.perf_counter()
    record = process.start_endpoint(
        f"bench-{config}", model_dir, tags={"bench": "serving", "config": config},
        max_new_tokens_cap=max(512, args.max_tokens), request_timeout_ms=int(args.request_timeout_s * 1000),
        ready_timeout_s=args.ready_timeout_s, device=args.device, **CONFIGS[config])
    return record, time.perf_counter() - began


def stats(client: httpx.Client, record: process.EndpointRecord, key: str) -> dict[str, Any]:
    response = client.get(f"{record.url}/stats", headers={"Authorization": f"Bearer {key}"})
    response.raise_for_status()
    return response.json()


def log_tail(record: process.EndpointRecord, lines: int = 20) -> str:
    try:
        return "\n".join(Path(record.log_file).read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


# --------------------------------------------------------------------------------------------
# Clients

def chat(client: httpx.Client, record: process.EndpointRecord, key: str, prompt: str, max_tokens: int,
         origin: float) -> dict[str, Any]:
    """One chat completion; its start/end (seconds after origin), latency, tokens or error."""
    body = {"model": "bench", "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0}
    began = time.perf_counter()
    try:
        response = client.post(f"{record.url}/v1/chat/completions", json=body,
                               headers={"Authorization": f"Bearer {key}"})
        ok = response.is_success
        detail = None if ok else f"{response.status_code}: {response.text[:300]}"
    except httpx.HTTPError as exc:
        ok, detail = False, f"{type(exc).__name__}: {exc}"
    ended = time.perf_counter()
    result: dict[str, Any] = {"start_s": began - origin, "end_s": ended - origin, "latency_s": ended - began}
    if not ok:
        result["error"] = detail
        return result
    reply = response.json()
    result["completion_tokens"] = reply["usage"]["completion_tokens"]
    result["prompt_tokens"] = reply["usage"]["prompt_tokens"]
    result["finish_reason"] = reply["choices"][0]["finish_reason"]
    return result


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def phase(record: process.EndpointRecord, key: str, clients: int, per_client: int, prompts: list[str],
          args: argparse.Namespace) -> dict[str, Any]:
    """`clients` closed-loop clients, `per_client` requests each, released together."""
    timeout = args.request_timeout_s + 30
    barrier = threading.Barrier(clients + 1)
    results: list[list[dict[str, Any]]] = [[] for _ in range(clients)]
    origin = time.perf_counter()

    def client_loop(k: int) -> None:
        # trust_env=False: no proxy from the environment between us and loopback.
        with httpx.Client(timeout=timeout, trust_env=False) as client:
            barrier.wait()
            for j in range(per_client):
                results[k].append(chat(client, record, key, prompts[(j * clients + k) % len(prompts)],
                                       args.max_tokens, origin))

    with httpx.Client(timeout=30, trust_env=False) as control:
        before = stats(control, record, key)
        threads = [threading.Thread(target=client_loop, args=(k,), daemon=True) for k in range(clients)]
        for thread in threads:
            thread.start()
        barrier.wait()
        for thread in threads:
            thread.join()
        after = stats(control, record, key)

    requests = [r for per in results for r in per]
    done = [r for r in requests if "error" not in r]
    errors = [r["error"] for r in requests if "error" in r]
    wall = max(r["end_s"] for r in requests) - min(r["start_s"] for r in requests)
    tokens = sum(r["completion_tokens"] for r in done)
    latencies = [r["latency_s"] for r in done]
    batches = after["batches"] - before["batches"]
    return {
        "clients": clients, "requests": len(requests), "errors": len(errors), "error_samples": errors[:3],
        "completion_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "p50_s": percentile(latencies, 50), "p95_s": percentile(latencies, 95),
        "cut_short": sum(1 for r in done
                         if r["finish_reason"] == "length" and r["completion_tokens"] < args.max_tokens),
        "generate_calls": batches,
        "mean_batch": (after["replies"] - before["replies"]) / batches if batches else math.nan,
        "largest_batch_so_far": after["largest_batch"], "per_request": requests,
    }


def serve(config: str, model_dir: Path, prompts: list[str], args: argparse.Namespace, rep: int) -> dict[str, Any]:
    """Start one server, warm it up, run every client count against it, and stop it."""
    name = f"bench-{config}"
    run: dict[str, Any] = {"config": config, "rep": rep + 1, "phases": []}
    try:
        record, run["ready_s"] = start(config, model_dir, args)
        key = process.read_key(record)
        print(f"  rep {rep + 1} {config:13}: ready {run['ready_s']:.2f} s after the start call "
              f"(pid {record.pid}, {record.url})", flush=True)
        with httpx.Client(timeout=args.request_timeout_s + 30, trust_env=False) as client:
            warm = chat(client, record, key, prompts[0], args.max_tokens, time.perf_counter())
        if "error" in warm:
            raise SystemExit(f"warm-up request failed: {warm['error']}\n--- server log ---\n{log_tail(record)}")
        run["warmup_s"] = warm["latency_s"]
        for clients in args.clients:
            per_client = max(args.requests_per_client, math.ceil(MIN_REQUESTS / clients))
            result = phase(record, key, clients, per_client, prompts, args)
            run["phases"].append(result)
            print(f"  rep {rep + 1} {config:13} {clients:3} clients: {result['requests']:3} requests, "
                  f"{result['completion_tokens']:5} tokens in {result['wall_s']:7.2f} s = "
                  f"{result['tokens_per_s']:7.2f} tokens/s; p50 {result['p50_s']:6.2f} s, "
                  f"p95 {result['p95_s']:6.2f} s; mean batch {result['mean_batch']:4.1f}"
                  + (f"; {result['cut_short']} cut short" if result["cut_short"] else "")
                  + (f"; {result['errors']} ERRORS, e.g. {result['error_samples'][0]}" if result["errors"] else ""),
                  flush=True)
            if result["errors"]:
                print(f"--- last lines of the server log ---\n{log_tail(record)}", flush=True)
        largest = run["phases"][-1]["largest_batch_so_far"] if run["phases"] else 0
        if config == "one-at-a-time" and largest > 1:
            raise SystemExit(f"the one-at-a-time server ran a batch of {largest}: --max-batch-size 1 did not apply")
    finally:
        process.stop_endpoint(name)
    return run


# --------------------------------------------------------------------------------------------
# Report

def summarize(runs: list[dict[str, Any]], args: argparse.Namespace) -> None:
    table: dict[tuple[str, int], dict[str, float]] = {}
    for config in CONFIGS:
        for clients in args.clients:
            phases = [p for r in runs if r["config"] == config for p in r["phases"] if p["clients"] == clients]
            if phases:
                table[config, clients] = {m: statistics.median(p[m] for p in phases)
                                          for m in ("tokens_per_s", "p50_s", "p95_s", "mean_batch")}
                table[config, clients]["errors"] = sum(p["errors"] for p in phases)
                table[config, clients]["cut_short"] = sum(p["cut_short"] for p in phases)
    print(f"\nmedians of {args.reps} repetition(s); max_tokens {args.max_tokens}, greedy, "
          f"{args.threads} torch thread(s) per server")
    print(f"{'config':14} {'clients':>7} {'tokens/s':>9} {'p50 s':>8} {'p95 s':>8} {'mean batch':>10} "
          f"{'errors':>6} {'cut':>4}")
    for (config, clients), m in table.items():
        print(f"{config:14} {clients:7} {m['tokens_per_s']:9.2f} {m['p50_s']:8.2f} {m['p95_s']:8.2f} "
              f"{m['mean_batch']:10.1f} {int(m['errors']):6} {int(m['cut_short']):4}")

    most, fewest = max(args.clients), min(args.clients)
    ours, alone = table.get(("ours", most)), table.get(("one-at-a-time", most))
    if ours and alone and alone["tokens_per_s"] > 0:
        speedup = ours["tokens_per_s"] / alone["tokens_per_s"]
        print(f"ours at {most} clients vs one at a time at {most} clients: {speedup:.2f}x the tokens/s "
              f"(target >= {TARGET_SPEEDUP:g}x: {'met' if speedup >= TARGET_SPEEDUP else 'MISSED'})")
    single = table.get(("one-at-a-time", fewest))
    if ours and single and single["tokens_per_s"] > 0:
        print(f"ours at {most} clients vs one at a time at {fewest} client(s): "
              f"{ours['tokens_per_s'] / single['tokens_per_s']:.2f}x the tokens/s")
    for config in CONFIGS:
        ready = [r["ready_s"] for r in runs if r["config"] == config and "ready_s" in r]
        if ready:
            met = statistics.median(ready) <= TARGET_READY_S
            verdict = f"; target <= {TARGET_READY_S:g} s: {'met' if met else 'MISSED'}" if config == "ours" else ""
            print(f"deploy-to-ready ({config}): median {statistics.median(ready):.2f} s "
                  f"(runs: {', '.join(f'{s:.2f}' for s in ready)}){verdict}")
    warm = [r["warmup_s"] for r in runs if "warmup_s" in r]
    if warm:
        print(f"first (warm-up) request after ready: median {statistics.median(warm):.2f} s")
    if any(m["errors"] or m["cut_short"] for m in table.values()):
        print("WARNING: some requests failed or were cut short; the figures above undercount them")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="Hugging Face model folder, or 'tiny' (default: the demo experiment's)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per server (OMP_NUM_THREADS; default: $OMP_NUM_THREADS, "
                             "else the CPUs available)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--request-timeout-s", type=float, default=600.0)
    parser.add_argument("--ready-timeout-s", type=float, default=300.0)
    parser.add_argument("--ours", default="", metavar="KEY=VALUE,...",
                        help="other `start_endpoint` batching settings for ours, e.g. 'batch_window_ms=50' "
                             "(default: the product's defaults)")
    parser.add_argument("--json", type=Path, help="write every run, request by request, to this file")
    args = parser.parse_args()
    if min(args.clients) < 1 or args.reps < 1 or args.max_tokens < 1 or args.requests_per_client < 1:
        parser.error("--clients, --reps, --max-tokens and --requests-per-client must be at least 1")
    CONFIGS["ours"] = {key: float(value) if "ms" in key else int(value)
                       for key, value in (item.split("=", 1) for item in args.ours.split(",") if item)}
    if args.threads is None:
        args.threads = int(os.environ.get("OMP_NUM_THREADS") or len(os.sched_getaffinity(0)))

    # A SIGTERM ends the run through the finally blocks, so no server is left behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.environ["HF_HUB_OFFLINE"] = "1"
    scratch = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    runs: list[dict[str, Any]] = []
    try:
        # Resolved in the user's workspace (where the converted model is cached) before switching
        # AUTOMATION_HOME to a temporary one for the endpoint records, keys and logs.
        model_dir, origin = resolve_model(args.model, scratch)
        os.environ["AUTOMATION_HOME"] = str(scratch / "home")
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the servers
        prompts = load_prompts()
        print(f"model: {origin}\n{len(prompts)} prompts from {PROMPTS.relative_to(REPO)}; clients {args.clients}; "
              f"max_tokens {args.max_tokens}; {args.threads} torch thread(s) per server; "
              f"{args.reps} repetition(s), configurations alternating"
              + (f"; ours started with {args.ours}" if args.ours else ""), flush=True)
        for rep in range(args.reps):
            order = list(CONFIGS) if rep % 2 == 0 else list(reversed(CONFIGS))
            for config in order:
                runs.append(serve(config, model_dir, prompts, args, rep))
        summarize(runs, args)
    finally:
        if os.environ.get("AUTOMATION_HOME") == str(scratch / "home"):  # never the user's own endpoints
            for record in process.list_endpoints():  # whatever an interruption left running
                process.stop_endpoint(record.name)
        if args.json:
            args.json.write_text(json.dumps({"args": {k: str(v) if isinstance(v, Path) else v
                                                      for k, v in vars(args).items()}, "runs": runs}, indent=1))
            print(f"raw runs written to {args.json}")
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
