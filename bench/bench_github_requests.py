"""GitHub REST requests per scheduled tick, per leg state, before and after issue 21's request
budget, counted by the fake GitHub (tests/fake_github.py) the way GitHub bills them: every answer
but a 304 counts against the hourly limit, and each job has its own token (a new GITHUB_TOKEN per
job, so one job's ETags never earn another a 304, as on github.com).

The legs are the client-level operations the reconcile loop performs (as `automation.ticks` /
`automation.reconcile` did at BASE): read the pull request(s), list a PR's files, read each
experiment file at the head, read our comment's status, write the comment. Nothing here imports
the loop, so the figures do not move when the loop is rewritten; what they assume of it is said
beside each shape.

Shapes:
- before: BASE's client (automation/github.py at BASE, loaded from git). A plan job (list the
  open PRs; per PR its files and experiment texts, the status of legs not in flight), then one
  job per leg (read the PR, its files, the text, the status; write the comment). In Actions
  `GET /user` answers 403, and the comments were listed twice per leg.
- jobs: this client, the same jobs: no `GET /user`, one comment listing per process.
- one-job: this client, the whole scheduled tick in one job: the PR list, every PR's comments in
  one repository listing (prime_issue_comments), files and texts once, each leg's PR from the
  list, then the comment writes.
- one-job+sha-cache: one-job, with the answers kept for a commit SHA (files at the head, texts at
  the head) carried from tick to tick, as actions/cache would carry `.automation/cache/github/sha`.
- desk: one-job run from a desk with a person's token, the whole cache folder kept (ETags
  included): the token stays the same, so what did not change answers 304.

Leg states: `new` (opened; the tick submits and creates the comment), `training` (in flight; the
tick edits the progress comment, whose body changes each tick), `settled` (done for this head:
only the plan reads it), and `idle` (no open pull request).

    PYTHONPATH=. python bench/bench_github_requests.py [--experiments 1 10 100] [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import types
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from automation import github as after_module  # noqa: E402
from tests.fake_github import BOT, FakeGitHub, Identity  # noqa: E402

BASE = "300024e"  # the commit before issue 21's request budget
REPO = "acme-ml/chat-finetune"
MARKER = "<!-- automation:report experiment={name} -->"
STATUS = "<!-- automation:status job={job} phase={phase} -->"
TICKS_PER_HOUR = 6  # a tick every 10 minutes
HOURLY_LIMIT = 1000  # GITHUB_TOKEN: 1,000 requests an hour per repository
STATES = ("idle", "new", "training", "settled")
SHAPES = ("before", "jobs", "one-job", "one-job+sha-cache", "desk")


def before_module() -> types.ModuleType:
    """automation/github.py as it was at BASE, loaded under another name."""
    source = subprocess.run(["git", "show", f"{BASE}:automation/github.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader("github_before", loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules["github_before"] = module  # dataclasses look their module up
    exec(compile(source, f"{BASE}:automation/github.py", "exec"), module.__dict__)
    return module


class World:
    """A fake GitHub with `n` open pull requests, each changing one experiment, in `state`."""

    def __init__(self, fake: FakeGitHub, n: int, state: str):
        self.fake, self.n, self.state, self.tokens = fake, n, state, 0
        if state == "idle":
            return
        for i in range(n):
            number, name = 100 + i, f"exp-{i}"
            fake.open_pull(REPO, number, head_sha=f"{i:040x}", files={f"experiments/{name}.yaml": f"name: {name}\n"})
            fake.add_comment(REPO, number, "Looks good, let's train it.")  # a person's comment beside ours
            if state != "new":
                phase = "running" if state == "training" else "done"
                fake.add_comment(REPO, number, "\n".join([MARKER.format(name=name),
                                                          STATUS.format(job=f"job-{i}", phase=phase), "report"]), BOT)

    def token(self, same: bool = False) -> str:
        """A new job's GITHUB_TOKEN (its own ETags), with room for the bench's requests; `same`:
        the one token of a desk."""
        if same and self.tokens:
            return f"ghs_benchJob{self.tokens:06d}"
        self.tokens += 1
        token = f"ghs_benchJob{self.tokens:06d}"
        self.fake.tokens[token] = Identity(BOT, can_write=True, installation=True, rate_limit=10**9)
        return token

    def legs(self) -> list[tuple[int, str, str]]:
        """(PR, experiment, head) for every leg a tick runs (in flight or not settled)."""
        if self.state in ("idle", "settled"):
            return []
        return [(100 + i, f"exp-{i}", f"{i:040x}") for i in range(self.n)]


# ---------------------------------------------------------------------------------------------
# What a tick does, per shape


def _status(mod, gh, pr: int, name: str) -> str | None:
    ours = mod._ours(gh.list_issue_comments(pr), MARKER.format(name=name), gh.viewer_login())
    return ours[0].get("body") if ours else None


def _comment(mod, gh, pr: int, name: str, tick: int, phase: str) -> None:
    marker = MARKER.format(name=name)
    body = "\n".join([marker, STATUS.format(job=f"job-{pr}", phase=phase), f"progress at tick {tick}"])
    mod.upsert_comment(gh, pr, body, marker)


def _leg_work(mod, gh, world: World, pr: int, name: str, tick: int) -> None:
    """After the reads: submit and create the comment, or edit the progress comment."""
    _comment(mod, gh, pr, name, tick, "running")


def tick_in_jobs(mod, world: World, tick: int, cache_for: Callable[[], object | None]) -> None:
    """The plan job, then one job per leg, each with its own token and client (a new process)."""
    def client():
        cache = cache_for()
        kwargs = {"cache": cache} if cache is not None else {}
        return mod.GitHubClient(world.token(), REPO, world.fake.url, **kwargs)

    in_flight = world.state == "training"
    with client() as gh:  # the plan
        for pr in gh.list_pulls("open"):
            files = gh.list_pull_files(pr["number"])
            for entry in files:
                gh.file_text(entry["filename"], pr["head"]["sha"])
                if not in_flight:  # the planner reads the status of what is not in flight
                    _status(mod, gh, pr["number"], Path(entry["filename"]).stem)
    for pr, name, head in world.legs():
        with client() as gh:  # one job per leg
            gh.get_pull(pr)
            for entry in gh.list_pull_files(pr):
                gh.file_text(entry["filename"], head)
            _status(mod, gh, pr, name)
            _leg_work(mod, gh, world, pr, name, tick)


def tick_in_one_job(world: World, tick: int, cache: object, *, same_token: bool = False) -> None:
    """The whole tick in one process: the PR list, every PR's comments in one listing, files and
    texts at the head (kept by SHA), each leg's PR from the list, then the writes."""
    mod = after_module
    with mod.GitHubClient(world.token(same_token), REPO, world.fake.url, cache=cache) as gh:
        pulls = gh.list_pulls("open")
        gh.prime_issue_comments(pulls)
        for pr in pulls:
            for entry in gh.list_pull_files(pr["number"], pr["head"]["sha"]):
                gh.file_text(entry["filename"], pr["head"]["sha"])
                _status(mod, gh, pr["number"], Path(entry["filename"]).stem)
        for pr, name, head in world.legs():
            gh.get_pull(pr, fresh=False)
            for entry in gh.list_pull_files(pr, head):
                gh.file_text(entry["filename"], head)
            _status(mod, gh, pr, name)
            _leg_work(mod, gh, world, pr, name, tick)


