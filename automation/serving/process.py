"""Start, find, stop and call local endpoints: one detached server process each.

The workspace keeps, per endpoint, `<home>/endpoints/<name>.json` (the record), `<name>.key`
(the API key, mode 0600) and `<name>.log` (the server's output, kept after a stop). A record is
only a hint: before signalling a pid we check that the process really is our server for that
key file (or, for a server that was a warm standby, for that standby id), so a pid reused by the
system is never killed. Importing this module imports no torch.

A warm standby (`start_standby`, `automation endpoints warm`) is a server process that has done its
imports and waits for a model (`standby.py`): `start_endpoint` claims it when there is one, and the
endpoint is ready in a second or two instead of 5-20 (bench/RESULTS.md). Its files are in `<home>/standby/`:
`standby.json` (the record), `standby.log` (its output until claimed), `standby.sock` and
`standby.lock` (one start, claim or stop at a time).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel

from automation.errors import BackendError, ConfigError
from automation.serving.standby import (
    code_fingerprint,
    import_environment,
    read_message,
    send_message,
)
from automation.workspace import home, write_text_atomic

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
HOST = "127.0.0.1"
LOG_TAIL_LINES = 30
STOP_GRACE_S = 10.0

# Servers this process started: waiting on them reaps them, so a stopped server does not linger
# as a zombie that still answers os.kill(pid, 0).
_children: dict[int, subprocess.Popen] = {}


class EndpointRecord(BaseModel):
    name: str
    pid: int
    port: int
    url: str
    model_dir: str
    tags: dict[str, str] = {}
    created_at: str
    key_file: str
    log_file: str
    standby_id: str | None = None  # set when a warm standby became this server: its process marker
    precision: str = "auto"  # as requested (--precision); the server's /ready and log say what it chose
    alive: bool = False  # computed when read; not meaningful in the stored file

    @property
    def marker(self) -> str:
        """What the server's arguments contain: its key file, or the id of the standby it was."""
        return self.standby_id or self.key_file


class StandbyRecord(BaseModel):
    pid: int
    standby_id: str
    socket: str
    idle_timeout_s: int
    replenish: bool  # a claim starts the next standby once the claimed endpoint is ready
    created_at: str
    log_file: str
    alive: bool = False  # computed when read

    @property
    def marker(self) -> str:
        return self.standby_id


def endpoints_dir() -> Path:
    return home() / "endpoints"


def _paths(name: str) -> dict[str, Path]:
    if not NAME_PATTERN.match(name):
        raise ConfigError(f"endpoint name {name!r} must match {NAME_PATTERN.pattern}")
    folder = endpoints_dir()
    return {kind: folder / f"{name}.{kind}" for kind in ("json", "key", "log", "port")}


# --------------------------------------------------------------------------------------------
# Processes

