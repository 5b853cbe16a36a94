"""The reconcile loop, in one place (as Flux runs one reconciler per kind): what the pull requests
want, what exists, the decision for each (pull request, experiment), and the one writer of its
status.

Desired state: the experiment files a pull request changes, at its head commit, while it is open;
nothing once it is closed or merged, or for a file it no longer changes. Observed state: the status
line of the experiment's PR comment (which job it last reported, in which phase, after how many
attempts), and, inside a leg, the job named there and the endpoints found by their tags. Only this
module writes the status line, and only from a leg, inside the experiment's concurrency group.

The decision (`decide`) is the same function for the planner and the leg: the planner runs it on the
status alone (a tick with nothing to do reads GitHub and nothing else, on the core install), the leg
on the status read again inside its concurrency group, and then observes the backend:

    the head's job, not started     -> data, submit                  (pull_request event or dispatch)
    queued or running               -> progress in the comment
    failed or canceled              -> the error in the comment; settled until the head changes
    completed                       -> register, deploy, score, evaluate, report (stages.SEQUENCE)
    a transient error               -> retried with exponential backoff, attempts counted
    a terminal error                -> the error and its fix in the comment; settled
    closed, merged, file removed    -> cancel the job, delete the staging endpoints

A schedule never starts a new head's job: that starts from the pull request's own event, after its
preflight (`--gate`), so a broken file never costs a GPU hour. Each step is idempotent
(deterministic names, find before create), so a leg that dies midway is finished by the next.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote, unquote

from automation import github, naming
from automation.errors import (
    AuthenticationError,
    AutomationError,
    ConfigError,
    ExperimentInvalid,
    TransientError,
)
from automation.spec import NAME_PATTERN

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
MAX_ATTEMPTS = 5  # transient errors of one job, then the leg gives up and says so
BACKOFF = timedelta(minutes=10)  # doubled per attempt: 10, 20, 40, 80 min between tries
BACKOFF_MAX = timedelta(hours=6)
PROGRESS_EVERY = timedelta(minutes=30)  # a tick rewrites a running job's comment when its state moves, or this often
CLOSED_LOOKBACK = timedelta(days=1)  # a scheduled tick prunes what pull requests closed this recently left
READ_ONLY_AUTHORS = ("dependabot[bot]",)  # their pull requests get a read-only token and no OIDC

# Triggers, as the loop tells them apart
EVENT, CLOSED, SCHEDULE, DISPATCH = "event", "closed", "schedule", "dispatch"
# Decisions
ADVANCE, PRUNE, SETTLED, WAIT = "advance", "prune", "settled", "wait"


def utc_now() -> datetime:
    return datetime.now(UTC)


# ---------------------------------------------------------------------------------------------
# Desired state: the pull requests and the experiment files they change


@dataclass(frozen=True)
class PullRequest:
    number: int
    state: str  # "open" or "closed"
    merged: bool
    head_sha: str
    fork: bool
    author: str = ""

    @property
    def open(self) -> bool:
        return self.state == "open"

    @property
    def read_only(self) -> bool:
        """A fork's or Dependabot's pull request: a read-only token, no secrets, no OIDC."""
        return self.fork or self.author in READ_ONLY_AUTHORS

    @classmethod
    def from_api(cls, body: dict[str, Any], repository: str) -> PullRequest:
        head = body.get("head") or {}
        head_repo = (head.get("repo") or {}).get("full_name")
        return cls(number=int(body["number"]), state=str(body.get("state")),
                   merged=bool(body.get("merged") or body.get("merged_at")), head_sha=str(head.get("sha") or ""),
                   fork=head_repo != repository, author=str((body.get("user") or {}).get("login") or ""))


@dataclass(frozen=True)
class Source:
    """An experiment file a pull request changes: its path and text at the head (None: removed)."""

    name: str
    path: str
    text: str | None


@dataclass(frozen=True)
class Desired:
    """What the head wants for one experiment: the job that runs it, or the reason it cannot run."""

    source: Source
    backend: str  # local, azure or unknown
    job: str  # the head's job name, or invalid@<sha>
    experiment: Any = None  # spec.Experiment when valid
    problem: ExperimentInvalid | None = None


def invalid_job(sha: str) -> str:
    """What the status line names instead of a job when the head's file is invalid."""
    return f"invalid@{sha}"


def load(source: Source, sha: str, workdir: Path):
    """The head's experiment, loaded as `automation validate` loads it (one loader for the planner
    and the leg): written under `workdir`, errors pointing at the file in the repository."""
    from automation.spec import load_experiment
    from automation.workspace import write_text_atomic

    path = workdir / sha[:12] / source.path
    write_text_atomic(path, source.text or "")
    try:
        return load_experiment(path)
    except ExperimentInvalid as err:
        raise ExperimentInvalid([replace(i, file=source.path) for i in err.issues]) from None


def desire(source: Source | None, sha: str, workdir: Path) -> Desired | None:
    if source is None or source.text is None:
        return None
    from automation.spec import backend_of

    try:
        experiment = load(source, sha, workdir)
    except ExperimentInvalid as err:
        return Desired(source, backend_of(source.text, source.path), invalid_job(sha), problem=err)
    return Desired(source, experiment.backend, naming.job_name(experiment.name, sha, naming.config_hash(experiment)),
                   experiment)


# ---------------------------------------------------------------------------------------------
# Observed state: the status line, written only here

STATUS = re.compile(r"<!-- automation:status (?P<fields>[^<>]*?) -->")


