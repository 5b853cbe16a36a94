"""Reconcile, don't wait: each tick brings every (pull request, experiment) one step closer to
its desired state, as Argo CD and Flux do, and never waits on a fine-tune.

Desired state: the experiment files a pull request changes, at its head commit, while it is open;
nothing once it is closed or merged, or for an experiment it no longer changes. Actual state:
the jobs and endpoints found by their tags in the backend, and the status line of the PR comment.
The step taken for one experiment of an open pull request:

    no job for the head commit     -> prepare the data and submit it
    queued or running              -> update the comment (state, elapsed, step, loss, studio link)
    failed or canceled             -> comment the error and the link; the leg fails
    completed                      -> register, check the PR is open, deploy, score, evaluate, comment
    done for this job already      -> nothing

Before any of that, jobs of earlier commits still in flight are cancelled (a new push stops
spending on the old one). For a closed pull request or a removed experiment every in-flight job
is cancelled and every staging endpoint deleted. Each step is idempotent (deterministic names,
find before create), so a tick that dies midway is finished by the next.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from automation import naming
from automation.backends.base import IN_FLIGHT, JOB_CANCELING, JOB_COMPLETED, Backend, JobInfo
from automation.errors import AutomationError, ExperimentInvalid
from automation.pulls import PullRequest, PullRequests, Source

log = logging.getLogger(__name__)

SETTLED = ("done", "failed")  # phases after which a tick has nothing left to do for that job
Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


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
            kept = _report_after_prune(self.pulls.body(pr, experiment), deleted)
            self.pulls.comment(pr, experiment, "\n".join([_status_line("", "pruned"), *lines, "", *kept]))
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
        try:
            return self._advance(pr, run, current, cancelled)
        except AutomationError as err:
            # A local job fails the same way every time: report it once for this commit. A cloud
            # call that failed is tried again by the next tick.
            phase = "failed" if not self.backend.endpoints_outlive_job else "error"
            body = f"### {type(err).__name__}\n\n```text\n{err}\n```\n"
            self.pulls.comment(pr.number, name, _status_line(current, phase) + "\n" + body)
            raise

    def _advance(self, pr: PullRequest, run, current: str, cancelled: list[str]) -> Outcome:
        from automation import stages

        name, experiment = run.experiment.name, run.experiment
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
        stages.stage_evaluate(run)  # Azure: the held-out prompts on the staging and production endpoints
        if not self.backend.endpoints_outlive_job:
            stages.stage_teardown(run)  # a local endpoint lives only as long as this process
        path = stages.stage_report(run)
        if not self.backend.endpoints_outlive_job:
            stages.stage_bundle(run)  # the job uploads it: the local MLflow store ends with the runner
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


def _report_after_prune(body: str | None, deleted: list[str]) -> list[str]:
    """The results a reviewer already had, kept under the "Stopped" note with their final facts: the
    staging endpoints just deleted say so. Hidden lines (marker, status) and an earlier note go."""
    if not body or "### " not in body:
        return []
    lines = [line for line in body.splitlines() if not (line.startswith("<!-- automation:") and line.endswith("-->"))]
    if lines and lines[0].startswith("### Stopped:"):
        return []  # pruned before: the results were kept then (or there were none)
    text = "\n".join(lines).strip()
    for name in deleted:
        text = text.replace(f"**Endpoint** `{name}` (staging, live)", f"**Endpoint** `{name}` (staging, deleted)")
    return ["---", "", text, ""]


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
