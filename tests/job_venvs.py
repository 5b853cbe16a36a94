"""Venvs installed exactly as each workflow job installs its own: `make setup-<kind>`.

`job_venv(kind)` returns the folder of a venv that `make setup-core`, `make setup-azure` or
`make setup-local` built with `VENV` pointing there (its `bin/automation` and `bin/python` run the
working tree's code: the Makefile installs the project editable). A test that runs a verb from
that venv sees exactly what a runner of that job kind sees: a package outside the job's extra is
not installed there, so importing it fails the verb.

The venvs live under `.automation/job-venvs/` (ignored by git; `make clean` removes it, or set
`AUTOMATION_JOB_VENVS` to a folder elsewhere), one folder per kind and per content of `uv.lock`,
`pyproject.toml`, the Makefile, `requirements/`, the Python and this checkout's path. The first
test session after any of those changes builds the venv (from the uv and pip caches when warm);
later sessions reuse it. A lock file makes concurrent sessions build a venv once; folders of an older key that no
session used for an hour are removed when a newer one is built.

Fixtures: `core_venv`, `azure_venv`, `local_venv` (session scope); a test module takes the ones
it uses by name (`azure_venv = job_venvs.azure_venv` after `from tests import job_venvs`).

The import audit: a process started with `audit_env(env, record)` (it adds a `sitecustomize` to
PYTHONPATH) appends to `record`, at exit, the distribution of every module it imported and every
import that the project's own code attempted and no installed package could satisfy (a lazy
`import torchmetrics` inside a function is one). `audit_problems(record, kind)` turns that into
the list of what a job of that kind could not have run: empty when all is well. Child processes
(an endpoint server, say) inherit the environment and are audited too.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
KINDS = ("core", "azure", "local")
STALE_S = 3600
BUILD_TIMEOUT_S = 1200


def venvs_root() -> Path:
    return Path(os.environ.get("AUTOMATION_JOB_VENVS") or REPO / ".automation" / "job-venvs")


def install_key() -> str:
    """What decides a venv's contents: the lock, the project, the Makefile, the hashed requirements
    (uv, torch), the Python, and the checkout the project is installed from (editable)."""
    digest = hashlib.sha256()
    names = ["uv.lock", "pyproject.toml", "Makefile", *sorted(p.relative_to(REPO).as_posix()
                                                           for p in (REPO / "requirements").glob("*.txt"))]
    for name in names:
        digest.update(name.encode() + b"\0" + (REPO / name).read_bytes() + b"\0")
    digest.update(f"{sys.version}\0{base_python()}\0{REPO}".encode())
    return digest.hexdigest()[:12]


def base_python() -> str:
    """The interpreter behind the running one (a venv has no pip; the Makefile's bootstrap uses
    pip): the same Python version the tests run on, as setup-python gives every job the same."""
    return os.path.realpath(getattr(sys, "_base_executable", sys.executable))


def job_venv(kind: str) -> Path:
    """The venv `make setup-<kind>` installs, built on first use and reused while its key holds.

    Raises RuntimeError, with the end of make's output, when the install fails."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    root = venvs_root()
    root.mkdir(parents=True, exist_ok=True)
    key = install_key()
    venv = root / f"{kind}-{key}"
    with (root / f"{kind}-{key}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (venv / f".installed-{kind}").is_file():
            _build(kind, venv)
            _remove_stale(root, kind, keep=venv)
        (root / f"{kind}-{key}.used").touch()
    return venv


def _build(kind: str, venv: Path) -> None:
    log = venv.with_suffix(".log")
    # a sub-make must not inherit the outer `make test`'s command-line variables (VENV=...)
    env = {k: v for k, v in os.environ.items()
           if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    started = time.monotonic()
    with log.open("w") as out:
        done = subprocess.run(["make", "-C", str(REPO), f"setup-{kind}", f"VENV={venv}", f"PYTHON={base_python()}"],
                              stdout=out, stderr=subprocess.STDOUT, env=env, timeout=BUILD_TIMEOUT_S)
    text = log.read_text(errors="replace")
    if done.returncode != 0 or not (venv / f".installed-{kind}").is_file():
        raise RuntimeError(f"`make setup-{kind} VENV={venv}` failed (exit {done.returncode}); its output "
                           f"({log}) ends:\n{text[-4000:]}")
    with log.open("a") as out:
        out.write(f"built in {time.monotonic() - started:.1f} s\n")


def _remove_stale(root: Path, kind: str, keep: Path) -> None:
    for used in root.glob(f"{kind}-*.used"):
        folder = root / used.name.removesuffix(".used")
        if folder != keep and time.time() - used.stat().st_mtime > STALE_S:
            shutil.rmtree(folder, ignore_errors=True)
            for suffix in (".used", ".lock", ".log"):
                folder.with_suffix(suffix).unlink(missing_ok=True)


def installed_names(kind: str) -> set[str]:
    """The distributions `make setup-<kind>` installs, from the lock (torch apart: requirements/torch-cpu.txt)."""
    from tests.test_installs import export

    names = set(export(*{"core": (), "azure": ("azure",), "local": ("local",)}[kind]))
    return {normalized(n) for n in names} | ({"torch"} if kind == "local" else set()) | {"automation"}


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# Runs at the start of every audited Python process (PYTHONPATH); writes one JSON line at exit.
SITECUSTOMIZE = r'''
import atexit, json, os, sys, sysconfig

_REPO = os.path.realpath(%(repo)r)
_PROJECT = os.path.join(_REPO, "automation") + os.sep
_missing = []


class _Missing:
    """Last on sys.meta_path: asked only about imports no finder before it could satisfy."""

    def find_spec(self, name, path=None, target=None):
        frame = sys._getframe(1)
        while frame and (frame.f_code.co_filename.startswith("<frozen") or "importlib" in frame.f_code.co_filename):
            frame = frame.f_back
        where = os.path.realpath(frame.f_code.co_filename) if frame else ""
        if where.startswith(_PROJECT):
            _missing.append([name, "%%s:%%d" %% (where[len(_REPO) + 1:], frame.f_lineno)])
        return None


def _distributions():
    # Each installed file's owner from the RECORDs (joined to its folder's real path once, not
    # resolved file by file: this runs at exit).
    from importlib import metadata

    owner = {}
    for dist in metadata.distributions():
        root, name = os.path.realpath(dist.locate_file("")), dist.metadata["Name"]
        for file in dist.files or ():
            owner[os.path.normpath(os.path.join(root, str(file)))] = name
    stdlib = {os.path.realpath(sysconfig.get_paths()[k]) + os.sep for k in ("stdlib", "platstdlib")}
    used, unknown = set(), set()
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if not file or name in ("__main__", "__mp_main__", "sitecustomize"):
            continue  # builtin, frozen, or a namespace package (its submodules have files)
        real = os.path.realpath(file)
        if real in owner:
            used.add(owner[real])
        elif real.startswith(_PROJECT):
            used.add("automation")
        elif os.path.exists(real) and not any(real.startswith(s) and "site-packages" not in real[len(s):]
                                              for s in stdlib):
            unknown.add(name)
    return used, unknown


def _write():
    used, unknown = _distributions()
    missing = [m for m in _missing if m[0] not in sys.modules]
    with open(os.environ["AUTOMATION_IMPORT_AUDIT"], "a") as out:
        out.write(json.dumps({"argv": sys.argv, "distributions": sorted(used), "unknown": sorted(unknown),
                              "missing": missing}) + "\n")


if os.environ.get("AUTOMATION_IMPORT_AUDIT"):
    sys.meta_path.append(_Missing())
    atexit.register(_write)
'''


def audit_env(env: dict[str, str], record: Path) -> dict[str, str]:
    """`env` plus what makes a Python process of a job venv record its imports in `record`."""
    folder = venvs_root() / "import-audit"
    folder.mkdir(parents=True, exist_ok=True)
    text = SITECUSTOMIZE % {"repo": str(REPO)}
    if not (folder / "sitecustomize.py").is_file() or (folder / "sitecustomize.py").read_text() != text:
        temporary = folder / f"sitecustomize.py.{os.getpid()}"
        temporary.write_text(text)
        temporary.replace(folder / "sitecustomize.py")
    return {**env, "PYTHONPATH": str(folder), "AUTOMATION_IMPORT_AUDIT": str(record)}


def audit_problems(record: Path, kind: str) -> list[str]:
    """What the audited processes imported outside `make setup-<kind>`'s packages, and what the
    project's code tried to import and could not: one line each, empty when none."""
    if not record.is_file():
        return [f"no audited process wrote {record} (did it run with audit_env?)"]
    allowed, problems = installed_names(kind), []
    for line in record.read_text().splitlines():
        entry = json.loads(line)
        command = " ".join(Path(entry["argv"][0]).name.split() + entry["argv"][1:])[:120]
        for name in sorted({normalized(d) for d in entry["distributions"]} - allowed):
            problems.append(f"{command}: imported {name}, which `make setup-{kind}` does not install")
        for name in entry["unknown"]:
            problems.append(f"{command}: imported {name} from outside the venv")
        for name, where in entry["missing"]:
            problems.append(f"{command}: {where} imports {name}, which `make setup-{kind}` does not install")
    return problems


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a verb run as a workflow step would run it: none of this test process's
    venv or GitHub variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GITHUB_", "VIRTUAL_ENV", "PYTHON"))}
    return {**env, **extra}


def _fixture(kind: str) -> Path:
    try:
        return job_venv(kind)
    except RuntimeError as err:
        pytest.fail(str(err), pytrace=False)


@pytest.fixture(scope="session")
def core_venv() -> Path:
    return _fixture("core")


@pytest.fixture(scope="session")
def azure_venv() -> Path:
    return _fixture("azure")


@pytest.fixture(scope="session")
def local_venv() -> Path:
    return _fixture("local")