@dataclass(frozen=True)
class Status:
    """The loop's record of one (PR, experiment), kept in its comment. Phases: running (a job in
    flight), done (reported), failed (a terminal error: settled for this job), error (a transient
    error: retried at `retry_at`), pruned (nothing left running)."""

    job: str | None = None
    phase: str | None = None
    attempts: int = 0
    retry_at: datetime | None = None
    backend: str | None = None  # where the job ran: what a closed pull request's prune leg needs
    sha: str | None = None  # the head commit the job is for: a tick needs no file read while it holds
    file: str | None = None  # the experiment file, read at `sha` by a tick's leg
    state: str | None = None  # the job's state as last written (Queued, Running, ...)
    written: datetime | None = None  # when, on the loop's clock
    verdict: str | None = None  # the promotion policy on the staging results: passed, failed (kept once pruned)

    def line(self) -> str:
        fields = [f"job={self.job or ''}", f"phase={self.phase}"]
        for key in ("backend", "sha", "state", "verdict"):
            if getattr(self, key):
                fields.append(f"{key}={getattr(self, key)}")
        if self.file:
            fields.append(f"file={quote(self.file, safe='/')}")
        if self.written:
            fields.append(f"written={self.written.strftime('%Y-%m-%dT%H:%M:%SZ')}")
        if self.attempts:
            fields.append(f"attempts={self.attempts}")
        if self.retry_at:
            fields.append(f"retry_at={self.retry_at.strftime('%Y-%m-%dT%H:%M:%SZ')}")
        return f"<!-- automation:status {' '.join(fields)} -->"

    @classmethod
    def parse(cls, body: str | None) -> Status:
        match = STATUS.search(body or "")
        if not match:
            return cls()
        fields = dict(part.split("=", 1) for part in match["fields"].split() if "=" in part)
        attempts = fields.get("attempts", "0")
        return cls(fields.get("job") or None, fields.get("phase") or None,
                   int(attempts) if attempts.isdigit() else 0, _time(fields.get("retry_at")),
                   fields.get("backend") or None, fields.get("sha") or None,
                   unquote(fields["file"]) if fields.get("file") else None, fields.get("state") or None,
                   _time(fields.get("written")), fields.get("verdict") or None)

    @property
    def live(self) -> bool:
        """Something needs a later tick: a job in flight, or a retry to come."""
        return self.phase == "running" or (self.phase == "error" and self.attempts < MAX_ATTEMPTS)


class PullRequests:
    """What the loop reads from GitHub through the REST client, and the one place it writes."""

    def __init__(self, client: github.GitHubClient):
        self.client = client

    def get(self, number: int, *, fresh: bool = True) -> PullRequest:
        """The pull request; with `fresh=False`, as this process's listing of the open ones saw it."""
        return PullRequest.from_api(self.client.get_pull(number, fresh=fresh), self.client.repository)

    def open_ones(self) -> list[PullRequest]:
        """The open pull requests; their comments listed in one repository-wide read where cheaper."""
        listed = self.client.list_pulls("open")
        if len(listed) > 1:
            self.client.prime_issue_comments(listed)
        return [PullRequest.from_api(p, self.client.repository) for p in listed]

    def recently_closed(self, since: datetime) -> list[PullRequest]:
        """Pull requests closed since `since`, newest first, from one page: a close whose event never
        ran (GitHub runs no pull_request workflow for a conflicted pull request) is found here."""
        answer = self.client.request("GET", f"/repos/{self.client.repository}/pulls", params={
            "state": "closed", "sort": "updated", "direction": "desc", "per_page": 30}).json()
        found = []
        for body in answer:
            closed = _time(body.get("closed_at"))
            if closed is not None and closed >= since:
                found.append(PullRequest.from_api(body, self.client.repository))
        return found

    def experiments(self, pr: PullRequest) -> dict[str, Source]:
        """The experiment files the pull request adds or changes (text at its head) and removes."""
        found: dict[str, Source] = {}
        for entry in self.client.list_pull_files(pr.number, head_sha=pr.head_sha):
            path, status = entry["filename"], entry["status"]
            previous = entry.get("previous_filename")
            if previous and naming.is_experiment_path(previous) and \
                    PurePosixPath(previous).stem != PurePosixPath(path).stem:
                found.setdefault(PurePosixPath(previous).stem, Source(PurePosixPath(previous).stem, previous, None))
            if not naming.is_experiment_path(path):
                continue
            name = PurePosixPath(path).stem
            text = None if status == "removed" else self.client.file_text(path, pr.head_sha)
            found[name] = Source(name, path, text)
        return found

    def body(self, pr: int, experiment: str) -> str | None:
        """The body of our comment for the experiment, or None when there is none."""
        from automation.report import MARKER

        ours = github._ours(self.client.list_issue_comments(pr), MARKER.format(name=experiment),
                            self.client.viewer_login())
        return (ours[0].get("body") or "") if ours else None

    def status(self, pr: int, experiment: str, *, fresh: bool = False) -> Status:
        if fresh:  # what another job may have written since this process listed the comments
            self.client.list_issue_comments(pr, fresh=True)
        return Status.parse(self.body(pr, experiment))

    def remembered(self, pr: PullRequest, name: str, status: Status) -> Source | None:
        """The experiment's file at the head, by the path the status keeps (no listing of the PR's
        files): what a scheduled tick's leg loads. None when the status does not say."""
        if not status.file or status.sha != pr.head_sha:
            return None
        return Source(name, status.file, self.client.file_text(status.file, pr.head_sha))

    def statuses(self, pr: int) -> dict[str, Status]:
        """The status of every experiment with a comment of ours on the pull request."""
        from automation.report import MARKER_PATTERN

        login = self.client.viewer_login()
        found: dict[str, Status] = {}
        for comment in self.client.list_issue_comments(pr):
            body = comment.get("body") or ""
            match = MARKER_PATTERN.search(body)
            if match and github._ours([comment], match.group(0), login):
                found.setdefault(match["name"], Status.parse(body))
        return found

    def comment(self, pr: int, experiment: str, status: Status, body: str) -> None:
        """Write the experiment's comment: the marker, the status line, then `body`."""
        from automation.report import MARKER

        marker = MARKER.format(name=experiment)
        # split on "\n" only: str.splitlines() also breaks at \x0c, \x1c, \u2028..., which would cut a
        # model's reply out of its blockquote
        lines = [line for line in body.split("\n") if line != marker and not STATUS.fullmatch(line.strip())]
        text = "\n".join([marker, status.line(), *lines])
        try:
            github.upsert_comment(self.client, pr, github.fit_comment(text), marker)
        except github.GitHubPermissionError as err:  # a read-only token: the job summary instead
            log.warning("could not comment on #%s (%s); the report is in the job summary", pr, err)
            github.report_to_summary(experiment, text)


