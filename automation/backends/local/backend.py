"""The local backend: trains with TRL + PEFT, tracks and registers in MLflow (SQLite), serves over HTTP.

Everything lives in the workspace (`.automation/` or `$AUTOMATION_HOME`):

    mlflow.db        MLflow tracking and model registry (SQLite)
    mlartifacts/     MLflow artifacts (the logged models)
    models/          base models converted from GGUF, once
    jobs/<job>/      checkpoints, the trained model, result.json
    endpoints/       one record, key (0600) and log per endpoint process
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from automation.backends.base import (
    JOB_COMPLETED,
    JOB_FAILED,
    JOB_RUNNING,
    Backend,
    EndpointInfo,
    JobInfo,
    Progress,
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
        if client.get_experiment_by_name(experiment_name) is None:
            client.create_experiment(experiment_name, artifact_location=(home() / "mlartifacts").as_uri())
        mlflow.set_experiment(experiment_name)
    return mlflow


def _file_uri_to_path(uri: str) -> Path:
    parsed = urlparse(uri)
    if parsed.scheme not in ("", "file"):
        raise BackendError(f"expected a local artifact location, got {uri}")
    return Path(unquote(parsed.path))


def _flatten(prefix: str, data: dict[str, Any]) -> dict[str, Any]:
    return {f"{prefix}.{k}": v for k, v in data.items()}


class LocalBackend(Backend):
    name = "local"
    endpoints_outlive_job = False

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
        with mlflow.start_run(run_id=run_id, run_name=job_name, tags={**tags, "job_name": job_name}) as run:
            if run_id is None:
                mlflow.log_params(_flatten("training", experiment.training.model_dump()))
                mlflow.log_params(_flatten("optimization", experiment.optimization.model_dump()))
                mlflow.log_params({"model.name": experiment.model.name, "data.dataset": experiment.data.dataset,
                                   "data.sample_percent": experiment.data.sample_percent})
            result = train(experiment, base_model=base_model,
                           train_file=data_dir / f"{experiment.data.train_split}.jsonl",
                           test_file=data_dir / f"{experiment.data.test_split}.jsonl", job_dir=job_dir)
            model_info = _log_chat_model(mlflow, result.model_dir)
            part = FinetunePart(
                job_name=job_name, run_id=run.info.run_id, model_uri=model_info.model_uri,
                output_dir=str(result.model_dir), base_eval_loss=result.base_eval_loss, eval_loss=result.eval_loss,
                train_loss=result.train_loss,
                train_loss_curve=[LossPoint(step=s, loss=v) for s, v in result.loss_curve],
                train_tokens=result.train_tokens, tokens_per_second=result.tokens_per_second,
                wall_seconds=result.wall_seconds, resumed_from=result.resumed_from, params=result.params,
            )
        write_text_atomic(job_dir / "result.json", part.model_dump_json(indent=2))
        return job_name

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
        clauses = [f"tags.`{k}` = '{v}'" for k, v in (match_tags or {}).items() if "'" not in v + k]
        found = [self._job_info(r) for r in self._runs(" and ".join(clauses))]
        return [j for j in found if all(j.tags.get(k) == v for k, v in (match_tags or {}).items())]

    def cancel_job(self, job_name: str) -> bool:
        return False  # nothing runs here outside the process that trains it

    def job_progress(self, job_name: str) -> Progress:
        runs = self._runs(f"tags.job_name = '{job_name}'")
        if not runs:
            return Progress()
        history = _mlflow().MlflowClient().get_metric_history(runs[0].info.run_id, "loss")
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
        version_tags = {**tags, "timestamp_version": timestamp_version, "job_name": finetune.job_name}
        version = client.create_model_version(
            name=model_name, source=finetune.model_uri, run_id=finetune.run_id, tags=version_tags,
            description=(f"{experiment.model.name} fine tuned on {experiment.data.dataset}; "
                         f"timestamp version {timestamp_version}; job {finetune.job_name}"),
        )
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
    def deploy(self, experiment: Experiment, model: RegisterPart, *, endpoint_name: str,
               tags: dict[str, str]) -> DeployPart:
        from automation.serving import process

        d = experiment.deployment
        record = process.start_endpoint(
            endpoint_name, self._model_dir(model),
            tags={**tags, "model": model.model_name, "model_version": model.version},
            max_new_tokens_cap=d.max_new_tokens_cap, request_timeout_ms=d.request_timeout_ms,
            device=experiment.compute.device,
        )
        return DeployPart(endpoint_name=record.name, deployment_name="default", url=record.url,
                          stage=tags.get("stage", "staging"))

    def invoke(self, endpoint_name: str, request: dict[str, Any], *, deployment: str | None = None) -> dict[str, Any]:
        from automation.serving import process

        record = process.get_endpoint(endpoint_name)
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
    def promote(self, experiment: Experiment, model: RegisterPart, *, endpoint_name: str,
                tags: dict[str, str]) -> PromotePart:
        """Alias `production` on the version; the production endpoint moved blue/green: the new
        deployment is started and smoke-scored before the old one stops."""
        from automation.serving import process

        mlflow = _mlflow()
        mlflow.MlflowClient().set_registered_model_alias(model.model_name, PRODUCTION_ALIAS, model.version)
        deployment = f"v{model.version}"
        new_name = f"{endpoint_name}-{deployment}"
        old = [r for r in process.list_endpoints({"production_endpoint": endpoint_name}) if r.name != new_name]
        d = experiment.deployment
        record = process.start_endpoint(
            new_name, self._model_dir(model),
            tags={**tags, "production_endpoint": endpoint_name, "deployment": deployment,
                  "model": model.model_name, "model_version": model.version},
            max_new_tokens_cap=d.max_new_tokens_cap, request_timeout_ms=d.request_timeout_ms,
            device=experiment.compute.device,
        )
        smoke = {"input_data": {"input_string": [{"role": "user", "content": "Say hello."}],
                                "parameters": {"max_new_tokens": 8, "do_sample": False}}, "params": {}}
        try:
            reply = process.invoke(record, smoke)
            if not isinstance(reply.get("output"), str):
                raise BackendError(f"smoke score of {new_name} returned {reply!r}")
        except BackendError:
            process.stop_endpoint(new_name)
            raise
        _write_traffic(endpoint_name, new_name)
        for previous in old:
            process.stop_endpoint(previous.name)
        return PromotePart(endpoint_name=endpoint_name, deployment_name=deployment, url=record.url,
                           model_version=model.version,
                           previous_deployment=old[0].tags.get("deployment") if old else None)


def _write_traffic(endpoint: str, deployment_endpoint: str) -> None:
    write_text_atomic(home() / "endpoints" / f"{endpoint}.traffic.json",
                      json.dumps({"deployment_endpoint": deployment_endpoint, "traffic": 100}))


def _total_ram_gib() -> float | None:
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    return pages * size / 2**30


def _log_chat_model(mlflow, model_dir: Path):
    """Log the trained folder as an MLflow pyfunc model (see chat_pyfunc.py)."""
    from automation.backends.local import chat_pyfunc

    return mlflow.pyfunc.log_model(
        name="model", python_model=chat_pyfunc.__file__, artifacts={"model": str(model_dir)},
        pip_requirements=["torch", "transformers", "mlflow"],
    )
