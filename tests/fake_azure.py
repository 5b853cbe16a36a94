"""An in-memory MLClient: the operations the Azure backend calls, with Azure's behaviour.

Real SDK entities go in and come out; missing things raise ResourceNotFoundError, name conflicts
ResourceExistsError, long-running operations return pollers, and faults can be queued per
operation (`fail("online_endpoints.begin_create_or_update", error, times=2)`) to play transient
429/503 answers, dropped connections or quota refusals.
"""

from __future__ import annotations

import copy
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml
from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceNotFoundError

from automation.spec import Experiment
from tests.conftest import chat_row, write_jsonl


class FakeResponse:
    """Enough of an HTTP response for HttpResponseError to read status, headers and error body."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        self.status_code = status
        self.reason = message
        self.headers = headers or {}
        self.content_type = "application/json"
        self._body = json.dumps({"error": {"code": code, "message": message}})

    def text(self, encoding: str | None = None) -> str:
        return self._body

    def body(self) -> bytes:
        return self._body.encode()


def http_error(status: int, code: str, message: str, retry_after: str | None = None) -> HttpResponseError:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    return HttpResponseError(response=FakeResponse(status, code, message, headers))


def throttled(retry_after: str = "7") -> HttpResponseError:
    return http_error(429, "TooManyRequests", "Rate limit exceeded", retry_after)


def unavailable() -> HttpResponseError:
    return http_error(503, "ServiceUnavailable", "The service is temporarily unavailable")


def quota_error() -> HttpResponseError:
    return http_error(400, "QuotaExceeded", "Not enough quota available for Standard_NC6s_v3 in "
                      "subscription; requested 6 cores, available 0")


def not_found(kind: str, name: str) -> ResourceNotFoundError:
    return ResourceNotFoundError(f"{kind} {name} not found")


class Poller:
    """azure.core.polling.LROPoller's surface: result(), wait(), done(), status()."""

    def __init__(self, value: Any = None):
        self._value = value

    def result(self, timeout: float | None = None) -> Any:
        return self._value

    def wait(self, timeout: float | None = None) -> None:
        return None

    def done(self) -> bool:
        return True

    def status(self) -> str:
        return "Succeeded"


class _Ops:
    def __init__(self, client: FakeMLClient, prefix: str):
        self._client, self._prefix = client, prefix

    def _enter(self, method: str) -> None:
        self._client.calls.append(f"{self._prefix}.{method}")
        queue = self._client.faults.get(f"{self._prefix}.{method}")
        if queue:
            raise queue.pop(0)


class Models(_Ops):
    def __init__(self, client, registry: str | None = None):
        super().__init__(client, "models")
        self.registry = registry
        self.versions: dict[str, dict[str, Any]] = defaultdict(dict)
        self.labels: dict[str, str] = {}
        self.shared: list[tuple[str, str, str]] = []

    def add(self, model) -> Any:
        scope = f"registries/{self.registry}" if self.registry else "workspaces/ws"
        model._id = f"azureml://{scope}/models/{model.name}/versions/{model.version}"
        self.versions[model.name][str(model.version)] = model
        self.labels.setdefault(model.name, str(model.version))
        return model

    def get(self, name: str, version: str | None = None, label: str | None = None):
        self._enter("get")
        versions = self.versions.get(name, {})
        key = self.labels.get(name) if label == "latest" else version
        if key not in versions:
            raise not_found("model", f"{name}:{version or label}")
        return versions[key]

    def list(self, name: str | None = None, stage: str | None = None, *, list_view_type=None):
        self._enter("list")
        if name is not None and name not in self.versions:
            raise not_found("model", name)
        names = [name] if name else list(self.versions)
        return iter([m for n in names for m in self.versions[n].values()])

    def create_or_update(self, model):
        self._enter("create_or_update")
        stored = self.versions.get(model.name, {}).get(str(model.version))
        if stored is not None and stored is not model and stored.path != model.path:
            raise ResourceExistsError(f"model {model.name} version {model.version} exists with another path")
        return self.add(model)

    def share(self, name: str, version: str, *, share_with_name: str, share_with_version: str, registry_name: str):
        self._enter("share")
        if (registry_name, share_with_name, share_with_version) in self.shared:
            raise ResourceExistsError(f"{share_with_name}:{share_with_version} exists in {registry_name}")
        self.shared.append((registry_name, share_with_name, share_with_version))
        return self.get(name, version=version)