# ---------------------------------------------------------------------------------------------
# The decision, one function for the planner and the leg


def decide(pr: PullRequest, desired: Desired | None, status: Status, *, trigger: str, now: datetime) -> str:
    if not pr.open or desired is None:
        return PRUNE if status.phase not in (None, "pruned") or trigger == CLOSED else SETTLED
    if desired.job != status.job:
        # another commit's job (or none yet): only the pull request's own event, after its preflight,
        # or a person's dispatch starts the head's job; the schedule never does
        return WAIT if trigger == SCHEDULE else ADVANCE
    if status.phase == "running" or status.phase == "pruned":
        return ADVANCE
    if status.phase == "error":
        if trigger == DISPATCH:
            return ADVANCE
        if status.attempts >= MAX_ATTEMPTS:
            return SETTLED
        return WAIT if status.retry_at and now < status.retry_at else ADVANCE
    if status.phase == "failed" and trigger == DISPATCH and not desired.job.startswith("invalid@"):
        return ADVANCE  # a person asks again
    return SETTLED


def is_transient(err: BaseException) -> bool:
    """Whether the same call may succeed later: the service's weather (throttling, 5xx, a busy
    resource, a login service down), not the experiment, the settings or the quota."""
    if isinstance(err, ExperimentInvalid | ConfigError):
        return False
    return isinstance(err, TransientError | AuthenticationError)


def backoff(attempts: int) -> timedelta:
    return min(BACKOFF * 2 ** max(attempts - 1, 0), BACKOFF_MAX)


# ---------------------------------------------------------------------------------------------
# The plan: the decision's dry run over every pull request, for the workflow's matrices


@dataclass(frozen=True)
class Leg:
    pr: int
    experiment: str
    backend: str
    decision: str
    file: str = ""
    preflight: bool = False  # an Azure job starts in this leg: the CPU preflight gates it

    def entry(self) -> dict[str, Any]:
        return {"pr": self.pr, "experiment": self.experiment}


@dataclass
class Plan:
    legs: list[Leg] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)  # "#7 x (retry at 10:40 UTC)"
    notices: list[str] = field(default_factory=list)
    live: bool = False  # something needs a later scheduled tick

    batch: bool = False  # a tick: every azure leg in one job (one install, one comment listing)

    def outputs(self) -> dict[str, str]:
        def legs(entries: list[dict[str, Any]]) -> str:
            return json.dumps([[e["pr"], e["experiment"]] for e in entries], separators=(",", ":"))

        azure = [leg.entry() for leg in self.legs if leg.backend == "azure"]
        if self.batch and len(azure) > 1:  # a tick: one job, one install, one listing for all
            azure = [{"pr": "tick", "experiment": "all", "legs": legs(azure)}]
        else:
            azure = [{**e, "legs": legs([e])} for e in azure]
        groups = {
            "local": [leg.entry() for leg in self.legs if leg.backend == "local"],
            "azure": azure,
            "preflight": [{**leg.entry(), "file": leg.file} for leg in self.legs if leg.preflight],
        }
        outputs = {}
        for name, entries in groups.items():
            outputs[name] = json.dumps({"include": entries}, separators=(",", ":"))
            outputs[f"any_{name}"] = "true" if entries else "false"
        return outputs


def _as_remembered(name: str, status: Status, head: str) -> Desired | None:
    """What the head wants, as its status remembers it: the same job while the head is the one the
    status was written for; another (unknown) job once the head moved; nothing once pruned (a
    reopened pull request's event reads the files again)."""
    if status.phase == "pruned":
        return None
    job = status.job if status.sha == head else f"unknown@{head}"
    return Desired(Source(name, status.file or "", ""), status.backend or "unknown", job)