def _cmdline(pid: int) -> list[str] | None:
    """The process's arguments, or None when there is no such (live) process."""
    proc = Path(f"/proc/{pid}")
    if proc.is_dir():
        try:
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return None  # a zombie has exited; only its exit status is left
            return (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except (OSError, IndexError):
            return None
    if sys.platform.startswith("linux"):
        return None
    # No /proc (macOS): ask ps.
    done = subprocess.run(["ps", "-o", "stat=,command=", "-p", str(pid)], capture_output=True, text=True)
    line = done.stdout.strip()
    if done.returncode != 0 or not line or line.startswith("Z"):
        return None
    return line.split(None, 1)[1].split()


def _is_our_server(pid: int, marker: str) -> bool:
    """Is pid a live `python -m automation.serving` whose arguments hold marker (a key file or a standby id)?"""
    if _gone(pid):
        return False
    args = _cmdline(pid)
    return bool(args) and "automation.serving" in args and marker in args


def _gone(pid: int) -> bool:
    child = _children.get(pid)
    if child is not None:
        # Our own child: poll() is the truth, and it reaps the exited process in the same step.
        if child.poll() is None:
            return False
        _children.pop(pid, None)
        return True
    return _cmdline(pid) is None if Path("/proc").is_dir() else not _pid_exists(pid)


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_gone(pid: int, timeout_s: float) -> bool:
    until = time.monotonic() + timeout_s
    while time.monotonic() < until:
        if _gone(pid):
            return True
        time.sleep(0.05)
    return _gone(pid)


def _signal_group(pid: int, sig: int) -> None:
    # start_new_session made the server a group leader: signal the group, so anything it spawned
    # goes too.
    with contextlib.suppress(ProcessLookupError):
        try:
            os.killpg(pid, sig)
        except PermissionError:
            os.kill(pid, sig)


def _terminate(pid: int, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM, a grace period for a clean shutdown, then SIGKILL."""
    _signal_group(pid, signal.SIGTERM)
    if _wait_gone(pid, grace_s):
        return
    log.warning("endpoint process %d ignored SIGTERM for %.0f s; killing it", pid, grace_s)
    _signal_group(pid, signal.SIGKILL)
    if not _wait_gone(pid, 5.0):
        raise BackendError(f"endpoint process {pid} survived SIGKILL")


# --------------------------------------------------------------------------------------------
# Files

def _new_key(path: Path) -> str:
    """A fresh random key in a file created with mode 0600: never readable by others, even briefly."""
    key = secrets.token_urlsafe(32)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(key + "\n")
    return key


def _log_tail(path: Path, start: int, secret: str | None = None) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(start)
            text = handle.read().decode("utf-8", errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    if secret:  # the server never logs its key; this is a second line of defence
        text = text.replace(secret, "***")
    return "\n".join(text.splitlines()[-LOG_TAIL_LINES:]) or "(the log is empty)"


def _read_record(path: Path, kind: type[EndpointRecord] | type[StandbyRecord] = EndpointRecord):
    """The record at path with `alive` set, or None when there is none (or it cannot be read)."""
    try:
        record = kind.model_validate_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable %s %s: %s", "standby record" if kind is StandbyRecord else "endpoint record",
                    path, exc)
        return None
    record.alive = _is_our_server(record.pid, record.marker)
    return record


# --------------------------------------------------------------------------------------------
# Public API

def get_endpoint(name: str) -> EndpointRecord | None:
    path = _paths(name)["json"]
    return _read_record(path) if path.exists() else None


def list_endpoints(match_tags: dict[str, str] | None = None) -> list[EndpointRecord]:
    """Every recorded endpoint whose tags include all of match_tags, each with `alive` set."""
    wanted = match_tags or {}
    records = []
    for path in sorted(endpoints_dir().glob("*.json")):
        record = _read_record(path)
        if record and all(record.tags.get(k) == v for k, v in wanted.items()):
            records.append(record)
    return records


def read_key(record: EndpointRecord) -> str:
    try:
        return Path(record.key_file).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise BackendError(f"cannot read the key of endpoint {record.name}: {exc}") from exc


def _client(timeout_s: float) -> httpx.Client:
    # trust_env=False: a proxy from the environment must never see loopback traffic or the key.
    return httpx.Client(timeout=timeout_s, trust_env=False)


def _is_ready(url: str) -> bool:
    try:
        with _client(2.0) as client:
            return client.get(f"{url}/ready").status_code == 200
    except httpx.HTTPError:
        return False


def invoke(record: EndpointRecord, payload: dict[str, Any], path: str = "/score",
           timeout_s: float = 120.0) -> dict[str, Any]:
    """POST payload to the endpoint with its key; any non-2xx answer is a BackendError."""
    headers = {"Authorization": f"Bearer {read_key(record)}"}
    try:
        with _client(timeout_s) as client:
            response = client.post(f"{record.url}{path}", json=payload, headers=headers)
    except httpx.HTTPError as exc:
        raise BackendError(f"endpoint {record.name} at {record.url}{path}: {type(exc).__name__}: {exc}") from exc
    if not response.is_success:
        raise BackendError(f"endpoint {record.name} at {record.url}{path} answered "
                           f"{response.status_code}: {response.text[:2000]}")
    return response.json()


def stop_endpoint(name: str) -> bool:
    """Stop the server and forget it; True if anything was there. Already gone is success."""
    paths = _paths(name)
    record = get_endpoint(name)
    if record is not None and record.alive:
        log.info("stopping endpoint %s (pid %d)", name, record.pid)
        _terminate(record.pid)
        _children.pop(record.pid, None)
    found = False
    for kind in ("json", "key", "port"):  # the log stays, for whoever investigates later
        with contextlib.suppress(FileNotFoundError):
            paths[kind].unlink()
            found = True
    return found


def start_endpoint(name: str, model_dir: str | Path, *, tags: dict[str, str], max_new_tokens_cap: int = 512,
                   request_timeout_ms: int = 90_000, ready_timeout_s: float = 300,
                   device: str = "auto", max_batch_size: int = 16, max_tokens_in_flight: int = 65_536,
                   max_prompt_tokens: int = 4096, threads: int = 0,
                   prefill_threads: int = 0, max_prefill_tokens: int = 512,
                   precision: str = "auto", environment: Mapping[str, str] | None = None) -> EndpointRecord:
    """Start a server for model_dir on a free loopback port and wait until it is ready.

    Continuous batching: up to `max_batch_size` requests decode together, each joining and leaving
    at any step; beyond `max_tokens_in_flight` (prompt + max_new_tokens of every admitted request)
    the server answers 429 with Retry-After; a conversation over `max_prompt_tokens` gets 400. At most
    `max_prefill_tokens` prompt tokens are prefilled between two decoding steps (longer prompts in chunks).
    `threads` / `prefill_threads`: torch threads while decoding / prefilling, 0 for the server's
    defaults (the usable CPUs less one / all of them). `precision` ("auto", "bf16", "fp32"): the
    weights' precision (auto: bf16 where the machine does it natively, else fp32; see generator.py).
    `environment`: what the server starts with instead of this process's environment (a run passes
    its environment from before its fine-tune, whose imports write to it: the standby it warmed
    then fits, and a cold start gets the same).

    Idempotent: a live, ready endpoint of that name serving the same folder is returned as it is;
    one serving another folder is stopped and replaced.
    """
    paths = _paths(name)
    model_dir = str(Path(model_dir).resolve())
    existing = get_endpoint(name)
    if existing is not None:
        if (existing.alive and existing.model_dir == model_dir and existing.precision == precision
                and _is_ready(existing.url)):
            log.info("endpoint %s already serves %s (pid %d)", name, model_dir, existing.pid)
            return existing
        stop_endpoint(name)
    endpoints_dir().mkdir(mode=0o700, parents=True, exist_ok=True)
    key = _new_key(paths["key"])
    with contextlib.suppress(FileNotFoundError):
        paths["port"].unlink()
    log_start = paths["log"].stat().st_size if paths["log"].exists() else 0
    arguments = [
        "--model-dir", model_dir, "--host", HOST,
        "--port", "0", "--port-file", str(paths["port"]), "--key-file", str(paths["key"]),
        "--max-new-tokens-cap", str(max_new_tokens_cap), "--request-timeout-ms", str(request_timeout_ms),
        "--device", device, "--max-batch-size", str(max_batch_size),
        "--max-tokens-in-flight", str(max_tokens_in_flight), "--max-prompt-tokens", str(max_prompt_tokens),
        "--max-prefill-tokens", str(max_prefill_tokens),
        "--threads", str(threads), "--prefill-threads", str(prefill_threads), "--precision", precision,
    ]
    standby, import_writes = _claim_standby(arguments, paths["log"], environment)
    if standby is not None:
        pid, standby_id = standby.pid, standby.standby_id
        log.info("endpoint %s: warm standby (pid %d) claimed for %s; waiting until it is ready", name, pid, model_dir)
    else:
        pid, standby_id = _spawn(arguments, paths["log"], _child_env(base=environment)), None
        log.info("started endpoint %s (pid %d) for %s; waiting until it is ready", name, pid, model_dir)
    try:
        port = _wait_ready(pid, paths["port"], ready_timeout_s)
    except BackendError as exc:
        _abandon(pid, paths)
        raise BackendError(f"endpoint {name} did not start: {exc}\n--- last lines of {paths['log']} ---\n"
                           f"{_log_tail(paths['log'], log_start, key)}") from None
    record = EndpointRecord(
        name=name, pid=pid, port=port, url=f"http://{HOST}:{port}", model_dir=model_dir,
        tags={str(k): str(v) for k, v in tags.items()}, created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        key_file=str(paths["key"]), log_file=str(paths["log"]), standby_id=standby_id, alive=True,
        precision=precision,
    )
    write_text_atomic(paths["json"], record.model_dump_json(indent=2, exclude={"alive"}) + "\n")
    paths["port"].unlink(missing_ok=True)
    if standby is not None and standby.replenish:  # the next start is warm too
        # Without what this process's own imports left in its environment: not the next standby's input.
        start_standby(idle_timeout_s=standby.idle_timeout_s, replenish=True, leave_out=import_writes)
    return record


def _spawn(arguments: list[str], log_path: Path, env: dict[str, str] | None = None) -> int:
    """`python -m automation.serving ARGUMENTS`, detached (its own session), output appended to log_path."""
    with log_path.open("ab") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "automation.serving", *arguments], stdin=subprocess.DEVNULL,
                                   stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                                   env=env or _child_env())
    _children[process.pid] = process
    return process.pid


def _child_env(leave_out: Mapping[str, str] | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """A server's environment: `base` (default: this process's), less the variables of `leave_out`
    that hold its values."""
    # The server runs `-m automation.serving`: make this very package importable in it even when
    # the project is not installed, by putting its parent folder first on PYTHONPATH.
    env = {k: v for k, v in (os.environ if base is None else base).items() if not leave_out or leave_out.get(k) != v}
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _wait_ready(pid: int, port_file: Path, timeout_s: float) -> int:
    until = time.monotonic() + timeout_s
    port = None
    while time.monotonic() < until:
        child = _children.get(pid)  # before _gone(), which forgets a child once it has exited
        if _gone(pid):
            code = child.returncode if child is not None else None
            raise BackendError(f"the server exited with code {code}" if code is not None else "the server exited")
        if port is None and port_file.exists():
            port = int(port_file.read_text().strip())
        if port is not None and _is_ready(f"http://{HOST}:{port}"):
            return port
        time.sleep(0.05 if port is not None else 0.1)
    raise BackendError(f"the server was not ready within {timeout_s:g} s")


def _abandon(pid: int, paths: dict[str, Path]) -> None:
    """Kill a server that failed to start, and remove what it would have needed."""
    if not _gone(pid):
        _signal_group(pid, signal.SIGKILL)
        _wait_gone(pid, 5.0)
    _children.pop(pid, None)
    for kind in ("key", "port"):
        paths[kind].unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# The warm standby

def _standby_paths() -> dict[str, Path]:
    folder = home() / "standby"
    sock = folder / "standby.sock"
    if len(str(sock).encode()) > 100:  # AF_UNIX paths are limited to 108 bytes
        digest = hashlib.sha256(str(folder).encode()).hexdigest()[:16]
        sock = Path(tempfile.gettempdir()) / f"automation-standby-{digest}.sock"
    return {"json": folder / "standby.json", "log": folder / "standby.log", "sock": sock}


def get_standby() -> StandbyRecord | None:
    """The workspace's standby as recorded (with `alive`), or None when none was started."""
    return _read_record(_standby_paths()["json"], StandbyRecord)