class Components(_Ops):
    def __init__(self, client):
        super().__init__(client, "components")
        self.items: dict[tuple[str, str], Any] = {}
        self.latest: dict[str, str] = {}

    def add(self, component) -> None:
        self.items[(component.name, str(component.version))] = component
        self.latest[component.name] = str(component.version)

    def get(self, name: str, version: str | None = None, label: str | None = None):
        self._enter("get")
        key = (name, self.latest.get(name) if label == "latest" else str(version))
        if key not in self.items:
            raise not_found("component", f"{name}:{version or label}")
        return self.items[key]


class Compute(_Ops):
    def __init__(self, client):
        super().__init__(client, "compute")
        self.clusters: dict[str, Any] = {}
        self.sizes: list[Any] = []
        self.refuse_tiers: set[str] = set()

    def get(self, name: str):
        self._enter("get")
        if name not in self.clusters:
            raise not_found("compute", name)
        return self.clusters[name]

    def list_sizes(self, *, location: str | None = None, compute_type: str | None = None):
        self._enter("list_sizes")
        return iter(self.sizes)

    def begin_create_or_update(self, compute):
        self._enter("begin_create_or_update")
        if compute.tier in self.refuse_tiers:
            raise quota_error()
        compute._provisioning_state = "Succeeded"
        self.clusters[compute.name] = compute
        return Poller(compute)


class Jobs(_Ops):
    """Jobs end with `outcome[name]` ("Completed" by default) when streamed or polled."""

    def __init__(self, client):
        super().__init__(client, "jobs")
        self.items: dict[str, Any] = {}
        self.outcome: dict[str, tuple[str, str | None]] = {}
        self.submitted: list[Any] = []
        self.durations: dict[str, float] = {}
        self.timelines: dict[str, dict[str, float]] = {}
        self.cancelled: list[str] = []

    def create_or_update(self, job, *, description=None, compute=None, tags=None, experiment_name=None,
                         skip_validation=False, **kwargs):
        from azure.ai.ml.entities import JobService

        self._enter("create_or_update")
        if job.name in self.items:
            raise ResourceExistsError(f"job {job.name} already exists")
        job.experiment_name = experiment_name or job.experiment_name
        job._status = "NotStarted"
        job.services = {"Studio": JobService(endpoint=f"https://ml.azure.com/runs/{job.name}?wsid=ws")}
        self.items[job.name] = job
        self.submitted.append(job)
        if self.clock is not None:
            self._timeline(job.name)
        return job

    def get(self, name: str):
        self._enter("get")
        if name not in self.items:
            raise not_found("job", name)
        self._advance(name)
        return self.items[name]

    def _finish(self, name: str) -> tuple[str, str | None]:
        status, error = self.outcome.get(name, ("Completed", None))
        self.items[name]._status = status
        return status, error

    # -- time-driven jobs (the reconcile tests): with `clock` set, a job goes NotStarted ->
    # Queued -> Running -> Completed (or `outcome`) as the clock moves, and `begin_cancel` takes
    # it Running -> CancelRequested -> Canceled, `cancel_s` later, as Azure ML does.
    clock = None  # () -> seconds; None keeps the stream/poll behaviour above
    queue_s, cancel_s = 120.0, 60.0

    def run_for(self, name: str, seconds: float) -> None:
        """How long the job named `name` trains once it leaves the queue (default one hour)."""
        self.durations[name] = seconds

    def _timeline(self, name: str) -> dict[str, float]:
        return self.timelines.setdefault(name, {"submitted": self.clock()})

    def _advance(self, name: str) -> None:
        if self.clock is None or name not in self.items:
            return
        job, t = self.items[name], self._timeline(name)
        now = self.clock()
        start = t["submitted"] + self.queue_s
        end = start + self.durations.get(name, 3600.0)
        if "cancel" in t:
            job._status = "Canceled" if now >= t["cancel"] + self.cancel_s else "CancelRequested"
        elif now < t["submitted"] + 5:
            job._status = "NotStarted"
        elif now < start:
            job._status = "Queued"
        elif now < end:
            job._status = "Running"
        else:
            job._status = self.outcome.get(name, ("Completed", None))[0]

    def billed_seconds(self, name: str, after: float | None = None) -> float:
        """Seconds the job held its compute (Running, or CancelRequested until Canceled), counted
        from `after` when given: what Azure bills for it."""
        t = self._timeline(name)
        start = t["submitted"] + self.queue_s
        end = start + self.durations.get(name, 3600.0)
        if "cancel" in t:
            end = min(end, t["cancel"] + self.cancel_s)
        end = min(end, self.clock())
        begin = max(start, after if after is not None else start)
        return max(end - begin, 0.0)

    def list(self, *, parent_job_name: str | None = None, list_view_type=None, **kwargs):
        self._enter("list")
        for name in self.items:
            self._advance(name)
        return iter(list(self.items.values()))

    def begin_cancel(self, name: str, **kwargs):
        self._enter("begin_cancel")
        if name not in self.items:
            raise not_found("job", name)
        self._advance(name)
        if self.items[name]._status not in ("Completed", "Failed", "Canceled") and self.clock is not None:
            self._timeline(name).setdefault("cancel", self.clock())
            self._advance(name)
        self.cancelled.append(name)
        return Poller(None)

    def stream(self, name: str) -> None:
        from azure.ai.ml.exceptions import JobException

        self._enter("stream")
        status, error = self._finish(self.get(name).name)
        if status != "Completed":
            raise JobException(message=f"Exception : \n {json.dumps({'message': error})} ",
                               no_personal_data_message="Exception raised on failed job.")