def plan(pulls: PullRequests, repo: str, *, trigger: str, pr: int | None = None, azure: bool,
         workdir: Path, clock: Clock = utc_now) -> Plan:
    """The legs a run of the loop starts: the decision of every (PR, experiment), on the status
    alone. `azure`: whether Azure ML is configured for this repository."""
    now = clock()
    result = Plan(batch=trigger == SCHEDULE)
    requests = [pulls.get(pr)] if pr is not None else pulls.open_ones()
    if pr is None and trigger == SCHEDULE:  # closes whose event never ran
        requests += pulls.recently_closed(now - CLOSED_LOOKBACK)
    for request in requests:
        statuses = pulls.statuses(request.number)
        # A tick starts no new head (decide), so it needs the files only where a status predates
        # the sha field; everywhere else the status says which job the head wants.
        schedule_only = trigger == SCHEDULE and all(s.sha for s in statuses.values())
        sources = pulls.experiments(request) if request.open and not schedule_only else {}
        for name in sorted(set(sources) | set(statuses)):
            status = statuses.get(name, Status())
            if schedule_only and request.open:
                wanted = _as_remembered(name, status, request.head_sha)
            else:
                wanted = desire(sources.get(name), request.head_sha, workdir)
            decision = decide(request, wanted, status, trigger=trigger, now=now)
            backend = wanted.backend if wanted else (status.backend or "unknown")
            result.live |= status.live and decision != PRUNE
            if decision == WAIT and status.live:
                result.waiting.append(f"#{request.number} {name}" + (
                    f" (retry at {status.retry_at:%H:%M} UTC)" if status.retry_at else ""))
            if decision in (WAIT, SETTLED) or (decision == PRUNE and backend != "azure"):
                continue  # nothing of a local run outlives its job: nothing to prune
            if backend == "local" and trigger == SCHEDULE:
                continue  # a local leg runs its whole flow in its own event's job
            file = wanted.source.path if wanted else ""
            preflight = (backend == "azure" and trigger == EVENT and wanted is not None and wanted.problem is None
                         and wanted.job != status.job)  # a new head's Azure job: the CPU preflight gates it
            if backend == "azure" and (not azure or request.read_only):
                why = ("the pull request has a read-only token (a fork or Dependabot): no OIDC, so no Azure"
                       if request.read_only else "Azure ML is not configured (README, \"Use it in your fork\")")
                result.notices.append(f"#{request.number} {name}: Azure skipped: {why}")
                backend = "none"  # the preflight still runs: it needs no cloud
            elif backend not in ("local", "azure"):
                backend = "local"  # an unreadable file: reported by a leg that needs no cloud identity
            if backend == "none" and not preflight:
                continue
            result.legs.append(Leg(request.number, name, backend, decision, file, preflight))
            result.live |= backend == "azure" and decision == ADVANCE
    return result


# ---------------------------------------------------------------------------------------------
# A leg: one (PR, experiment) on one backend


@dataclass
class Outcome:
    pr: int
    experiment: str
    action: str  # submitted, running, failed, error, done, settled, waiting, pruned, skipped, invalid
    detail: str = ""
    cancelled: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.action in ("failed", "invalid", "error")

    def line(self) -> str:
        extra = [f"cancelled {', '.join(self.cancelled)}"] if self.cancelled else []
        extra += [f"deleted {', '.join(self.deleted)}"] if self.deleted else []
        return (f"#{self.pr} {self.experiment}: {self.action}" + (f" ({self.detail})" if self.detail else "")
                + (f"; {'; '.join(extra)}" if extra else ""))


PASSED_GATES = ("", "success", "skipped")


class Superseded(AutomationError):
    """Another run wrote this leg's status after this one read it: this one's view is stale."""


