"""What the reconcile loop lets slip, per fault: GPU time billed after a pull request is closed or
superseded, and staging endpoints left behind, measured on the fake Azure ML workspace with a
fake clock (ticks every TICK minutes; the pull_request event, when there is one, runs at once).

The fake bills a job from the end of its queue until it completes or reaches Canceled, and
Canceled follows CancelRequested `cancel_s` (60 s) later: Azure ML's own cancellation latency is
not something this loop controls, so it is reported beside the loop's share.

    PYTHONPATH=. python bench/bench_reconcile.py [--tick-minutes 10] [--offsets 10]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from azure.ai.ml import load_component

from tests.fake_azure import write_component
from tests.test_reconcile import (
    PATH,
    REPO_NAME,
    SHA1,
    SHA2,
    FakeClock,
    experiment_text,
    reconcile_world,
)


def scenario(component, name: str, *, tick: timedelta, offset: timedelta, event: bool) -> dict:
    """Open PR 7, train (1 h job), then the fault `offset` after a tick; tick until 3 h later."""
    clock = FakeClock()
    with reconcile_world(component, clock) as world:
        world.github.open_pull(REPO_NAME, 7, head_sha=SHA1, files={PATH: experiment_text()})
        world.workspace.jobs.run_for(world.job_of(SHA1), 3600)
        world.tick(pr=7)
        fault_at_minutes = {"push": 30, "close": 30, "close-after-deploy": 80}[name]
        start = clock.now
        next_tick = start + tick
        fault_time = start + timedelta(minutes=fault_at_minutes)
        # align the fault to `offset` after the last scheduled tick before it
        fault_time = start + tick * ((fault_time - start) // tick) + offset
        happened, had_endpoint, gone_at = None, False, None
        while clock.now < start + timedelta(hours=3):
            upcoming = min(next_tick, fault_time) if happened is None else next_tick
            clock.now = upcoming
            if happened is None and clock.now >= fault_time:
                happened, had_endpoint = clock.seconds(), bool(world.endpoints())
                if name == "push":
                    world.github.push(REPO_NAME, 7, SHA2, {PATH: experiment_text(learning_rate=1e-5)})
                else:
                    world.github.close_pull(REPO_NAME, 7)
                if event:
                    world.tick(pr=7)
            else:
                world.tick()
                next_tick += tick
            if happened is not None and had_endpoint and gone_at is None and not world.endpoints():
                gone_at = clock.seconds()
        old = world.job_of(SHA1)
        billed_after = world.workspace.jobs.billed_seconds(old, after=happened)
        endpoint_s = (gone_at - happened) if had_endpoint and gone_at is not None else 0.0
        return {"billed_after_s": billed_after, "endpoint_after_s": endpoint_s, "endpoints_left": len(world.endpoints()) if name != "push" else 0,
                "ever_created": "online_endpoints.begin_create_or_update" in world.workspace.calls}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tick-minutes", type=float, default=10)
    parser.add_argument("--offsets", type=int, default=10, help="fault times spread over one tick interval")
    args = parser.parse_args()
    import logging

    logging.disable(logging.WARNING)
    os.environ.setdefault("GITHUB_REPOSITORY", REPO_NAME)
    with tempfile.TemporaryDirectory() as folder:
        os.environ["AUTOMATION_HOME"] = str(Path(folder) / "ws")
        os.chdir(folder)
        component = load_component(write_component(Path(folder)))
        tick = timedelta(minutes=args.tick_minutes)
        print(f"tick every {args.tick_minutes:g} min; fault at {args.offsets} offsets within the interval")
        print("| fault | closed/push event | GPU s billed after it (max) | endpoint s alive after it (max) "
              "| endpoints left |\n|---|---|---:|---:|---:|")
        for name in ("push", "close", "close-after-deploy"):
            for event in (True, False):
                results = [scenario(component, name, tick=tick, offset=tick * (i + 0.5) / args.offsets, event=event)
                           for i in range(args.offsets)]
                worst = max(r["billed_after_s"] for r in results)
                left = max(r["endpoints_left"] for r in results)
                alive = max(r["endpoint_after_s"] for r in results)
                label = {"push": "push during training", "close": "closed during training",
                         "close-after-deploy": "closed after deploy"}[name]
                print(f"| {label} | {'yes' if event else 'lost'} | {worst:.0f} | {alive:.0f} | {left} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
