"""The Azure legs on the wire, measured against the stand-in (tests/standin/): HTTP requests (and
SDK operations) per tick per leg state, the wall time of one tick, one call's worst case under
throttling (computed from the configured retry policy, then checked by a run), and one tick's
worst case when every answer is slow.

    PYTHONPATH=. python bench/bench_azure_wire.py [--slow 0.25] [--retry-after 1]

The `automation` CLI is the azure job venv's (tests/job_venvs.py) run as a subprocess, as in
tests/test_azure_wire.py; the throttling run calls the backend in this process.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.standin.service import ARM_HOST, StandIn
from tests.standin.world import PATH, REPO_NAME, experiment_text, seed_reference_flow, world

HOSTS = {"login.microsoftonline.com": "Entra", ARM_HOST: "ARM", "actions.githubusercontent.com": "OIDC",
         "api.azureml.ms": "ML data plane", "experiments.azureml.net": "registry", "blob.core.windows.net": "blob",
         "inference.ml.azure.com": "scoring"}


def host_kind(host: str) -> str:
    return next((kind for suffix, kind in HOSTS.items() if host.endswith(suffix)), host)


def is_poll(call) -> bool:
    return "/mfeOperation" in call.path


def summarise(calls) -> dict:
    by_kind = collections.Counter(host_kind(c.host) for c in calls)
    sdk_ops = [c for c in calls if host_kind(c.host) not in ("Entra", "OIDC") and not is_poll(c)]
    arm = collections.Counter(f"{c.method} {c.path.split('/workspaces/', 1)[-1].split('/providers/', 1)[-1]}"
                              for c in calls if c.host == ARM_HOST and not is_poll(c))
    return {"http": len(calls), "sdk_operations": len(sdk_ops), "lro_polls": sum(is_poll(c) for c in calls),
            "by_host": dict(sorted(by_kind.items())), "arm": dict(sorted(arm.items()))}


def lifecycle(folder: Path) -> list[dict]:
    """One PR: plan + leg per tick, the stand-in moving the job between ticks."""
    rows = []
    with world(folder) as w:
        w.azure._mlflow_app()  # the stand-in's MLflow server imported before the clock runs, not in a tick
        w.github.open_pull(REPO_NAME, 7, head_sha="1" * 40, files={PATH: experiment_text()})

        def tick(state: str, before=None, leg_anyway: bool = False, **env: str) -> None:
            """The plan job, then the leg (when the plan names one, or `leg_anyway`: the pull
            request's own event starts the head's job; the schedule never does)."""
            if before:
                before()
            start = len(w.azure.calls)
            planned, matrix = w.plan()
            middle = len(w.azure.calls)
            leg = w.reconcile(**env) if matrix["include"] or leg_anyway else None
            rows.append({"state": state, "plan_s": round(planned.seconds, 2),
                         "leg_s": round(leg.seconds, 2) if leg else None,
                         "leg_outcome": (leg.stdout.strip() or f"rc {leg.returncode}: {leg.stderr[-300:]}")
                         if leg else "no leg planned",
                         "plan": summarise(w.azure.calls[start:middle]),
                         "leg": summarise(w.azure.calls[middle:]) if leg else None})

        def job() -> str:
            return next(iter(w.azure.jobs))

        tick("opened: no job yet -> submit (the PR's event)", leg_anyway=True, GITHUB_EVENT_NAME="workflow_dispatch")
        w.azure.log_loss(job(), [(10, 2.1), (20, 1.9)])
        tick("job Running -> progress", lambda: w.azure.set_job_state(job(), "Running"))
        tick("job Running (again)")
        tick("job Completed -> register, deploy, score, evaluate, comment",
             lambda: w.azure.set_job_state(job(), "Completed"))
        tick("settled (comment says done)")
        tick("PR closed -> delete the staging endpoint", lambda: w.github.close_pull(REPO_NAME, 7), leg_anyway=True,
             GITHUB_EVENT_NAME="pull_request")
        tick("closed and pruned")
    return rows


def throttled_call(folder: Path, retry_after: float) -> dict:
    """One `get_job` against a workspace that throttles every answer: how many tries, how long."""
    from automation.backends.azure.backend import AzureBackend
    from automation.backends.azure.retry import AZURE_CORE_RETRY
    from automation.errors import BackendError

    with StandIn(folder) as azure:
        seed_reference_flow(azure)
        os.environ.update(azure.env())
        name = "bench-job"
        azure.jobs[name] = {"id": f"/jobs/{name}", "name": name, "properties": {"jobType": "Command",
                                                                                "command": "echo", "services": {}}}
        backend = AzureBackend(sleep=time.sleep, poll_s=0)
        backend.get_job(name)  # sign in first: the figure is the call, not the token
        azure.throttle("GET", rf"/jobs/{name}$", retry_after=f"{retry_after:g}", times=1000)
        before = len(azure.calls)
        start = time.monotonic()
        try:
            backend.get_job(name)
            outcome = "answered"
        except BackendError as err:
            outcome = f"BackendError: {err}"
        seconds = time.monotonic() - start
        tries = sum(1 for c in azure.calls[before:] if c.path.endswith(f"/jobs/{name}"))
    retries = AZURE_CORE_RETRY["retry_status"]
    return {"retry_after_s": retry_after, "tries": tries, "seconds": round(seconds, 2), "outcome": outcome[:160],
            "computed_s": retries * retry_after, "retry_total": AZURE_CORE_RETRY["retry_total"]}


def one_tick(folder: Path, final: str, delay: float) -> tuple[float, int, str]:
    """The leg of the tick that finds the job `final` (Running: the progress comment; Completed:
    register, deploy, score, evaluate), every answer of every service `delay` seconds late."""
    with world(folder) as w:
        w.azure._mlflow_app()
        w.github.open_pull(REPO_NAME, 7, head_sha="1" * 40, files={PATH: experiment_text()})
        w.reconcile(GITHUB_EVENT_NAME="workflow_dispatch")
        job = next(iter(w.azure.jobs))
        w.azure.log_loss(job, [(10, 2.0)])
        w.azure.set_job_state(job, final)
        w.azure.slow_s = delay
        start = len(w.azure.calls)
        leg = w.reconcile()
        return leg.seconds, len(w.azure.calls) - start, leg.stdout.strip()[-80:]


def slow_tick(folder: Path, delay: float) -> dict:
    """Each tick kind answered at once and answered `delay` s late per request, in fresh worlds."""
    out = {"delay_s": delay}
    for final in ("Running", "Completed"):
        fast_s, fast_n, _ = one_tick(folder / f"{final}-fast", final, 0.0)
        slow_s, slow_n, said = one_tick(folder / f"{final}-slow", final, delay)
        out[final] = {"requests": slow_n, "fast_s": round(fast_s, 2), "slow_s": round(slow_s, 2),
                      "fast_requests": fast_n, "added_per_request_s": round((slow_s - fast_s) / max(slow_n, 1), 3),
                      "outcome": said}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slow", type=float, default=0.25, help="seconds every answer waits in the slow run")
    parser.add_argument("--retry-after", type=float, default=1.0, help="Retry-After of the throttling run")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        report = {"lifecycle": lifecycle(root / "a"), "throttled": throttled_call(root / "b", args.retry_after),
                  "slow": slow_tick(root / "c", args.slow)}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
