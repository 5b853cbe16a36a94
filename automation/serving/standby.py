"""A warm spare: a server process that has done its imports and waits for a model.

A cold start spends most of its time importing torch and transformers (about 5 of its 6 s on the
2-core VM, see bench/RESULTS.md "Serving"); reading the tokenizer and the weights of a cached model
takes about half a second. `python -m automation.serving --standby SOCKET --standby-id ID` does the
imports ahead of time and then waits on a Unix socket for one claim: the arguments a cold start
would have been given. It then runs exactly what a cold start runs (`__main__.main`), in the same
process, with its output moved to the endpoint's log. `process.start_endpoint` claims a live
standby when the workspace has one and starts cold otherwise; `automation endpoints warm` starts one.

What the imports depend on must be the same for the claimer's cold start as it was for the
standby: the Python and its installed distributions, this package's source (`code_fingerprint()`),
and the environment variables torch, transformers and the server read (`import_environment()`). The
standby takes both when it starts, before it imports anything, so that nothing its own imports leave
in `os.environ` counts as an input (torch._inductor, which transformers pulls in, sets
TORCHINDUCTOR_CACHE_DIR). What its imports set is measured, and counts as their output on the
claimer's side too: a claimer that did the same imports has the same value there and differs in
nothing. A claim that differs is refused (the answer names the variables), the standby exits, and
the claimer starts cold. An unclaimed standby exits after its idle timeout.

The protocol, one JSON line each way on the socket (same user only: the socket is created with
umask 077, in the workspace's 0700 `standby/` folder):
  {"op": "status"}                                        -> {"warm": true, "pid": int}
                                                           (answered once the imports are done)
  {"op": "claim", "argv": [...], "log_file": PATH, "fingerprint": HEX, "environment": {NAME: VALUE}}
                                                          -> {"ok": true, "pid": int, "import_writes": {NAME: VALUE}}
                                                           | {"ok": false, "reason": TEXT}
Importing this module imports neither torch nor transformers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import site
import socket
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

log = logging.getLogger("automation.serving")

# Environment variables whose value at import time shapes the imported modules (thread pools,
# offline mode, caches, devices, import paths): a claim from an environment that differs in any of
# them must not reuse this process.
ENV_PREFIXES = ("OMP_", "MKL_", "OPENBLAS_", "KMP_", "HF_", "TRANSFORMERS_", "TORCH", "PYTORCH_", "CUDA_",
                "PYTHON", "AUTOMATION_", "TOKENIZERS_")
MAX_LINE = 1 << 20  # a claim is a few hundred bytes; anything near this is not ours


def code_fingerprint() -> str:
    """The Python, its installed distributions (their names carry their versions) and `.pth` files,
    and this package's source, as one digest."""
    digest = hashlib.sha256()
    digest.update(f"{sys.executable}\0{sys.version}\0".encode())
    for folder in site.getsitepackages():
        with contextlib.suppress(OSError):
            names = sorted(n for n in os.listdir(folder) if n.endswith((".dist-info", ".egg-info", ".pth")))
            digest.update(f"{folder}:{'/'.join(names)}\0".encode())
    package = Path(__file__).resolve().parents[1]
    for path in sorted(package.rglob("*.py")):
        digest.update(f"{path.relative_to(package)}\0".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def import_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables the imports may read (ENV_PREFIXES) of `environ` (default: this process's)."""
    environ = os.environ if environ is None else environ
    return {key: environ[key] for key in sorted(environ) if key.startswith(ENV_PREFIXES)}


def environment_differences(launch: Mapping[str, str], claimed: Mapping[str, str],
                            import_writes: Mapping[str, str]) -> list[str]:
    """The names of the variables in which a claimer's environment differs from the one the standby
    began with, less those the standby's own imports set to the claimer's value (their output)."""
    return [key for key in sorted(set(launch) | set(claimed))
            if launch.get(key) != claimed.get(key)
            and not (key not in launch and import_writes.get(key) == claimed.get(key))]


def preload() -> None:
    """The imports a start would do: the server, torch, and transformers' model-loading machinery
    (the bulk: ~3 s of torch.distributed, torch._dynamo and scipy modules that transformers pulls in)."""
    import torch  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401  (the default model's family)
    import uvicorn  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache  # noqa: F401

    import automation.serving.server  # noqa: F401


def read_message(conn: socket.socket) -> dict:
    """One JSON line from the other side; {} when it closed without one."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_LINE:
            raise ValueError("message too long")
    return json.loads(data or b"{}")


def send_message(conn: socket.socket, message: dict) -> None:
    conn.sendall(json.dumps(message).encode() + b"\n")


def _move_output(log_file: str) -> None:
    """From now on, stdout and stderr go to the endpoint's log (appended), as for a cold start."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def serve(socket_path: str, idle_timeout_s: float, main: Callable[[list[str]], int]) -> int:
    """Wait, warm, for one claim; then run `main` with its arguments. 0 when the idle timeout (or a
    refused claim) ends the wait."""
    old_umask = os.umask(0o077)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)
        listener.bind(socket_path)
    finally:
        os.umask(old_umask)
    listener.listen(8)
    message: dict = {}
    argv: list[str] = []
    # Stopped while waiting: leave through the finally below, so the socket file goes too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        began = time.monotonic()
        code, launch = code_fingerprint(), import_environment()  # before any import: what they depend on
        preload()
        import_writes = {key: value for key, value in import_environment().items() if launch.get(key) != value}
        log.info("standby warm after %.2f s (pid %d); waiting up to %.0f s for a claim", time.monotonic() - began,
                 os.getpid(), idle_timeout_s)
        until = time.monotonic() + idle_timeout_s
        while True:
            left = until - time.monotonic()
            if left <= 0:
                log.info("standby: no claim within %.0f s; exiting", idle_timeout_s)
                return 0
            listener.settimeout(left)
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(10)
                try:
                    message = read_message(conn)
                    if message.get("op") == "status":
                        send_message(conn, {"warm": True, "pid": os.getpid()})
                        continue
                    environment = message.get("environment")
                    if (message.get("op") != "claim" or not isinstance(message.get("argv"), list)
                            or not isinstance(message.get("log_file"), str) or not isinstance(environment, dict)):
                        send_message(conn, {"ok": False, "reason": "expected a claim (argv, log_file, environment) "
                                                                  "or a status request"})
                        continue
                    differences = environment_differences(launch, environment, import_writes)
                    if message.get("fingerprint") != code or differences:
                        reason = (f"the environment differs from this standby's in {', '.join(differences)}"
                                  if differences else "the Python, its packages or this package's source changed")
                        send_message(conn, {"ok": False, "reason": f"{reason} since the standby started; start cold"})
                        log.info("standby: refused a claim (%s); exiting", reason)  # names only, never values
                        return 0
                    argv = [str(a) for a in message["argv"]]
                    send_message(conn, {"ok": True, "pid": os.getpid(), "import_writes": import_writes})
                except (OSError, ValueError) as exc:  # the other side left, or sent what is not ours
                    if message.get("op") == "claim" and argv:
                        log.warning("standby: the claimer left before the answer (%s); exiting", exc)
                        return 0
                    log.warning("standby: unreadable message or a client gone (%s); ignored", exc)
                    continue
            break
    finally:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)
    log.info("standby claimed: serving %s", argv[argv.index("--model-dir") + 1] if "--model-dir" in argv else argv)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # from here on, a server like any other
    _move_output(message["log_file"])
    return main(argv)