@dataclass
class Reconciler:
    backend: Any  # backends.base.Backend
    pulls: PullRequests
    repo: str
    clock: Clock = utc_now
    workdir: Path | None = None  # where the heads' experiment files are written to be loaded
    trigger: str = DISPATCH
    gate: str = ""  # the preflight's result on a pull_request event: success, skipped, failure, cancelled
    on_submit: Callable[[], None] | None = None  # e.g. enable the scheduled tick

    def heads(self) -> Path:
        return self.workdir or _default_heads()

    seen: dict[tuple[int, str], Status] = field(default_factory=dict)  # what this run read, per leg
    head: dict[int, str] = field(default_factory=dict)
    files: dict[tuple[int, str], str] = field(default_factory=dict)

    def write(self, pr: int, name: str, status: Status, body: str) -> None:
        """The one writer of the status: the comment, with where the job runs, for which head, from
        which file. Compare and swap: when another run changed the status since this one read it
        (a tick's batch beside a push's leg), this run's view is stale and it writes nothing."""
        seen = self.seen.get((pr, name))
        if seen is not None and self.trigger == SCHEDULE:  # a tick's batch runs beside the PR's own legs
            now = self.pulls.status(pr, name, fresh=True)
            if (now.job, now.phase, now.attempts) != (seen.job, seen.phase, seen.attempts):
                raise Superseded(f"#{pr} {name}: another run moved it to {now.job} {now.phase} meanwhile")
        written = replace(status, backend=self.backend.name, sha=status.sha or self.head.get(pr),
                          file=status.file or self.files.get((pr, name)), written=self.clock())
        self.pulls.comment(pr, name, written, body)
        self.seen[(pr, name)] = written

    def match(self, pr: int, experiment: str | None = None) -> dict[str, str]:
        tags = {"repo": self.repo, "pr": str(pr), "managed_by": naming.MANAGED_BY}
        return {**tags, "experiment": experiment} if experiment else tags

    def reconcile(self, pr: PullRequest, source: Source | None, name: str, status: Status | None = None) -> Outcome:
        status = status or self.pulls.status(pr.number, name)  # read inside the concurrency group
        self.seen[(pr.number, name)], self.head[pr.number] = status, pr.head_sha
        if source is not None:
            self.files[(pr.number, name)] = source.path
        try:
            return self._reconcile(pr, source, name, status)
        except Superseded as err:
            log.warning("%s", err)
            return Outcome(pr.number, name, "skipped", str(err))

    def _reconcile(self, pr: PullRequest, source: Source | None, name: str, status: Status) -> Outcome:
        wanted = desire(source, pr.head_sha, self.heads())
        decision = decide(pr, wanted, status, trigger=self.trigger, now=self.clock())
        if decision == PRUNE:
            why = "merged" if pr.merged else "closed" if not pr.open else "no longer in the pull request"
            return self.prune(pr.number, name, status, why)
        if decision in (SETTLED, WAIT) or wanted is None:
            return Outcome(pr.number, name, "settled" if decision == SETTLED else "waiting", status.phase or "")
        if wanted.problem is not None:
            cancelled = self.cancel_older(status, keep=None)
            self.write(pr.number, name, Status(wanted.job, "failed"), invalid_body(wanted.problem))
            return Outcome(pr.number, name, "invalid", str(wanted.problem).splitlines()[0], cancelled)
        if wanted.backend != self.backend.name:
            return Outcome(pr.number, name, "skipped", f"runs on {wanted.backend}")
        cancelled = self.cancel_older(status, keep=wanted.job)
        if self.gate not in PASSED_GATES and status.job != wanted.job and self.backend.get_job(wanted.job) is None:
            self.write(pr.number, name, Status(wanted.job, "failed"), gate_body(self.gate))
            return Outcome(pr.number, name, "failed", f"preflight {self.gate}: nothing submitted", cancelled)
        return self._step(pr, wanted, status, cancelled)

    def unchanged(self, pr: PullRequest, name: str, status: Status | None) -> Outcome | None:
        """A tick's cheap look at a job in flight: one read of the job by name and no GitHub request,
        while its state is the one the comment shows and the comment is younger than PROGRESS_EVERY.
        None when the leg has more to do (the state moved, the comment is due, or anything else)."""
        from automation.backends.base import IN_FLIGHT

        if status is None or status.phase != "running" or not status.job or status.sha != pr.head_sha \
                or not pr.open or status.written is None or self.clock() - status.written >= PROGRESS_EVERY:
            return None
        job = self.backend.get_job(status.job)
        if job is None or job.state not in IN_FLIGHT or job.backend_status != status.state:
            return None
        return Outcome(pr.number, name, "running", f"{job.name} {job.backend_status} (comment unchanged)")

    # -- cancelling and pruning -------------------------------------------------------------------
    def cancel_older(self, status: Status, keep: str | None) -> list[str]:
        """Stop the job the status names when it is not the head's (a newer push stops spending on
        the old one). Found by name: never by paging the workspace's jobs."""
        from automation.backends.base import IN_FLIGHT

        if not status.job or status.job == keep or status.job.startswith("invalid@"):
            return []
        job = self.backend.get_job(status.job)
        if job is None or job.state not in IN_FLIGHT:
            return []
        return [job.name] if self.backend.cancel_job(job.name) else []

    def prune(self, pr: int, name: str, status: Status, why: str) -> Outcome:
        cancelled = self.cancel_older(status, keep=None)
        deleted = self.backend.delete_endpoints({**self.match(pr, name), "stage": "staging"})
        body = self.pulls.body(pr, name)
        if cancelled or deleted or (body is not None and status.phase != "pruned"):
            lines = [f"### Stopped: {why}", ""]
            lines += [f"- cancelled fine-tune job `{job}`" for job in cancelled]
            lines += [f"- deleted staging endpoint `{endpoint}`" for endpoint in deleted]
            kept = _report_after_prune(body, deleted)
            self.write(pr, name, replace(status, phase="pruned", attempts=0, retry_at=None),
                       "\n".join([*lines, "", *kept]))
        return Outcome(pr, name, "pruned", why, cancelled, deleted)

    # -- the step -----------------------------------------------------------------------------
    def _step(self, pr: PullRequest, wanted: Desired, status: Status, cancelled: list[str]) -> Outcome:
        from automation import stages
        from automation.record import RunRecord

        experiment, current = wanted.experiment, wanted.job
        file = self.heads() / pr.head_sha[:12] / wanted.source.path
        record = RunRecord(experiment=experiment.name, experiment_file=str(file), backend=experiment.backend,
                           config_hash=naming.config_hash(experiment), sha=pr.head_sha, repo=self.repo, pr=pr.number)
        run = stages.Run(experiment, file, record, stages.run_dir(experiment.name) / f"record-{pr.number}.json",
                         self.backend)
        attempts = status.attempts if status.job == current and status.phase == "error" else 0
        try:
            return self._advance(pr, run, current, cancelled)
        except AutomationError as err:
            attempts += 1
            transient = is_transient(err) and self.backend.endpoints_outlive_job
            if transient and attempts < MAX_ATTEMPTS:
                retry_at = self.clock() + backoff(attempts)
                self.write(pr.number, experiment.name, Status(current, "error", attempts, retry_at), error_body(err, attempts=attempts, retry_at=retry_at))
                log.error("%s: attempt %d failed (%s); retried at %s", experiment.name, attempts, err,
                          retry_at.strftime("%H:%M UTC"))
                return Outcome(pr.number, experiment.name, "error", _one_line(err), cancelled)
            given_up = attempts if transient else 0
            self.write(pr.number, experiment.name, Status(current, "failed", given_up), error_body(err, attempts=given_up))
            raise

    def _advance(self, pr: PullRequest, run, current: str, cancelled: list[str]) -> Outcome:
        from automation import stages
        from automation.backends.base import IN_FLIGHT, JOB_CANCELING, JOB_COMPLETED

        name, experiment = run.experiment.name, run.experiment
        job = self.backend.get_job(current)
        action = "running"
        if job is None:
            for stage in stages.sequence(run, stop="data"):  # validate, data
                stages.run_stage(run, stage)
            tags = naming.resource_tags(repo=self.repo, pr=pr.number, experiment=name, sha=pr.head_sha,
                                        stage="finetune", ttl_hours=experiment.deployment.ttl_hours,
                                        created_at=self.clock())
            self.backend.prepare_deploy(experiment)  # local: the fine-tune runs here, its deploy follows
            self.backend.submit_finetune(experiment, run.record.data, job_name=current, tags=tags)
            job = self.backend.get_job(current)
            action = "submitted"
            if job is None:
                raise TransientError(f"job {current} was submitted but cannot be found")
            if self.on_submit and job.state in IN_FLIGHT:
                self.on_submit()
        if job.state in IN_FLIGHT or job.state == JOB_CANCELING:
            self.write(pr.number, name, Status(current, "running", state=job.backend_status),
                       self.progress_body(run, job))
            return Outcome(pr.number, name, action, f"{job.name} {job.backend_status}", cancelled)
        if job.state != JOB_COMPLETED:
            self.write(pr.number, name, Status(current, "failed"), failed_body(run, job))
            return Outcome(pr.number, name, "failed", f"{job.name} {job.backend_status}", cancelled)
        return self._finish(pr, run, current, cancelled)

    def _finish(self, pr: PullRequest, run, current: str, cancelled: list[str]) -> Outcome:
        from automation import stages

        name = run.experiment.name
        stages.run_stage(run, "data")  # reused when present; the sample split is what gets scored
        run.record.finetune = self.backend.wait_finetune(run.experiment, current, stream=False)  # ended: no wait

        def still_open() -> Outcome | None:  # the PR may have closed while the job ran or while we registered
            still = self.pulls.get(pr.number)
            if not still.open:
                outcome = self.prune(pr.number, name, Status(current, "done"), "closed before deploying")
                outcome.cancelled = cancelled + outcome.cancelled
                return outcome
            if still.head_sha != pr.head_sha:
                return Outcome(pr.number, name, "skipped", "a newer commit arrived before deploying", cancelled)
            return None

        keep = self.backend.endpoints_outlive_job  # a local endpoint lives only as long as this process
        for stage in stages.sequence(run, start="register", keep_endpoint=keep, bundle=not keep):
            if stage == "deploy" and (stopped := still_open()) is not None:
                return stopped
            stages.run_stage(run, stage)
        from automation.evaluation import check_policy

        finetune = run.record.finetune
        policy = check_policy(finetune.evaluation if finetune else None, run.experiment.promotion, finetune)
        verdict = "passed" if policy.passed else "failed"
        body = Path(run.record.report_file).read_text(encoding="utf-8")
        if self.backend.endpoints_outlive_job:
            body += "\n" + on_merge(run, pr, verdict)
        self.write(pr.number, name, Status(current, "done", verdict=verdict), body)
        return Outcome(pr.number, name, "done", run.record.deploy.endpoint_name if run.record.deploy else "",
                       cancelled)

    # -- bodies -------------------------------------------------------------------------------
    def progress_body(self, run, job) -> str:
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
        report = render(run.record, run.experiment)
        first, _, rest = report.partition("\n")
        return "\n".join([first, *lines, rest])


