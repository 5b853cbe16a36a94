"""The production job (`automation release`): a merge promotes, a dispatch retries, overrides or
rolls back. Production is its own trust zone: this runs only from the default branch, in the
`production` environment, after its reviewers approve; it reads that environment's protection
before any Azure call and refuses an unprotected one. What it promotes is pinned to the job the pull
request's comment reported (the loop's status line: `sha`, `job`, `verdict`), found by name; the
version that job registered is evaluated in place beside the live deployment (stages.stage_promote).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from automation import github, naming
from automation.errors import ConfigError
from automation.loop import (
    Clock,
    Outcome,
    PullRequest,
    PullRequests,
    Source,
    Status,
    _default_heads,
    _out,
    load,
    require_pr,
    utc_now,
)

log = logging.getLogger(__name__)


def merged_pulls(pulls: PullRequests, sha: str) -> list[PullRequest]:
    """The pull requests whose merge made commit `sha` on the default branch."""
    client = pulls.client
    answer = client.request("GET", f"/repos/{client.repository}/commits/{sha}/pulls").json()
    return [PullRequest.from_api(p, client.repository) for p in answer
            if p.get("merged_at") and p.get("merge_commit_sha") == sha]


def merged_experiments(pulls: PullRequests, sha: str, backend: str):
    """(pull request, experiment, status, why not) for each experiment on `backend` that the pull
    request merged as commit `sha` has a status for; `why` is "" when it is promotable."""
    for pr in merged_pulls(pulls, sha):
        for name, status in sorted(pulls.statuses(pr.number).items()):
            if (status.backend or "azure") == backend:
                yield pr, name, status, _not_promotable(pr, status)


def promote_merged(pulls: PullRequests, backend, repo: str, sha: str, *, clock: Clock = utc_now,
                   workdir: Path | None = None) -> list[Outcome]:
    """A merge to the default branch: each experiment of the merged pull request whose staging run
    on its final head completed and passed its policy is promoted, pinned to that head's job. The
    others are skipped with the reason. A pull request closed without merging makes no such commit."""
    outcomes = []
    for pr, name, status, why in merged_experiments(pulls, sha, backend.name):
        outcomes.append(Outcome(pr.number, name, "skipped", why) if why else
                        promote_one(pulls, backend, repo, pr, name, status, clock=clock, workdir=workdir))
    if not outcomes:
        outcomes.append(Outcome(0, "-", "skipped", f"commit {sha[:7]} merged no experiment with staging results"))
    return outcomes


def _not_promotable(pr: PullRequest, status: Status) -> str:
    if not status.job or not status.sha or status.verdict is None:
        return "its staging run never completed"
    if status.sha != pr.head_sha:
        return (f"the staging results are for {status.sha[:7]}, not the merged head {pr.head_sha[:7]}: "
                "the last push never completed its staging run")
    if status.verdict != "passed":
        return "its promotion policy was not met on the staging results (dispatch with an override to promote)"
    return ""


def promote_dispatched(pulls: PullRequests, backend, repo: str, pr: int, experiment: str, commit: str, *,
                       override: str | None = None, clock: Clock = utc_now, workdir: Path | None = None) -> Outcome:
    """A person's retry or policy override: the pull request, the experiment and the commit the
    comment reported, which must match; the pull request must be merged."""
    request = pulls.get(pr)
    status = pulls.status(pr, experiment)
    if not request.merged:
        raise ConfigError(f"#{pr} is not merged: promotion follows a reviewed merge (closing never promotes)")
    if not commit or status.sha != commit:
        raise ConfigError(f"#{pr} {experiment}: commit {commit[:12] or '(none)'} is not the one its comment reported "
                          f"({(status.sha or 'none')[:12]}); pass that commit, or push and merge again")
    if not status.job or status.verdict is None:
        raise ConfigError(f"#{pr} {experiment}: no completed staging run is reported for {commit[:12]}")
    if status.verdict != "passed" and override is None:
        raise ConfigError(f"#{pr} {experiment}: the promotion policy was not met on the staging results; give an "
                          "override reason to promote anyway")
    return promote_one(pulls, backend, repo, request, experiment, status, override=override, clock=clock,
                       workdir=workdir)


def promote_one(pulls: PullRequests, backend, repo: str, pr: PullRequest, name: str, status: Status, *,
                override: str | None = None, clock: Clock = utc_now, workdir: Path | None = None) -> Outcome:
    """One experiment to production, from the job its comment reported (found by name in the
    staging workspace; nothing is trusted from an artifact): the version that job registered is
    shared into the registry and evaluated in place beside the live deployment (stages.stage_promote)."""
    from automation import stages
    from automation.backends.base import JOB_COMPLETED
    from automation.record import RunRecord

    source = Source(name, status.file or "", pulls.client.file_text(status.file, status.sha) if status.file else None)
    if source.text is None:
        raise ConfigError(f"#{pr.number} {name}: its experiment file is not readable at {status.sha}")
    heads = workdir or _default_heads()
    experiment = load(source, status.sha, heads)
    cfg = naming.config_hash(experiment)
    job_name = naming.job_name(experiment.name, status.sha, cfg)
    if job_name != status.job:
        raise ConfigError(f"#{pr.number} {name}: the comment names job {status.job}, but the file at "
                          f"{status.sha[:7]} makes {job_name}; refusing a mismatch")
    job = backend.get_job(job_name)
    if job is None or job.state != JOB_COMPLETED:
        raise ConfigError(f"#{pr.number} {name}: job {job_name} has not completed "
                          f"({job.backend_status if job else 'not found'}); nothing to promote")
    record = RunRecord(experiment=experiment.name, experiment_file=source.path, backend=experiment.backend,
                       config_hash=cfg, sha=status.sha, repo=repo, pr=pr.number)
    run = stages.Run(experiment, heads / status.sha[:12] / source.path, record,
                     stages.run_dir(experiment.name) / "record-promote.json", backend)
    run.record.finetune = backend.wait_finetune(experiment, job_name, stream=False)  # ended: no wait
    for stage in stages.sequence(run, start="data", stop="register", skip=("finetune",)):
        stages.run_stage(run, stage)  # the data (the held-out prompts), the version the job registered
    stages.stage_promote(run, override=override)
    p = run.record.promote
    return Outcome(pr.number, name, "promoted", f"version {p.model_version} serves {p.endpoint_name} "
                   f"({p.deployment_name}; {p.previous_deployment or 'nothing'} kept for a rollback)")


def promotion_body(outcome: Outcome, run_url: str = "") -> str:
    verb = {"promoted": "Promoted to production", "rolled-back": "Rolled back"}.get(outcome.action,
                                                                                  "Not promoted")
    return (f"<!-- automation:promotion experiment={outcome.experiment} -->\n### {verb}: `{outcome.experiment}`\n\n"
            f"{outcome.detail}" + (f"\n\n[The promote job]({run_url})" if run_url else "") + "\n")


def require_default_branch(client: github.GitHubClient, ref: str | None) -> str:
    """The default branch's name; ConfigError unless `ref` is it (a dispatch from a branch refused)."""
    default = str(client.request("GET", f"/repos/{client.repository}").json().get("default_branch") or "main")
    if ref != f"refs/heads/{default}":
        raise ConfigError(f"production runs only from the default branch ({default}); this run is on "
                          f"{ref or 'no ref'}: dispatch the promote workflow from {default}")
    return default


