"""The Azure ML backend: validate, fine-tune, register, deploy, score, tear down, promote.

Clients are created on first use (DefaultAzureCredential; see connection.py) or injected, which is
how the tests pass an in-memory fake of MLClient. Every cloud call goes through `retry.call`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

from automation.backends.azure import compute, endpoints, jobs, pipeline, retry
from automation.backends.base import (
    IN_FLIGHT,
    JOB_FAILED,
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
from automation.spec import Experiment, run_display_name

log = logging.getLogger(__name__)

PRODUCTION_REGISTRY_VARIABLE = "AZURE_ML_REGISTRY"  # a variable of the production environment
LEGACY_REGISTRY_VARIABLE = "AZURE_ML_PRODUCTION_REGISTRY"
COMPONENT_VERSION_VARIABLE = "AZURE_ML_COMPONENT_VERSION"
MAX_WAIT_S = 72 * 3600.0  # the longest `wait_finetune` waits for a job (the reconcile loop never waits)


LOSS_CURVE = "loss_curve"  # key of the metrics dict holding [(step, loss), ...] of the training loss


MLFLOW_READ_DEADLINE_S = 120.0  # one whole metrics read, whatever MLflow or a credential does


def mlflow_metrics(tracking_uri: str, job_name: str, *, credential=None, timeout_s: float = MLFLOW_READ_DEADLINE_S,
                   host_url: str | None = None) -> dict[str, Any]:
    """Latest metrics of every run of the pipeline job (its child steps), read through MLflow,
    plus the training loss history under `LOSS_CURVE`, so the report draws the same curve as
    for the local backend.

    A workspace (`azureml://`) is read with `credential` (default: the project's, credentials.py),
    never with azureml-mlflow's own chain (connection.use_credential_for_mlflow), and the read is
    given `timeout_s` in all: past it, BackendError, and the read is left behind in a daemon thread."""
    import threading

    if tracking_uri.startswith("azureml:"):
        from automation.backends.azure import connection

        reader = connection.workspace_mlflow_store(tracking_uri, credential or connection.credential(),
                                                   host_url=host_url)
    else:  # a local store (tests, a self-hosted MLflow)
        import mlflow

        reader = mlflow.MlflowClient(tracking_uri)
    outcome: dict[str, Any] = {}

    def read() -> None:
        try:
            outcome["metrics"] = _read_mlflow_metrics(reader, job_name)
        except BaseException as err:  # handed to the caller's thread
            outcome["error"] = err

    thread = threading.Thread(target=read, name=f"mlflow-metrics-{job_name}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise BackendError(f"reading the metrics of {job_name} through MLflow took more than {timeout_s:.0f} s; "
                           "gave up")
    if "error" in outcome:
        err = outcome["error"]
        raise BackendError(f"reading the metrics of {job_name} through MLflow failed: "
                           f"{retry.one_sentence(err)}") from err
    return outcome["metrics"]


def _pages(fetch: Callable[[str | None], Any]) -> list[Any]:
    found, token = [], None
    while True:
        page = fetch(token)
        found.extend(page)
        token = getattr(page, "token", None)
        if not token:
            return found


def _read_mlflow_metrics(reader, job_name: str) -> dict[str, Any]:
    """`reader`: a tracking store or an MlflowClient (the same search methods)."""
    from mlflow.entities import ViewType

    experiments = _pages(lambda token: reader.search_experiments(
        view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token))
    runs = _pages(lambda token: reader.search_runs(
        [e.experiment_id for e in experiments], f"tags.mlflow.rootRunId = '{job_name}'", ViewType.ACTIVE_ONLY,
        max_results=1000, page_token=token)) if experiments else []
    merged: dict[str, Any] = {}
    for run in runs:
        merged.update(run.data.metrics)
        for key in ("loss", "train_loss"):
            if key in run.data.metrics and LOSS_CURVE not in merged:
                history = reader.get_metric_history(run.info.run_id, key)
                merged[LOSS_CURVE] = sorted((int(m.step), float(m.value)) for m in history)
    return merged


class AzureBackend(Backend):
    name = "azure"
    # chat_completion_pipeline 0.0.82 comments its model evaluation steps out (pipeline.py): the
    # held-out evaluation asks the staging and production endpoints instead (stages.stage_evaluate).
    evaluates_in_finetune = False

    def __init__(self, workspace_client=None, registry_client=None, *,
                 metrics_reader: Callable[[str, str], dict[str, Any]] | None = None,
                 sleep: Callable[[float], None] = time.sleep, poll_s: float = 30,
                 component_version: str | None = None, production_registry: str | None = None,
                 registry_clients: dict[str, Any] | None = None, today: Callable[[], date] = compute.today_utc,
                 clock: Callable[[], float] = time.monotonic, max_wait_s: float = MAX_WAIT_S,
                 source_client=None):
        self._workspace = workspace_client
        self._clock = clock
        self._max_wait_s = max_wait_s
        self._today = today
        self._registry = registry_client
        self._registries: dict[str, Any] = dict(registry_clients or {})
        self._stuck: dict[str, JobInfo] = {}
        self._ended: dict[str, Any] = {}  # jobs read in a terminal state
        self._tracking_uri: str | None = None
        self._validations: dict[str, tuple[compute.ComputeCheck, Any, list[str], Experiment]] = {}
        self._metrics_reader = metrics_reader or self._workspace_metrics
        self._sleep = sleep
        self._poll_s = poll_s
        self.component_version = component_version or os.environ.get(COMPONENT_VERSION_VARIABLE) or None
        self.production_registry = (production_registry or os.environ.get(PRODUCTION_REGISTRY_VARIABLE)
                                    or os.environ.get(LEGACY_REGISTRY_VARIABLE) or None)
        self._source = source_client

    # -- clients ----------------------------------------------------------------------------
    @property
    def workspace(self):
        if self._workspace is None:
            from automation.backends.azure.connection import workspace_client

            self._workspace = workspace_client()
        return self._workspace

    @property
    def source(self):
        """The workspace where candidates are trained and registered: this one, or, in the production
        job, the staging workspace (AZURE_STAGING_ML_WORKSPACE), read to share a version into the
        registry. The production identity reads there; it never writes."""
        if self._source is None:
            from automation.backends.azure.connection import staging_settings, workspace_client

            staging = staging_settings()
            self._source = workspace_client(staging) if staging is not None else self.workspace
        return self._source

    def registry(self, name: str | None = None):
        from automation.backends.azure.connection import DEFAULT_REGISTRY, registry_client

        key = name or DEFAULT_REGISTRY
        if key in self._registries:
            return self._registries[key]
        if self._registry is not None:
            return self._registry
        if key not in self._registries:
            self._registries[key] = registry_client(key)
        return self._registries[key]

    def _workspace_metrics(self, tracking_uri: str, job_name: str) -> dict[str, Any]:
        """MLflow read with the MLClient's own credential (MLClient keeps it as `_credential`)."""
        return mlflow_metrics(tracking_uri, job_name, credential=getattr(self.source, "_credential", None))

    def _call(self, what: str, fn: Callable[[], Any], **options: Any) -> Any:
        """retry.call with this backend's sleep; `begin=True` for a `begin_*`, `passthrough` for the
        errors the caller reads itself (by default "not found")."""
        return retry.call(what, fn, sleep=self._sleep, **options)

    # -- validate ---------------------------------------------------------------------------
    def _validated(self, experiment: Experiment) -> tuple[compute.ComputeCheck, Any, list[str], Experiment]:
        """compute.validate once per experiment and process: `validate` and the submit that follows it
        in one run share its reads (model, lifecycle metadata, cluster, VM sizes) and its warnings."""
        key = experiment.model_dump_json()
        if key not in self._validations:
            self._validations[key] = compute.validate(self.workspace, self.registry(experiment.model.registry),
                                                      experiment, self._call, today=self._today())
        return self._validations[key]

    def validate_compute(self, experiment: Experiment) -> list[str]:
        return self._validated(experiment)[2]

    # -- fine-tune --------------------------------------------------------------------------
    def _existing_job(self, job_name: str):
        from azure.core.exceptions import ResourceNotFoundError

        if job_name in self._ended:  # an ended job never changes: one read per process
            return self._ended[job_name]
        try:
            job = self._call(f"reading job {job_name}", lambda: self.source.jobs.get(job_name))
        except ResourceNotFoundError:  # jobs.get: "Raised if no job with the given name can be found"
            return None
        if jobs.is_terminal(getattr(job, "status", None)):
            self._ended[job_name] = job
        return job

    def component_version_for(self, experiment: Experiment) -> str | None:
        """The experiment's pin (training.component_version), else $AZURE_ML_COMPONENT_VERSION, else latest."""
        return experiment.training.component_version or self.component_version

    def component(self, registry_name: str | None, version: str | None = None):
        from azure.ai.ml.exceptions import MlException
        from azure.core.exceptions import ResourceNotFoundError

        reg = self.registry(registry_name)
        version = version or self.component_version
        try:
            if version:
                return self._call(f"reading component {pipeline.COMPONENT_NAME}:{version}",
                                  lambda: reg.components.get(name=pipeline.COMPONENT_NAME, version=version))
            return self._call(f"reading component {pipeline.COMPONENT_NAME}",
                              lambda: reg.components.get(name=pipeline.COMPONENT_NAME, label="latest"))
        except (ResourceNotFoundError, MlException) as err:
            if not retry.is_not_found(err):  # by version: ResourceNotFoundError; latest: ValidationException
                raise
            raise ConfigError(f"component {pipeline.COMPONENT_NAME} ({version or 'latest'}) not found in "
                              f"registry {registry_name or 'azureml'}") from None

    def build_job(self, experiment: Experiment, data: DataPart, *, job_name: str, tags: dict[str, str]):
        """The pipeline job this experiment submits (after the workspace checks)."""
        check, model, _, merged = self._validated(experiment)
        for path in pipeline.data_files(merged, data.out_dir).values():
            if not path.is_file():
                raise ConfigError(f"data file {path} is missing; run `automation data` first")
        return pipeline.build_pipeline_job(
            self.component(experiment.model.registry, self.component_version_for(experiment)), merged,
            model_id=model.id,
            gpus_per_node=check.gpus_per_node, data_dir=data.out_dir, job_name=job_name,
            display_name=run_display_name(merged, check.gpus_per_node), tags=tags)

    def submit_finetune(self, experiment: Experiment, data: DataPart, *, job_name: str,
                        tags: dict[str, str]) -> str:
        from azure.core.exceptions import AzureError

        if self._existing_job(job_name) is not None:
            log.info("fine-tune job %s exists; reusing it", job_name)
            return job_name
        job = self.build_job(experiment, data, job_name=job_name, tags=tags)
        try:
            created = self._call(f"submitting job {job_name}", lambda: self.workspace.jobs.create_or_update(
                job, experiment_name=experiment.name), passthrough=retry.is_already_exists)
        except AzureError as err:
            # another run submitted it between our get and create: the service refuses the name (400)
            if retry.is_already_exists(err) and self._existing_job(job_name) is not None:
                return job_name
            raise BackendError(f"submitting job {job_name} failed: {retry.one_sentence(err)}") from err
        log.info("submitted %s: %s", created.name, getattr(created, "studio_url", None) or "")
        return created.name

    def wait_finetune(self, experiment: Experiment, job_name: str, *, stream: bool = True) -> FinetunePart:
        job = self._existing_job(job_name)
        if job is None:
            raise BackendError(f"fine-tune job {job_name} does not exist; run `automation finetune`")
        error = getattr(job, "error", None)
        if not jobs.is_terminal(job.status):
            started = self._clock()
            if stream and jobs.stall_deadline_s(job.status) is None:
                error = self._stream(job_name) or error
            job = self._poll_until_done(job_name, started)
        status = jobs.state_text(job.status, "unknown")
        if status.lower() != "completed":
            detail = error or "no error detail in the job"
            raise BackendError(f"fine-tune job {job_name} ended {status}: {detail}; "
                               f"see {job.studio_url or 'the Azure ML studio'}")
        part = FinetunePart(job_name=job_name, status="completed", run_id=job_name,
                            model_uri=pipeline.trained_model_path(job_name), studio_url=job.studio_url,
                            params=pipeline.parameter_inputs(experiment))
        try:
            found = self.metrics(part)
        except Exception as err:  # metrics are a report detail, not a reason to fail the stage
            log.warning("could not read the metrics of %s: %s", job_name, err)
            found = {}
        curve = [LossPoint(step=step, loss=loss) for step, loss in found.get(LOSS_CURVE) or []]
        return part.model_copy(update={"eval_loss": found.get("eval_loss"), "train_loss": found.get("train_loss"),
                                       "train_loss_curve": curve})

    def _stream(self, job_name: str) -> str | None:
        """`jobs.stream` (the job's logs until it ends, NotResponding or Paused), in a daemon thread
        given at most `max_wait_s`; the job's error when the SDK raised one (JobException)."""
        import threading

        outcome: dict[str, BaseException] = {}

        def follow() -> None:
            try:
                self.source.jobs.stream(job_name)
            except Exception as err:
                outcome["error"] = err

        thread = threading.Thread(target=follow, name=f"stream-{job_name}", daemon=True)
        thread.start()
        thread.join(self._max_wait_s)
        if thread.is_alive():
            log.warning("stopped following the logs of %s after %.0f h", job_name, self._max_wait_s / 3600)
            return None
        err = outcome.get("error")
        return " ".join(str(err).split())[:500] if err is not None else None

    def _poll_until_done(self, job_name: str, started: float | None = None):
        """The job once it has ended; BackendError when it stays NotResponding or Paused past its
        deadline (jobs.STALL_DEADLINES_S) or has not ended `max_wait_s` after `started`."""
        started = self._clock() if started is None else started
        status_key, since = None, started
        while True:
            job = self._call(f"reading job {job_name}", lambda: self.source.jobs.get(job_name))
            status = jobs.state_text(job.status, "Unknown")
            if jobs.is_terminal(status):
                return job
            now = self._clock()
            if status.lower() != status_key:
                status_key, since = status.lower(), now
            deadline = jobs.stall_deadline_s(status)
            stuck = jobs.stuck_for(job)  # across ticks: from the job's own last-modified time
            if deadline is not None and (now - since >= deadline or stuck is not None):
                raise BackendError(jobs.stuck_message(job_name, status, max(now - since, stuck or 0),
                                                      job.studio_url))
            if now - started >= self._max_wait_s:
                raise BackendError(f"fine-tune job {job_name} is still {status} after waiting "
                                   f"{self._max_wait_s / 3600:g} h; it goes on in Azure ML: let the reconcile "
                                   f"loop follow it, or cancel it; see {job.studio_url or 'the Azure ML studio'}")
            note = jobs.job_state(status).note
            log.info("job %s is %s%s", job_name, status, f" ({note})" if note else "")
            self._sleep(self._poll_s)

    # -- jobs, observed without waiting (the reconcile loop) ---------------------------------
    def get_job(self, job_name: str) -> JobInfo | None:
        from automation.backends.azure.jobs import job_info

        job = self._existing_job(job_name)
        if job is None:
            return None
        return self._observed(job_info(job))

    def _observed(self, info: JobInfo) -> JobInfo:
        """A job found stuck past its state's deadline (jobs.stuck_for: measured from the job's own
        systemData.lastModifiedAt, so any tick sees it) is cancelled, once, and reported failed for
        the rest of this process (its status reads CancelRequested next). The production job only
        reads the staging workspace: it reports, never cancels."""
        if info.name in self._stuck:
            return self._stuck[info.name]
        if info.state != JOB_FAILED or jobs.stall_deadline_s(info.backend_status) is None:
            return info
        log.warning("%s", info.error)
        self._stuck[info.name] = info
        if self.source is not self.workspace:
            return info
        try:
            self._call(f"cancelling stuck job {info.name}", lambda: self.workspace.jobs.begin_cancel(info.name),
                       begin=True, wait=False, passthrough=retry.is_not_found)
        except Exception as err:  # the report of the failure matters more than the cancel
            log.warning("could not cancel stuck job %s: %s", info.name, retry.one_sentence(err))
        return info

    def list_jobs(self, match_tags: dict[str, str] | None = None) -> list[JobInfo]:
        from automation.backends.azure.jobs import job_info

        # jobs.list() pages through the workspace's active (not archived) jobs; tags are matched here,
        # as for endpoints, since the service filters only on one tag at a time.
        found = self._call("listing jobs", lambda: [j for j in self.source.jobs.list() if j is not None])
        wanted = match_tags or {}
        # a job stuck past its deadline reads failed, and is cancelled (an older commit's too)
        return [self._observed(job_info(j)) for j in found
                if all((j.tags or {}).get(k) == v for k, v in wanted.items())]

    def cancel_job(self, job_name: str) -> bool:
        from azure.core.exceptions import ResourceNotFoundError

        job = self.get_job(job_name)
        if job is None or job.state not in IN_FLIGHT:
            return False
        try:
            # The poller ends when the service accepted the request (CancelRequested); the job
            # reaches Canceled later, on its own. Never wait for that here.
            self._call(f"cancelling job {job_name}", lambda: self.workspace.jobs.begin_cancel(job_name),
                       begin=True, wait=False, passthrough=retry.is_not_found)
        except ResourceNotFoundError:
            return False
        return True

    def job_progress(self, job_name: str) -> Progress:
        try:
            found = self._metrics_reader(self.tracking_uri(), job_name)
        except Exception as err:  # progress is a courtesy in the comment, never a reason to fail
            log.warning("could not read the progress of %s: %s", job_name, err)
            return Progress()
        curve = found.get(LOSS_CURVE) or []
        if curve:
            step, loss = curve[-1]
            return Progress(step=int(step), loss=float(loss))
        return Progress(loss=found.get("loss", found.get("train_loss")))

    def tracking_uri(self) -> str:
        """The workspace's MLflow tracking URI, read once per process (it never changes)."""
        if self._tracking_uri is None:
            ws = self.source  # where the jobs ran
            info = self._call("reading the workspace", lambda: ws.workspaces.get(ws.workspace_name))
            self._tracking_uri = info.mlflow_tracking_uri
        return self._tracking_uri

    def metrics(self, finetune: FinetunePart) -> dict[str, Any]:
        return dict(self._metrics_reader(self.tracking_uri(), finetune.job_name))

    # -- registry ---------------------------------------------------------------------------
    def _versions(self, model_name: str) -> list[Any]:
        from azure.core.exceptions import ResourceNotFoundError

        try:
            return list(self._call(f"listing model {model_name}", lambda: self.source.models.list(name=model_name)))
        except ResourceNotFoundError:
            return []

    def _registered_version(self, model_name: str, job_name: str) -> RegisterPart | None:
        for existing in self._versions(model_name):
            if (existing.tags or {}).get("job_name") == job_name:
                log.info("job %s is already registered as %s:%s", job_name, model_name, existing.version)
                return _register_part(model_name, str(existing.version),
                                      existing.tags.get("timestamp_version", str(existing.version)))
        return None

    def register(self, experiment: Experiment, finetune: FinetunePart, *, model_name: str,
                 timestamp_version: str, tags: dict[str, str]) -> RegisterPart:
        from azure.ai.ml.entities import Model
        from azure.ai.ml.exceptions import AssetPathException

        found = self._registered_version(model_name, finetune.job_name)
        if found is not None:
            return found
        if self.source is not self.workspace:
            raise ConfigError(f"job {finetune.job_name} has no registered version of {model_name} in the staging "
                              "workspace: the pull request's loop registers it; promotion never registers")
        model = Model(**registration_spec(experiment, finetune.job_name, model_name=model_name,
                                          version=timestamp_version, tags=tags))

        def taken(err: BaseException) -> bool:
            # the version exists with another path: the service's 400 "Asset paths cannot be updated"
            # (the SDK means to raise AssetPathException for it, but compares azure-core's formatted
            # message for equality and never does: found on the wire), or a 409 / "already exists"
            return (isinstance(err, AssetPathException) or retry.is_already_exists(err)
                    or "asset paths cannot be updated" in str(err).lower())

        try:
            created = self._call(f"registering {model_name}:{timestamp_version}",
                                 lambda: self.workspace.models.create_or_update(model), passthrough=taken)
        except Exception as err:
            if not taken(err):
                raise
            found = self._registered_version(model_name, finetune.job_name)  # registered in between
            if found is not None:
                return found
            raise BackendError(f"model {model_name} version {timestamp_version} exists for another job's "
                               f"output: {retry.one_sentence(err)}") from err
        return _register_part(model_name, str(created.version), timestamp_version)

    # -- endpoints --------------------------------------------------------------------------
    def _endpoint(self, name: str):
        from azure.core.exceptions import ResourceNotFoundError

        ops = self.workspace.online_endpoints
        try:
            return endpoints.wait_until_settled(
                lambda: self._call(f"reading endpoint {name}", lambda: ops.get(name=name)),
                f"endpoint {name}", sleep=self._sleep, poll_s=self._poll_s)
        except ResourceNotFoundError:
            return None

    def _ensure_endpoint(self, name: str, tags: dict[str, str]):
        endpoint = self._endpoint(name)
        if endpoint is None:
            entity = endpoints.build_endpoint(endpoints.endpoint_spec(name, tags))
            endpoint = self._call(f"creating endpoint {name}", lambda: self.workspace.online_endpoints.
                                  begin_create_or_update(entity), begin=True)
        return endpoint

    def _create_deployment(self, spec: dict[str, Any]):
        entity = endpoints.build_deployment(spec)
        self._endpoint(spec["endpoint_name"])  # never race an update of the endpoint
        return self._call(f"creating deployment {spec['name']} on {spec['endpoint_name']}",
                          lambda: self.workspace.online_deployments.begin_create_or_update(entity),
                          begin=True)

    def _set_traffic(self, name: str, traffic: dict[str, int]):
        endpoint = self._endpoint(name)
        endpoint.traffic = dict(traffic)
        return self._call(f"moving traffic of {name}",
                          lambda: self.workspace.online_endpoints.begin_create_or_update(endpoint),
                          begin=True)

    def deploy(self, experiment: Experiment, model: RegisterPart, *, endpoint_name: str,
               tags: dict[str, str]) -> DeployPart:
        from azure.core.exceptions import ResourceNotFoundError

        name = endpoints.STAGING_DEPLOYMENT
        endpoint = self._ensure_endpoint(endpoint_name, tags)
        try:
            current = self._call(f"reading deployment {name}", lambda: self.workspace.online_deployments.get(
                name=name, endpoint_name=endpoint_name))
        except ResourceNotFoundError:
            current = None
        serving = current is not None and _same_model(current.model, model.model_uri) \
            and (endpoint.traffic or {}).get(name) == 100
        if not serving:
            self._create_deployment(endpoints.deployment_spec(
                experiment, endpoint_name=endpoint_name, deployment_name=name, model_id=model.model_uri,
                tags={**tags, "model": model.model_name, "model_version": model.version}))
            endpoint = self._set_traffic(endpoint_name, {name: 100})
        return DeployPart(endpoint_name=endpoint_name, deployment_name=name, url=endpoint.scoring_uri or "",
                          stage=tags.get("stage", "staging"))

    def invoke(self, endpoint_name: str, request: dict[str, Any], *, deployment: str | None = None) -> dict[str, Any]:
        from azure.ai.ml.exceptions import ValidationException
        from azure.core.exceptions import ResourceNotFoundError

        with tempfile.TemporaryDirectory() as folder:
            request_file = Path(folder) / "sample_score.json"
            request_file.write_text(json.dumps(request), encoding="utf-8")
            try:
                raw = self._call(f"scoring {endpoint_name}", lambda: self.workspace.online_endpoints.invoke(
                    endpoint_name=endpoint_name, request_file=str(request_file), deployment_name=deployment))
            except ResourceNotFoundError:
                raise BackendError(f"no endpoint named {endpoint_name}; deploy first") from None
            except ValidationException as err:  # invoke checks deployment_name against the endpoint's list
                if not retry.is_not_found(err):
                    raise BackendError(f"scoring {endpoint_name} failed: {retry.one_sentence(err)}") from err
                raise BackendError(f"endpoint {endpoint_name} has no deployment {deployment}: "
                                   f"{retry.one_sentence(err)}") from None
        try:
            answer = json.loads(raw) if isinstance(raw, (str, bytes)) else raw
        except ValueError:
            raise BackendError(f"endpoint {endpoint_name} answered with non-JSON: {str(raw)[:200]!r}") from None
        if isinstance(answer, str):
            return {"output": answer}
        if isinstance(answer, list) and len(answer) == 1 and isinstance(answer[0], dict):
            return answer[0]
        if not isinstance(answer, dict):
            raise BackendError(f"endpoint {endpoint_name} answered {answer!r}; expected a JSON object")
        return answer

    def serving_model(self, endpoint_name: str) -> ServingModel | None:
        """The version behind the deployment with the most traffic (promote gives one all of it), read
        from the deployment's `model`/`model_version` tags that deploy and promote write, else from
        its model id (`azureml:<name>:<version>` or `.../models/<name>/versions/<version>`)."""
        from azure.core.exceptions import ResourceNotFoundError

        endpoint = self._endpoint(endpoint_name)
        traffic = {k: v for k, v in ((endpoint.traffic or {}) if endpoint is not None else {}).items() if v}
        if not traffic:
            return None
        name = max(traffic, key=lambda k: traffic[k])
        try:
            deployment = self._call(f"reading deployment {name} of {endpoint_name}",
                                    lambda: self.workspace.online_deployments.get(name=name,
                                                                                  endpoint_name=endpoint_name))
        except ResourceNotFoundError:
            return None
        tags = dict(deployment.tags or {})
        model_name, version = _model_name_version(str(getattr(deployment.model, "id", None) or deployment.model or ""))
        model_name, version = tags.get("model") or model_name, tags.get("model_version") or version
        if not model_name or not version:
            log.warning("deployment %s of %s names no model version (%r); not compared", name, endpoint_name,
                        deployment.model)
            return None
        return ServingModel(endpoint_name=endpoint_name, deployment_name=name, model_name=model_name,
                            version=version, model_uri=f"azureml:{model_name}:{version}")

    def list_endpoints(self, match_tags: dict[str, str] | None = None) -> list[EndpointInfo]:
        found = self._call("listing endpoints", lambda: list(self.workspace.online_endpoints.list()))
        wanted = match_tags or {}
        return [EndpointInfo(name=e.name, url=e.scoring_uri or "", tags=dict(e.tags or {}),
                             created_at=(e.tags or {}).get("created_at", ""),
                             alive=jobs.state_text(e.provisioning_state).lower() not in {"failed", "deleting"},
                             deployments=sorted((e.traffic or {}).keys()))
                for e in found if all((e.tags or {}).get(k) == v for k, v in wanted.items())]

    def delete_endpoint(self, name: str) -> bool:
        from azure.core.exceptions import ResourceNotFoundError

        if self._endpoint(name) is None:
            return False
        try:
            self._call(f"deleting endpoint {name}",
                       lambda: self.workspace.online_endpoints.begin_delete(name=name), begin=True)
        except ResourceNotFoundError:
            return False
        return True

    # -- promotion --------------------------------------------------------------------------
    def _shared_version(self, model: RegisterPart):
        """The version in the production registry, or None: a rerun finds what a previous one shared."""
        from azure.core.exceptions import ResourceNotFoundError

        registry = self.registry(self.production_registry)
        try:
            return self._call(f"reading {model.model_name}:{model.version} in {self.production_registry}",
                              lambda: registry.models.get(model.model_name, version=model.version))
        except ResourceNotFoundError:
            return None

    def _mark_for_production(self, model: RegisterPart) -> None:
        """Share the version into the production registry (when one is set), else tag it `stage: production`."""
        from azure.ai.ml.exceptions import MlException

        models = self.source.models
        if self.production_registry:
            if self._shared_version(model) is not None:
                log.info("%s:%s is already in %s", model.model_name, model.version, self.production_registry)
                return
            try:
                self._call(f"sharing {model.model_name}:{model.version} into {self.production_registry}",
                           lambda: models.share(model.model_name, model.version, share_with_name=model.model_name,
                                                share_with_version=model.version,
                                                registry_name=self.production_registry),
                           passthrough=retry.is_already_exists)
            except MlException as err:  # shared in between: ValidationException "already exists in registry"
                if not retry.is_already_exists(err):
                    raise
                log.info("%s:%s is already in %s", model.model_name, model.version, self.production_registry)
            return
        entity = self._call(f"reading {model.model_name}:{model.version}",
                            lambda: models.get(model.model_name, version=model.version))
        if (entity.tags or {}).get("stage") == "production":
            return
        entity.tags = {**(entity.tags or {}), "stage": "production"}
        self._call(f"tagging {model.model_name}:{model.version} for production",
                   lambda: models.create_or_update(entity))

    def _production_model_id(self, model: RegisterPart) -> str:
        """What a production deployment names: the version in the registry (shared there first), or
        the workspace's own version where no registry is set (one workspace, at a desk)."""
        if self.production_registry:
            return (f"azureml://registries/{self.production_registry}/models/{model.model_name}"
                    f"/versions/{model.version}")
        return model.model_uri

    def stage_candidate(self, experiment: Experiment, model: RegisterPart, *, endpoint_name: str,
                        tags: dict[str, str]) -> Candidate:
        """Share the version into the registry, then deploy it from there on the production endpoint
        as `v<version>` beside the live deployment, with no traffic (a new deployment takes none until
        the endpoint's traffic names it), and smoke-score it through its deployment header."""
        if self.source is not self.workspace and not self.production_registry:
            raise ConfigError(f"{PRODUCTION_REGISTRY_VARIABLE} is not set: production deploys from an Azure ML "
                              "registry, shared from the staging workspace (set it in the production environment)")
        self._mark_for_production(model)
        model_id = self._production_model_id(model)
        self._ensure_endpoint(endpoint_name, tags)
        new = endpoints.deployment_name_for_version(model.version)
        live = self.serving_model(endpoint_name)
        ops = self.workspace.online_deployments
        deployed = self._call(f"listing deployments of {endpoint_name}",
                              lambda: list(ops.list(endpoint_name=endpoint_name)))
        if not any(d.name == new and _same_model(d.model, model_id) for d in deployed):
            self._create_deployment(endpoints.deployment_spec(
                experiment, endpoint_name=endpoint_name, deployment_name=new, model_id=model_id,
                tags={**tags, "model": model.model_name, "model_version": model.version}))
        candidate = Candidate(endpoint_name, new, model_id, live)
        try:
            reply = self.invoke(endpoint_name, SMOKE_REQUEST, deployment=new)
            if not isinstance(reply.get("output"), str):
                raise BackendError(f"smoke score of deployment {new} returned {reply!r}")
        except BackendError as err:  # the live version keeps serving; the broken one would only cost money
            self.remove_candidate(candidate)
            if str(err).startswith("smoke score"):
                raise
            # a scoring error alone ("scoring <endpoint> failed: ...") would not say what it means here
            raise BackendError(f"smoke score of deployment {new} on {endpoint_name} failed ({err}); the candidate is "
                               "removed and production's traffic is unchanged") from err
        return candidate

    def shift_traffic(self, experiment: Experiment, candidate: Candidate, model: RegisterPart, *,
                      tags: dict[str, str]) -> PromotePart:
        from azure.core.exceptions import ResourceNotFoundError

        name, new = candidate.endpoint_name, candidate.deployment_name
        live = candidate.live
        previous = live.deployment_name if live is not None and live.deployment_name != new else None
        endpoint = self._endpoint(name)
        if (endpoint.traffic or {}).get(new) != 100:
            endpoint = self._set_traffic(name, {new: 100, **({previous: 0} if previous else {})})
        ops = self.workspace.online_deployments
        deployed = self._call(f"listing deployments of {name}", lambda: list(ops.list(endpoint_name=name)))
        for old in [d.name for d in deployed if d.name not in (new, previous)]:
            try:
                self._endpoint(name)  # never race an update of the endpoint
                self._call(f"deleting deployment {old}",
                           lambda n=old: ops.begin_delete(name=n, endpoint_name=name), begin=True)
            except ResourceNotFoundError:
                pass
        return PromotePart(endpoint_name=name, deployment_name=new, url=endpoint.scoring_uri or "",
                           model_version=model.version, previous_deployment=previous)

    def remove_candidate(self, candidate: Candidate) -> None:
        from azure.core.exceptions import ResourceNotFoundError

        live = candidate.live
        if live is not None and live.deployment_name == candidate.deployment_name:
            return  # it serves already (a rerun): never delete what takes the traffic
        with contextlib.suppress(ResourceNotFoundError, BackendError):
            self._endpoint(candidate.endpoint_name)
            self._call(f"deleting deployment {candidate.deployment_name}",
                       lambda: self.workspace.online_deployments.begin_delete(
                           name=candidate.deployment_name, endpoint_name=candidate.endpoint_name), begin=True)

    def rollback(self, endpoint_name: str) -> PromotePart:
        current = self.serving_model(endpoint_name)
        if current is None:
            raise ConfigError(f"{endpoint_name}: no deployment takes production's traffic; nothing to roll back")
        ops = self.workspace.online_deployments
        deployed = self._call(f"listing deployments of {endpoint_name}",
                              lambda: list(ops.list(endpoint_name=endpoint_name)))
        kept = [d for d in deployed if d.name != current.deployment_name]
        if not kept:
            raise ConfigError(f"{endpoint_name}: no previous deployment is kept to roll back to (only "
                              f"{current.deployment_name} is deployed)")
        back = kept[0]
        endpoint = self._set_traffic(endpoint_name, {back.name: 100, current.deployment_name: 0})
        version = (back.tags or {}).get("model_version") or _model_name_version(
            str(getattr(back.model, "id", None) or back.model or ""))[1] or ""
        return PromotePart(endpoint_name=endpoint_name, deployment_name=back.name, url=endpoint.scoring_uri or "",
                           model_version=version, previous_deployment=current.deployment_name)


def registration_spec(experiment: Experiment, job_name: str, *, model_name: str, version: str,
                      tags: dict[str, str]) -> dict[str, Any]:
    return {
        "name": model_name, "version": version, "type": "mlflow_model",
        "path": pipeline.trained_model_path(job_name),
        "description": f"{experiment.model.name} fine tuned model for {experiment.data.dataset} chat-completion",
        "tags": {**tags, "job_name": job_name, "timestamp_version": version, "base_model": experiment.model.name},
    }


def _register_part(model_name: str, version: str, timestamp_version: str) -> RegisterPart:
    return RegisterPart(model_name=model_name, version=version, timestamp_version=timestamp_version,
                        model_uri=f"azureml:{model_name}:{version}")


def _model_name_version(model_id: str) -> tuple[str | None, str | None]:
    """(name, version) of `azureml:<name>:<version>` or an ARM/registry id ending in
    `/models/<name>/versions/<version>`; (None, None) for anything else."""
    if model_id.startswith("azureml:") and "/" not in model_id:
        name, _, version = model_id.removeprefix("azureml:").partition(":")
        return (name, version) if name and version else (None, None)
    parts = model_id.rstrip("/").split("/")
    if len(parts) >= 4 and parts[-4] == "models" and parts[-2] == "versions":
        return parts[-3], parts[-1]
    return None, None


def _same_model(current: Any, wanted: str) -> bool:
    """A deployment's model reads back as an ARM id; compare name and version only."""
    text = str(getattr(current, "id", None) or current or "")
    name, _, version = wanted.removeprefix("azureml:").partition(":")
    return text == wanted or (f"/models/{name}/versions/{version}" in text)
