"""The reconcile loop against the fake Azure ML workspace and the fake GitHub, with a fake clock:
every tick is what a scheduled (or event) run does; the clock moves the fine-tune jobs through
Azure ML's states (NotStarted, Queued, Running, Completed; CancelRequested, Canceled)."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

import pytest
import yaml
from azure.ai.ml import load_component

from automation import naming
from automation.backends.azure.backend import AzureBackend
from automation.backends.base import Progress
from automation.github import GitHubClient
from automation.loop import PullRequests, run_leg, tick
from tests.conftest import REPO
from tests.fake_azure import EXPERIMENT, reference_clients, write_component
from tests.fake_github import WRITE_TOKEN, FakeGitHub

REPO_NAME = "acme-ml/chat-finetune"
PATH = "experiments/phi3-ultrachat.yaml"
TICK = timedelta(minutes=10)


def experiment_text(**training) -> str:
    body = copy.deepcopy(EXPERIMENT)
    body["name"] = "phi3-ultrachat"  # the file's name (experiments/phi3-ultrachat.yaml)
    body["data"] = {"dataset": str(REPO / "data" / "ultrachat-sample"), "sample_percent": 100}
    body["training"].update(training)
    return yaml.safe_dump(body, sort_keys=False)


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def seconds(self) -> float:
        return self.now.timestamp()

    def advance(self, delta: timedelta) -> None:
        self.now += delta


@dataclass
class World:
    github: FakeGitHub
    workspace: object
    backend: AzureBackend
    pulls: PullRequests
    clock: FakeClock
    sleeps: list[float] = field(default_factory=list)

    def tick(self, pr: int | None = None):
        """A scheduled tick (pr=None: every open PR and everything live), or a PR event's."""
        return tick(self.pulls, {"azure": self.backend}, REPO_NAME, pr=pr, clock=self.clock)

    def comment(self, pr: int = 7) -> str:
        (comment,) = self.github.issue_comments(REPO_NAME, pr)
        return comment["body"]

    def jobs(self) -> dict[str, str]:
        for name in self.workspace.jobs.items:
            self.workspace.jobs._advance(name)
        return {name: job.status for name, job in self.workspace.jobs.items.items()}

    def endpoints(self) -> list[str]:
        return sorted(self.workspace.online_endpoints.items)

    def job_of(self, sha: str) -> str:
        from automation.spec import Experiment

        experiment = Experiment.model_validate(yaml.safe_load(self.github.trees[(REPO_NAME, sha)][PATH]))
        return naming.job_name("phi3-ultrachat", sha, naming.config_hash(experiment))


@pytest.fixture(scope="module")
def component(tmp_path_factory):
    return load_component(write_component(tmp_path_factory.mktemp("component")))


