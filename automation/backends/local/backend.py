"""The local backend: trains with TRL + PEFT, tracks and registers in MLflow (SQLite), serves over HTTP.

Everything lives in the workspace (`.automation/` or `$AUTOMATION_HOME`):

    mlflow.db        MLflow tracking and model registry (SQLite)
    mlartifacts/     MLflow artifacts (the logged models)
    models/          base models converted from GGUF, once
    jobs/<job>/      checkpoints, the trained model, result.json
    endpoints/       one record, key (0600) and log per endpoint process
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from automation import naming
from automation.backends.base import (
    JOB_COMPLETED,
    JOB_FAILED,
    JOB_RUNNING,
    SMOKE_REQUEST,
    Backend,
    Candidate,
    EndpointInfo,
    JobInfo,
    Progress,
    ServingModel,
)
from automation.errors import BackendError, ConfigError
from automation.record import (
    DataPart,
    DeployPart,
    FinetunePart,
    LossPoint,
    PromotePart,
    RegisterPart,
)
from automation.spec import Experiment
from automation.workspace import home, write_text_atomic

log = logging.getLogger(__name__)

PRODUCTION_ALIAS = "production"
STAGING_ALIAS = "staging"  # the newest registered candidate
# Without it MLflow's UI opens an experiment on its (empty) GenAI traces page, not on the runs.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
MODEL_VERSIONS_TAG = "mlflow.modelVersions"  # on a logged model: the registered versions made from it


def tracking_uri() -> str:
    return f"sqlite:///{home() / 'mlflow.db'}"


def _mlflow(experiment_name: str | None = None):
    """MLflow pointed at the workspace; creates the MLflow experiment with a local artifact root."""
    import mlflow

    home().mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_registry_uri(tracking_uri())
    if experiment_name:
        client = mlflow.MlflowClient()
        found = client.get_experiment_by_name(experiment_name)
        if found is None:
            client.create_experiment(experiment_name, artifact_location=(home() / "mlartifacts").as_uri(),
                                     tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        elif found.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
            client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        mlflow.set_experiment(experiment_name)
    return mlflow


def _file_uri_to_path(uri: str) -> Path:
    parsed = urlparse(uri)
    if parsed.scheme not in ("", "file"):
        raise BackendError(f"expected a local artifact location, got {uri}")
    return Path(unquote(parsed.path))


def _flatten(prefix: str, data: dict[str, Any]) -> dict[str, Any]:
    return {f"{prefix}.{k}": v for k, v in data.items()}


def _stop_unclaimed_standby(standby_id: str) -> None:
    """Stop the workspace's standby if it is still the one `prepare_deploy` started (unclaimed)."""
    from automation.serving import process

    record = process.get_standby()
    if record is not None and record.standby_id == standby_id:
        process.stop_standby()


