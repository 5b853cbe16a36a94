"""Installs per job kind, as the workflows make them: `make setup-core|setup-local|setup-azure`.

    python bench/bench_setup.py [--kinds core local azure] [--reps 1]

Each case creates a new venv in a temp folder (`make VENV=... setup-KIND`) from a clean copy of the
repository's build files, so nothing of this checkout's .venv is reused:

- cold: an empty uv cache (UV_CACHE_DIR is a new folder), so every locked package is downloaded
  from PyPI, as on a runner whose cache missed;
- warm: a second new venv with the same uv cache, as on a runner whose cache hit (the
  workflows restore ~/.cache/uv and ~/.cache/pip keyed on uv.lock).

For `core` the figure is install + `automation validate experiments/`, what the validate job runs.
The installed size is `du` of the venv. The machine's pip takes torch from a local file
(/opt/wheels) because download.pytorch.org is unreachable here: the torch step's download
(about 190 MB on a runner) is not in these figures, and pip's failed look-up of the index is.
Prints a markdown table; figures go to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COPY = ("Makefile", "pyproject.toml", "uv.lock", "README.md", "automation", "experiments")


def size_mb(path: Path) -> float:
    out = subprocess.run(["du", "-sm", str(path)], capture_output=True, text=True, check=True).stdout
    return float(out.split()[0])


def timed(args: list[str], cwd: Path, env: dict[str, str]) -> float:
    started = time.monotonic()
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.monotonic() - started


def install(kind: str, work: Path, cache: Path, label: str) -> dict[str, float]:
    tree = work / f"{kind}-{label}"
    tree.mkdir()
    for name in COPY:
        source = REPO / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, tree / name)
    env = {**os.environ, "UV_CACHE_DIR": str(cache), "PIP_NO_CACHE_DIR": "1"}
    env.pop("VIRTUAL_ENV", None)
    seconds = timed(["make", "--no-print-directory", f"setup-{kind}", f"PYTHON={sys.executable}"], tree, env)
    row = {"install_s": seconds, "size_mb": size_mb(tree / ".venv")}
    if kind == "core":
        row["validate_s"] = timed([str(tree / ".venv" / "bin" / "automation"), "validate", "experiments"], tree, env)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", nargs="+", default=["core", "azure", "local"])
    args = parser.parse_args(argv)
    if not shutil.which("make"):
        sys.exit("make is needed")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-setup-") as tmp:
        work = Path(tmp)
        for kind in args.kinds:
            cache = work / f"uv-cache-{kind}"
            cold = install(kind, work, cache, "cold")
            warm = install(kind, work, cache, "warm")
            rows.append((kind, cold, warm))
            print(f"{kind}: cold {cold}, warm {warm}", file=sys.stderr, flush=True)
    print("| job kind | cold install | warm install | + validate | installed size |")
    print("|---|---|---|---|---|")
    for kind, cold, warm in rows:
        validate = (f"cold {cold['install_s'] + cold['validate_s']:.1f} s, warm {warm['install_s'] + warm['validate_s']:.1f} s"
                    if "validate_s" in cold else "")
        print(f"| {kind} | {cold['install_s']:.1f} s | {warm['install_s']:.1f} s | {validate} | {warm['size_mb']:.0f} MB |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