def cmd_release(args) -> int:
    from automation import environments
    from automation.backends import get_backend

    event = github.read_event(args.event)
    inputs = event.get("inputs") or {}
    repo = naming.current_repo()
    with github.GitHubClient.from_env() as client:
        if args.plan:  # before the production job: does this merge promote anything? (no approval asked if not)
            return _release_plan(PullRequests(client), args, event)
        if github.in_actions() or args.check_environment:
            require_default_branch(client, os.environ.get("GITHUB_REF"))
            environments.require_production(client)  # before any Azure call: fail closed
        pulls = PullRequests(client)
        backend = get_backend(args.backend)
        pr = args.pr if args.pr is not None else (require_pr(inputs["pr"]) if str(inputs.get("pr") or "").strip()
                                                  else None)
        experiment = args.experiment or str(inputs.get("experiment") or "").strip() or None
        override = args.override or str(inputs.get("override") or "").strip() or None
        if args.rollback or str(inputs.get("rollback") or "").lower() == "true":
            if not experiment:
                raise ConfigError("--rollback needs --experiment")
            part = backend.rollback(naming.production_endpoint_name(repo, experiment))
            outcome = Outcome(pr or 0, experiment, "rolled-back",
                              f"{part.endpoint_name} serves {part.deployment_name} (version {part.model_version}) "
                              f"again; {part.previous_deployment} is kept without traffic")
            outcomes = [outcome]
        elif pr is not None or experiment:
            commit = args.commit or str(inputs.get("commit") or "").strip()
            if pr is None or not experiment:
                raise ConfigError("a dispatched promotion needs --pr, --experiment and --commit")
            outcomes = [promote_dispatched(pulls, backend, repo, pr, experiment, commit, override=override)]
        else:
            sha = args.commit or str(event.get("after") or os.environ.get("GITHUB_SHA") or "")
            if not sha:
                raise ConfigError("no merge commit: run on a push to the default branch, or pass --commit")
            outcomes = promote_merged(pulls, backend, repo, sha)
        run_url = (f"{os.environ.get('GITHUB_SERVER_URL', 'https://github.com')}/{client.repository}/actions/runs/"
                   f"{os.environ['GITHUB_RUN_ID']}" if os.environ.get("GITHUB_RUN_ID") else "")
        for outcome in outcomes:
            _out(outcome.line())
            if outcome.pr and outcome.action in ("promoted", "rolled-back"):
                marker = f"<!-- automation:promotion experiment={outcome.experiment} -->"
                try:
                    github.upsert_comment(client, outcome.pr, promotion_body(outcome, run_url), marker)
                except github.GitHubError as err:
                    log.warning("could not comment on #%s: %s", outcome.pr, err)
        github.append_step_summary("### Production\n\n" + "\n".join(f"- {o.line()}" for o in outcomes))
    return 0