class LocalBackend(Backend):
    name = "local"
    endpoints_outlive_job = False
    _deploy_environment: dict[str, str] | None = None  # set by prepare_deploy

    # -- validate ---------------------------------------------------------------------------
    def validate_compute(self, experiment: Experiment) -> list[str]:
        from automation.backends.local.model_source import resolve_model_dir

        warnings = []
        resolve_model_dir(experiment.model)  # raises ConfigError with what to install
        try:
            import torch
        except ImportError as err:
            raise ConfigError("the local backend needs the local extra: pip install -e '.[local]'") from err
        if experiment.compute.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("compute.device is cuda but no CUDA device is available")
        ram = _total_ram_gib()
        if ram is not None and ram < 4:
            warnings.append(f"this machine has {ram:.1f} GiB of RAM; the local backend needs about 4 GiB")
        return warnings

    # -- fine-tune --------------------------------------------------------------------------
    def _job_dir(self, job_name: str) -> Path:
        return home() / "jobs" / job_name

    def submit_finetune(self, experiment: Experiment, data: DataPart, *, job_name: str,
                        tags: dict[str, str]) -> str:
        """Runs the fine-tune here and now (a local "job" is this process); a finished job is reused,
        an interrupted one resumes from its last checkpoint in the same MLflow run."""
        from automation.backends.local.model_source import resolve_model_dir
        from automation.backends.local.train import train
        from automation.evaluation import held_out_prompts

        job_dir = self._job_dir(job_name)
        if (job_dir / "result.json").is_file():
            log.info("fine-tune job %s already finished; reusing it", job_name)
            return job_name
        mlflow = _mlflow(experiment.name)
        existing = mlflow.search_runs(filter_string=f"tags.job_name = '{job_name}'", output_format="list",
                                      max_results=1)
        run_id = existing[0].info.run_id if existing else None
        base_model = resolve_model_dir(experiment.model)
        data_dir = Path(data.out_dir)
        files = {role: data_dir / f"{split}.jsonl" for role, split in (
            ("training", experiment.data.train_split), ("evaluation", experiment.data.test_split),
            ("prompts", experiment.data.sample_split))}
        prompts = held_out_prompts(files["prompts"], experiment.evaluation.prompts, experiment.evaluation.seed)
        baseline = self._production_baseline(naming.model_name(experiment.model.name, experiment.data.dataset))
        run_tags = _present({**tags, "job_name": job_name, "mlflow.source.git.commit": tags.get("sha", ""),
                             "mlflow.note.content": _run_description(experiment, job_name)})
        # System metrics every 5 s unless MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL says (MLflow's 10 s
        # default leaves a short run with none).
        os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "5")
        with mlflow.start_run(run_id=run_id, run_name=job_name, tags=run_tags, log_system_metrics=True) as run:
            if run_id is None:
                mlflow.log_params(_flatten("training", experiment.training.model_dump()))
                mlflow.log_params(_flatten("optimization", experiment.optimization.model_dump()))
                mlflow.log_params({"model.name": experiment.model.name, "data.dataset": experiment.data.dataset,
                                   "data.sample_percent": experiment.data.sample_percent,
                                   "evaluation.prompts": experiment.evaluation.prompts,
                                   "evaluation.max_new_tokens": experiment.evaluation.max_new_tokens})
                _log_datasets(mlflow, experiment, data_dir, files)
            result = train(experiment, base_model=base_model, train_file=files["training"],
                           test_file=files["evaluation"], job_dir=job_dir, prompts=prompts, baseline=baseline)
            model_info = _log_chat_model(mlflow, result.model_dir, name=experiment.name)
            mlflow.set_tag("mlflow.note.content", _run_description(experiment, job_name, result.evaluation))
            _log_evaluation_table(mlflow, result.evaluation)
            part = FinetunePart(
                job_name=job_name, run_id=run.info.run_id, model_uri=model_info.model_uri,
                tracking_store=str(home() / "mlflow.db"), mlflow_experiment_id=run.info.experiment_id,
                output_dir=str(result.model_dir), base_eval_loss=result.base_eval_loss, eval_loss=result.eval_loss,
                train_loss=result.train_loss, last_train_loss=result.last_train_loss, max_steps=result.max_steps,
                train_loss_curve=[LossPoint(step=s, loss=v) for s, v in result.loss_curve],
                train_tokens=result.train_tokens, tokens_per_second=result.tokens_per_second,
                wall_seconds=result.wall_seconds, resumed_from=result.resumed_from, params=result.params,
                evaluation=result.evaluation,
            )
        write_text_atomic(job_dir / "result.json", part.model_dump_json(indent=2))
        return job_name

    def _production_baseline(self, model_name: str):
        """The version behind the `production` alias and its folder, or None when there is none."""
        from mlflow.exceptions import MlflowException

        from automation.backends.local.evaluate import Baseline

        client = _mlflow().MlflowClient()
        try:
            version = client.get_model_version_by_alias(model_name, PRODUCTION_ALIAS)
        except MlflowException:
            log.info("no production model of %s yet: the base model is the baseline", model_name)
            return None
        folder = self._model_dir(RegisterPart(model_name=model_name, version=str(version.version),
                                              timestamp_version="", model_uri=""))
        return Baseline(uri=f"models:/{model_name}/{version.version}", version=str(version.version), model_dir=folder)

    def log_run_files(self, finetune: FinetunePart, files: list[Path]) -> None:
        """Attach the report, the scoring request and the experiment file to the fine-tune's MLflow run."""
        if not finetune.run_id:
            return
        import tempfile

        from mlflow.exceptions import MlflowException

        from automation.report import mlflow_markdown

        client = _mlflow().MlflowClient()
        try:
            for file in files:
                if file.suffix == ".md" and file.is_file():  # the report, as MLflow previews markdown
                    with tempfile.TemporaryDirectory() as folder:
                        clean = Path(folder) / file.name
                        clean.write_text(mlflow_markdown(file.read_text(encoding="utf-8")), encoding="utf-8")
                        client.log_artifact(finetune.run_id, str(clean), artifact_path="run")
                elif file.is_file():
                    client.log_artifact(finetune.run_id, str(file), artifact_path="run")
        except MlflowException as err:  # e.g. a record brought from another machine: the report still stands
            log.warning("could not attach the report to MLflow run %s: %s", finetune.run_id, err)

    def wait_finetune(self, experiment: Experiment, job_name: str, *, stream: bool = True) -> FinetunePart:
        result = self._job_dir(job_name) / "result.json"
        if not result.is_file():
            raise BackendError(f"fine-tune job {job_name} has not finished; run `automation finetune` again "
                               "to resume it from its last checkpoint")
        return FinetunePart.model_validate_json(result.read_text())

    # -- jobs, observed (the reconcile loop) ------------------------------------------------
    # A local job runs inside the process that submitted it, so it is found finished (result.json),
    # failed (its MLflow run says so), or interrupted (an MLflow run still RUNNING with nobody
    # training: `submit_finetune` resumes it from its last checkpoint).
    def _job_info(self, run) -> JobInfo:
        from datetime import UTC, datetime

        tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")}
        name = tags.get("job_name", run.info.run_name)
        if (self._job_dir(name) / "result.json").is_file():
            state = JOB_COMPLETED
        elif run.info.status in ("FAILED", "KILLED"):
            state = JOB_FAILED
        else:
            state = JOB_RUNNING
        created = datetime.fromtimestamp(run.info.start_time / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return JobInfo(name=name, state=state, backend_status=run.info.status, tags=tags, created_at=created)

    def _runs(self, filter_string: str) -> list:
        if not (home() / "mlflow.db").is_file():
            return []  # a fresh workspace: no job ever ran here (and no database to create)
        return _mlflow().search_runs(search_all_experiments=True, filter_string=filter_string,
                                     output_format="list")

    def get_job(self, job_name: str) -> JobInfo | None:
        runs = self._runs(f"tags.job_name = '{job_name}'")
        return self._job_info(runs[0]) if runs else None

    def list_jobs(self, match_tags: dict[str, str] | None = None) -> list[JobInfo]:
        # empty values are not stored as tags (`_present`): a wanted "" matches an absent tag
        clauses = [f"tags.`{k}` = '{v}'" for k, v in (match_tags or {}).items() if v and "'" not in v + k]
        found = [self._job_info(r) for r in self._runs(" and ".join(clauses))]
        return [j for j in found if all(j.tags.get(k, "") == v for k, v in (match_tags or {}).items())]

    def cancel_job(self, job_name: str) -> bool:
        return False  # nothing runs here outside the process that trains it

    def job_progress(self, job_name: str) -> Progress:
        runs = self._runs(f"tags.job_name = '{job_name}'")
        if not runs:
            return Progress()
        client = _mlflow().MlflowClient()  # `loss` in runs logged before the curves had their prefix
        history = (client.get_metric_history(runs[0].info.run_id, "loss/train")
                   or client.get_metric_history(runs[0].info.run_id, "loss"))
        if not history:
            return Progress()
        last = max(history, key=lambda m: m.step)
        return Progress(step=int(last.step), loss=float(last.value))

    def metrics(self, finetune: FinetunePart) -> dict[str, Any]:
        mlflow = _mlflow()
        run = mlflow.MlflowClient().get_run(finetune.run_id)
        return dict(run.data.metrics)

    # -- registry ---------------------------------------------------------------------------
    def register(self, experiment: Experiment, finetune: FinetunePart, *, model_name: str,
                 timestamp_version: str, tags: dict[str, str]) -> RegisterPart:
        mlflow = _mlflow()
        client = mlflow.MlflowClient()
        for version in client.search_model_versions(f"name = '{model_name}'"):
            if version.run_id == finetune.run_id:
                log.info("run %s is already registered as %s version %s", finetune.run_id, model_name, version.version)
                return RegisterPart(model_name=model_name, version=str(version.version),
                                    timestamp_version=version.tags.get("timestamp_version", timestamp_version),
                                    model_uri=f"models:/{model_name}/{version.version}")
        if not client.search_registered_models(f"name = '{model_name}'"):
            client.create_registered_model(model_name, description=(
                f"{experiment.model.name} fine tuned model for {experiment.data.dataset} chat-completion"))
        version_tags = _present({**tags, "timestamp_version": timestamp_version, "job_name": finetune.job_name})
        model_id = finetune.model_uri.removeprefix("models:/") if finetune.model_uri.startswith("models:/m-") else None
        version = client.create_model_version(
            name=model_name, source=finetune.model_uri, run_id=finetune.run_id, tags=version_tags, model_id=model_id,
            description=(f"{experiment.model.name} fine tuned on {experiment.data.dataset}; "
                         f"timestamp version {timestamp_version}; job {finetune.job_name}"),
        )
        if model_id:  # what mlflow.register_model does: the logged model's page then shows its versions
            linked = client.get_logged_model(model_id).tags.get(MODEL_VERSIONS_TAG)
            versions = [*(json.loads(linked) if linked else []), {"name": model_name, "version": str(version.version)}]
            client.set_logged_model_tags(model_id, {MODEL_VERSIONS_TAG: json.dumps(versions)})
        client.set_registered_model_alias(model_name, STAGING_ALIAS, version.version)  # the candidate under review
        return RegisterPart(model_name=model_name, version=str(version.version),
                            timestamp_version=timestamp_version, model_uri=f"models:/{model_name}/{version.version}")

    def _model_dir(self, model: RegisterPart) -> Path:
        """The logged model's transformers folder, read in place from the local artifact store."""
        mlflow = _mlflow()
        uri = mlflow.MlflowClient().get_model_version_download_uri(model.model_name, model.version)
        folder = _file_uri_to_path(uri) / "artifacts" / "model"
        if not (folder / "config.json").is_file():
            raise BackendError(f"{model.model_uri}: no model folder at {folder}")
        return folder

    # -- endpoints --------------------------------------------------------------------------
    def prepare_deploy(self, experiment: Experiment) -> None:
        """A warm standby (the server process with its imports done), started now so that the
        fine-tune's own imports and the standby's run on different cores and the deploy claims it:
        ready in about 1.5 s instead of 5-7 (bench/RESULTS.md, issue 23). It takes no CPU while it
        waits, and a deploy without it starts cold as before. One this run started and its deploy did
        not claim (the fine-tune failed) is stopped when the process exits."""
        from automation.serving import process

        # The deploy's server starts with this environment, not with what the fine-tune's imports
        # add to it (sklearn sets KMP_DUPLICATE_LIB_OK): the same for the standby and a cold start.
        self._deploy_environment = dict(os.environ)
        existing = process.get_standby()
        try:
            standby = process.start_standby(replenish=False)
        except OSError as err:
            log.warning("could not start a warm standby for the deploy (%s); it will start cold", err)
            return
        if existing is None or not existing.alive:  # ours, not a person's `automation endpoints warm`
            atexit.register(_stop_unclaimed_standby, standby.standby_id)

    def deploy(self, experiment: Experiment, model: RegisterPart, *, endpoint_name: str,
               tags: dict[str, str]) -> DeployPart:
        from automation.serving import process

        d = experiment.deployment
        record = process.start_endpoint(
            endpoint_name, self._model_dir(model),
            tags={**tags, "model": model.model_name, "model_version": model.version},
            max_new_tokens_cap=d.max_new_tokens_cap, request_timeout_ms=d.request_timeout_ms,
            device=experiment.compute.device, precision=experiment.compute.precision,
            environment=self._deploy_environment,
        )
        return DeployPart(endpoint_name=record.name, deployment_name="default", url=record.url,
                          stage=tags.get("stage", "staging"))

    def invoke(self, endpoint_name: str, request: dict[str, Any], *, deployment: str | None = None) -> dict[str, Any]:
        from automation.serving import process

        record = process.get_endpoint(endpoint_name)
        if record is None:  # a production endpoint: the deployment asked for, else the one with the traffic
            deployment = deployment if deployment not in (None, "default") else _read_traffic(endpoint_name).get(
                "deployment")
            record = process.get_endpoint(_process(endpoint_name, deployment)) if deployment else None
        if record is None:
            raise BackendError(f"no local endpoint named {endpoint_name}; deploy first")
        return process.invoke(record, request)

    def list_endpoints(self, match_tags: dict[str, str] | None = None) -> list[EndpointInfo]:
        from automation.serving import process

        return [EndpointInfo(name=r.name, url=r.url, tags=dict(r.tags), created_at=r.created_at,
                             alive=r.alive, deployments=["default"])
                for r in process.list_endpoints(match_tags)]

    def delete_endpoint(self, name: str) -> bool:
        from automation.serving import process

        return process.stop_endpoint(name)

    # -- promotion --------------------------------------------------------------------------
    # The production endpoint is a name with deployments: one server process each
    # (`<endpoint>-v<version>`), and `<home>/endpoints/traffic/<endpoint>.json` saying which takes
    # the traffic and which served before it (kept for a rollback).
    def stage_candidate(self, experiment: Experiment, model: RegisterPart, *, endpoint_name: str,
                        tags: dict[str, str]) -> Candidate:
        from automation.serving import process

        deployment = f"v{model.version}"
        name = _process(endpoint_name, deployment)
        record = process.get_endpoint(name)
        if record is None or not record.alive:
            d = experiment.deployment
            record = process.start_endpoint(
                name, self._model_dir(model),
                tags={**tags, "production_endpoint": endpoint_name, "deployment": deployment,
                      "model": model.model_name, "model_version": model.version},
                max_new_tokens_cap=d.max_new_tokens_cap, request_timeout_ms=d.request_timeout_ms,
                device=experiment.compute.device, precision=experiment.compute.precision,
            )
        candidate = Candidate(endpoint_name, deployment, model.model_uri, self.serving_model(endpoint_name))
        try:
            reply = process.invoke(record, SMOKE_REQUEST)
            if not isinstance(reply.get("output"), str):
                raise BackendError(f"smoke score of {name} returned {reply!r}")
        except BackendError:
            self.remove_candidate(candidate)
            raise
        return candidate

    def shift_traffic(self, experiment: Experiment, candidate: Candidate, model: RegisterPart, *,
                      tags: dict[str, str]) -> PromotePart:
        from automation.serving import process

        endpoint = candidate.endpoint_name
        live = candidate.live
        previous = live.deployment_name if live and live.deployment_name != candidate.deployment_name else None
        _write_traffic(endpoint, candidate.deployment_name, previous)
        client = _mlflow().MlflowClient()
        client.set_registered_model_alias(model.model_name, PRODUCTION_ALIAS, model.version)
        for key in ("promotion_policy", "promotion_override"):
            if key in tags:
                client.set_model_version_tag(model.model_name, model.version, key, tags[key])
        keep = {_process(endpoint, candidate.deployment_name)} | ({_process(endpoint, previous)} if previous else set())
        for record in process.list_endpoints({"production_endpoint": endpoint}):
            if record.name not in keep:
                process.stop_endpoint(record.name)
        record = process.get_endpoint(_process(endpoint, candidate.deployment_name))
        return PromotePart(endpoint_name=endpoint, deployment_name=candidate.deployment_name,
                           url=record.url if record else "", model_version=model.version,
                           previous_deployment=previous)

    def remove_candidate(self, candidate: Candidate) -> None:
        from automation.serving import process

        live = candidate.live
        if live is None or live.deployment_name != candidate.deployment_name:  # never what takes the traffic
            process.stop_endpoint(_process(candidate.endpoint_name, candidate.deployment_name))

    def rollback(self, endpoint_name: str) -> PromotePart:
        from automation.serving import process

        traffic = _read_traffic(endpoint_name)
        previous = traffic.get("previous")
        record = process.get_endpoint(_process(endpoint_name, previous)) if previous else None
        if record is None or not record.alive:
            raise ConfigError(f"{endpoint_name}: no previous deployment is kept to roll back to "
                              f"({'none recorded' if not previous else previous + ' is not running'})")
        current = traffic.get("deployment")
        _write_traffic(endpoint_name, previous, current)
        model_name, version = record.tags.get("model"), record.tags.get("model_version")
        if model_name and version:
            _mlflow().MlflowClient().set_registered_model_alias(model_name, PRODUCTION_ALIAS, version)
        return PromotePart(endpoint_name=endpoint_name, deployment_name=previous, url=record.url,
                           model_version=version or "", previous_deployment=current)

    def serving_model(self, endpoint_name: str) -> ServingModel | None:
        from automation.serving import process

        deployment = _read_traffic(endpoint_name).get("deployment")
        record = process.get_endpoint(_process(endpoint_name, deployment)) if deployment else None
        if record is None or not record.alive:
            return None
        name, version = record.tags.get("model", ""), record.tags.get("model_version", "")
        return ServingModel(endpoint_name, deployment, name, version, f"models:/{name}/{version}")


def _process(endpoint: str, deployment: str) -> str:
    """The server process of a production endpoint's deployment."""
    return f"{endpoint}-{deployment}"


def _traffic_file(endpoint: str) -> Path:
    return home() / "endpoints" / "traffic" / f"{endpoint}.json"  # beside the records, not among them


def _read_traffic(endpoint: str) -> dict[str, Any]:
    try:
        data = json.loads(_traffic_file(endpoint).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_traffic(endpoint: str, deployment: str, previous: str | None) -> None:
    write_text_atomic(_traffic_file(endpoint), json.dumps({"deployment": deployment, "traffic": 100,
                                                           "previous": previous}))


def _total_ram_gib() -> float | None:
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    return pages * size / 2**30


def _present(tags: dict[str, str]) -> dict[str, str]:
    """Tags with a value: at a desk there is no PR, and an empty `pr` tag only says nothing."""
    return {k: v for k, v in tags.items() if v not in ("", None)}


def _log_evaluation_table(mlflow, evaluation) -> None:
    """The held-out evaluation as an MLflow table (the run's Evaluations/artifact view shows it as a
    grid): one row per prompt with its reference, each model's reply and ROUGE-L."""
    if evaluation is None or not evaluation.prompts:
        return
    table: dict[str, list] = {
        "prompt": [p.messages[-1]["content"] if p.messages else "" for p in evaluation.prompts],
        "reference": [p.reference or "" for p in evaluation.prompts],
    }
    for label, result in evaluation.models.items():
        table[f"{label}_reply"] = list(result.replies)
        table[f"{label}_rouge_l"] = list(result.rouge_l_each)
    mlflow.log_table(data=table, artifact_file="evaluation/replies.json")


def _log_chat_model(mlflow, model_dir: Path, name: str = "model"):
    """Log the trained folder as an MLflow pyfunc model (see chat_pyfunc.py), named after the experiment."""
    from automation.backends.local import chat_pyfunc

    log.info("logging the model to MLflow (%s)", model_dir)
    with warnings.catch_warnings():
        # The signature is given, so MLflow's advice to add an input example (to infer one, by running
        # the model once more) does not apply.
        warnings.filterwarnings("ignore", message=".*input example was not provided")
        return mlflow.pyfunc.log_model(
            name=name, python_model=chat_pyfunc.__file__, artifacts={"model": str(model_dir)},
            conda_env=model_environment(), signature=chat_pyfunc.signature(),
        )


MODEL_PACKAGES = ("mlflow", "torch", "transformers")


def model_environment() -> dict[str, Any]:
    """The logged model's environment, pinned to the versions that trained it (without a local
    version label such as `+cpu`, which PyPI does not serve).

    Given whole, because from `pip_requirements` MLflow writes conda.yaml itself and pins `pip` to
    the installed pip's version (mlflow/utils/environment.py `_mlflow_conda_env`): the uv-made venv
    has no pip, so it warned "Failed to resolve installed pip version" and wrote `pip` unpinned.
    Here `pip` is unpinned on purpose (the model needs none of its features), and nothing is
    looked up."""
    import platform
    from importlib.metadata import version

    return {"name": "mlflow-env", "channels": ["conda-forge"],
            "dependencies": [f"python={platform.python_version()}", "pip",
                             {"pip": [f"{name}=={version(name).split('+')[0]}" for name in MODEL_PACKAGES]}]}


def _run_description(experiment: Experiment, job_name: str, evaluation=None) -> str:
    """The run page's description (MLflow's `mlflow.note.content` tag, markdown): what the run is,
    and, once it ran, what was evaluated; nothing that did not happen."""
    t, o = experiment.training, experiment.optimization
    lora = f"LoRA r={o.lora_r} alpha={o.lora_alpha}" if o.apply_lora else "full fine-tune"
    steps = f"{t.max_steps} steps" if t.max_steps > 0 else f"{t.num_train_epochs} epoch(s)"
    text = (f"{experiment.description or experiment.name}\n\n"
            f"Fine-tune of {experiment.model.name} on {experiment.data.dataset} "
            f"({experiment.data.sample_percent:g} % of each split): {lora}, {steps}, learning rate {t.learning_rate:g}. "
            f"Job `{job_name}`.")
    if evaluation is None:
        return text + " Evaluation: running."
    models = {"base": "base", "candidate": "fine-tuned", "production": f"production v{evaluation.production_version}"}
    who = ", ".join(models[k] for k in ("base", "candidate", "production") if k in evaluation.models)
    parts = [f"eval loss on `{evaluation.test_split}`"] if any(
        m.eval_loss is not None for m in evaluation.models.values()) else []
    if evaluation.prompts:
        parts.append(f"{len(evaluation.prompts)} held-out prompts of `{evaluation.prompt_split}`")
    if not parts:
        return text + " Evaluation: none (no test split and no held-out prompts)."
    return (text + f" Evaluation of the {who} models: {' and '.join(parts)} "
            "(the table evaluation/replies.json, all figures in evaluation/evaluation.json).")


def _log_datasets(mlflow, experiment: Experiment, data_dir: Path, files: dict[str, Path]) -> None:
    """Each split the run reads as an MLflow run input, with the data manifest's digest of the file."""
    from mlflow.data.dataset_source_registry import get_registered_sources
    from mlflow.data.meta_dataset import MetaDataset

    from automation.data import file_sha256

    # The local file source class (MLflow registers it once per artifact repository scheme).
    local = next(s for s in get_registered_sources() if s._get_source_type() == "local")

    try:
        splits = json.loads((data_dir / "manifest.json").read_text()).get("splits", {})
    except (OSError, ValueError):
        splits = {}
    for context, file in files.items():
        digest = (splits.get(file.stem) or {}).get("sha256") or file_sha256(file)
        dataset = MetaDataset(local(file.resolve().as_uri()),
                              name=f"{experiment.data.dataset}:{file.stem}", digest=digest[:36])
        mlflow.log_input(dataset, context=context, tags={"split": file.stem, "sha256": digest})


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt")


def copy_tracking_store(folder: Path, *, with_weights: bool = False) -> None:
    """A consistent copy of the MLflow store (SQLite online backup) and its artifacts in `folder`, with
    every artifact location rewritten relative to it (`mlartifacts/...`): `mlflow ui` started in the
    folder shows the runs, models and their files wherever the folder was downloaded to. Model weights
    are left out unless asked (the logged model's MLmodel, config and tokenizer stay)."""
    import shutil
    import sqlite3
    from contextlib import closing

    db = home() / "mlflow.db"
    if not db.is_file():
        return
    copy = folder / "mlflow.db"
    with closing(sqlite3.connect(db)) as source, closing(sqlite3.connect(copy)) as target:
        source.backup(target)
    artifacts = home() / "mlartifacts"
    prefixes = [artifacts.as_uri(), f"file://{artifacts}", str(artifacts)]
    with closing(sqlite3.connect(copy)) as conn, conn:  # closed, after one committed transaction
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            columns = [r[1] for r in conn.execute(f'PRAGMA table_info("{table}")')
                       if any(t in (r[2] or "").upper() for t in ("CHAR", "TEXT"))]
            for column in columns:
                for prefix in prefixes:
                    conn.execute(f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) '
                                 f'WHERE "{column}" LIKE ?', (prefix, "mlartifacts", prefix + "%"))
    if artifacts.is_dir():
        skip = () if with_weights else WEIGHT_SUFFIXES
        shutil.copytree(artifacts, folder / "mlartifacts",
                        ignore=lambda _dir, names: [n for n in names if n.endswith(skip)] if skip else [])
