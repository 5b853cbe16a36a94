"""Ticks of the reconcile loop: which (pull request, experiment) legs a tick runs, running them,
and the `automation reconcile` verb that a workflow calls (`--plan` for the matrices, then one
leg per job; `--promote` in the production environment)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from automation import github, naming
from automation.backends.base import IN_FLIGHT, JOB_COMPLETED, Backend
from automation.errors import AutomationError, ConfigError
from automation.pulls import PullRequest, PullRequests, Source
from automation.reconcile import SETTLED, Clock, Outcome, Reconciler, invalid_job, utc_now

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Leg:
    pr: int
    experiment: str
    backend: str

    def entry(self) -> dict[str, Any]:
        return {"pr": self.pr, "experiment": self.experiment}


def observed(backend: Backend, repo: str, pr: int | None = None) -> dict[tuple[int, str], set[str]]:
    """(PR, experiment) -> {"job", "endpoint"}: what is live in `backend` for it, found by tags
    (a job in flight, a staging endpoint)."""
    match = {"repo": repo, "managed_by": naming.MANAGED_BY, **({"pr": str(pr)} if pr is not None else {})}
    found: dict[tuple[int, str], set[str]] = {}
    for job in backend.list_jobs(match):
        if job.state in IN_FLIGHT and job.tags.get("pr", "").isdigit():
            found.setdefault((int(job.tags["pr"]), job.tags.get("experiment", "")), set()).add("job")
    for endpoint in backend.list_endpoints({**match, "stage": "staging"}):
        if endpoint.tags.get("pr", "").isdigit():
            found.setdefault((int(endpoint.tags["pr"]), endpoint.tags.get("experiment", "")), set()).add("endpoint")
    return found


def plan_legs(pulls: PullRequests, backends: dict[str, Backend], repo: str, *, pr: int | None = None,
              include_forks: bool = False) -> list[Leg]:
    """The legs this tick runs: every desired experiment of the open pull requests (or of `pr`)
    that has not settled for its head commit, and every (PR, experiment) with live resources that
    no longer wants them."""
    from automation.gitops import _raw_backend

    live: dict[tuple[int, str], dict[str, set[str]]] = {}
    for name, backend in backends.items():
        for key, kinds in observed(backend, repo, pr).items():
            live.setdefault(key, {})[name] = kinds
    prs = {p.number: p for p in ([pulls.get(pr)] if pr is not None else pulls.open_ones())}
    for number, _ in live:
        if number not in prs:
            prs[number] = pulls.get(number)
    legs: list[Leg] = []
    for number, request in sorted(prs.items()):
        if request.open and request.fork and not include_forks:
            continue  # a fork's pull request runs only through its own pull_request event (no cloud)
        wanted: dict[str, Source] = {}  # a fork's experiments: only through its own pull_request event
        if request.open and (include_forks or not request.fork):
            wanted = pulls.experiments(request)
        for name, source in sorted(wanted.items()):
            if source.text is None:
                continue
            backend = _raw_backend(source.text, source.path)
            in_flight = any("job" in kinds for kinds in live.get((number, name), {}).values())
            if backend not in backends or (not in_flight and _settled(pulls, request, name, source)):
                continue
            legs.append(Leg(number, name, backend))
        for (live_pr, name), where in sorted(live.items()):
            if live_pr == number and (name not in wanted or wanted[name].text is None or not request.open):
                legs += [Leg(number, name, b) for b in sorted(where) if Leg(number, name, b) not in legs]
    return legs


def _settled(pulls: PullRequests, pr: PullRequest, name: str, source: Source) -> bool:
    """Nothing to do: the comment says this head's job is done (or failed) and nothing of an older
    commit is in flight. Read cheaply (the YAML and the comment), so settled legs cost no runner."""
    from automation.spec import Experiment
    from automation.yamlfile import YamlProblem, parse_yaml

    job, phase = pulls.status(pr.number, name)
    if phase not in SETTLED or not job:
        return False
    try:
        experiment = Experiment.model_validate(parse_yaml(source.text or "", source.path).data)
    except (YamlProblem, ValueError):
        return job == invalid_job(pr.head_sha)  # reported once for this commit
    return job == naming.job_name(name, pr.head_sha, naming.config_hash(experiment))


def run_leg(pulls: PullRequests, backend: Backend, repo: str, pr: int, experiment: str | None = None, *,
            clock: Clock = utc_now) -> list[Outcome]:
    """One pull request (one experiment, or every one it changes or left resources for) on one
    backend: what a workflow leg runs. An error in one experiment is its outcome, not the others'."""
    request = pulls.get(pr)
    sources = pulls.experiments(request) if request.open else {}
    names = [experiment] if experiment else sorted(set(sources) | {e for (p, e) in observed(backend, repo, pr)})
    reconciler = Reconciler(backend, pulls, repo, clock)
    outcomes = []
    for name in names:
        try:
            outcomes.append(reconciler.reconcile(request, sources.get(name), name))
        except AutomationError as err:
            log.error("%s: %s", name, err)
            outcomes.append(Outcome(pr, name, "failed", " ".join(str(err).split())[:300] or type(err).__name__))
    return outcomes


