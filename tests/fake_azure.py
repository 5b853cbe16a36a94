"""An in-memory MLClient: the operations the Azure backend calls, with Azure's behaviour.

Real SDK entities go in and come out, built by the SDK's own code where it builds them (registry
models from their REST payloads through `Model._from_rest_object`; plain-text scoring errors
through `validate_response`). Errors are the types azure-ai-ml 1.35 raises, read from its source:
a lookup by version raises ResourceNotFoundError, by label "latest" ValidationException
(RESOURCE_NOT_FOUND, after listing the active versions only); a share into a registry that holds
the version ValidationException("A model with this name and version already exists in registry");
a job name that exists HttpResponseError 400; a 404 or 409 of an ARM operation ResourceNotFoundError
or ResourceExistsError (map_error); a model version registered again with another path
HttpResponseError 400 "Asset paths cannot be updated". Long-running operations return pollers, and faults can be queued per operation
(`fail("online_endpoints.begin_create_or_update", error, times=2)`) to play transient 429/503
answers, 409 conflicts, dropped connections, quota refusals or a gateway's plain text.

Queued faults first meet azure-core's RetryPolicy as connection.py configures it
(`retry.AZURE_CORE_RETRY`): what it retries for the operation's HTTP method (429/5xx on GET/PUT/
DELETE, 500/503/504 on POST, anything with Retry-After, connection failures on GET/PUT/DELETE) is
absorbed up to its budget (`core_retries` records each), as the real pipeline would; only the rest
reaches the code under test.
"""

from __future__ import annotations

import copy
import io
import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceNotFoundError

from automation.spec import Experiment
from tests.conftest import chat_row, write_jsonl


class FakeRequest:
    def __init__(self, method: str = "GET"):
        self.method = method


class FakeResponse:
    """Enough of an HTTP response for HttpResponseError to read status, headers, error body and the
    request's method (set by the fake operation that raises it)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        self.status_code = status
        self.reason = message
        self.headers = headers or {}
        self.content_type = "application/json"
        self.request = FakeRequest()
        self._body = json.dumps({"error": {"code": code, "message": message}})

    def text(self, encoding: str | None = None) -> str:
        return self._body

    def body(self) -> bytes:
        return self._body.encode()


def http_error(status: int, code: str, message: str, retry_after: str | None = None) -> HttpResponseError:
    """The error an ARM operation raises for this answer: the generated code's `map_error` turns 401,
    404 and 409 into their azure.core types (every 409 is ResourceExistsError), the rest stays
    HttpResponseError."""
    from azure.core.exceptions import ClientAuthenticationError

    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    kind = {401: ClientAuthenticationError, 404: ResourceNotFoundError, 409: ResourceExistsError}.get(
        status, HttpResponseError)
    return kind(response=FakeResponse(status, code, message, headers))


def conflict(message: str = "Conflict: an operation on this resource is in progress") -> HttpResponseError:
    """A 409 answer to a begin_*: the resource is busy (the SDK raises ResourceExistsError for it)."""
    return http_error(409, "Conflict", message)


def asset_path_changed(name: str, version: str) -> HttpResponseError:
    """What `models.create_or_update` raises when the version exists with another path: the
    service's 400 "(UserError) Asset paths cannot be updated." as azure-core's HttpResponseError.
    (operations/_model_operations.py would turn it into AssetPathException only when str(err)
    equals that text exactly, which azure-core's formatted message never does: the wire stand-in
    shows it, tests/test_azure_contract.py.)"""
    return http_error(400, "UserError", "Asset paths cannot be updated.")


def throttled(retry_after: str = "7") -> HttpResponseError:
    return http_error(429, "TooManyRequests", "Rate limit exceeded", retry_after)


def unavailable() -> HttpResponseError:
    return http_error(503, "ServiceUnavailable", "The service is temporarily unavailable")


def quota_error() -> HttpResponseError:
    return http_error(400, "OutOfQuota", "Not enough quota available for Standard_NC24ads_A100_v4 in "
                      "SubscriptionId; current usage/limit: 0/0, additional needed: 24")


def not_found(kind: str, name: str) -> ResourceNotFoundError:
    """A 404 as the SDK raises it for an ARM read (map_error): the status and the error body kept."""
    return ResourceNotFoundError(response=FakeResponse(404, "ResourceNotFound", f"{kind} {name} not found"))


def no_latest_version(name: str, scope: str):
    """What `get(name, label="latest")` raises when no active version exists (azure/ai/ml/_utils/
    _asset_utils.py `_get_latest`): a ValidationException."""
    from azure.ai.ml.exceptions import (
        ErrorCategory,
        ErrorTarget,
        ValidationErrorType,
        ValidationException,
    )

    return ValidationException(
        message=f"Asset {name} does not exist in {scope}.",
        no_personal_data_message="Asset {asset_name} does not exist in {scope}.",
        target=ErrorTarget.ASSET, error_category=ErrorCategory.USER_ERROR,
        error_type=ValidationErrorType.RESOURCE_NOT_FOUND)


def already_in_registry():
    """What `models.share` raises when the registry holds the version (operations/_model_operations.py)."""
    from azure.ai.ml.exceptions import ErrorCategory, ErrorTarget, ValidationException

    msg = "A model with this name and version already exists in registry"
    return ValidationException(message=msg, no_personal_data_message=msg, target=ErrorTarget.MODEL,
                               error_category=ErrorCategory.USER_ERROR)


def unknown_deployment(name: str | None):
    """What `online_endpoints.invoke(..., deployment_name=name)` raises when the endpoint has no such
    deployment (`_validate_deployment_name` in operations/_online_endpoint_operations.py); `None`:
    the endpoint has no deployment at all."""
    from azure.ai.ml.exceptions import (
        ErrorCategory,
        ErrorTarget,
        ValidationErrorType,
        ValidationException,
    )

    if name is None:
        msg, private = "No deployment exists for this endpoint", "No deployment exists for this endpoint"
    else:
        msg, private = f"Deployment name {name} not found for this endpoint", "Deployment name not found for this endpoint"
    return ValidationException(message=msg, target=ErrorTarget.ONLINE_ENDPOINT, no_personal_data_message=private,
                               error_category=ErrorCategory.USER_ERROR,
                               error_type=ValidationErrorType.RESOURCE_NOT_FOUND)


class _TextResponse:
    """An HTTP answer with a plain-text body, as a scoring endpoint's gateway sends it."""

    def __init__(self, status: int, text: str):
        self.status_code, self.content = status, text.encode()

    def json(self):
        return json.loads(self.content)


