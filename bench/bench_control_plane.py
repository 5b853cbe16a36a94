"""Control plane: cold start of `automation validate` (1 and 500 files) and `automation changed`.

    python bench/bench_control_plane.py [--reps 10]

Every run is a fresh process (`.venv/bin/automation ...`), as in CI. Cases:

- validate 1 file: experiments/smollm2-ultrachat-local.yaml;
- validate 500 files: copies of it named exp-0000 ... exp-0499 (name = file stem) in a temp folder;
- changed, a PR touching 50 experiments: a temp git repo whose base commit holds experiments/
  (the repository's two plus 50 generated ones) and data/ultrachat-sample; the head commit
  modifies 25 of them and adds 25 new ones. Run as
  `automation changed --base BASE --head HEAD --pr 1 --no-teardown` with GITHUB_OUTPUT and
  GITHUB_STEP_SUMMARY pointing at temp files.

The floor is `python -c pass` with the same interpreter (what any Python CLI pays), measured
alternately with each case so the noise of this shared machine hits both alike. Figures are
medians of --reps runs. Targets (issue 6): validate 1 file < 0.5 s, 500 files < 3 s.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
AUTOMATION = str(BIN / "automation")
SAMPLE = REPO / "experiments" / "smollm2-ultrachat-local.yaml"


def experiment_text(name: str, learning_rate: str = "1.0e-3") -> str:
    text = SAMPLE.read_text()
    text = re.sub(r"(?m)^name: .*$", f"name: {name}", text, count=1)
    return re.sub(r"(?m)^(\s*learning_rate:).*$", rf"\g<1> {learning_rate}", text, count=1)


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.decode()[-2000:]}")
    return seconds


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def make_pr_repo(root: Path) -> tuple[str, str]:
    (root / "experiments").mkdir(parents=True)
    for f in (REPO / "experiments").iterdir():
        shutil.copy(f, root / "experiments" / f.name)
    shutil.copytree(REPO / "data" / "ultrachat-sample", root / "data" / "ultrachat-sample")
    for i in range(50):
        (root / "experiments" / f"exp-{i:04d}.yaml").write_text(experiment_text(f"exp-{i:04d}"))
    git(root, "init", "-q")
    git(root, "-c", "user.name=bench", "-c", "user.email=bench@example.com", "add", "-A")
    git(root, "-c", "user.name=bench", "-c", "user.email=bench@example.com", "commit", "-qm", "base")
    base = git(root, "rev-parse", "HEAD")
    for i in range(25):  # modify 25
        (root / "experiments" / f"exp-{i:04d}.yaml").write_text(experiment_text(f"exp-{i:04d}", "2.0e-4"))
    for i in range(50, 75):  # add 25
        (root / "experiments" / f"exp-{i:04d}.yaml").write_text(experiment_text(f"exp-{i:04d}"))
    git(root, "-c", "user.name=bench", "-c", "user.email=bench@example.com", "add", "-A")
    git(root, "-c", "user.name=bench", "-c", "user.email=bench@example.com", "commit", "-qm", "touch 50")
    return base, git(root, "rev-parse", "HEAD")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-cp-"))
    try:
        many = tmp / "many"
        many.mkdir()
        for i in range(500):
            (many / f"exp-{i:04d}.yaml").write_text(experiment_text(f"exp-{i:04d}"))
        shutil.copy(REPO / "experiments" / "experiment.schema.json", many / "experiment.schema.json")
        pr_repo = tmp / "pr"
        base, head = make_pr_repo(pr_repo)
        env = {k: v for k, v in os.environ.items() if not k.startswith("GITHUB_")}
        env_changed = dict(env, GITHUB_OUTPUT=str(tmp / "github_output"), GITHUB_STEP_SUMMARY=str(tmp / "summary.md"))

        cases = [
            ("validate, 1 file", [AUTOMATION, "validate", str(SAMPLE)], REPO, env, 0.5),
            ("validate, 500 files", [AUTOMATION, "validate", str(many)], REPO, env, 3.0),
            ("changed, PR touching 50 experiments",
             [AUTOMATION, "changed", "--base", base, "--head", head, "--pr", "1", "--no-teardown"],
             pr_repo, env_changed, None),
        ]
        floor_cmd = [sys.executable, "-c", "pass"]
        print(f"{args.reps} runs each, alternating with the floor `python -c pass`; medians")
        for label, cmd, cwd, case_env, target in cases:
            timed(cmd, cwd, case_env)  # warm the page cache once; every timed run is still a new process
            ours, floor = [], []
            for rep in range(args.reps):
                if rep % 2 == 0:
                    ours.append(timed(cmd, cwd, case_env))
                    floor.append(timed(floor_cmd, cwd, env))
                else:
                    floor.append(timed(floor_cmd, cwd, env))
                    ours.append(timed(cmd, cwd, case_env))
            med, med_floor = statistics.median(ours), statistics.median(floor)
            verdict = "" if target is None else f"; target < {target:g} s: {'met' if med < target else 'MISSED'}"
            print(f"{label}: median {med:.3f} s (min {min(ours):.3f}, max {max(ours):.3f}); "
                  f"python floor {med_floor:.3f} s; ratio {med / med_floor:.1f}x the floor{verdict}", flush=True)
        if (tmp / "github_output").exists():
            outputs = (tmp / "github_output").read_text()
            runs = args.reps + 1
            print(f"(changed appended {len(outputs) // runs} bytes to GITHUB_OUTPUT per run, "
                  f"{outputs.count('exp-') // runs} experiment mentions)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