def measure(shape: str, state: str, n: int, before: types.ModuleType) -> dict:
    """Billed requests and 304s of the tick measured: the first for `new` (the submission), the
    second for the others (steady state: a comment edited each tick, caches as they would be)."""
    with tempfile.TemporaryDirectory() as folder, FakeGitHub() as fake:
        world = World(fake, n, state)
        carried = Path(folder) / "github"  # what actions/cache would carry between ticks

        def run(tick: int) -> None:
            if shape == "before":
                tick_in_jobs(before, world, tick, lambda: None)
            elif shape == "jobs":
                tick_in_jobs(after_module, world, tick, after_module.ResponseCache)
            elif shape == "one-job":
                tick_in_one_job(world, tick, after_module.ResponseCache())
            elif shape == "desk":
                tick_in_one_job(world, tick, after_module.ResponseCache(carried), same_token=True)
            else:
                # Only the SHA-keyed answers are worth carrying: the next job's token has new ETags.
                tick_in_one_job(world, tick, after_module.ResponseCache(carried))
                for stale in (carried / "etag").glob("*.json"):
                    stale.unlink()

        measured = 1 if state == "new" else 2
        if measured == 2:
            run(1)
        mark, mark_304 = fake.billed(), fake.not_modified()
        first = len(fake.requests)
        run(measured)
        calls = fake.requests[first:]
        kinds: dict[str, int] = {}
        for call in calls:
            if call.billed:
                key = f"{call.method} {_route(call.path)}"
                kinds[key] = kinds.get(key, 0) + 1
        return {"shape": shape, "state": state, "experiments": n, "billed": fake.billed() - mark,
                "not_modified": fake.not_modified() - mark_304, "by_route": kinds}