def tick(pulls: PullRequests, backends: dict[str, Backend], repo: str, *, pr: int | None = None,
         clock: Clock = utc_now) -> list[Outcome]:
    """A whole tick on one machine: plan the legs, then run each (a workflow runs them as jobs)."""
    outcomes = []
    for leg in plan_legs(pulls, backends, repo, pr=pr, include_forks=pr is not None):
        outcomes += run_leg(pulls, backends[leg.backend], repo, leg.pr, leg.experiment, clock=clock)
    return outcomes


def legs_outputs(legs: list[Leg]) -> dict[str, str]:
    outputs = {}
    for backend in ("local", "azure"):
        mine = [leg.entry() for leg in legs if leg.backend == backend]
        outputs[backend] = json.dumps({"include": mine}, separators=(",", ":"))
        outputs[f"any_{backend}"] = "true" if mine else "false"
    return outputs


def require_pr(value: Any) -> int:
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        return int(value)
    raise ConfigError(f"not a pull request number: {value!r}")


# ---------------------------------------------------------------------------------------------
# The verb

def _out(text: str = "") -> None:
    print(text, flush=True)


def available_backends(only: list[str]) -> dict[str, Backend]:
    """The backends a tick looks at: `only`, else local, plus azure when its settings are there."""
    from automation.backends import get_backend
    from automation.backends.azure.credentials import github_oidc_available
    from automation.gitops import azure_settings_missing

    # In Actions, Azure needs the job's OIDC token: a fork's pull request never gets one.
    azure = not azure_settings_missing() and (not github.in_actions() or github_oidc_available())
    names = only or (["local"] + (["azure"] if azure else []))
    return {name: get_backend(name) for name in dict.fromkeys(names)}


def promote(reconciler: Reconciler, pr: PullRequest, source: Source) -> str:
    """Promote the model the head commit's job produced, found by its tags: nothing is trusted
    from an artifact. Runs in the production environment, with the production identity."""
    from automation import stages
    from automation.record import RunRecord

    experiment = reconciler.load(source, pr.head_sha)
    cfg = naming.config_hash(experiment)
    current = naming.job_name(experiment.name, pr.head_sha, cfg)
    job = reconciler.backend.get_job(current)
    if job is None or job.state != JOB_COMPLETED:
        raise ConfigError(f"{experiment.name}: the job of the head commit ({current}) has not completed "
                          f"({job.backend_status if job else 'not submitted'}); nothing to promote yet")
    record = RunRecord(experiment=experiment.name, experiment_file=source.path, backend=experiment.backend,
                       config_hash=cfg, sha=pr.head_sha, repo=reconciler.repo, pr=pr.number)
    run = stages.Run(experiment, Path(source.path), record, stages.run_dir(experiment.name) / "record-promote.json",
                     reconciler.backend)
    run.record.finetune = reconciler.backend.wait_finetune(experiment, current, stream=False)
    stages.stage_register(run)  # finds the version the staging flow registered for this job
    if not reconciler.backend.evaluates_in_finetune:
        # The policy needs the held-out evaluation, measured again here rather than read from the
        # comment: the candidate on the PR's staging endpoint, the production model on its own.
        stages.stage_data(run)
        stages.find_staging(run)
        stages.stage_evaluate(run)
    stages.stage_promote(run)
    p = run.record.promote
    return f"#{pr.number} {experiment.name}: version {p.model_version} serves {p.endpoint_name} ({p.deployment_name})"


