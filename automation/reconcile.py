"""Reconcile, don't wait: each tick brings every (pull request, experiment) one step closer to
its desired state, as Argo CD and Flux do, and never waits on a fine-tune.

Desired state: the experiment files a pull request changes, at its head commit, while it is open;
nothing once it is closed or merged, or for an experiment it no longer changes. Actual state:
the jobs and endpoints found by their tags in the backend, and the status line of the PR comment.
The step taken for one experiment of an open pull request:

    no job for the head commit     -> prepare the data and submit it
    queued or running              -> update the comment (state, elapsed, step, loss, studio link)
    failed or canceled             -> comment the error and the link; the leg fails
    completed                      -> register, check the PR is open, deploy, score, comment
    done for this job already      -> nothing

Before any of that, jobs of earlier commits still in flight are cancelled (a new push stops
spending on the old one). For a closed pull request or a removed experiment every in-flight job
is cancelled and every staging endpoint deleted. Each step is idempotent (deterministic names,
find before create), so a tick that dies midway is finished by the next.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from automation import github, naming
from automation.backends.base import IN_FLIGHT, JOB_CANCELING, JOB_COMPLETED, Backend, JobInfo
from automation.errors import AutomationError, ConfigError, ExperimentInvalid

log = logging.getLogger(__name__)

STATUS = re.compile(r"<!-- automation:status job=(?P<job>\S*) phase=(?P<phase>[a-z]+) -->")
SETTLED = ("done", "failed")  # phases after which a tick has nothing left to do for that job
Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


# ---------------------------------------------------------------------------------------------
# The pull request side (GitHub)


@dataclass(frozen=True)
class PullRequest:
    number: int
    state: str  # "open" or "closed"
    merged: bool
    head_sha: str
    fork: bool

    @property
    def open(self) -> bool:
        return self.state == "open"

    @classmethod
    def from_api(cls, body: dict[str, Any], repository: str) -> PullRequest:
        head = body.get("head") or {}
        head_repo = (head.get("repo") or {}).get("full_name")
        return cls(number=int(body["number"]), state=str(body.get("state")),
                   merged=bool(body.get("merged") or body.get("merged_at")), head_sha=str(head.get("sha") or ""),
                   fork=head_repo != repository)


@dataclass(frozen=True)
class Source:
    """An experiment a pull request changes: its path and text at the head (None: removed)."""

    name: str
    path: str
    text: str | None


class PullRequests:
    """What the reconcile loop reads from GitHub, through the REST client."""

    def __init__(self, client: github.GitHubClient):
        self.client = client

    def get(self, number: int) -> PullRequest:
        return PullRequest.from_api(self.client.get_pull(number), self.client.repository)

    def open_ones(self) -> list[PullRequest]:
        return [PullRequest.from_api(p, self.client.repository) for p in self.client.list_pulls("open")]

    def experiments(self, pr: PullRequest) -> dict[str, Source]:
        """The experiment files the pull request adds or changes (text at its head) and removes."""
        from automation.gitops import is_experiment_path

        found: dict[str, Source] = {}
        for entry in self.client.list_pull_files(pr.number):
            path, status = entry["filename"], entry["status"]
            previous = entry.get("previous_filename")
            if previous and is_experiment_path(previous) and PurePosixPath(previous).stem != PurePosixPath(path).stem:
                found.setdefault(PurePosixPath(previous).stem, Source(PurePosixPath(previous).stem, previous, None))
            if not is_experiment_path(path):
                continue
            name = PurePosixPath(path).stem
            text = None if status == "removed" else self.client.file_text(path, pr.head_sha)
            found[name] = Source(name, path, text)
        return found

    def status(self, pr: int, experiment: str) -> tuple[str | None, str | None]:
        """(job, phase) from the status line of our comment for the experiment; (None, None) without one."""
        from automation.github import _ours
        from automation.report import MARKER

        ours = _ours(self.client.list_issue_comments(pr), MARKER.format(name=experiment), self.client.viewer_login())
        match = STATUS.search(ours[0].get("body") or "") if ours else None
        return (match["job"], match["phase"]) if match else (None, None)

    def comment(self, pr: int, experiment: str, body: str) -> None:
        from automation.report import MARKER

        marker = MARKER.format(name=experiment)
        if marker not in body:
            body = f"{marker}\n{body}"
        try:
            github.upsert_comment(self.client, pr, github.fit_comment(body), marker)
        except github.GitHubPermissionError as err:  # a fork's read-only token: the job summary instead
            log.warning("could not comment on #%s (%s); the report is in the job summary", pr, err)
            github.append_step_summary(
                f"<details open><summary>Report for <code>{experiment}</code> (could not be posted as a PR "
                f"comment: the token is read-only, as on pull requests from forks)</summary>\n\n{body}\n</details>")


# ---------------------------------------------------------------------------------------------
# One leg: one pull request, one experiment, one backend


@dataclass
class Outcome:
    pr: int
    experiment: str
    action: str  # submitted, running, failed, done, settled, pruned, skipped, invalid
    detail: str = ""
    cancelled: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.action in ("failed", "invalid")

    def line(self) -> str:
        extra = [f"cancelled {', '.join(self.cancelled)}"] if self.cancelled else []
        extra += [f"deleted {', '.join(self.deleted)}"] if self.deleted else []
        return (f"#{self.pr} {self.experiment}: {self.action}" + (f" ({self.detail})" if self.detail else "")
                + (f"; {'; '.join(extra)}" if extra else ""))


@dataclass
class Reconciler:
    backend: Backend
    pulls: PullRequests
    repo: str
    clock: Clock = utc_now
    workdir: Path | None = None  # where the head's experiment files are written to be loaded

    def match(self, pr: int, experiment: str | None = None) -> dict[str, str]:
        tags = {"repo": self.repo, "pr": str(pr), "managed_by": naming.MANAGED_BY}
        return {**tags, "experiment": experiment} if experiment else tags

    # -- pruning ------------------------------------------------------------------------------
    def cancel_in_flight(self, jobs: list[JobInfo], keep: str | None = None) -> list[str]:
        cancelled = []
        for job in jobs:
            if job.name != keep and job.state in IN_FLIGHT and self.backend.cancel_job(job.name):
                log.info("cancelled %s (%s)", job.name, job.backend_status)
                cancelled.append(job.name)
        return cancelled

    def prune(self, pr: int, experiment: str, why: str) -> Outcome:
        from automation.stages import teardown

        cancelled = self.cancel_in_flight(self.backend.list_jobs(self.match(pr, experiment)))
        deleted = teardown(self.backend, {**self.match(pr, experiment), "stage": "staging"})
        if cancelled or deleted:  # say so where the reviewers look; nothing to say, no comment
            lines = [f"### Stopped: {why}", ""]
            lines += [f"- cancelled fine-tune job `{name}`" for name in cancelled]
            lines += [f"- deleted staging endpoint `{name}`" for name in deleted]
            self.pulls.comment(pr, experiment, "\n".join([_status_line("", "pruned"), *lines, ""]))
        return Outcome(pr, experiment, "pruned", why, cancelled, deleted)

    # -- the step -----------------------------------------------------------------------------
    def reconcile(self, pr: PullRequest, source: Source | None, experiment_name: str) -> Outcome:
        if not pr.open:
            return self.prune(pr.number, experiment_name, "merged" if pr.merged else "closed")
        if source is None or source.text is None:
            return self.prune(pr.number, experiment_name, "no longer in the pull request")
        try:
            experiment = self.load(source, pr.head_sha)
        except ExperimentInvalid as err:
            cancelled = self.cancel_in_flight(self.backend.list_jobs(self.match(pr.number, experiment_name)))
            self.pulls.comment(pr.number, experiment_name,
                               _status_line(invalid_job(pr.head_sha), "failed") + "\n" + invalid_body(err))
            return Outcome(pr.number, experiment_name, "invalid", str(err).splitlines()[0], cancelled)
        if experiment.backend != self.backend.name:
            return Outcome(pr.number, experiment_name, "skipped", f"runs on {experiment.backend}")
        return self._step(pr, experiment, Path(self.workdir_for(pr.head_sha)) / source.path)

    def _step(self, pr: PullRequest, experiment, file: Path) -> Outcome:
        from automation import stages
        from automation.record import RunRecord

        name = experiment.name
        cfg = naming.config_hash(experiment)
        current = naming.job_name(name, pr.head_sha, cfg)
        cancelled = self.cancel_in_flight(self.backend.list_jobs(self.match(pr.number, name)), keep=current)
        job_seen, phase = self.pulls.status(pr.number, name)
        if job_seen == current and phase in SETTLED:
            return Outcome(pr.number, name, "settled", phase, cancelled)

        record = RunRecord(experiment=name, experiment_file=str(file), backend=experiment.backend, config_hash=cfg,
                           sha=pr.head_sha, repo=self.repo, pr=pr.number)
        run = stages.Run(experiment, file, record, stages.run_dir(name) / f"record-{pr.number}.json", self.backend)
        job = self.backend.get_job(current)
        action = "running"
        if job is None:
            data = stages.stage_data(run)
            tags = naming.resource_tags(repo=self.repo, pr=pr.number, experiment=name, sha=pr.head_sha,
                                        stage="finetune", ttl_hours=experiment.deployment.ttl_hours,
                                        created_at=self.clock())
            self.backend.submit_finetune(experiment, data, job_name=current, tags=tags)
            job = self.backend.get_job(current)
            action = "submitted"
            if job is None:
                raise AutomationError(f"job {current} was submitted but cannot be found")
        if job.state in IN_FLIGHT or job.state == JOB_CANCELING:
            self.pulls.comment(pr.number, name, self.progress_body(run, job))
            return Outcome(pr.number, name, action, f"{job.name} {job.backend_status}", cancelled)
        if job.state != JOB_COMPLETED:
            self.pulls.comment(pr.number, name, _status_line(current, "failed") + "\n" + failed_body(run, job))
            return Outcome(pr.number, name, "failed", f"{job.name} {job.backend_status}", cancelled)
        return self._finish(pr, run, current, cancelled)

    def _finish(self, pr: PullRequest, run, current: str, cancelled: list[str]) -> Outcome:
        from automation import stages

        name = run.experiment.name
        stages.stage_data(run)  # reused when present; the sample split is what gets scored
        run.record.finetune = self.backend.wait_finetune(run.experiment, current, stream=False)  # ended: no wait
        stages.stage_register(run)
        still = self.pulls.get(pr.number)  # the PR may have closed while the job ran or while we registered
        if not still.open or still.head_sha != pr.head_sha:
            if not still.open:
                outcome = self.prune(pr.number, name, "closed before deploying")
                outcome.cancelled = cancelled + outcome.cancelled
                return outcome
            return Outcome(pr.number, name, "skipped", "a newer commit arrived before deploying", cancelled)
        stages.stage_deploy(run)
        stages.stage_score(run)
        if not self.backend.endpoints_outlive_job:
            stages.stage_teardown(run)  # a local endpoint lives only as long as this process
        path = stages.stage_report(run)
        body = path.read_text(encoding="utf-8")
        self.pulls.comment(pr.number, name, _with_status(body, current, "done"))
        return Outcome(pr.number, name, "done", run.record.deploy.endpoint_name if run.record.deploy else "",
                       cancelled)

    # -- bodies -------------------------------------------------------------------------------
    def progress_body(self, run, job: JobInfo) -> str:
        from automation.report import render

        progress = self.backend.job_progress(job.name)
        elapsed = _elapsed(job.created_at, self.clock())
        lines = [f"### Fine-tune {job.backend_status.lower()}", "",
                 f"Job `{job.name}` is **{job.backend_status}**" + (f" for {elapsed}" if elapsed else "")
                 + (f" · step {progress.step}" if progress.step is not None else "")
                 + (f" · training loss {progress.loss:.4f}" if progress.loss is not None else "")
                 + (f" · [Azure ML studio]({job.url})" if job.url else ""),
                 "", f"_Updated {self.clock().strftime('%Y-%m-%d %H:%M UTC')}; the next tick registers, deploys "
                 "and scores once the job has completed._", ""]
        return _with_status(render(run.record, run.experiment), job.name, "running", "\n".join(lines))

    # -- loading the head's experiment -----------------------------------------------------------
    def workdir_for(self, sha: str) -> Path:
        from automation.workspace import home

        return (self.workdir or home() / "heads") / sha[:12]

    def load(self, source: Source, sha: str):
        from automation.spec import load_experiment
        from automation.workspace import write_text_atomic

        path = self.workdir_for(sha) / source.path
        write_text_atomic(path, source.text or "")
        try:
            return load_experiment(path)
        except ExperimentInvalid as err:  # point at the file in the repository, not at our copy
            raise ExperimentInvalid([replace(i, file=source.path) for i in err.issues]) from None


def invalid_job(sha: str) -> str:
    """What the status line names instead of a job when the head's file is invalid."""
    return f"invalid@{sha}"