def plain_text_answer(status: int, text: str) -> Exception:
    """The exception `online_endpoints.invoke` raises for a non-JSON error answer, made by the SDK's
    own `validate_response`: an MlException carrying the body, the status dropped (kept aside here
    only so the fake's azure-core layer knows what the wire said)."""
    from azure.ai.ml._utils._endpoint_utils import validate_response

    try:
        validate_response(_TextResponse(status, text))
    except Exception as err:  # whatever the SDK raises is the point
        err._wire_status = status
        return err
    raise AssertionError(f"validate_response accepted a {status} answer")


def as_sdk_enum(enum_name: str, value: Any) -> Any:
    """A status or provisioning state as azure-ai-ml 1.35 hands it over: the REST models' enum
    (`JobStatus.COMPLETED`, whose str() is "JobStatus.COMPLETED"), not a plain string."""
    from azure.ai.ml._restclient.arm_ml_service import models

    if not isinstance(value, str) or not value:
        return value
    return getattr(models, enum_name)(value)


# The HTTP method of each fake operation, for azure-core's retry rules (it retries by method).
HTTP_METHODS = {"create_or_update": "PUT", "begin_create_or_update": "PUT", "begin_delete": "DELETE",
                "invoke": "POST", "begin_cancel": "POST", "share": "POST"}