def _ask_standby(record: StandbyRecord, message: dict[str, Any], timeout_s: float) -> dict[str, Any] | None:
    """One request to the standby; None when it does not answer in time (gone, or still importing).
    Until its socket takes the connection (a standby just started binds it within a second), the
    connection is tried again; once the message is sent, never again: a claim must not go twice."""
    until = time.monotonic() + timeout_s
    while True:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            try:
                conn.settimeout(max(0.1, until - time.monotonic()))
                conn.connect(record.socket)
            except OSError as exc:
                if time.monotonic() >= until or _gone(record.pid):
                    log.warning("standby (pid %d) not reached: %s: %s", record.pid, type(exc).__name__, exc)
                    return None
                time.sleep(0.05)
                continue
            try:
                send_message(conn, message)
                answer = read_message(conn)
            except (OSError, ValueError) as exc:
                log.warning("standby (pid %d) did not answer: %s: %s", record.pid, type(exc).__name__, exc)
                return None
            if not answer:
                log.warning("standby (pid %d) closed the connection without an answer", record.pid)
            return answer or None


def standby_warm(timeout_s: float = 60.0) -> bool:
    """Wait until the workspace's standby has done its imports; False if there is none (or it is stuck)."""
    record = get_standby()
    if record is None or not record.alive:
        return False
    answer = _ask_standby(record, {"op": "status"}, timeout_s)
    return bool(answer and answer.get("warm"))