def on_merge(run, pr: PullRequest, verdict: str) -> str:
    """What merging this pull request will do, said where the reviewers decide."""
    model = run.record.registration
    endpoint = naming.production_endpoint_name(run.record.repo, run.experiment.name)
    if verdict != "passed":
        return ("### On merge\n\nMerging does **not** promote: the promotion policy is not met on these results. "
                f"To promote anyway, run the `promote` workflow with pull request {pr.number}, commit "
                f"`{pr.head_sha}` and an override reason; the production environment's reviewers approve it.\n")
    return (f"### On merge\n\nMerging promotes **{model.model_name}** version **{model.version}** (commit "
            f"`{pr.head_sha[:7]}`) to the production endpoint `{endpoint}`, after the reviewers of the `production` "
            "environment approve the promote job. It is shared into the production registry, deployed beside the "
            "live deployment with no traffic, asked the same held-out prompts as the live model there, and given "
            "the traffic only if the policy holds there too; the previous deployment is kept for a one-step "
            "rollback. A later push needs its own staging run before a merge can promote it.\n")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300] or type(err).__name__


def _report_after_prune(body: str | None, deleted: list[str]) -> list[str]:
    """The results a reviewer already had, kept under the "Stopped" note with their final facts: the
    staging endpoints just deleted say so. Hidden lines (marker, status) and an earlier note go."""
    if not body or "### " not in body:
        return []
    lines = [line for line in body.split("\n") if not (line.startswith("<!-- automation:") and line.endswith("-->"))]
    if lines and lines[0].startswith("### Stopped:"):
        return []  # pruned before: the results were kept then (or there were none)
    text = "\n".join(lines).strip()
    for name in deleted:
        text = text.replace(f"**Endpoint** `{name}` (staging, live)", f"**Endpoint** `{name}` (staging, deleted)")
    return ["---", "", text, ""]


def _time(text: str | None) -> datetime | None:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None
    except ValueError:
        return None