def azure_core_retry_kind(error: BaseException, method: str) -> str | None:
    """Which of azure-core's retry counters this answer spends ("status", "connect", "read"), or None
    when its RetryPolicy hands it on at once (azure/core/pipeline/policies/_retry.py)."""
    from azure.core.exceptions import ServiceRequestError, ServiceResponseError

    from automation.backends.azure.retry import (
        CORE_RETRIED_METHODS,
        CORE_RETRIED_ON_POST,
        TRANSIENT_STATUS,
    )

    if isinstance(error, ServiceRequestError):
        return "connect" if method in CORE_RETRIED_METHODS else None
    if isinstance(error, ServiceResponseError):
        return "read" if method in CORE_RETRIED_METHODS else None
    status = getattr(error, "status_code", None) or getattr(error, "_wire_status", None)
    if status is None or status < 400:
        return None
    headers = getattr(getattr(error, "response", None), "headers", None) or {}
    if any(str(k).lower() == "retry-after" for k in headers):
        return "status"
    if method in ("POST", "PATCH"):
        return "status" if status in CORE_RETRIED_ON_POST else None
    return "status" if status in TRANSIENT_STATUS else None


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
        from automation.backends.azure.retry import AZURE_CORE_RETRY

        operation = f"{self._prefix}.{method}"
        self._client.calls.append(operation)
        queue = self._client.faults.get(operation)
        http = HTTP_METHODS.get(method, "GET")
        left = {"total": AZURE_CORE_RETRY["retry_total"], "connect": AZURE_CORE_RETRY["retry_connect"],
                "read": AZURE_CORE_RETRY["retry_read"], "status": AZURE_CORE_RETRY["retry_status"]}
        while queue:
            error = queue.pop(0)
            request = getattr(getattr(error, "response", None), "request", None)
            if isinstance(request, FakeRequest):
                request.method = http
            kind = azure_core_retry_kind(error, http)
            if kind is None or min(left["total"], left[kind]) < 1:
                raise error
            left["total"] -= 1
            left[kind] -= 1
            self._client.core_retries.append((operation, error))