def _route(path: str) -> str:
    path = path.replace(f"/repos/{REPO}", "")
    if path == "/issues/comments":
        return "/issues/comments (every PR's, one listing)"
    for pattern, name in (("/pulls/", "/pulls/{n}"), ("/issues/comments/", "/issues/comments/{id}"),
                          ("/contents/", "/contents/{path}")):
        if pattern in path:
            head, _, tail = path.partition(pattern)
            rest = tail.split("/", 1)
            return head + name + ("/" + rest[1] if len(rest) > 1 and pattern == "/pulls/" else "")
    if "/issues/" in path:
        return "/issues/{n}/comments"
    return path


def idle_switch() -> dict:
    """Item 5's requests: the last tick with nothing live turns the scheduled workflow off, a
    submission turns it on again (state read first, or the PUT alone: both are idempotent)."""
    from tests.fake_github import ACTIONS_TOKEN

    with FakeGitHub() as fake:
        fake.add_workflow(REPO, ".github/workflows/reconcile-tick.yml", "Reconcile tick")
        with after_module.GitHubClient(ACTIONS_TOKEN, REPO, fake.url) as gh:
            mark = fake.billed()
            if gh.workflow_state("reconcile-tick.yml") == "active":
                gh.disable_workflow("reconcile-tick.yml")
            read_then_disable = fake.billed() - mark
            mark = fake.billed()
            gh.enable_workflow("reconcile-tick.yml")
            enable_alone = fake.billed() - mark
    return {"read_then_disable": read_then_disable, "enable_alone": enable_alone,
            "idle_ticks_per_day_before": 24 * TICKS_PER_HOUR, "idle_ticks_per_day_after": 0}


def capacity(one: dict, many: dict) -> dict:
    """Requests per tick as fixed + per-experiment (from two sizes), and how many experiments in
    that state fit under the hourly limit at TICKS_PER_HOUR ticks an hour."""
    n1, n2 = one["experiments"], many["experiments"]
    slope = (many["billed"] - one["billed"]) / (n2 - n1)
    fixed = one["billed"] - slope * n1
    fits = math.inf if slope <= 0 else math.floor((HOURLY_LIMIT / TICKS_PER_HOUR - fixed) / slope)
    return {"fixed_per_tick": round(fixed, 2), "per_experiment_per_tick": round(slope, 3),
            "per_hour_at_n": TICKS_PER_HOUR * many["billed"], "experiments_at_once": fits}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiments", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    # In a job: GITHUB_ACTIONS=true and no bot login configured (the workflow's GITHUB_TOKEN).
    os.environ["GITHUB_ACTIONS"] = "true"
    for name in ("AUTOMATION_BOT_LOGIN", "AUTOMATION_COMMENT_AUTHOR"):
        os.environ.pop(name, None)
    before = before_module()
    rows = [measure(shape, state, n, before) for shape in SHAPES for state in STATES for n in args.experiments]
    print(f"{'shape':<18} {'state':<9} " + " ".join(f"{f'n={n}':>14}" for n in args.experiments)
          + "   (billed requests per tick, +free 304s)")
    for shape in SHAPES:
        for state in STATES:
            cells = [r for r in rows if r["shape"] == shape and r["state"] == state]
            print(f"{shape:<18} {state:<9} " + " ".join(f"{r['billed']:>8} +{r['not_modified']:<4}" for r in cells))
    print()
    small, large = min(args.experiments), max(args.experiments)
    summary = {}
    for shape in SHAPES:
        for state in ("training", "new", "settled"):
            one = next(r for r in rows if (r["shape"], r["state"], r["experiments"]) == (shape, state, small))
            many = next(r for r in rows if (r["shape"], r["state"], r["experiments"]) == (shape, state, large))
            summary[f"{shape}/{state}"] = capacity(one, many)
    print(f"{'shape/state':<28} {'fixed':>6} {'per exp.':>9} {f'req/h at n={large}':>16} {'fit under 1,000/h':>18}")
    for key, c in summary.items():
        print(f"{key:<28} {c['fixed_per_tick']:>6} {c['per_experiment_per_tick']:>9} {c['per_hour_at_n']:>16} "
              f"{c['experiments_at_once']:>18}")
    print("\nbilled requests of one leg's tick, by route (n=1):")
    for shape in SHAPES:
        for state in ("new", "training"):
            r = next(r for r in rows if (r["shape"], r["state"], r["experiments"]) == (shape, state, small))
            print(f"  {shape}/{state}: " + ", ".join(f"{k} x{v}" for k, v in sorted(r["by_route"].items())))
    switch = idle_switch()
    print(f"\nidle: before, {switch['idle_ticks_per_day_before']} ticks a day of 1 request each (the PR list); after, "
          f"the last tick turns the schedule off ({switch['read_then_disable']} requests: state, then PUT disable) "
          f"and a submission turns it on ({switch['enable_alone']} request: PUT enable)")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "capacity": summary, "idle": switch}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