def _elapsed(created_at: str | None, now: datetime) -> str:
    start = _time(created_at)
    if start is None:
        return ""
    minutes = max(int((now - start).total_seconds() // 60), 0)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def failed_body(run, job) -> str:
    from automation.report import render

    lines = [f"### Fine-tune {job.backend_status.lower()}", "",
             f"Job `{job.name}` ended **{job.backend_status}**"
             + (f": {job.error}" if job.error else "") + (f" · [Azure ML studio]({job.url})" if job.url else ""),
             "", "Push a fix to run it again, or run the loop's workflow by hand (workflow_dispatch) to retry it.", ""]
    return "\n".join(lines) + "\n" + render(run.record, run.experiment).partition("\n")[2]


def invalid_body(err: ExperimentInvalid) -> str:
    issues = "\n".join(f"- `{i}`" for i in err.issues)
    return f"### Invalid experiment\n\nNothing was submitted:\n\n{issues}\n\nPush a fix to run it.\n"


def gate_body(result: str) -> str:
    return (f"### Preflight {result}\n\nThe CPU preflight of this commit did not pass ({result}), so nothing was "
            "submitted to Azure ML. Its log and annotations are in the `preflight` job of this workflow run; "
            "push a fix to run it again.\n")


def error_body(err: AutomationError, *, attempts: int = 0, retry_at: datetime | None = None) -> str:
    kind = type(err).__name__
    if retry_at is not None:
        head = (f"### {kind} (attempt {attempts} of {MAX_ATTEMPTS})\n\nA transient error: the loop tries again "
                f"after {retry_at.strftime('%H:%M UTC')}.")
    elif attempts:
        head = (f"### {kind}: gave up after {attempts} attempts\n\nThe error persisted. Run the loop's workflow "
                "by hand (workflow_dispatch with this pull request) to try again, or push a change.")
    else:
        head = (f"### {kind}\n\nThis error will not go away by retrying: fix what it names and push, or run the "
                "loop's workflow by hand once the cause is fixed elsewhere (quota, access, settings).")
    return f"{head}\n\n```text\n{err}\n```\n"


# ---------------------------------------------------------------------------------------------
# Running legs and ticks (the workflow runs each leg as its own job)


def run_leg(pulls: PullRequests, backend, repo: str, pr: int, experiment: str | None = None, *,
            clock: Clock = utc_now, trigger: str = DISPATCH, gate: str = "",
            on_submit: Callable[[], None] | None = None, workdir: Path | None = None) -> list[Outcome]:
    """One pull request (one experiment, or each it changes or has a comment for) on one backend."""
    return run_legs(pulls, backend, repo, [(pr, experiment)], clock=clock, trigger=trigger, gate=gate,
                    on_submit=on_submit, workdir=workdir)


def run_legs(pulls: PullRequests, backend, repo: str, legs: list[tuple[int, str | None]], *,
             clock: Clock = utc_now, trigger: str = DISPATCH, gate: str = "",
             on_submit: Callable[[], None] | None = None, workdir: Path | None = None,
             event_head: str | None = None) -> list[Outcome]:
    """Legs on one backend, in one process: a pull request's event runs one, a tick all its azure
    legs (one install, the open pull requests and their comments listed once). A tick's leg reads
    the experiment file where its status says, at the head it was written for. An error in one
    experiment is its outcome, not the others'."""
    reconciler = Reconciler(backend, pulls, repo, clock, workdir, trigger=trigger, gate=gate, on_submit=on_submit)
    if len({pr for pr, _ in legs}) > 1:
        pulls.open_ones()  # one listing of the pull requests and their comments for the batch
    outcomes = []
    for pr, experiment in legs:
        request = pulls.get(pr, fresh=len(legs) == 1)
        if event_head and request.open and request.head_sha != event_head:
            # an older push's run: its preflight gated its own head, not this one; the newer push's
            # run (its own preflight first) takes the leg
            outcomes.append(Outcome(pr, experiment or "*", "skipped",
                                    f"superseded: the head is {request.head_sha[:7]}, this run is for {event_head[:7]}"))
            continue
        statuses = pulls.statuses(pr)
        names = [experiment] if experiment else None
        if trigger == SCHEDULE and names and (quiet := reconciler.unchanged(request, names[0], statuses.get(names[0]))):
            outcomes.append(quiet)
            continue
        sources: dict[str, Source] | None = None
        if trigger == SCHEDULE and names and (src := pulls.remembered(request, names[0], statuses.get(names[0],
                                                                                                     Status()))):
            sources = {names[0]: src}
        if sources is None:
            sources = pulls.experiments(request) if request.open else {}
        for name in names or sorted(set(sources) | set(statuses)):
            try:
                outcomes.append(reconciler.reconcile(request, sources.get(name), name, statuses.get(name)))
            except AutomationError as err:
                log.error("%s: %s", name, err)
                outcomes.append(Outcome(pr, name, "failed", _one_line(err)))
    return outcomes


def tick(pulls: PullRequests, backends: dict, repo: str, *, pr: int | None = None, clock: Clock = utc_now,
         trigger: str | None = None, workdir: Path | None = None) -> list[Outcome]:
    """A whole run of the loop on one machine: plan, then run each leg (a workflow runs them as jobs).
    `trigger` defaults to the pull request's event when `pr` is given, else the schedule."""
    trigger = trigger or (EVENT if pr is not None else SCHEDULE)
    heads = workdir or _default_heads()
    outcomes = []
    the_plan = plan(pulls, repo, trigger=trigger, pr=pr, azure="azure" in backends, workdir=heads, clock=clock)
    for leg in the_plan.legs:
        if leg.backend in backends:
            outcomes += run_leg(pulls, backends[leg.backend], repo, leg.pr, leg.experiment, clock=clock,
                                trigger=trigger, workdir=heads)
    return outcomes


def _default_heads() -> Path:
    from automation.workspace import home

    return home() / "heads"


def trigger_of(event_name: str | None, event: dict[str, Any]) -> str:
    """The loop's trigger from GITHUB_EVENT_NAME and the payload (a reusable workflow sees its caller's)."""
    if event_name == "pull_request":
        return CLOSED if event.get("action") == "closed" else EVENT
    if event_name == "schedule":
        return SCHEDULE
    return DISPATCH  # workflow_dispatch, or a person at a desk


# ---------------------------------------------------------------------------------------------
# The verb


def _out(text: str = "") -> None:
    print(text, flush=True)


def parse_legs(text: str) -> list[tuple[int, str]]:
    """`--legs '[[7,"x"],[8,"y"]]'`, as the plan writes it into the azure matrix."""
    try:
        legs = json.loads(text)
        parsed = [(require_pr(pr), str(name)) for pr, name in legs]
    except (ValueError, TypeError, ConfigError) as err:
        raise ConfigError(f"--legs wants a JSON list of [pr, experiment] pairs, got {text[:80]!r}") from err
    bad = [name for _, name in parsed if not re.fullmatch(NAME_PATTERN, name)]
    if bad:
        raise ConfigError(f"--legs: not an experiment name: {bad[0][:60]!r}")
    return parsed


def require_pr(value: Any) -> int:
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        return int(value)
    raise ConfigError(f"not a pull request number: {value!r}")


def azure_configured() -> bool:
    from automation.backends.azure import azure_settings_missing

    return not azure_settings_missing()


def keep_tick(client: github.GitHubClient, workflow: str | None, the_plan: Plan, trigger: str) -> None:
    """Idle costs nothing: a scheduled tick that finds nothing in flight disables its own workflow;
    a plan of any other trigger that finds something in flight enables it (the safety net for a
    submission whose enable failed)."""
    if trigger == SCHEDULE and not the_plan.live:
        github.set_workflow(client, workflow, enabled=False)
    elif trigger != SCHEDULE and the_plan.live:
        github.set_workflow(client, workflow, enabled=True)


def cmd_reconcile(args) -> int:
    from automation.backends import get_backend

    event = github.read_event(args.event)
    trigger = trigger_of(os.environ.get("GITHUB_EVENT_NAME"), event)
    number = args.pr if args.pr is not None else github.pull_request_number(event)
    dispatched = str((event.get("inputs") or {}).get("pr") or "").strip()  # workflow_dispatch's input
    if number is None and dispatched:
        number = require_pr(dispatched)
    repo = naming.current_repo()
    with github.GitHubClient.from_env() as client:
        pulls = PullRequests(client)
        if args.plan:
            azure = azure_configured() and (not args.backend or "azure" in args.backend)
            the_plan = plan(pulls, repo, trigger=trigger, pr=number, azure=azure, workdir=_default_heads())
            if args.backend:
                the_plan.legs = [leg for leg in the_plan.legs if leg.backend in args.backend or
                                 (leg.preflight and "azure" in args.backend)]
            for name, value in the_plan.outputs().items():
                if not github.set_output(name, value):
                    _out(f"{name}={value}")
            legs = [leg for leg in the_plan.legs if leg.backend in ("local", "azure")]  # not preflight-only
            _out(f"{len(legs)} leg(s): " + (", ".join(f"#{leg.pr} {leg.experiment} ({leg.backend}, {leg.decision})"
                                                      for leg in legs) or "nothing to do"))
            for notice in the_plan.notices:
                _out(github.annotation("notice", notice, title="Azure skipped"))
            for waiting in the_plan.waiting:
                _out(f"waiting: {waiting}")
            keep_tick(client, args.tick_workflow, the_plan, trigger)
            github.append_step_summary("### Reconcile plan\n\n" + ("\n".join(
                f"- #{leg.pr} `{leg.experiment}` on {leg.backend}: {leg.decision}" for leg in legs)
                or "Nothing to do.") + "".join(f"\n- {n}" for n in the_plan.notices))
            return 0
        if number is None and not args.legs:
            raise ConfigError("no pull request: pass --pr N (or --plan to list what a run of the loop would do)")
        names = args.backend or (["local"] + (["azure"] if azure_configured() else []))
        backends = {name: get_backend(name) for name in dict.fromkeys(names)}
        outcomes = []
        legs = parse_legs(args.legs) if args.legs else [(number, e) for e in args.experiment or [None]]
        for backend in backends.values():
            event_head = ((event.get("pull_request") or {}).get("head") or {}).get("sha") if trigger == EVENT else None
            for outcome in run_legs(pulls, backend, repo, legs, trigger=trigger, gate=args.gate, event_head=event_head,
                                    on_submit=lambda: [github.set_workflow(client, w, enabled=True)
                                                       for w in (args.tick_workflow, args.sweeper_workflow)]):
                if outcome.action != "skipped" or len(backends) == 1:
                    outcomes.append(outcome)
                    _out(outcome.line())
                if outcome.failed:
                    level = "warning" if outcome.action == "error" else "error"
                    _out(github.annotation(level, outcome.line(), title=f"reconcile {outcome.experiment}"))
        github.append_step_summary("### Reconcile\n\n" + "\n".join(f"- {o.line()}" for o in outcomes))
        return 1 if any(o.action in ("failed", "invalid") for o in outcomes) else 0


def add_command(commands) -> None:
    p = commands.add_parser("reconcile", help="bring each experiment of a pull request one step closer to its "
                                              "desired state (submit, report progress, deploy, cancel, delete)")
    p.add_argument("--pr", type=int, help="pull request number (default: from the event payload)")
    p.add_argument("--experiment", action="append", default=[], help="only this experiment (repeatable)")
    p.add_argument("--legs", help="the (PR, experiment) legs to run, as the plan's azure matrix gives them: a JSON "
                                  "list of [pr, experiment] pairs (a tick runs all its azure legs in one job)")
    p.add_argument("--backend", action="append", default=[], choices=["local", "azure"],
                   help="backend to reconcile on (repeatable; default local, plus azure when configured)")
    p.add_argument("--plan", action="store_true",
                   help="list the (PR, experiment) legs this run starts, as job matrices on $GITHUB_OUTPUT "
                        "(local, azure, preflight)")
    p.add_argument("--gate", default="", choices=["", "success", "skipped", "failure", "cancelled"],
                   help="the CPU preflight's result for this push: failure or cancelled submits nothing")
    p.add_argument("--tick-workflow", metavar="FILE",
                   help="the scheduled tick's workflow file: the plan disables it when nothing is in flight, "
                        "a submission enables it")
    p.add_argument("--sweeper-workflow", metavar="FILE",
                   help="the endpoint sweeper's workflow file: a submission enables it (it disables itself "
                        "when no staging endpoint is left)")
    p.add_argument("--event", help="event payload file (default: $GITHUB_EVENT_PATH)")
    p.set_defaults(handler=cmd_reconcile)