class Models(_Ops):
    """Workspace models are the entities our code registered; registry models are REST payloads
    (see `publish`), returned through the SDK's own `Model._from_rest_object`, as `get` does."""

    def __init__(self, client, registry: str | None = None):
        super().__init__(client, "models")
        self.registry = registry
        self.versions: dict[str, dict[str, Any]] = defaultdict(dict)
        self.payloads: dict[str, dict[str, dict]] = defaultdict(dict)
        self.labels: dict[str, str] = {}

    @property
    def _scope(self) -> str:
        return f"registry {self.registry}" if self.registry else f"workspace {self._client.workspace_name}"

    def add(self, model) -> Any:
        scope = f"registries/{self.registry}" if self.registry else "workspaces/ws"
        model._id = f"azureml://{scope}/models/{model.name}/versions/{model.version}"
        self.versions[model.name][str(model.version)] = model
        self.labels[model.name] = str(model.version)
        return model

    def publish(self, spec: dict[str, Any]) -> None:
        """A registry model from an entry of tests/fixtures/azureml/models.yaml: tags stored as the SDK
        writes them (`Model._to_rest_object` turns every value into str(value))."""
        from azure.ai.ml.entities import Model

        name, version = spec["name"], str(spec["version"])
        tags = dict(Model(name=name, version=version, tags=spec.get("tags") or {})._to_rest_object().properties.tags)
        self.payloads[name][version] = {
            "id": f"azureml://registries/{self.registry}/models/{name}/versions/{version}", "name": version,
            "properties": {"modelUri": f"azureml://registries/{self.registry}/models/{name}/versions/{version}",
                           "modelType": "mlflow_model", "tags": tags, "isArchived": bool(spec.get("is_archived")),
                           "flavors": {"python_function": {"data": {"loader_module": "mlflow.transformers"}}},
                           **({"systemMetadata": spec["system_metadata"]} if spec.get("system_metadata") else {})},
            "systemData": {"createdAt": "2025-01-21T00:00:00Z"}}

    def _active_versions(self, name: str, include_archived: bool = False) -> list[str]:
        published = [v for v, p in self.payloads.get(name, {}).items()
                     if include_archived or not p["properties"]["isArchived"]]
        return published + list(self.versions.get(name, {}))

    def _get(self, name: str, version: str | None = None):
        """ModelOperations._get: the REST object (registry: ArmModelVersion) of one version. Faults
        queued for "models._get" hit the code's own calls of it, not the ones inside `get`."""
        self._enter("_get")
        return self._rest(name, version)

    def _rest(self, name: str, version: str | None = None):
        from azure.ai.ml._restclient.arm_ml_service.models import ModelVersion

        payload = self.payloads.get(name, {}).get(str(version))
        if payload is None:
            if str(version) in self.versions.get(name, {}):
                return self.versions[name][str(version)]._to_rest_object()
            raise not_found("model", f"{name}:{version}")
        return ModelVersion._deserialize(copy.deepcopy(payload), [])

    def get(self, name: str, version: str | None = None, label: str | None = None):
        from azure.ai.ml.entities import Model
        from azure.ai.ml.exceptions import (
            ErrorCategory,
            ErrorTarget,
            ValidationErrorType,
            ValidationException,
        )

        self._enter("get")
        if version and label:
            raise ValidationException(message="Cannot specify both version and label.",
                                      no_personal_data_message="Cannot specify both version and label.",
                                      target=ErrorTarget.MODEL, error_category=ErrorCategory.USER_ERROR,
                                      error_type=ValidationErrorType.INVALID_VALUE)
        if label:
            if label != "latest":
                raise ValidationException(
                    message=f"Asset {name} with version label {label} does not exist in {self._scope.split()[0]}.",
                    no_personal_data_message="Asset [name] with version label [label] does not exist in [scope].",
                    target=ErrorTarget.ASSET, error_type=ValidationErrorType.RESOURCE_NOT_FOUND)
            active = self._active_versions(name)
            if not active:
                raise no_latest_version(name, self._scope)
            version = active[-1]
        if str(version) in self.versions.get(name, {}):
            return self.versions[name][str(version)]
        return Model._from_rest_object(self._rest(name, version))

    def list(self, name: str | None = None, stage: str | None = None, *, list_view_type=None):
        from azure.ai.ml._restclient.arm_ml_service.models import ModelContainer
        from azure.ai.ml.constants import ListViewType
        from azure.ai.ml.entities import Model

        self._enter("list")
        everything = list_view_type == ListViewType.ALL
        if name is not None:
            if name not in self.versions and name not in self.payloads:
                raise not_found("model", name)
            return iter([self.get(name, version=v) for v in self._active_versions(name, everything)])
        containers = []
        for model_name in dict.fromkeys([*self.payloads, *self.versions]):
            versions = self._active_versions(model_name, everything)
            if versions:
                containers.append(Model._from_container_rest_object(ModelContainer._deserialize({
                    "id": f"azureml://registries/{self.registry}/models/{model_name}", "name": model_name,
                    "properties": {"latestVersion": versions[-1]},
                    "systemData": {"createdAt": "2025-01-21T00:00:00Z"}}, [])))
        return iter(containers)

    def create_or_update(self, model):
        self._enter("create_or_update")
        stored = self.versions.get(model.name, {}).get(str(model.version))
        if stored is not None and stored is not model and stored.path != model.path:
            raise asset_path_changed(model.name, str(model.version))
        return self.add(model)

    def share(self, name: str, version: str, *, share_with_name: str, share_with_version: str, registry_name: str):
        self._enter("share")
        registry = self._client.registries.get(registry_name)
        if registry is None:
            raise not_found("registry", registry_name)
        if str(share_with_version) in registry.models.versions.get(share_with_name, {}):
            raise already_in_registry()
        source = self.get(name, version=version)
        shared = copy.copy(source)
        shared.name, shared.version = share_with_name, str(share_with_version)
        return registry.models.add(shared)


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
        if label == "latest":
            if name not in self.latest:  # _get_latest_version lists the versions: none is a ValidationException
                raise no_latest_version(name, f"registry {self._client.registry_name}")
            version = self.latest[name]
        if (name, str(version)) not in self.items:
            raise not_found("component", f"{name}:{version or label}")
        return self.items[(name, str(version))]


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
        cluster = self.clusters[name]
        cluster._provisioning_state = as_sdk_enum("ProvisioningState", cluster._provisioning_state)
        return cluster

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
        if job.name in self.items:  # the service answers 400 UserError; map_error does not map 400
            raise http_error(400, "UserError", "A job with this ID already exists.")
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
        return self._as_read(self.items[name])

    @staticmethod
    def _as_read(job):
        job._status = as_sdk_enum("JobStatus", job._status)  # what Job._from_rest_object gives
        return job

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
        return iter([self._as_read(job) for job in self.items.values()])

    def begin_cancel(self, name: str, **kwargs):
        self._enter("begin_cancel")
        if name not in self.items:
            raise not_found("job", name)
        self._advance(name)
        if str(self.items[name]._status) not in ("Completed", "Failed", "Canceled"):
            if self.clock is not None:
                self._timeline(name).setdefault("cancel", self.clock())
                self._advance(name)
            else:  # no clock to reach Canceled by: the request is accepted, as the service says at once
                self.items[name]._status = "CancelRequested"
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
        # (endpoint, deployment, request) -> raw reply, or raises; when set, it answers instead of `replies`
        self.respond: Callable[[str, str | None, dict], str] | None = None

    def _entity(self, endpoint, state: str):
        from azure.ai.ml.entities import ManagedOnlineEndpoint

        return ManagedOnlineEndpoint(
            name=endpoint.name, auth_mode=endpoint.auth_mode, tags=dict(endpoint.tags or {}),
            traffic=dict(endpoint.traffic or {}), provisioning_state=as_sdk_enum("EndpointProvisioningState", state),
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
        request = json.loads(Path(request_file).read_text())  # the SDK reads the file first
        if deployment_name:  # then `_validate_deployment_name`: the endpoint's deployments, listed
            deployments = self._client.online_deployments.of(endpoint_name)
            if endpoint_name not in self.items:
                raise not_found("endpoint", endpoint_name)  # listing a missing endpoint's deployments: 404
            if deployment_name not in deployments:
                raise unknown_deployment(deployment_name if deployments else None)
        if endpoint_name not in self.items:
            raise not_found("endpoint", endpoint_name)
        self.invocations.append((endpoint_name, deployment_name, request))
        if self.respond is not None:
            return self.respond(endpoint_name, deployment_name, request)
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
        deployment._provisioning_state = as_sdk_enum("DeploymentProvisioningState", "Succeeded")
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


# What a workspace answers as its mlflow_tracking_uri (the ARM scope of the workspace in the path).
TRACKING_URI = ("azureml://westeurope.api.azureml.ms/mlflow/v2.0/subscriptions/00000000-0000-0000-0000-000000000000"
                "/resourceGroups/rg/providers/Microsoft.MachineLearningServices/workspaces/ws")


class Workspaces(_Ops):
    def __init__(self, client):
        super().__init__(client, "workspaces")

    def get(self, name: str | None = None, **kwargs):
        from azure.ai.ml.entities import Workspace

        self._enter("get")
        workspace = Workspace(name=name or self._client.workspace_name)
        workspace._mlflow_tracking_uri = TRACKING_URI
        return workspace


class FakeMLClient:
    """Workspace client (or, with `registry_name`, a registry client) held in memory."""

    def __init__(self, *, workspace_name: str = "ws", registry_name: str | None = None):
        self.workspace_name = workspace_name
        self.registry_name = registry_name
        self.registries: dict[str, FakeMLClient] = {}  # what `models.share(registry_name=...)` can reach
        self.calls: list[str] = []
        self.faults: dict[str, list[BaseException]] = defaultdict(list)
        self.core_retries: list[tuple[str, BaseException]] = []  # what azure-core's retries absorbed
        self.rest_payloads: list[dict] = []
        self.models = Models(self, registry_name)
        self.components = Components(self)
        self.compute = Compute(self)
        self.jobs = Jobs(self)
        self.online_endpoints = OnlineEndpoints(self)
        self.online_deployments = OnlineDeployments(self)
        self.workspaces = Workspaces(self)

    def fail(self, operation: str, error: BaseException, times: int = 1) -> None:
        try:
            errors = [copy.copy(error) for _ in range(times)]
        except TypeError:  # MlException cannot be copied; raising the same one again is as good
            errors = [error] * times
        self.faults[operation].extend(errors)


# ---------------------------------------------------------------------------------------------
# An experiment, the real component spec and model specs (tests/fixtures/azureml), a data folder

FIXTURES = Path(__file__).parent / "fixtures" / "azureml"
COMPONENT_SPEC = FIXTURES / "chat_completion_pipeline-0.0.82.yaml"

EXPERIMENT = {
    "name": "phi4-ultrachat",
    "backend": "azure",
    "model": {"name": "Phi-4", "registry": "azureml"},
    "data": {"dataset": "HuggingFaceH4/ultrachat_200k"},
    "compute": {"cluster": "gpu-a100", "size": "Standard_NC24ads_A100_v4"},
    "training": {"num_train_epochs": 3, "learning_rate": 5.0e-6, "lr_scheduler_type": "cosine",
                 "max_seq_length": 2048, "save_total_limit": 1},
    "optimization": {"apply_lora": True, "apply_deepspeed": True, "deepspeed_stage": 2},
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


def write_component(folder: Path, version: str = "0.0.82") -> Path:
    """The real chat_completion_pipeline 0.0.82 spec, under another version number when asked."""
    text = COMPONENT_SPEC.read_text(encoding="utf-8")
    path = folder / f"chat_completion_pipeline-{version}.yaml"
    path.write_text(text.replace("\nversion: 0.0.82\n", f"\nversion: {version}\n", 1), encoding="utf-8")
    return path


def model_specs() -> list[dict[str, Any]]:
    return yaml.safe_load((FIXTURES / "models.yaml").read_text(encoding="utf-8"))


def model_spec(name: str, version: str, source_date: str | None = None) -> dict[str, Any]:
    """One real model spec; `source_date` picks the state of a version that changed over time."""
    found = [m for m in model_specs() if m["name"] == name and m["version"] == version
             and (source_date is None or f"({source_date})" in m["source"])]
    if not found:
        raise KeyError(f"no fixture for {name}:{version} {source_date or ''}")
    return copy.deepcopy(found[-1])


# What the azureml registry holds now (Azure/azureml-assets, 2026-07-01): Phi-3-mini archived, Phi-4 current.
CURRENT_MODELS = (("Phi-3-mini-4k-instruct", "15", "2026-07-01"), ("Phi-4", "8", "2026-07-01"))


def data_dir(folder: Path) -> Path:
    out = folder / "data"
    for split in ("train_sft", "test_sft", "test_gen"):
        write_jsonl(out / f"{split}.jsonl", [chat_row(f"{split} question {i}?", f"Answer {i}.") for i in range(3)])
    return out


def reference_clients(component, models=CURRENT_MODELS) -> tuple[FakeMLClient, FakeMLClient]:
    """A workspace and an `azureml` registry as in the reference flow: the models of the real
    registry with their real tags, the pipeline component, an A100 cluster and the VM sizes."""
    from azure.ai.ml.entities import AmlCompute, VmSize

    a100 = "Standard_NC24ads_A100_v4"
    workspace, registry = FakeMLClient(), FakeMLClient(registry_name="azureml")
    for name, version, when in models:
        registry.models.publish(model_spec(name, version, when))
    registry.components.add(component)
    workspace.compute.clusters["gpu-a100"] = AmlCompute(name="gpu-a100", size=a100, min_instances=0, max_instances=2)
    workspace.compute.clusters["gpu-a100"]._provisioning_state = "Succeeded"  # as the service reads it back
    workspace.compute.sizes = [VmSize(name="Standard_NC8as_T4_v3", gpus=1), VmSize(name=a100, gpus=1),
                               VmSize(name="Standard_NC48ads_A100_v4", gpus=2), VmSize(name="Standard_D4s_v3", gpus=0)]
    return workspace, registry


# ---------------------------------------------------------------------------------------------
# The real SDK clients, offline: a credential that needs no sign-in and an azure-core transport
# that answers each request from a function, so the SDK's own pipeline (retries, error mapping,
# deserialization) runs as it does against Azure.

class StaticCredential:
    """A TokenCredential that hands out one token: no Entra ID, no interactive sign-in."""

    def __init__(self, token: str = "fake-access-token"):
        self.token, self.scopes = token, []

    def get_token(self, *scopes, **kwargs):
        from azure.core.credentials import AccessToken

        self.scopes.append(scopes)
        return AccessToken(self.token, 4102444800)

    def get_token_info(self, *scopes, options=None):
        from azure.core.credentials import AccessTokenInfo

        self.scopes.append(scopes)
        return AccessTokenInfo(self.token, 4102444800)


class CannedTransport:
    """An azure-core HttpTransport whose answers come from `answer(request) -> (status, json body[,
    headers])`; it records the requests and the retry policy's sleeps instead of sleeping."""

    def __init__(self, answer: Callable[[Any], tuple]):
        self.answer, self.requests, self.sleeps = answer, [], []

    def __enter__(self):
        return self

    def __exit__(self, *args) -> None:
        pass

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)

    def send(self, request, **kwargs):
        import requests
        from azure.core.rest._requests_basic import RestRequestsTransportResponse

        self.requests.append(request)
        status, body, *rest = self.answer(request)
        raw = requests.Response()
        raw.status_code, raw._content, raw.url = status, json.dumps(body).encode(), request.url
        raw._content_consumed, raw.raw = True, io.BytesIO(raw._content)
        raw.headers.update({"Content-Type": "application/json", **(rest[0] if rest else {})})
        raw.reason = "OK" if status < 400 else "Error"
        response = RestRequestsTransportResponse(request=request, internal_response=raw, block_size=4096)
        response._content = raw._content  # read already, as after a non-streamed request
        return response