class OnlineEndpoints(_Ops):
    def __init__(self, client):
        super().__init__(client, "online_endpoints")
        self.items: dict[str, Any] = {}
        self.busy: dict[str, int] = {}  # name -> how many more reads answer "Updating"
        self.invocations: list[tuple[str, str | None, dict]] = []
        self.replies: dict[str, str] = {}  # deployment -> raw reply

    def _entity(self, endpoint, state: str):
        from azure.ai.ml.entities import ManagedOnlineEndpoint

        return ManagedOnlineEndpoint(
            name=endpoint.name, auth_mode=endpoint.auth_mode, tags=dict(endpoint.tags or {}),
            traffic=dict(endpoint.traffic or {}), provisioning_state=state,
            scoring_uri=f"https://{endpoint.name}.westeurope.inference.ml.azure.com/score")

    def get(self, name: str, *, local: bool = False):
        self._enter("get")
        if name not in self.items:
            raise not_found("endpoint", name)
        if self.busy.get(name):
            self.busy[name] -= 1
            return self._entity(self.items[name], "Updating")
        return self._entity(self.items[name], "Succeeded")

    def list(self, *, local: bool = False):
        self._enter("list")
        return iter([self._entity(e, "Succeeded") for e in self.items.values()])

    def begin_create_or_update(self, endpoint, *, local: bool = False):
        self._enter("begin_create_or_update")
        unknown = set(endpoint.traffic or {}) - set(self._client.online_deployments.of(endpoint.name))
        if unknown:
            raise http_error(400, "BadArgument", f"traffic names unknown deployments {sorted(unknown)}")
        self.items[endpoint.name] = self._entity(endpoint, "Succeeded")
        self._client.rest_payloads.append(endpoint._to_rest_online_endpoint("westeurope").as_dict())
        return Poller(self._entity(endpoint, "Succeeded"))

    def begin_delete(self, name: str | None = None, *, local: bool = False):
        self._enter("begin_delete")
        if name not in self.items:
            raise not_found("endpoint", name)
        del self.items[name]
        self._client.online_deployments.drop_endpoint(name)
        return Poller(None)

    def invoke(self, endpoint_name: str, *, request_file: str | None = None, deployment_name: str | None = None,
               input_data=None, params_override=None, local: bool = False, **kwargs) -> str:
        self._enter("invoke")
        if endpoint_name not in self.items:
            raise not_found("endpoint", endpoint_name)
        request = json.loads(Path(request_file).read_text())
        self.invocations.append((endpoint_name, deployment_name, request))
        return self.replies.get(deployment_name or "", json.dumps({"output": "Hello from Azure."}))