def _release_plan(pulls: PullRequests, args, event: dict[str, Any]) -> int:
    dispatched = bool(event.get("inputs"))
    sha = args.commit or str(event.get("after") or os.environ.get("GITHUB_SHA") or "")
    found: list[str] = []
    if not dispatched and sha:
        for pr, name, status, why in merged_experiments(pulls, sha, args.backend):
            _out(f"#{pr.number} {name}: " + (f"not promoted: {why}" if why else f"promotes job {status.job}"))
            if not why:
                found.append(f"#{pr.number} {name}")
    promote = dispatched or bool(found)
    if not github.set_output("promote", "true" if promote else "false"):
        _out(f"promote={'true' if promote else 'false'}")
    github.append_step_summary("### Promotion plan\n\n" + ("A dispatch: the production job runs." if dispatched else
                               "\n".join(f"- {f}" for f in found) or "Nothing of this merge is promoted."))
    return 0


def add_command(commands) -> None:
    p = commands.add_parser("release", help="the production job: promote a merged pull request's experiments "
                                            "(evaluated in place), or a dispatched retry, override or rollback")
    p.add_argument("--backend", default="azure", choices=["local", "azure"])
    p.add_argument("--commit", help="the merge commit (default: the push event's), or with --pr the commit the "
                                    "pull request's comment reported")
    p.add_argument("--pr", type=int, help="a dispatched promotion: the merged pull request")
    p.add_argument("--experiment", help="a dispatched promotion or rollback: the experiment")
    p.add_argument("--override", metavar="REASON", help="promote although the policy is not met (kept as a tag)")
    p.add_argument("--rollback", action="store_true", help="move production's traffic back one promotion")
    p.add_argument("--plan", action="store_true",
                   help="only say whether this merge promotes anything (output `promote`); no Azure, no approval")
    p.add_argument("--check-environment", action="store_true",
                   help="check the production environment's protection even outside Actions")
    p.add_argument("--event", help="event payload file (default: $GITHUB_EVENT_PATH)")
    p.set_defaults(handler=cmd_release)