def _status_line(job: str, phase: str) -> str:
    return f"<!-- automation:status job={job} phase={phase} -->"


def _with_status(report: str, job: str, phase: str, preface: str = "") -> str:
    """The report with the status line (and a preface) after its marker line."""
    first, _, rest = report.partition("\n")
    return "\n".join([first, _status_line(job, phase), *([preface] if preface else []), rest])


def _elapsed(created_at: str | None, now: datetime) -> str:
    if not created_at:
        return ""
    try:
        start = datetime.fromisoformat(created_at.replace("Z", "+00:00"))
    except ValueError:
        return ""
    minutes = max(int((now - start).total_seconds() // 60), 0)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def failed_body(run, job: JobInfo) -> str:
    from automation.report import render

    lines = [f"### Fine-tune {job.backend_status.lower()}", "",
             f"Job `{job.name}` ended **{job.backend_status}**"
             + (f": {job.error}" if job.error else "") + (f" · [Azure ML studio]({job.url})" if job.url else ""),
             "", "Push a fix to run it again.", ""]
    return "\n".join(lines) + "\n" + render(run.record, run.experiment).partition("\n")[2]


def invalid_body(err: ExperimentInvalid) -> str:
    issues = "\n".join(f"- `{i}`" for i in err.issues)
    return f"### Invalid experiment\n\nNothing was submitted:\n\n{issues}\n"


# ---------------------------------------------------------------------------------------------
# Which legs a tick runs


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