@contextlib.contextmanager
def _standby_lock():
    """One start, claim or stop of the workspace's standby at a time (across processes): two claims
    at once would both ask the one standby, and the one it did not answer would stop it."""
    folder = _standby_paths()["json"].parent
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    with (folder / "standby.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _taken_standby():
    """Under the standby lock: the workspace's standby record, already removed from the workspace
    (whatever the caller then does with it, claim or stop, it is nobody's standby any more), or None."""
    path = _standby_paths()["json"]
    if not path.exists():
        yield None
        return
    with _standby_lock():
        record = get_standby()
        if record is not None:
            path.unlink(missing_ok=True)
        yield record


def _claim_standby(arguments: list[str], log_path: Path,
                   environment: Mapping[str, str] | None = None) -> tuple[StandbyRecord | None, dict[str, str]]:
    """Hand a cold start's arguments to the workspace's standby: its record when it took them (else
    None), and the variables its imports set (what a process's imports leave in its environment)."""
    with _taken_standby() as record:
        if record is None:
            return None, {}
        if not record.alive:
            log.info("the recorded standby (pid %d) is gone; starting cold", record.pid)
            return None, {}
        # It answers once its imports are done: waiting for that beats importing again from nothing.
        answer = _ask_standby(record, {"op": "claim", "argv": arguments, "log_file": str(log_path),
                                       "fingerprint": code_fingerprint(),
                                       "environment": import_environment(_child_env(base=environment))},
                              timeout_s=60.0)
        if not answer or not answer.get("ok") or answer.get("pid") != record.pid:
            reason = (answer or {}).get("reason", "it did not answer")
            log.info("standby (pid %d) not used: %s; starting cold", record.pid, reason)
            if not _wait_gone(record.pid, 5.0):  # a standby that refuses exits by itself
                _terminate(record.pid)
            return None, {}
        writes = answer.get("import_writes")
        return record, {str(k): str(v) for k, v in writes.items()} if isinstance(writes, dict) else {}


def start_standby(idle_timeout_s: int = 1800, replenish: bool = True,
                  leave_out: Mapping[str, str] | None = None) -> StandbyRecord:
    """Start a warm standby for this workspace (one at most: a live one is returned as it is).

    It imports torch, transformers and the server, then waits up to idle_timeout_s for
    `start_endpoint` to claim it. With replenish, each claim starts the next standby once the
    claimed endpoint is ready (in the background, about 5 CPU-seconds of imports). `leave_out`:
    variables (with their values) to keep out of its environment: what imports set, not a person."""
    paths = _standby_paths()
    with _standby_lock():
        existing = get_standby()
        if existing is not None and existing.alive:
            return existing
        standby_id = f"standby-{secrets.token_hex(8)}"
        pid = _spawn(["--standby", str(paths["sock"]), "--standby-id", standby_id,
                      "--idle-timeout-s", str(idle_timeout_s)], paths["log"], _child_env(leave_out))
        record = StandbyRecord(pid=pid, standby_id=standby_id, socket=str(paths["sock"]),
                               idle_timeout_s=idle_timeout_s, replenish=replenish,
                               created_at=datetime.now(UTC).isoformat(timespec="seconds"),
                               log_file=str(paths["log"]), alive=True)
        write_text_atomic(paths["json"], record.model_dump_json(indent=2, exclude={"alive"}) + "\n")
    log.info("started a warm standby (pid %d); it exits if unclaimed for %d s", pid, idle_timeout_s)
    return record


def stop_standby() -> bool:
    """Stop the workspace's standby; True if there was one."""
    with _taken_standby() as record:
        if record is None:
            return False
        if record.alive:
            _terminate(record.pid)
        _children.pop(record.pid, None)
        Path(record.socket).unlink(missing_ok=True)
    return True