def cmd_reconcile(args) -> int:
    from automation.gitops import current_repo

    event = github.read_event(args.event)
    number = args.pr if args.pr is not None else github.pull_request_number(event)
    dispatched = str((event.get("inputs") or {}).get("pr") or "").strip()  # workflow_dispatch's input
    if number is None and dispatched:
        number = require_pr(dispatched)
    repo = current_repo()
    with github.GitHubClient.from_env() as client:
        pulls = PullRequests(client)
        backends = available_backends(args.backend)
        if args.plan:
            legs = plan_legs(pulls, backends, repo, pr=number, include_forks=number is not None)
            for name, value in legs_outputs(legs).items():
                if not github.set_output(name, value):
                    _out(f"{name}={value}")
            _out(f"{len(legs)} leg(s): " + (", ".join(f"#{leg.pr} {leg.experiment} ({leg.backend})" for leg in legs)
                                           or "nothing to do"))
            github.append_step_summary("### Reconcile plan\n\n" + ("\n".join(
                f"- #{leg.pr} `{leg.experiment}` on {leg.backend}" for leg in legs) or "Nothing to do."))
            return 0
        if number is None:
            raise ConfigError("no pull request: pass --pr N (or --plan to list what a tick would do)")
        if args.promote:
            request = pulls.get(number)
            sources = pulls.experiments(request) if request.open else {}
            if len(backends) != 1 or len(args.experiment) != 1 or args.experiment[0] not in sources:
                raise ConfigError("--promote needs one --backend and one --experiment that the open pull request "
                                  "changes")
            reconciler = Reconciler(next(iter(backends.values())), pulls, repo)
            _out(promote(reconciler, request, sources[args.experiment[0]]))
            return 0
        outcomes = []
        for backend in backends.values():
            for experiment in args.experiment or [None]:
                for outcome in run_leg(pulls, backend, repo, number, experiment):
                    if outcome.action != "skipped" or len(backends) == 1:
                        outcomes.append(outcome)
                        _out(outcome.line())
                    if outcome.failed:
                        _out(github.annotation("error", outcome.line(), title=f"reconcile {outcome.experiment}"))
        github.append_step_summary("### Reconcile\n\n" + "\n".join(f"- {o.line()}" for o in outcomes))
        return 1 if any(o.failed for o in outcomes) else 0


def add_command(commands) -> None:
    p = commands.add_parser("reconcile", help="bring each experiment of a pull request one step closer to its "
                                              "desired state (submit, report progress, deploy, cancel, delete)")
    p.add_argument("--pr", type=int, help="pull request number (default: from the event payload)")
    p.add_argument("--experiment", action="append", default=[], help="only this experiment (repeatable)")
    p.add_argument("--backend", action="append", default=[], choices=["local", "azure"],
                   help="backend to reconcile on (repeatable; default local, plus azure when configured)")
    p.add_argument("--plan", action="store_true",
                   help="list the (PR, experiment) legs a tick runs, as job matrices on $GITHUB_OUTPUT")
    p.add_argument("--promote", action="store_true",
                   help="promote the head commit's fine-tuned model to production (blue/green)")
    p.add_argument("--event", help="event payload file (default: $GITHUB_EVENT_PATH)")
    p.set_defaults(handler=cmd_reconcile)