@contextmanager
def reconcile_world(component, clock: FakeClock | None = None) -> Iterator[World]:
    """A fake Azure ML workspace whose jobs move with `clock`, a fake GitHub, and the clients."""
    clock = clock or FakeClock()
    ws, registry = reference_clients(component)
    ws.jobs.clock = clock.seconds
    sleeps: list[float] = []

    def progress(uri: str, job: str) -> dict:
        """The training loss the job logged so far: a step every 6 s of running, loss falling."""
        running = ws.jobs.billed_seconds(job)
        steps = list(range(10, int(running // 6) + 1, 10))
        return {"loss_curve": [(s, 1.2 + 1.3 * math.exp(-s / 400)) for s in steps],
                "train_loss": 1.3, "eval_loss": 1.4}

    backend = AzureBackend(ws, registry, sleep=sleeps.append, poll_s=0, metrics_reader=progress)
    with FakeGitHub() as github:
        client = GitHubClient(WRITE_TOKEN, REPO_NAME, github.url, sleep=sleeps.append)
        try:
            yield World(github, ws, backend, PullRequests(client), clock, sleeps)
        finally:
            client.close()


@pytest.fixture
def world(component, workspace, monkeypatch):
    monkeypatch.setenv("GITHUB_REPOSITORY", REPO_NAME)
    with reconcile_world(component) as made:
        yield made


SHA1, SHA2 = "1" * 40, "2" * 40


def open_pr(world: World, sha: str = SHA1, **training) -> None:
    world.github.open_pull(REPO_NAME, 7, head_sha=sha, files={PATH: experiment_text(**training)})


# ---------------------------------------------------------------------------------------------


def test_opened_submits_one_job_and_ticks_show_progress_without_a_second(world):
    open_pr(world)
    (outcome,) = world.tick(pr=7)  # the pull_request event
    assert outcome.action == "submitted"
    job = world.job_of(SHA1)
    assert list(world.jobs()) == [job] and world.jobs()[job] == "NotStarted"
    submitted = world.workspace.jobs.submitted[0]
    assert submitted.tags["pr"] == "7" and submitted.tags["sha"] == SHA1 and submitted.tags["repo"] == REPO_NAME
    assert "is **NotStarted**" in world.comment() and "phase=running" in world.comment()

    # The comment moves when the job's state does (NotStarted -> Running at 10 min), then every
    # 30 minutes (PROGRESS_EVERY); the ticks between cost one read of the job and no GitHub request.
    for minutes, shown in ((10, 10), (20, 10), (30, 10), (40, 40)):
        world.clock.advance(TICK)
        requests = len(world.github.requests)
        (outcome,) = world.tick()
        assert outcome.action == "running"
        body = world.comment()
        assert "is **Running**" in body and f"for {shown} min" in body, minutes
        assert "training loss" in body and "step " in body and f"https://ml.azure.com/runs/{job}" in body
        if shown != minutes:
            assert "comment unchanged" in outcome.detail
            assert not [c for c in world.github.requests[requests:] if c.method != "GET"]
    assert world.workspace.calls.count("jobs.create_or_update") == 1
    assert world.endpoints() == [] and world.sleeps == []  # nothing waited


def test_finished_job_is_registered_deployed_scored_and_commented_once(world):
    open_pr(world)
    world.workspace.jobs.run_for(world.job_of(SHA1), 1800)
    world.tick(pr=7)
    outcomes = []
    for _ in range(5):
        world.clock.advance(TICK)
        outcomes += [o.action for o in world.tick()]
    assert outcomes[:2] == ["running", "running"] and "done" in outcomes
    assert outcomes[outcomes.index("done") + 1:] == []  # settled: later ticks plan nothing
    body = world.comment()
    assert "phase=done" in body and "### Sample" in body and "Hello from Azure." in body
    assert "**Registered**" in body and "**Endpoint**" in body
    (model,) = world.workspace.models.versions
    assert world.endpoints() == [naming.staging_endpoint_name(REPO_NAME, 7, "phi3-ultrachat")]
    # the sample, then the held-out prompts on the staging deployment (no production endpoint yet)
    from automation.spec import EvaluationSpec

    n = EvaluationSpec().prompts
    staging = naming.staging_endpoint_name(REPO_NAME, 7, "phi3-ultrachat")
    assert [(e, d) for e, d, _ in world.workspace.online_endpoints.invocations] == [(staging, "demo")] * (1 + n)
    assert "### Evaluation" in body and f"replies from the endpoints to {n} held-out prompts" in body
    assert f"### Replies to the {n} held-out prompts" in body and "with no baseline" in body
    calls = len(world.workspace.calls)
    assert world.tick() == [] and len(world.workspace.calls) == calls  # settled: the status says so, no Azure call


def test_closing_keeps_the_results_and_says_the_endpoint_is_deleted(world):
    open_pr(world)
    world.workspace.jobs.run_for(world.job_of(SHA1), 600)
    world.tick(pr=7)
    world.clock.advance(timedelta(minutes=15))
    world.tick()
    staging = naming.staging_endpoint_name(REPO_NAME, 7, "phi3-ultrachat")
    assert f"**Endpoint** `{staging}` (staging, live)" in world.comment()
    world.github.close_pull(REPO_NAME, 7)
    (outcome,) = world.tick(pr=7)
    assert outcome.action == "pruned" and outcome.deleted == [staging]
    body = world.comment()
    assert body.index("### Stopped: closed") < body.index("### Evaluation"), "the results stay, under the note"
    assert f"**Endpoint** `{staging}` (staging, deleted)" in body and "(staging, live)" not in body
    assert body.count("<!-- automation:report") == 1 and body.count("<!-- automation:status") == 1
    assert "phase=pruned" in body and "phase=done" not in body


def test_a_push_during_training_cancels_the_old_job_and_submits_a_new_one(world):
    open_pr(world)
    world.tick(pr=7)
    world.clock.advance(timedelta(minutes=25))
    old = world.job_of(SHA1)
    world.github.push(REPO_NAME, 7, SHA2, {PATH: experiment_text(learning_rate=1e-5)})
    pushed_at = world.clock.seconds()
    (outcome,) = world.tick(pr=7)  # the synchronize event
    new = world.job_of(SHA2)
    assert outcome.action == "submitted" and outcome.cancelled == [old]
    assert world.jobs() == {old: "CancelRequested", new: "NotStarted"}
    world.clock.advance(TICK)
    world.tick()
    assert world.jobs()[old] == "Canceled" and world.workspace.jobs.cancelled == [old]
    assert world.workspace.jobs.billed_seconds(old, after=pushed_at) == world.workspace.jobs.cancel_s
    assert world.workspace.calls.count("jobs.create_or_update") == 2


def test_closed_during_training_cancels_and_never_creates_an_endpoint(world):
    open_pr(world)
    world.workspace.jobs.run_for(world.job_of(SHA1), 3600)
    world.tick(pr=7)
    world.clock.advance(timedelta(minutes=30))
    world.github.close_pull(REPO_NAME, 7)
    (outcome,) = world.tick(pr=7)  # the closed event
    assert outcome.action == "pruned" and outcome.cancelled == [world.job_of(SHA1)]
    for _ in range(12):  # the job would have finished in this time
        world.clock.advance(TICK)
        assert world.tick() == []
    assert list(world.jobs().values()) == ["Canceled"]
    assert world.endpoints() == [] and "online_endpoints.begin_create_or_update" not in world.workspace.calls
    assert "### Stopped: closed" in world.comment() and "cancelled fine-tune job" in world.comment()


def test_closed_between_completion_and_deploy_creates_no_endpoint(world):
    open_pr(world)
    world.workspace.jobs.run_for(world.job_of(SHA1), 600)
    world.tick(pr=7)
    world.clock.advance(timedelta(minutes=15))
    original = world.pulls.get

    def closes_after_registering(number, **kwargs):  # GitHub's answer changes between two reads of the tick
        if "models.create_or_update" in world.workspace.calls:
            world.github.close_pull(REPO_NAME, 7)
        return original(number, **kwargs)

    world.pulls.get = closes_after_registering
    (outcome,) = world.tick()
    assert outcome.action == "pruned" and outcome.detail == "closed before deploying"
    assert world.endpoints() == [] and "online_endpoints.begin_create_or_update" not in world.workspace.calls


def test_a_conflicted_close_without_an_event_is_cleaned_by_the_next_tick(world):
    open_pr(world)
    world.workspace.jobs.run_for(world.job_of(SHA1), 600)
    world.tick(pr=7)
    world.clock.advance(timedelta(minutes=15))
    world.tick()
    assert len(world.endpoints()) == 1
    # A push of a second experiment then a close while conflicted: no pull_request event at all.
    world.github.push(REPO_NAME, 7, SHA2, {"experiments/phi3-other.yaml": experiment_text(learning_rate=1e-5)
                                           .replace("phi3-ultrachat", "phi3-other")})
    world.tick(pr=7)
    other = [j for j in world.jobs() if j.startswith("phi3-other")]
    world.github.close_pull(REPO_NAME, 7)
    world.clock.advance(TICK)
    outcomes = world.tick()  # the schedule finds PR 7 by the tags of what it left
    assert sorted(o.action for o in outcomes) == ["pruned", "pruned"]
    assert world.endpoints() == [] and world.jobs()[other[0]] in ("CancelRequested", "Canceled")
    assert world.tick() == []


def test_a_ten_hour_job_completes_through_ticks(world):
    open_pr(world)
    world.workspace.jobs.run_for(world.job_of(SHA1), 10 * 3600)
    world.tick(pr=7)
    ticks = 0
    while "phase=done" not in world.comment():
        world.clock.advance(TICK)
        world.tick()
        ticks += 1
        assert ticks < 80
    assert ticks == 61  # 2 min in the queue + 10 h of training = 602 min: done on the tick at 610 min
    assert world.workspace.calls.count("jobs.create_or_update") == 1 and world.sleeps == []
    assert "jobs.stream" not in world.workspace.calls  # no tick ever waited on the job
    assert len(world.endpoints()) == 1


def test_a_failed_job_comments_the_error_and_fails_the_leg(world):
    open_pr(world)
    job = world.job_of(SHA1)
    world.workspace.jobs.run_for(job, 300)
    world.workspace.jobs.outcome[job] = ("Failed", "CUDA out of memory")
    world.tick(pr=7)
    world.clock.advance(TICK)
    (outcome,) = world.tick()
    assert outcome.action == "failed" and outcome.failed
    body = world.comment()
    assert "ended **Failed**" in body and f"https://ml.azure.com/runs/{job}" in body and "phase=failed" in body
    world.clock.advance(TICK)
    assert world.tick() == []  # settled: not resubmitted, not re-commented, until a new push
    assert world.endpoints() == [] and world.workspace.calls.count("jobs.create_or_update") == 1


def test_a_removed_experiment_is_pruned_and_an_invalid_one_submits_nothing(world):
    open_pr(world)
    world.tick(pr=7)
    world.github.push(REPO_NAME, 7, SHA2, {PATH: None})
    (outcome,) = world.tick(pr=7)
    assert outcome.action == "pruned" and outcome.cancelled == [world.workspace.jobs.submitted[0].name]
    world.github.open_pull(REPO_NAME, 8, head_sha="3" * 40, files={
        "experiments/phi3-bad.yaml": experiment_text(learning_rate=-1).replace("phi3-ultrachat", "phi3-bad")})
    (outcome,) = run_leg(world.pulls, world.backend, REPO_NAME, 8, clock=world.clock)
    assert outcome.action == "invalid" and "learning_rate" in outcome.detail
    assert "experiments/phi3-bad.yaml" in world.comment(8)  # the repository's path, not our copy's
    assert world.tick() == []  # reported once for this commit: the schedule leaves it until a new push
    assert world.workspace.calls.count("jobs.create_or_update") == 1


def test_forks_are_left_to_their_own_event(world):
    world.github.open_pull(REPO_NAME, 9, head_sha=SHA1, files={PATH: experiment_text()},
                           head_repo="someone/chat-finetune")
    assert world.tick() == []  # the schedule never spends on a fork's experiment
    assert world.workspace.calls.count("jobs.create_or_update") == 0


def test_local_jobs_are_found_by_tags_in_mlflow(workspace):
    """The local backend observes its jobs the same way: MLflow runs tagged like Azure jobs."""
    from automation.backends.base import JOB_COMPLETED, JOB_RUNNING
    from automation.backends.local.backend import LocalBackend, _mlflow

    backend = LocalBackend()
    assert backend.list_jobs({"pr": "7"}) == [] and backend.get_job("nope") is None  # no database yet
    tags = naming.resource_tags(repo=REPO_NAME, pr=7, experiment="tiny", sha=SHA1, stage="finetune", ttl_hours=4)
    mlflow = _mlflow("tiny")
    for name in ("tiny-1111111-aaaaaaa", "tiny-2222222-aaaaaaa"):
        with mlflow.start_run(run_name=name, tags={**tags, "job_name": name}):
            mlflow.log_metrics({"loss": 2.0}, step=1)
            mlflow.log_metrics({"loss": 1.5}, step=2)
    (workspace / "jobs" / "tiny-2222222-aaaaaaa").mkdir(parents=True)
    (workspace / "jobs" / "tiny-2222222-aaaaaaa" / "result.json").write_text("{}")
    found = {j.name: j.state for j in backend.list_jobs({"repo": REPO_NAME, "pr": "7", "experiment": "tiny"})}
    assert found == {"tiny-1111111-aaaaaaa": JOB_RUNNING, "tiny-2222222-aaaaaaa": JOB_COMPLETED}
    assert backend.list_jobs({"pr": "8"}) == []
    assert backend.job_progress("tiny-1111111-aaaaaaa") == Progress(step=2, loss=1.5)
    assert backend.cancel_job("tiny-1111111-aaaaaaa") is False  # it runs only inside its own process


def finish_staging(world, sha: str = SHA1) -> None:
    world.workspace.jobs.run_for(world.job_of(sha), 600)
    world.tick(pr=7)
    while "phase=done" not in world.comment():
        world.clock.advance(TICK)
        world.tick()


def test_a_merge_promotes_the_reported_commit_once_evaluated_in_place(world):
    """Merging is the decision: the push of the merge commit promotes the job the comment reported,
    from the version it registered, evaluated beside the live deployment on the production endpoint;
    the staging endpoint is not needed (the close deletes it); running it again changes nothing."""
    from automation.release import promote_merged

    open_pr(world)
    finish_staging(world)
    body = world.comment()
    assert "verdict=passed" in body and "### On merge" in body and "Merging promotes **" in body
    world.github.close_pull(REPO_NAME, 7, merged=True)
    (pruned,) = world.tick(pr=7)  # the closed event: the staging endpoint goes
    assert pruned.action == "pruned" and world.endpoints() == []
    assert "verdict=passed" in world.comment()  # the prune keeps what the status knew
    merge = world.github.pulls[(REPO_NAME, 7)]["merge_commit_sha"]
    world.workspace.online_endpoints.invocations.clear()
    (outcome,) = promote_merged(world.pulls, world.backend, REPO_NAME, merge, clock=world.clock)
    assert outcome.action == "promoted" and "kept for a rollback" in outcome.detail
    production = naming.production_endpoint_name(REPO_NAME, "phi3-ultrachat")
    (serving,) = world.workspace.online_endpoints.items[production].traffic
    asked = {(e, d) for e, d, _ in world.workspace.online_endpoints.invocations}
    assert asked == {(production, serving)}  # the smoke test and the held-out prompts, in place
    creates = world.workspace.calls.count("online_deployments.begin_create_or_update")
    (again,) = promote_merged(world.pulls, world.backend, REPO_NAME, merge, clock=world.clock)
    assert again.action == "promoted"
    assert world.workspace.calls.count("online_deployments.begin_create_or_update") == creates  # once


def test_a_merge_of_a_head_without_staging_results_promotes_nothing(world):
    from automation.release import promote_merged

    open_pr(world)
    finish_staging(world)
    world.github.push(REPO_NAME, 7, SHA2, {PATH: experiment_text(learning_rate=1e-5)})
    world.tick(pr=7)  # the new head's job starts; it has not completed when the pull request merges
    world.github.close_pull(REPO_NAME, 7, merged=True)
    merge = world.github.pulls[(REPO_NAME, 7)]["merge_commit_sha"]
    (outcome,) = promote_merged(world.pulls, world.backend, REPO_NAME, merge, clock=world.clock)
    assert outcome.action == "skipped" and "never completed" in outcome.detail
    production = naming.production_endpoint_name(REPO_NAME, "phi3-ultrachat")
    assert production not in world.workspace.online_endpoints.items


def test_closing_without_merging_never_promotes_and_a_dispatch_needs_the_reported_commit(world):
    from automation.errors import ConfigError
    from automation.release import promote_dispatched, promote_merged

    open_pr(world)
    finish_staging(world)
    world.github.close_pull(REPO_NAME, 7)  # closed, not merged: no merge commit exists
    assert [o.action for o in promote_merged(world.pulls, world.backend, REPO_NAME, SHA1)] == ["skipped"]
    with pytest.raises(ConfigError, match="is not merged"):
        promote_dispatched(world.pulls, world.backend, REPO_NAME, 7, "phi3-ultrachat", SHA1)
    world.github.pulls[(REPO_NAME, 7)].update(merged=True, merged_at="2026-03-02T10:00:00Z")
    with pytest.raises(ConfigError, match="not the one its comment reported"):
        promote_dispatched(world.pulls, world.backend, REPO_NAME, 7, "phi3-ultrachat", SHA2)
    outcome = promote_dispatched(world.pulls, world.backend, REPO_NAME, 7, "phi3-ultrachat", SHA1,
                                 clock=world.clock)
    assert outcome.action == "promoted"


def test_production_runs_only_from_the_default_branch(world):
    from automation.errors import ConfigError
    from automation.release import require_default_branch

    client = world.pulls.client
    assert require_default_branch(client, "refs/heads/main") == "main"
    for ref in ("refs/heads/feature-7", "refs/pull/7/merge", None):
        with pytest.raises(ConfigError, match="only from the default branch"):
            require_default_branch(client, ref)


# ---------------------------------------------------------------------------------------------
# The decision: errors decide retries, the schedule never starts a head, the preflight gates


def test_a_transient_error_is_retried_with_backoff_then_given_up_until_asked_again(world):
    from tests.fake_azure import unavailable

    open_pr(world)
    world.workspace.fail("jobs.create_or_update", unavailable(), times=10_000)
    (outcome,) = world.tick(pr=7)
    assert outcome.action == "error" and outcome.failed
    body = world.comment()
    assert "phase=error" in body and "attempts=1" in body and "(attempt 1 of 5)" in body
    assert "tries again after 09:10 UTC" in body
    world.clock.advance(timedelta(minutes=5))
    assert world.tick() == []  # before retry_at: the tick waits
    tries = ["error"]
    while "phase=error" in world.comment():
        world.clock.advance(TICK)
        tries += [o.action for o in world.tick()]
        assert len(tries) < 40
    assert tries == ["error"] * 4 + ["failed"]  # attempts 1-4 retried after 10, 20, 40, 80 min; the 5th gives up
    body = world.comment()
    assert "phase=failed" in body and "gave up after 5 attempts" in body
    world.clock.advance(timedelta(hours=12))
    assert world.tick() == []  # settled: no runner spent on it any more
    world.workspace.faults.clear()
    (outcome,) = run_leg(world.pulls, world.backend, REPO_NAME, 7, clock=world.clock)  # a person's dispatch
    assert outcome.action == "submitted" and "phase=running" in world.comment()


def test_a_terminal_error_settles_with_its_fix_and_is_not_retried(world):
    from tests.fake_azure import quota_error

    open_pr(world)
    world.workspace.fail("jobs.create_or_update", quota_error(), times=1)
    (outcome,) = world.tick(pr=7)
    assert outcome.action == "failed"
    body = world.comment()
    assert "phase=failed" in body and "lack of quota" in body and "will not go away by retrying" in body
    assert "attempts=" not in body
    for _ in range(3):
        world.clock.advance(TICK)
        assert world.tick() == []
    assert world.workspace.calls.count("jobs.create_or_update") == 1


def test_the_schedule_never_starts_a_new_heads_job(world):
    open_pr(world)  # its pull_request event has not run (or was lost)
    world.clock.advance(TICK)
    assert world.tick() == []
    assert world.workspace.calls.count("jobs.create_or_update") == 0 and world.github.issue_comments(REPO_NAME, 7) == []


def test_a_failed_preflight_submits_nothing_and_says_so(world):
    open_pr(world)
    (outcome,) = run_leg(world.pulls, world.backend, REPO_NAME, 7, clock=world.clock, trigger="event",
                         gate="failure")
    assert outcome.action == "failed" and "preflight failure" in outcome.detail
    body = world.comment()
    assert "### Preflight failure" in body and "phase=failed" in body and f"job={world.job_of(SHA1)}" in body
    assert world.workspace.calls.count("jobs.create_or_update") == 0
    world.clock.advance(TICK)
    assert world.tick() == []  # settled for this head
    world.github.push(REPO_NAME, 7, SHA2, {PATH: experiment_text(learning_rate=1e-5)})
    (outcome,) = run_leg(world.pulls, world.backend, REPO_NAME, 7, clock=world.clock, trigger="event",
                         gate="success")
    assert outcome.action == "submitted"


def test_the_planner_and_the_leg_read_an_experiment_the_same_way(world, tmp_path):
    """A `name:` that differs from the file name: invalid for both, reported once, then settled."""
    from automation.loop import EVENT, SCHEDULE, plan

    text = experiment_text().replace("name: phi3-ultrachat", "name: phi3-renamed")
    world.github.open_pull(REPO_NAME, 7, head_sha=SHA1, files={PATH: text})
    first = plan(world.pulls, REPO_NAME, trigger=EVENT, pr=7, azure=True, workdir=tmp_path, clock=world.clock)
    assert [(leg.backend, leg.decision, leg.preflight) for leg in first.legs] == [("azure", "advance", False)]
    (outcome,) = world.tick(pr=7)
    assert outcome.action == "invalid" and "must match the file name" in world.comment()
    later = plan(world.pulls, REPO_NAME, trigger=SCHEDULE, azure=True, workdir=tmp_path, clock=world.clock)
    assert later.legs == [] and not later.live
    assert world.workspace.calls.count("jobs.create_or_update") == 0


def test_the_plan_gives_each_job_kind_its_matrix(world, tmp_path):
    from automation.loop import EVENT, SCHEDULE, plan

    open_pr(world)
    event = plan(world.pulls, REPO_NAME, trigger=EVENT, pr=7, azure=True, workdir=tmp_path, clock=world.clock)
    outputs = event.outputs()
    assert outputs["azure"] == '{"include":[{"pr":7,"experiment":"phi3-ultrachat","legs":"[[7,\\"phi3-ultrachat\\"]]"}]}'
    assert outputs["preflight"] == f'{{"include":[{{"pr":7,"experiment":"phi3-ultrachat","file":"{PATH}"}}]}}'
    assert outputs["any_local"] == "false" and event.live
    unconfigured = plan(world.pulls, REPO_NAME, trigger=EVENT, pr=7, azure=False, workdir=tmp_path,
                        clock=world.clock)
    assert unconfigured.outputs()["any_azure"] == "false" and unconfigured.outputs()["any_preflight"] == "true"
    assert "Azure ML is not configured" in unconfigured.notices[0]
    world.github.open_pull(REPO_NAME, 9, head_sha=SHA2, files={PATH: experiment_text()},
                           head_repo="someone/chat-finetune")
    fork = plan(world.pulls, REPO_NAME, trigger=EVENT, pr=9, azure=True, workdir=tmp_path, clock=world.clock)
    assert fork.outputs()["any_azure"] == "false" and fork.outputs()["any_preflight"] == "true"
    assert "read-only token" in fork.notices[0]
    idle = plan(world.pulls, REPO_NAME, trigger=SCHEDULE, azure=True, workdir=tmp_path, clock=world.clock)
    assert idle.legs == [] and not idle.live  # nothing submitted yet: the schedule has nothing to do


def test_the_tick_disables_itself_when_idle_and_a_submission_enables_it(world, tmp_path):
    from automation.github import GitHubClient
    from automation.loop import DISPATCH, EVENT, SCHEDULE, keep_tick, plan
    from tests.fake_github import ACTIONS_TOKEN

    world.github.add_workflow(REPO_NAME, ".github/workflows/tick.yml")
    with GitHubClient(ACTIONS_TOKEN, REPO_NAME, world.github.url) as client:
        idle = plan(world.pulls, REPO_NAME, trigger=SCHEDULE, azure=True, workdir=tmp_path, clock=world.clock)
        keep_tick(client, "tick.yml", idle, SCHEDULE)
        assert client.workflow_state("tick.yml") == "disabled_manually"
        open_pr(world)
        (outcome,) = run_leg(world.pulls, world.backend, REPO_NAME, 7, clock=world.clock, trigger=EVENT,
                             on_submit=lambda: keep_tick(client, "tick.yml", replace(idle, live=True), DISPATCH))
        assert outcome.action == "submitted" and client.workflow_state("tick.yml") == "active"
        busy = plan(world.pulls, REPO_NAME, trigger=SCHEDULE, azure=True, workdir=tmp_path, clock=world.clock)
        assert busy.live and [leg.decision for leg in busy.legs] == ["advance"]
        keep_tick(client, "tick.yml", busy, SCHEDULE)
        assert client.workflow_state("tick.yml") == "active"


def test_the_status_line_round_trips():
    from automation.loop import Status

    status = Status("x-1111111-aaaaaaa", "error", 3, datetime(2026, 3, 2, 9, 40, tzinfo=UTC), "azure")
    assert Status.parse("intro\n" + status.line() + "\nmore") == status
    assert Status.parse("<!-- automation:status job=x phase=done -->") == Status("x", "done")  # the old form
    assert Status.parse("no status here") == Status()


def test_the_sweeper_deletes_what_a_closed_pull_request_left(world):
    """The safety net under the loop's prune: a closed pull request's staging endpoint goes at the
    next sweep, its ttl_hours notwithstanding; an open one's stays."""
    from automation.gitops import sweep

    open_pr(world)
    world.workspace.jobs.run_for(world.job_of(SHA1), 600)
    world.tick(pr=7)
    world.clock.advance(timedelta(minutes=15))
    world.tick()
    (endpoint,) = world.endpoints()
    closed = {7: False}
    assert sweep(world.backend, closed=lambda pr: closed[pr]) == ([], [endpoint])
    closed[7] = True
    assert sweep(world.backend, closed=lambda pr: closed[pr]) == ([endpoint], [])
    assert world.endpoints() == []


def test_a_tick_costs_github_requests_per_tick_not_per_file(world, tmp_path, monkeypatch):
    """The request budget of a scheduled tick with three experiments training in three pull
    requests: the plan job reads no file, the azure legs run in one job, and a leg whose job's
    state did not move writes nothing until its comment is PROGRESS_EVERY old. Each job is a new
    client (a new GITHUB_TOKEN per job in Actions: no ETag carries over)."""
    from automation.github import GitHubClient
    from automation.loop import SCHEDULE, parse_legs, plan, run_legs

    monkeypatch.setenv("AUTOMATION_BOT_LOGIN", "github-actions[bot]")  # as in Actions: no GET /user
    for number in (7, 8, 9):
        sha = str(number) * 40
        world.github.open_pull(REPO_NAME, number, head_sha=sha, files={PATH: experiment_text()})
        world.workspace.jobs.run_for(world.job_of(sha), 10 * 3600)
        (outcome,) = world.tick(pr=number)
        assert outcome.action == "submitted"

    def job_run(trigger_minutes: int):
        world.clock.advance(timedelta(minutes=trigger_minutes))
        start = len(world.github.requests)
        with GitHubClient(WRITE_TOKEN, REPO_NAME, world.github.url) as client:
            the_plan = plan(PullRequests(client), REPO_NAME, trigger=SCHEDULE, azure=True, workdir=tmp_path,
                            clock=world.clock)
        planned = world.github.requests[start:]
        (entry,) = json.loads(the_plan.outputs()["azure"])["include"]
        with GitHubClient(WRITE_TOKEN, REPO_NAME, world.github.url) as client:
            outcomes = run_legs(PullRequests(client), world.backend, REPO_NAME, parse_legs(entry["legs"]),
                                trigger=SCHEDULE, clock=world.clock)
        legs = world.github.requests[start + len(planned):]
        return planned, legs, outcomes

    planned, legs, outcomes = job_run(10)  # NotStarted -> Running: every comment moves
    assert not [c for c in planned if "/files" in c.path or "/contents/" in c.path], [c.path for c in planned]
    assert sum(c.billed for c in planned) <= 3  # open pulls, their comments at once, recent closes
    assert [o.action for o in outcomes] == ["running"] * 3
    assert sum(c.billed for c in legs) <= 2 + 3 * 3, [(c.method, c.path) for c in legs if c.billed]
    planned, legs, outcomes = job_run(10)  # nothing moved: no leg touches GitHub
    assert all("comment unchanged" in o.detail for o in outcomes)
    assert sum(c.billed for c in legs) <= 2, [(c.method, c.path) for c in legs if c.billed]