class OnlineDeployments(_Ops):
    def __init__(self, client):
        super().__init__(client, "online_deployments")
        self.items: dict[tuple[str, str], Any] = {}

    def of(self, endpoint: str) -> list[str]:
        return [d for (e, d) in self.items if e == endpoint]

    def drop_endpoint(self, endpoint: str) -> None:
        for key in [k for k in self.items if k[0] == endpoint]:
            del self.items[key]

    def begin_create_or_update(self, deployment, *, local=False, vscode_debug=False,
                               skip_script_validation=False, local_enable_gpu=False, **kwargs):
        self._enter("begin_create_or_update")
        endpoints = self._client.online_endpoints
        if deployment.endpoint_name not in endpoints.items:
            raise not_found("endpoint", deployment.endpoint_name)
        if endpoints.busy.get(deployment.endpoint_name):
            raise http_error(409, "Conflict", f"endpoint {deployment.endpoint_name} is Updating")
        deployment._provisioning_state = "Succeeded"
        self.items[(deployment.endpoint_name, deployment.name)] = deployment
        self._client.rest_payloads.append(deployment._to_rest_object("westeurope").as_dict())
        return Poller(deployment)

    def get(self, name: str, endpoint_name: str, *, local: bool = False):
        self._enter("get")
        if (endpoint_name, name) not in self.items:
            raise not_found("deployment", f"{endpoint_name}/{name}")
        return self.items[(endpoint_name, name)]

    def list(self, endpoint_name: str, *, local: bool = False):
        self._enter("list")
        return iter([d for (e, _), d in self.items.items() if e == endpoint_name])

    def begin_delete(self, name: str, endpoint_name: str, *, local: bool = False):
        self._enter("begin_delete")
        if (endpoint_name, name) not in self.items:
            raise not_found("deployment", f"{endpoint_name}/{name}")
        traffic = self._client.online_endpoints.items[endpoint_name].traffic or {}
        if traffic.get(name):
            raise http_error(400, "BadArgument", f"deployment {name} still has traffic")
        del self.items[(endpoint_name, name)]
        return Poller(None)


class Workspaces(_Ops):
    def __init__(self, client):
        super().__init__(client, "workspaces")

    def get(self, name: str | None = None, **kwargs):
        from azure.ai.ml.entities import Workspace

        self._enter("get")
        workspace = Workspace(name=name or self._client.workspace_name)
        workspace._mlflow_tracking_uri = "azureml://westeurope.api.azureml.ms/mlflow/v1.0/subscriptions/s/ws"
        return workspace


class FakeMLClient:
    """Workspace client (or, with `registry_name`, a registry client) held in memory."""

    def __init__(self, *, workspace_name: str = "ws", registry_name: str | None = None):
        self.workspace_name = workspace_name
        self.calls: list[str] = []
        self.faults: dict[str, list[BaseException]] = defaultdict(list)
        self.rest_payloads: list[dict] = []
        self.models = Models(self, registry_name)
        self.components = Components(self)
        self.compute = Compute(self)
        self.jobs = Jobs(self)
        self.online_endpoints = OnlineEndpoints(self)
        self.online_deployments = OnlineDeployments(self)
        self.workspaces = Workspaces(self)

    def fail(self, operation: str, error: BaseException, times: int = 1) -> None:
        self.faults[operation].extend(copy.copy(error) for _ in range(times))


# ---------------------------------------------------------------------------------------------
# An experiment, a component spec mirroring chat_completion_pipeline, and a data folder

EXPERIMENT = {
    "name": "phi3-ultrachat",
    "backend": "azure",
    "model": {"name": "Phi-3-mini-4k-instruct", "registry": "azureml"},
    "data": {"dataset": "HuggingFaceH4/ultrachat_200k"},
    "compute": {"cluster": "gpu-a100", "size": "Standard_NC24ads_A100_v4"},
    "training": {"num_train_epochs": 3, "learning_rate": 5.0e-6, "lr_scheduler_type": "cosine",
                 "max_seq_length": 2048, "save_total_limit": 1},
    "optimization": {"apply_lora": True, "apply_deepspeed": True, "deepspeed_stage": 2},
}

# The inputs of azureml://registries/azureml/components/chat_completion_pipeline (a subset of its
# optional knobs is left out on purpose, to exercise the "input not declared" path).
COMPONENT_INPUTS = {
    "mlflow_model_path": "mlflow_model", "compute_model_import": "string", "compute_preprocess": "string",
    "compute_finetune": "string", "compute_model_evaluation": "string", "train_file_path": "uri_file",
    "test_file_path": "uri_file", "number_of_gpu_to_use_finetuning": "integer", "num_nodes_finetune": "integer",
    "num_train_epochs": "integer", "max_steps": "integer", "per_device_train_batch_size": "integer",
    "per_device_eval_batch_size": "integer", "gradient_accumulation_steps": "integer",
    "auto_find_batch_size": "string", "learning_rate": "number", "lr_scheduler_type": "string",
    "warmup_steps": "integer", "weight_decay": "number", "optim": "string", "precision": "string",
    "seed": "integer", "max_seq_length": "integer", "pad_to_max_length": "string",
    "evaluation_strategy": "string", "eval_steps": "integer", "logging_steps": "integer",
    "save_total_limit": "integer", "apply_early_stopping": "string", "early_stopping_patience": "integer",
    "resume_from_checkpoint": "string", "apply_lora": "string", "lora_r": "integer", "lora_alpha": "integer",
    "lora_dropout": "number", "merge_lora_weights": "string", "apply_deepspeed": "string",
    "deepspeed_stage": "string", "apply_ort": "string",
}


def experiment(**changes) -> Experiment:
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in EXPERIMENT.items()}
    for dotted, value in changes.items():
        section, _, key = dotted.partition("__")
        if key:
            data.setdefault(section, {})[key] = value
        else:
            data[section] = value
    return Experiment.model_validate(data)


def write_component(folder: Path, version: str = "0.0.62") -> Path:
    inputs = {}
    for name, kind in COMPONENT_INPUTS.items():
        spec: dict = {"type": kind}
        if name in ("mlflow_model_path",):
            spec["optional"] = True
        inputs[name] = spec
    document = {
        "$schema": "https://azuremlschemas.azureedge.net/latest/pipelineComponent.schema.json",
        "type": "pipeline", "name": "chat_completion_pipeline", "version": version,
        "inputs": inputs, "outputs": {"mlflow_model_folder": {"type": "mlflow_model"}},
        "jobs": {"finetune_step": {
            "type": "command",
            "component": {"command": "echo finetune", "environment": "azureml:acft-hf-nlp-gpu:1",
                          "inputs": {"compute": {"type": "string"}},
                          "outputs": {"model": {"type": "mlflow_model"}}},
            "inputs": {"compute": "${{parent.inputs.compute_finetune}}"},
            "outputs": {"model": "${{parent.outputs.mlflow_model_folder}}"},
        }},
    }
    path = folder / f"chat_completion_pipeline-{version}.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def data_dir(folder: Path) -> Path:
    out = folder / "data"
    for split in ("train_sft", "test_sft", "test_gen"):
        write_jsonl(out / f"{split}.jsonl", [chat_row(f"{split} question {i}?", f"Answer {i}.") for i in range(3)])
    return out


def reference_clients(component) -> tuple[FakeMLClient, FakeMLClient]:
    """A workspace and an `azureml` registry as in the reference flow: Phi-3-mini with its
    allow-list and defaults tags, the pipeline component, an A100 cluster and the VM sizes."""
    from azure.ai.ml.entities import AmlCompute, Model, VmSize

    a100 = "Standard_NC24ads_A100_v4"
    workspace, registry = FakeMLClient(), FakeMLClient(registry_name="azureml")
    registry.models.add(Model(name="Phi-3-mini-4k-instruct", version="10", type="mlflow_model", path="x", tags={
        "finetune_compute_allow_list": "['Standard_NC24ads_A100_v4', 'Standard_NC24rs_v3']",
        "inference_compute_allow_list": "['Standard_NC6s_v3', 'Standard_NC24ads_A100_v4']",
        "model_specific_defaults": "{'apply_deepspeed': 'true', 'deepspeed_stage': '3'}",
    }))
    registry.components.add(component)
    workspace.compute.clusters["gpu-a100"] = AmlCompute(name="gpu-a100", size=a100, min_instances=0, max_instances=2)
    workspace.compute.sizes = [VmSize(name="Standard_NC24rs_v3", gpus=4), VmSize(name=a100, gpus=1),
                               VmSize(name="Standard_D4s_v3", gpus=0)]
    return workspace, registry
