"""One stand-in for every service the product's Azure SDKs reach, on the wire (tests/standin/proxy.py):

| host | what |
|---|---|
| pipelines…actions.githubusercontent.com | GitHub's OIDC token service (identity.py) |
| login.microsoftonline.com | Entra ID's token endpoint, federated client assertion (identity.py) |
| management.azure.com | ARM, Microsoft.MachineLearningServices: workspace, computes, VM sizes, jobs, models, datastores, online endpoints and deployments (long-running operations), listKeys |
| <region>.api.azureml.ms | registry discovery, the registry's data plane (models, components), the MLflow tracking API |
| <account>.blob.core.windows.net | the workspace's default blob datastore (job inputs are uploaded there) |
| <endpoint>.<region>.inference.ml.azure.com | scoring, with the endpoint's key |

Strict as the services are: a bearer token that Entra issued, for the right audience and unexpired;
a known api-version; a JSON body where one is due; 404/409 bodies in ARM's error shape; long-running
operations driven through `Azure-AsyncOperation` / `Location` with provisioningState transitions.
Faults are queued per (method, path pattern): 429 with Retry-After, 503, 409, a dropped connection.
Every request is logged (`calls`), so tests and the benchmark count them.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import re
import secrets
import threading
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.standin import identity
from tests.standin.ca import TestCA
from tests.standin.identity import ARM_RESOURCE, Identities, arm_error
from tests.standin.proxy import DROP, Proxy, Reply, Request

SUBSCRIPTION = "00000000-1111-2222-3333-444444444444"
RESOURCE_GROUP = "rg-ml"
WORKSPACE = "ws-staging"
REGION = "westeurope"
STAGING_CLIENT = "11111111-2222-3333-4444-555555555555"  # AZURE_CLIENT_ID: the pull-request identity
PRODUCTION_CLIENT = "66666666-7777-8888-9999-000000000000"  # AZURE_CLIENT_ID_PRODUCTION
REGISTRY_SUBSCRIPTION = "99999999-8888-7777-6666-555555555555"
STORAGE_ACCOUNT = "wsstagingstore0123"
PROVIDER = "Microsoft.MachineLearningServices"
EXPERIMENT = "phi3-ultrachat"  # the MLflow experiment the jobs log to (the job's experiment_name)
ARM_HOST = "management.azure.com"
ML_HOST = f"{REGION}.api.azureml.ms"
BLOB_HOST = f"{STORAGE_ACCOUNT}.blob.core.windows.net"
DISCOVERY_HOST = "eastus.api.azureml.ms"  # azure-ai-ml's registry_discovery_endpoint for AzureCloud
REGISTRY_HOST = f"cert-{REGION}.experiments.azureml.net"  # the registry's primaryRegionResourceProviderUri

# api-versions the service accepts (the folders of azure-rest-api-specs' Microsoft.MachineLearningServices
# that azure-ai-ml 1.35 uses, see tests/fixtures/arm/README.md); anything else gets ARM's 400.
API_VERSIONS = {  # folders of specification/machinelearningservices/resource-manager/Microsoft.MachineLearningServices/
    "2021-04-01", "2021-07-01", "2022-01-01-preview", "2022-02-01-preview", "2022-05-01", "2022-06-01-preview",
    "2022-10-01", "2022-10-01-preview", "2022-12-01-preview", "2023-02-01-preview", "2023-04-01",
    "2023-04-01-preview", "2023-06-01-preview", "2023-08-01-preview", "2023-10-01", "2024-01-01-preview",
    "2024-04-01", "2024-04-01-preview", "2024-07-01-preview", "2024-10-01", "2024-10-01-preview",
    "2025-01-01-preview", "2025-04-01", "2025-04-01-preview", "2025-06-01", "2025-07-01-preview", "2025-09-01",
    "2025-12-01"}
REGISTRY_API_VERSIONS = {"2021-10-01-dataplanepreview"}
# what the service reads from a registered MLflow model's MLmodel file (a transformers chat model)
MLFLOW_FLAVORS = {"python_function": {"data": {"loader_module": "mlflow.transformers", "python_version": "3.10.14"}},
                  "transformers": {"data": {"task": "chat-completion", "transformers_version": "4.44.0"}}}
TERMINAL_JOB_STATES = {"Completed", "Failed", "Canceled"}


# -- role assignments (README, "The gate is a boundary: two identities") ------------------------------

def _production_endpoint(rest: str) -> bool:
    return re.match(r"/onlineEndpoints/prod-", rest, re.IGNORECASE) is not None


def _reads(method: str, rest: str) -> bool:
    return method == "GET" or (method == "POST" and rest.endswith("/listKeys"))


def staging_may(method: str, rest: str) -> bool:
    """The pull-request identity: AzureML Data Scientist on the workspace, except that it only reads
    (and scores) the production endpoints."""
    return not _production_endpoint(rest) or _reads(method, rest)


def production_may(method: str, rest: str) -> bool:
    """The production identity: reads the workspace, scores the staging endpoints, writes the
    production endpoints and the models' tags; no jobs, no staging endpoints, no datastore secrets."""
    if _reads(method, rest):
        return True
    return _production_endpoint(rest) or (method == "PUT" and re.fullmatch(r"/models/[^/]+/versions/[^/]+", rest)
                                          is not None)


def authorization_failed(client_id: str, method: str, scope: str, rest: str) -> Reply:
    kind = "/".join(part for i, part in enumerate(rest.strip("/").split("/")) if i % 2 == 0) or ""
    verb = {"GET": "read", "PUT": "write", "PATCH": "write", "DELETE": "delete"}.get(method, "action")
    action = f"{PROVIDER}/workspaces{'/' + kind if kind else ''}/{verb}"
    return arm_error(403, "AuthorizationFailed", f"The client '{client_id}' with object id '{client_id}' does not "
                     f"have authorization to perform action '{action}' over scope '{scope}{rest}' or the scope is "
                     "invalid. If access was recently granted, please refresh your credentials.")


def now_iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000+00:00", time.gmtime(seconds))


@dataclass
class Call:
    method: str
    host: str
    path: str
    query: dict[str, list[str]]
    status: int


@dataclass
class Fault:
    method: str
    pattern: re.Pattern
    reply: Reply
    times: int


@dataclass
class Operation:
    """A long-running operation: `polls` more status reads answer InProgress, then it is done."""
    id: str
    polls: int
    on_done: Any  # () -> None
    status: str = "InProgress"


@dataclass
class StandIn:
    """`with StandIn(tmp_path) as azure:`; `azure.env()` is what a GitHub job's step sees."""

    folder: Path
    now: float = field(default_factory=time.time)  # the services' clock; tests move it
    lro_polls: int = 1  # status reads a long-running operation answers InProgress
    retry_after: str = "1"  # what long-running operations ask the client to wait between polls
    calls: list[Call] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    jobs: dict[str, dict] = field(default_factory=dict)
    job_states: dict[str, str] = field(default_factory=dict)
    models: dict[tuple[str, str], dict] = field(default_factory=dict)
    registry_models: dict[tuple[str, str], dict] = field(default_factory=dict)
    components: dict[tuple[str, str], dict] = field(default_factory=dict)
    computes: dict[str, dict] = field(default_factory=dict)
    vm_sizes: list[dict] = field(default_factory=list)
    endpoints: dict[str, dict] = field(default_factory=dict)
    deployments: dict[tuple[str, str], dict] = field(default_factory=dict)
    keys: dict[str, dict[str, str]] = field(default_factory=dict)
    operations: dict[str, Operation] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    blob_meta: dict[str, dict[str, str]] = field(default_factory=dict)
    scored: list[dict] = field(default_factory=list)
    reply_text: str = "Hello from the stand-in."
    slow_s: float = 0.0  # every answer waits this long (the worst-case tick figure)
    spec_problems: list[str] = field(default_factory=list)  # answers off azure-rest-api-specs (spec.py)
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _mlflow_server: Any = None  # (store, Flask test client), made on first use

    def __post_init__(self) -> None:
        self.identities = Identities(clock=lambda: self.now)
        self.identities.apps[STAGING_CLIENT] = identity.Identity(
            STAGING_CLIENT, self.identities.subject, staging_may)
        self.identities.apps[PRODUCTION_CLIENT] = identity.Identity(
            PRODUCTION_CLIENT, identity.SUBJECT_PREFIX + "production", production_may)

    # -- control --------------------------------------------------------------------------------
    def __enter__(self) -> StandIn:
        self._stack = ExitStack()
        self.ca = TestCA(self.folder / "ca")
        self.proxy = self._stack.enter_context(Proxy(self.ca, self.route))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        if self._mlflow_server is not None:
            import mlflow.server.handlers as handlers

            handlers._tracking_store = None
            self._mlflow_server[0].engine.dispose()

    def env(self, environment: str = "staging") -> dict[str, str]:
        """The variables a GitHub job in the `staging` (or `production`: the promote job)
        environment has, and the proxy and CA."""
        bundle = str(self.ca.bundle)
        production = environment == "production"
        return {
            "HTTPS_PROXY": self.proxy.url, "https_proxy": self.proxy.url,
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
            "REQUESTS_CA_BUNDLE": bundle, "SSL_CERT_FILE": bundle, "CURL_CA_BUNDLE": bundle,
            "ACTIONS_ID_TOKEN_REQUEST_URL": f"https://{identity.ACTIONS_HOST}{identity.ACTIONS_PATH}?api-version=2.0",
            "ACTIONS_ID_TOKEN_REQUEST_TOKEN": identity.PRODUCTION_REQUEST_TOKEN if production else identity.REQUEST_TOKEN,
            "AZURE_CLIENT_ID": PRODUCTION_CLIENT if production else STAGING_CLIENT, "AZURE_TENANT_ID": identity.TENANT,
            "AZURE_SUBSCRIPTION_ID": SUBSCRIPTION, "AZURE_RESOURCE_GROUP": RESOURCE_GROUP,
            "AZURE_ML_WORKSPACE": WORKSPACE,
        }

    def fail(self, method: str, pattern: str, reply: Reply, times: int = 1) -> None:
        """Answer the next `times` requests matching (method, host+path regex) with `reply`."""
        with self._lock:
            self.faults.append(Fault(method, re.compile(pattern), reply, times))

    def throttle(self, method: str, pattern: str, retry_after: str = "1", times: int = 1) -> None:
        self.fail(method, pattern, arm_error(429, "TooManyRequests", "The request is being throttled.",
                                             {"Retry-After": retry_after}), times)

    def unavailable(self, method: str, pattern: str, times: int = 1) -> None:
        self.fail(method, pattern, arm_error(503, "ServiceUnavailable", "The service is temporarily unavailable."),
                  times)

    def drop(self, method: str, pattern: str, times: int = 1) -> None:
        self.fail(method, pattern, DROP, times)

    def set_job_state(self, name: str, state: str) -> None:
        with self._lock:
            self.job_states[name] = state

    def count(self, host: str | None = None) -> int:
        return len([c for c in self.calls if host is None or c.host == host])

    # -- routing --------------------------------------------------------------------------------
    def route(self, req: Request) -> Reply:
        if self.slow_s:
            time.sleep(self.slow_s)
        with self._lock:
            reply = self._route(req)
            self.calls.append(Call(req.method, req.host, req.path, req.query, reply.status))
            self._check_spec(req, reply)
            return reply

    def _check_spec(self, req: Request, reply: Reply) -> None:
        from tests.standin import spec

        if req.host != ARM_HOST or not isinstance(reply.body, dict) or reply.status >= 300:
            return
        rest = req.path[len(self._ws_prefix()):]
        kinds = ((r"/onlineEndpoints/[^/]+", "online_endpoint_get.json"),
                 (r"/onlineEndpoints/[^/]+/deployments/[^/]+", "online_deployment_create.json"),
                 (r"/jobs/[^/]+", "pipeline_job_get.json"), (r"/models/[^/]+/versions/[^/]+", "model_version_get.json"))
        for pattern, name in kinds:
            if re.fullmatch(pattern, rest) and (name != "pipeline_job_get.json"
                                                or reply.body.get("properties", {}).get("jobType") == "Pipeline"):
                self.spec_problems += spec.problems(name, reply.body)

    def _route(self, req: Request) -> Reply:
        target = f"{req.host}{req.path}"
        for fault in self.faults:
            if fault.times > 0 and fault.method == req.method and fault.pattern.search(target):
                fault.times -= 1
                return fault.reply
        if req.host == identity.ACTIONS_HOST:
            return self.identities.github(req)
        if req.host == identity.LOGIN_HOST:
            return self.identities.login(req)
        if req.host == ARM_HOST:
            return self._arm(req)
        if req.host.endswith(".api.azureml.ms") or req.host == REGISTRY_HOST:
            return self._ml(req)
        if req.host == BLOB_HOST:
            return self._blob(req)
        if req.host.endswith(f".{REGION}.inference.ml.azure.com"):
            return self._score(req)
        return Reply(502, f"the stand-in does not serve {req.host}")

    # -- ARM ------------------------------------------------------------------------------------
    def _ws_prefix(self) -> str:
        return (f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/{PROVIDER}"
                f"/workspaces/{WORKSPACE}")

    def _arm(self, req: Request) -> Reply:
        caller, refusal = self.identities.caller(req, ARM_RESOURCE)
        if refusal:
            return refusal
        version = req.arg("api-version")
        if version is None:
            return arm_error(400, "MissingApiVersionParameter", "The api-version query parameter (?api-version=) "
                             "is required for all requests.")
        if version not in API_VERSIONS:
            return arm_error(400, "NoRegisteredProviderFound", f"No registered resource provider found for "
                             f"location '{REGION}' and API version '{version}' for type 'workspaces'. The supported "
                             f"api-versions are '{', '.join(sorted(API_VERSIONS))}'.")
        if req.method in ("PUT", "PATCH"):
            try:
                body = req.json()
            except ValueError:
                return arm_error(400, "InvalidRequestContent", "The request content was invalid and could not "
                                 "be deserialized.")
            if not isinstance(body, dict):
                return arm_error(400, "InvalidRequestContent", "The request content was invalid and could not "
                                 "be deserialized: the body must be a JSON object.")
        path = req.path
        locations = f"/subscriptions/{SUBSCRIPTION}/providers/{PROVIDER}/locations/{REGION}"
        if path == f"{locations}/vmSizes" and req.method == "GET":
            return Reply(200, {"value": self.vm_sizes})
        if path.startswith(f"{locations}/mfeOperationResults/") or path.startswith(f"{locations}/mfeOperationsStatus/"):
            return self._operation(req, path.rsplit("/", 1)[-1], kind="location" if "Results" in path else "async")
        prefix = self._ws_prefix()
        if not path.startswith(prefix):
            if re.fullmatch(r"/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft.MachineLearningServices"
                            r"/workspaces/[^/]+(/.*)?", path, re.IGNORECASE):
                return arm_error(404, "ResourceNotFound", f"The Resource '{PROVIDER}/workspaces/"
                                 f"{path.split('/')[8]}' under resource group '{path.split('/')[4]}' was not found.")
            return arm_error(404, "InvalidResourceType", f"The resource type could not be found for {path}.")
        rest = path[len(prefix):]
        if caller.may is not None and not caller.may(req.method, rest):
            return authorization_failed(caller.client_id, req.method, prefix, rest)
        if rest == "" and req.method == "GET":
            return Reply(200, self.workspace_body())
        for pattern, handler in (
            (r"/computes/([^/]+)", self._compute),
            (r"/jobs", self._jobs_list),
            (r"/jobs/([^/]+)", self._job),
            (r"/jobs/([^/]+)/cancel", self._job_cancel),
            (r"/models/([^/]+)/versions", self._model_versions),
            (r"/models/([^/]+)/versions/([^/]+)", self._model_version),
            (r"/models/([^/]+)", self._model_container),
            (r"/datastores", self._datastores),
            (r"/datastores/([^/]+)", self._datastore),
            (r"/datastores/([^/]+)/listSecrets", self._datastore_secrets),
            (r"/onlineEndpoints", self._endpoints_list),
            (r"/onlineEndpoints/([^/]+)", self._endpoint),
            (r"/onlineEndpoints/([^/]+)/listKeys", self._endpoint_keys),
            (r"/onlineEndpoints/([^/]+)/deployments", self._deployments_list),
            (r"/onlineEndpoints/([^/]+)/deployments/([^/]+)", self._deployment),
        ):
            match = re.fullmatch(pattern, rest, re.IGNORECASE)
            if match:
                return handler(req, *match.groups())
        return arm_error(404, "NotFound", f"no route for {req.method} {rest}")

    def _arm_id(self, rest: str) -> str:
        return f"{self._ws_prefix()}{rest}"

    def _system_data(self) -> dict[str, Any]:
        stamp = now_iso(self.now)
        return {"createdAt": stamp, "createdBy": STAGING_CLIENT, "createdByType": "Application",
                "lastModifiedAt": stamp, "lastModifiedBy": STAGING_CLIENT, "lastModifiedByType": "Application"}

    def workspace_body(self) -> dict[str, Any]:
        """Workspaces_Get (2024-10-01-preview): the workspace, its MLflow tracking URI and discovery URL."""
        return {
            "id": self._ws_prefix(), "name": WORKSPACE, "type": f"{PROVIDER}/workspaces", "location": REGION,
            "kind": "Default", "sku": {"name": "Basic", "tier": "Basic"}, "tags": {},
            "identity": {"type": "SystemAssigned", "principalId": str(uuid.UUID(int=7)), "tenantId": identity.TENANT},
            "systemData": self._system_data(),
            "properties": {
                "friendlyName": WORKSPACE, "provisioningState": "Succeeded",
                "workspaceId": "c0ffee00-0000-4000-8000-000000000001",
                "storageAccount": f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/"
                                  f"Microsoft.Storage/storageAccounts/{STORAGE_ACCOUNT}",
                "discoveryUrl": f"https://{ML_HOST}/discovery",
                "mlFlowTrackingUri": f"azureml://{ML_HOST}/mlflow/v1.0/subscriptions/{SUBSCRIPTION}/resourceGroups/"
                                     f"{RESOURCE_GROUP}/providers/{PROVIDER}/workspaces/{WORKSPACE}",
                "publicNetworkAccess": "Enabled", "v1LegacyMode": False,
            },
        }

    # computes ---------------------------------------------------------------------------------
    def _compute(self, req: Request, name: str) -> Reply:
        if req.method != "GET":
            return arm_error(405, "MethodNotAllowed", f"{req.method} computes is not stood in")
        if name not in self.computes:
            return arm_error(404, "ResourceNotFound", f"The Resource '{PROVIDER}/workspaces/{WORKSPACE}/computes/"
                             f"{name}' under resource group '{RESOURCE_GROUP}' was not found.")
        return Reply(200, self.computes[name])

    def add_endpoint(self, name: str, *, tags: dict[str, str] | None = None, traffic: dict[str, int] | None = None,
                     state: str = "Succeeded", deployments: tuple[str, ...] = ()) -> None:
        """An endpoint (and deployments) as the service holds it after its operations finished."""
        scoring = f"https://{name}.{REGION}.inference.ml.azure.com/score"
        self.endpoints[name] = {
            "id": self._arm_id(f"/onlineEndpoints/{name}"), "name": name, "location": REGION,
            "type": f"{PROVIDER}/workspaces/onlineEndpoints", "tags": dict(tags or {}), "kind": "Managed",
            "identity": {"type": "SystemAssigned", "principalId": str(uuid.UUID(int=9)), "tenantId": identity.TENANT},
            "systemData": self._system_data(),
            "properties": {"authMode": "Key", "provisioningState": state, "scoringUri": scoring,
                           "properties": {"azureml.onlineendpointid": self._arm_id(f"/onlineEndpoints/{name}")},
                           "swaggerUri": scoring.replace("/score", "/swagger.json"), "traffic": dict(traffic or {})}}
        self.keys.setdefault(name, {"primaryKey": secrets.token_urlsafe(24), "secondaryKey": secrets.token_urlsafe(24)})
        for key in [k for k in self.deployments if k[0] == name]:
            del self.deployments[key]
        for deployment in deployments:
            self.deployments[(name, deployment)] = {
                "id": self._arm_id(f"/onlineEndpoints/{name}/deployments/{deployment}"), "name": deployment,
                "type": f"{PROVIDER}/workspaces/onlineEndpoints/deployments", "location": REGION, "tags": {},
                "kind": "Managed", "sku": {"name": "Default", "capacity": 1}, "systemData": self._system_data(),
                "properties": {"endpointComputeType": "Managed", "model": "azureml:m:1",
                               "instanceType": "Standard_NC24ads_A100_v4", "scaleSettings": {"scaleType": "Default"},
                               "provisioningState": "Succeeded"}}

    def add_cluster(self, name: str, size: str, state: str = "Succeeded") -> None:
        self.computes[name] = {
            "id": self._arm_id(f"/computes/{name}"), "name": name, "type": f"{PROVIDER}/workspaces/computes",
            "location": REGION, "systemData": self._system_data(),
            "properties": {"computeType": "AmlCompute", "computeLocation": REGION, "provisioningState": state,
                           "isAttachedCompute": False, "disableLocalAuth": True,
                           "properties": {"vmSize": size, "vmPriority": "Dedicated", "osType": "Linux",
                                          "scaleSettings": {"maxNodeCount": 2, "minNodeCount": 0,
                                                            "nodeIdleTimeBeforeScaleDown": "PT120S"},
                                          "allocationState": "Steady", "currentNodeCount": 0, "targetNodeCount": 0,
                                          "remoteLoginPortPublicAccess": "Disabled", "enableNodePublicIp": True}}}

    # jobs -------------------------------------------------------------------------------------
    def _job_view(self, name: str) -> dict[str, Any]:
        body = copy.deepcopy(self.jobs[name])
        body["properties"]["status"] = self.job_states.get(name, "NotStarted")
        return body

    def _job(self, req: Request, name: str) -> Reply:
        if req.method == "GET":
            if name not in self.jobs:
                return arm_error(404, "UserError", f"Job {name} not found.")  # what AML answers
            return Reply(200, self._job_view(name))
        if req.method == "PUT":
            body = req.json()
            props = body.get("properties")
            if not isinstance(props, dict) or "jobType" not in props:
                return arm_error(400, "UserError", "properties.jobType is required.")
            if name in self.jobs:
                return arm_error(400, "UserError", f"A job with this name already exists: {name}. "
                                 "Job names must be unique within a workspace.")
            missing = [k for k, v in (props.get("inputs") or {}).items()
                       if isinstance(v, dict) and str(v.get("uri", "")).startswith(("file:", "/"))]
            if missing:
                return arm_error(400, "UserError", f"inputs {missing} point at a local path")
            stored = {"id": self._arm_id(f"/jobs/{name}"), "name": name, "type": f"{PROVIDER}/workspaces/jobs",
                      "systemData": self._system_data(), "properties": copy.deepcopy(props)}
            stored["properties"]["services"] = {
                "Studio": {"jobServiceType": "Studio",
                           "endpoint": f"https://ml.azure.com/runs/{name}?wsid={self._ws_prefix()}"},
                "Tracking": {"jobServiceType": "Tracking", "endpoint": self.workspace_body()["properties"]["mlFlowTrackingUri"]}}
            self.jobs[name] = stored
            self.job_states[name] = "NotStarted"
            return Reply(201, self._job_view(name))
        return arm_error(405, "MethodNotAllowed", f"{req.method} jobs/{name}")

    def _jobs_list(self, req: Request) -> Reply:
        if req.method != "GET":
            return arm_error(405, "MethodNotAllowed", req.method)
        tag = req.arg("tag")
        found = [self._job_view(n) for n, j in self.jobs.items()
                 if not tag or tag in (j["properties"].get("tags") or {})]
        return self._page(req, found)

    def _page(self, req: Request, items: list, size: int = 2) -> Reply:
        """ARM pagination: `value` and a `nextLink` carrying a $skipToken (small pages, so clients page)."""
        skip = int(req.arg("$skipToken") or 0)
        page = items[skip:skip + size]
        body: dict[str, Any] = {"value": page}
        if skip + size < len(items):
            query = "&".join(f"{k}={v[0]}" for k, v in req.query.items() if k != "$skipToken")
            body["nextLink"] = f"https://{req.host}{req.path}?{query}&$skipToken={skip + size}"
        return Reply(200, body)

    def _job_cancel(self, req: Request, name: str) -> Reply:
        if req.method != "POST":
            return arm_error(405, "MethodNotAllowed", req.method)
        if name not in self.jobs:
            return arm_error(404, "UserError", f"Job {name} not found.")
        state = self.job_states.get(name, "NotStarted")
        if state in TERMINAL_JOB_STATES:
            return arm_error(400, "UserError", f"Cannot cancel job {name} in state {state}.")
        self.job_states[name] = "CancelRequested"
        return self._start(lambda: None, location_only=True)

    # models -----------------------------------------------------------------------------------
    def _model_container(self, req: Request, name: str) -> Reply:
        versions = [k for k in self.models if k[0] == name]
        if req.method == "GET":
            if not versions:
                return arm_error(404, "UserError", f"Model container {name} not found.")
            return Reply(200, {"id": self._arm_id(f"/models/{name}"), "name": name,
                               "type": f"{PROVIDER}/workspaces/models", "systemData": self._system_data(),
                               "properties": {"latestVersion": max(v for _, v in versions), "isArchived": False}})
        return arm_error(405, "MethodNotAllowed", req.method)

    def _model_versions(self, req: Request, name: str) -> Reply:
        found = [self.models[k] for k in sorted(self.models) if k[0] == name]
        if req.method != "GET":
            return arm_error(405, "MethodNotAllowed", req.method)
        if not found:
            return arm_error(404, "UserError", f"Model container {name} not found.")
        return self._page(req, found)

    def _model_version(self, req: Request, name: str, version: str) -> Reply:
        key = (name, version)
        if req.method == "GET":
            if key not in self.models:
                return arm_error(404, "UserError", f"Model {name}:{version} not found.")
            return Reply(200, self.models[key])
        if req.method == "PUT":
            props = req.json().get("properties")
            if not isinstance(props, dict) or not props.get("modelUri"):
                return arm_error(400, "UserError", "properties.modelUri is required.")
            if key in self.models and self.models[key]["properties"]["modelUri"] != props["modelUri"]:
                # the SDK compares str(err) with "(UserError) Asset paths cannot be updated."
                return arm_error(400, "UserError", "Asset paths cannot be updated.")
            self.models[key] = {"id": self._arm_id(f"/models/{name}/versions/{version}"), "name": version,
                                "type": f"{PROVIDER}/workspaces/models/versions", "systemData": self._system_data(),
                                "properties": {"flavors": MLFLOW_FLAVORS, "isArchived": False, "stage": "Development",
                                               **props, "provisioningState": "Succeeded"}}
            return Reply(200, self.models[key])
        return arm_error(405, "MethodNotAllowed", req.method)

    # datastores -------------------------------------------------------------------------------
    def _datastore_body(self) -> dict[str, Any]:
        return {"id": self._arm_id("/datastores/workspaceblobstore"), "name": "workspaceblobstore",
                "type": f"{PROVIDER}/workspaces/datastores", "systemData": self._system_data(),
                "properties": {"datastoreType": "AzureBlob", "accountName": STORAGE_ACCOUNT,
                               "containerName": "azureml-blobstore-c0ffee00", "endpoint": "core.windows.net",
                               "protocol": "https", "isDefault": True,
                               "credentials": {"credentialsType": "AccountKey"},
                               "serviceDataAccessAuthIdentity": "WorkspaceSystemAssignedIdentity"}}

    def _datastores(self, req: Request) -> Reply:
        return Reply(200, {"value": [self._datastore_body()]})

    def _datastore(self, req: Request, name: str) -> Reply:
        if name != "workspaceblobstore":
            return arm_error(404, "UserError", f"Datastore {name} not found.")
        return Reply(200, self._datastore_body())

    def _datastore_secrets(self, req: Request, name: str) -> Reply:
        if req.method != "POST":
            return arm_error(405, "MethodNotAllowed", req.method)
        return Reply(200, {"secretsType": "AccountKey", "key": "c3RhbmRpbi1hY2NvdW50LWtleQ=="})

    # long-running operations ------------------------------------------------------------------
    def _start(self, on_done, *, body: Any = None, status: int = 202, location_only: bool = False) -> Reply:
        op = Operation(secrets.token_hex(8), self.lro_polls, on_done)
        self.operations[op.id] = op
        base = f"https://{ARM_HOST}/subscriptions/{SUBSCRIPTION}/providers/{PROVIDER}/locations/{REGION}"
        headers = {"Location": f"{base}/mfeOperationResults/{op.id}?api-version=2025-12-01",
                   "Retry-After": self.retry_after}
        if not location_only:
            headers["Azure-AsyncOperation"] = f"{base}/mfeOperationsStatus/{op.id}?api-version=2025-12-01"
        return Reply(status, body, headers)

    def _operation(self, req: Request, op_id: str, kind: str) -> Reply:
        op = self.operations.get(op_id)
        if op is None:
            return arm_error(404, "NotFound", f"operation {op_id} not found")
        if op.status == "InProgress":
            if op.polls > 0:
                op.polls -= 1
            else:
                op.on_done()
                op.status = "Succeeded"
        if kind == "async":
            return Reply(200, {"id": op.id, "name": op.id, "status": op.status,
                               "startTime": now_iso(self.now)}, {"Retry-After": self.retry_after})
        if op.status == "InProgress":
            return Reply(202, None, {"Location": f"https://{req.host}{req.path}?api-version=2025-12-01",
                                     "Retry-After": self.retry_after})
        return Reply(200, None)

    def _busy(self, endpoint: str) -> bool:
        state = self.endpoints.get(endpoint, {}).get("properties", {}).get("provisioningState")
        return state in ("Creating", "Updating", "Deleting") or any(
            d["properties"]["provisioningState"] in ("Creating", "Updating", "Deleting")
            for (e, _), d in self.deployments.items() if e == endpoint)

    def _conflict(self, endpoint: str) -> Reply:
        return arm_error(409, "Conflict", f"Endpoint {endpoint} has an operation in progress; "
                         "wait for it to finish and try again.")

    # online endpoints -------------------------------------------------------------------------
    def _endpoint_view(self, name: str) -> dict[str, Any]:
        return copy.deepcopy(self.endpoints[name])

    def _endpoints_list(self, req: Request) -> Reply:
        return self._page(req, [self._endpoint_view(n) for n in self.endpoints])

    def _endpoint(self, req: Request, name: str) -> Reply:
        if req.method == "GET":
            if name not in self.endpoints:
                return arm_error(404, "UserError", f"Endpoint {name} not found.")
            return Reply(200, self._endpoint_view(name))
        if req.method == "PUT":
            body = req.json()
            props = body.get("properties")
            if not isinstance(props, dict) or props.get("authMode") not in ("Key", "AMLToken", "AADToken"):
                return arm_error(400, "BadArgument", "properties.authMode must be Key, AMLToken or AADToken.")
            if not body.get("location"):
                return arm_error(400, "BadArgument", "location is required.")
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]{1,30}[A-Za-z0-9]", name):
                return arm_error(400, "BadArgument", f"Endpoint name {name} is invalid.")
            if name in self.endpoints and self._busy(name):
                return self._conflict(name)
            unknown = set(props.get("traffic") or {}) - {d for (e, d) in self.deployments if e == name}
            if unknown:
                return arm_error(400, "BadArgument", f"Traffic refers to deployments that do not exist: {sorted(unknown)}")
            created = name not in self.endpoints
            scoring = f"https://{name}.{REGION}.inference.ml.azure.com/score"
            stored = {"id": self._arm_id(f"/onlineEndpoints/{name}"), "name": name,
                      "type": f"{PROVIDER}/workspaces/onlineEndpoints", "location": body["location"],
                      "kind": body.get("kind"), "tags": body.get("tags") or {},
                      "identity": body.get("identity") or {"type": "SystemAssigned",
                                                           "principalId": str(uuid.uuid4()),
                                                           "tenantId": identity.TENANT},
                      "systemData": self._system_data(),
                      "properties": {"properties": {}, **props,
                                     "provisioningState": "Creating" if created else "Updating",
                                     "scoringUri": scoring, "swaggerUri": scoring.replace("/score", "/swagger.json"),
                                     "traffic": props.get("traffic") or {}}}
            self.endpoints[name] = stored
            self.keys.setdefault(name, {"primaryKey": secrets.token_urlsafe(24),
                                        "secondaryKey": secrets.token_urlsafe(24)})

            def done() -> None:
                if name in self.endpoints:
                    self.endpoints[name]["properties"]["provisioningState"] = "Succeeded"

            return self._start(done, body=self._endpoint_view(name), status=201 if created else 200)
        if req.method == "DELETE":
            if name not in self.endpoints:
                return Reply(204)
            if self._busy(name):
                return self._conflict(name)
            self.endpoints[name]["properties"]["provisioningState"] = "Deleting"

            def gone() -> None:
                self.endpoints.pop(name, None)
                for key in [k for k in self.deployments if k[0] == name]:
                    del self.deployments[key]

            return self._start(gone)
        return arm_error(405, "MethodNotAllowed", req.method)

    def _endpoint_keys(self, req: Request, name: str) -> Reply:
        if req.method != "POST":
            return arm_error(405, "MethodNotAllowed", req.method)
        if name not in self.endpoints:
            return arm_error(404, "UserError", f"Endpoint {name} not found.")
        return Reply(200, self.keys[name])

    def _deployments_list(self, req: Request, endpoint: str) -> Reply:
        if endpoint not in self.endpoints:
            return arm_error(404, "UserError", f"Endpoint {endpoint} not found.")
        return self._page(req, [copy.deepcopy(d) for (e, _), d in self.deployments.items() if e == endpoint])

    def _deployment(self, req: Request, endpoint: str, name: str) -> Reply:
        key = (endpoint, name)
        if req.method == "GET":
            if key not in self.deployments:
                return arm_error(404, "UserError", f"Deployment {name} of endpoint {endpoint} not found.")
            return Reply(200, copy.deepcopy(self.deployments[key]))
        if endpoint not in self.endpoints:
            return arm_error(404, "UserError", f"Endpoint {endpoint} not found.")
        if req.method == "PUT":
            body = req.json()
            props = body.get("properties")
            if not isinstance(props, dict) or props.get("endpointComputeType") != "Managed":
                return arm_error(400, "BadArgument", "properties.endpointComputeType must be Managed.")
            if not body.get("sku", {}).get("capacity") or not props.get("instanceType") or not props.get("model"):
                return arm_error(400, "BadArgument", "sku.capacity, properties.instanceType and properties.model "
                                 "are required.")
            if self._busy(endpoint):
                return self._conflict(endpoint)
            created = key not in self.deployments
            self.deployments[key] = {"id": self._arm_id(f"/onlineEndpoints/{endpoint}/deployments/{name}"),
                                     "name": name, "type": f"{PROVIDER}/workspaces/onlineEndpoints/deployments",
                                     "location": body.get("location"), "tags": body.get("tags") or {},
                                     "kind": body.get("kind"), "sku": body["sku"], "systemData": self._system_data(),
                                     "properties": {"scaleSettings": {"scaleType": "Default"},  # the service's defaults
                                                    "appInsightsEnabled": False, "egressPublicNetworkAccess": "Enabled",
                                                    **props,
                                                    "provisioningState": "Creating" if created else "Updating"}}

            def done() -> None:
                if key in self.deployments:
                    self.deployments[key]["properties"]["provisioningState"] = "Succeeded"

            return self._start(done, body=copy.deepcopy(self.deployments[key]), status=201 if created else 200)
        if req.method == "DELETE":
            if key not in self.deployments:
                return Reply(204)
            if self.endpoints[endpoint]["properties"].get("traffic", {}).get(name):
                return arm_error(400, "BadArgument", f"Deployment {name} has traffic; move it first.")
            self.deployments[key]["properties"]["provisioningState"] = "Deleting"
            return self._start(lambda: self.deployments.pop(key, None))
        return arm_error(405, "MethodNotAllowed", req.method)

    # -- <region>.api.azureml.ms: registry discovery and data plane, MLflow ---------------------
    def _ml(self, req: Request) -> Reply:
        # Azure ML's data plane takes a token for ARM or for Azure ML itself (https://ml.azure.com)
        caller, refusal = self.identities.caller(req, ARM_RESOURCE, identity.ML_RESOURCE)
        if refusal:
            return refusal
        path = req.path
        if match := re.fullmatch(r"/registrymanagement/v1.0/registries/([^/]+)/discovery", path):
            if match.group(1) != "azureml":
                return arm_error(404, "NotFound", f"Registry {match.group(1)} not found.")
            return Reply(200, {"registryName": "azureml", "subscriptionId": REGISTRY_SUBSCRIPTION,
                               "resourceGroup": "azureml-rg", "primaryRegion": REGION,
                               "primaryRegionResourceProviderUri": f"https://{REGISTRY_HOST}/",
                               "registryFqdns": {REGION: {"primary": f"https://{ML_HOST}"}}})
        if path.startswith("/mlflow/v2.0/") or path.startswith("/mlflow/v1.0/"):
            return self._mlflow(req)
        if path.startswith("/mferp/managementfrontend/"):
            return self._registry(req, path.removeprefix("/mferp/managementfrontend"))
        return Reply(404, {"error": {"code": "NotFound", "message": f"no route for {req.method} {path}"}})

    def _registry(self, req: Request, path: str) -> Reply:
        version = req.arg("api-version")
        if version not in REGISTRY_API_VERSIONS:
            return arm_error(400, "InvalidApiVersion", f"api-version {version} is not supported by the registry "
                             f"data plane; supported: {sorted(REGISTRY_API_VERSIONS)}")
        prefix = f"/subscriptions/{REGISTRY_SUBSCRIPTION}/resourceGroups/azureml-rg/providers/{PROVIDER}/registries/azureml"
        if not path.startswith(prefix):
            return arm_error(404, "NotFound", f"registry path {path} not found")
        rest = path[len(prefix):]
        for pattern, store, kind in ((r"/models/([^/]+)/versions(?:/([^/]+))?", self.registry_models, "Model"),
                                     (r"/components/([^/]+)/versions(?:/([^/]+))?", self.components, "Component")):
            match = re.fullmatch(pattern, rest)
            if not match:
                continue
            if req.method != "GET":
                return arm_error(405, "MethodNotAllowed", f"{req.method} {rest} is not stood in")
            name, version = match.groups()
            if version is not None:
                if (name, version) not in store:
                    return arm_error(404, "UserError", f"{kind} {name}:{version} not found in registry azureml.")
                return Reply(200, copy.deepcopy(store[(name, version)]))
            found = sorted((v for (n, _), v in store.items() if n == name),
                           key=lambda v: v["systemData"]["createdAt"], reverse=True)
            if kind == "Model" and req.arg("listViewType") != "All":
                found = [v for v in found if not v["properties"].get("isArchived")]
            top = int(req.arg("$top") or 100)
            return Reply(200, {"value": found[:top]})
        return arm_error(404, "NotFound", f"no registry route for {req.method} {rest}")

    def _registry_id(self, rest: str) -> str:
        return (f"azureml://registries/azureml{rest}")

    def publish_model(self, spec: dict[str, Any]) -> None:
        """A registry model from an entry of tests/fixtures/azureml/models.yaml (Azure/azureml-assets):
        tags are strings on the wire; system metadata as the registry holds it."""
        name, version = spec["name"], str(spec["version"])
        tags = {k: v if isinstance(v, str) else str(v) for k, v in (spec.get("tags") or {}).items()}
        props: dict[str, Any] = {"modelUri": self._registry_id(f"/models/{name}/versions/{version}"),
                                 "modelType": "mlflow_model", "tags": tags,
                                 "isArchived": bool(spec.get("is_archived")), "properties": {},
                                 "flavors": {"python_function": {"data": {"loader_module": "mlflow.transformers"}}}}
        if spec.get("system_metadata"):
            props["systemMetadata"] = spec["system_metadata"]
        created = now_iso(self.now - 86400 * (100 - len(self.registry_models)))
        self.registry_models[(name, version)] = {
            "id": self._registry_id(f"/models/{name}/versions/{version}"), "name": version,
            "type": "Microsoft.MachineLearningServices/registries/models/versions",
            "properties": props, "systemData": {"createdAt": created, "lastModifiedAt": created}}

    def publish_component(self, rest: dict[str, Any], name: str, version: str) -> None:
        created = now_iso(self.now - 86400 + len(self.components))
        self.components[(name, version)] = {
            **rest, "id": self._registry_id(f"/components/{name}/versions/{version}"), "name": version,
            "type": "Microsoft.MachineLearningServices/registries/components/versions",
            "systemData": {"createdAt": created, "lastModifiedAt": created}}

    # -- blob storage ---------------------------------------------------------------------------
    def _blob(self, req: Request) -> Reply:
        auth = req.headers.get("authorization", "")
        if not auth.startswith("SharedKey ") and "sig=" not in "&".join(req.query):
            return Reply(403, "<?xml version=\"1.0\" encoding=\"utf-8\"?><Error><Code>NoAuthenticationInformation"
                         "</Code><Message>Server failed to authenticate the request.</Message></Error>",
                         {"Content-Type": "application/xml", "x-ms-error-code": "NoAuthenticationInformation"})
        key = req.path
        stamp = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(self.now))
        if req.method == "PUT" and req.arg("comp") == "metadata":  # Set Blob Metadata: 200
            if key not in self.blobs:
                return Reply(404, None, {"x-ms-error-code": "BlobNotFound"})
            self.blob_meta[key] = {k: v for k, v in req.headers.items() if k.startswith("x-ms-meta-")}
            return Reply(200, None, {"ETag": f"\"0x{secrets.token_hex(8)}\"", "Last-Modified": stamp,
                                     "x-ms-request-server-encrypted": "true"})
        if req.method == "PUT":  # Put Blob: 201
            if req.headers.get("x-ms-blob-type") != "BlockBlob":
                return Reply(400, None, {"x-ms-error-code": "MissingRequiredHeader"})
            self.blobs[key] = req.body
            self.blob_meta[key] = {k: v for k, v in req.headers.items() if k.startswith("x-ms-meta-")}
            return Reply(201, None, {"ETag": f"\"0x{hashlib.md5(req.body).hexdigest()[:16]}\"",
                                     "Last-Modified": stamp, "x-ms-request-server-encrypted": "true",
                                     "Content-MD5": base64.b64encode(hashlib.md5(req.body).digest()).decode()})
        if req.method in ("GET", "HEAD"):
            if req.arg("comp") == "list" or req.arg("restype") == "container":
                return Reply(200, "<?xml version=\"1.0\" encoding=\"utf-8\"?><EnumerationResults><Blobs></Blobs>"
                             "<NextMarker /></EnumerationResults>", {"Content-Type": "application/xml"})
            if key not in self.blobs:
                return Reply(404, None, {"x-ms-error-code": "BlobNotFound"})
            return Reply(200, self.blobs[key], {"Content-Type": "application/octet-stream", "Last-Modified": stamp,
                                                "x-ms-blob-type": "BlockBlob", "ETag": "\"0x1\"",
                                                **self.blob_meta.get(key, {})})
        return Reply(405, None)

    # -- scoring --------------------------------------------------------------------------------
    def _score(self, req: Request) -> Reply:
        name = req.host.split(".")[0]
        if name not in self.endpoints or req.path != "/score":
            return Reply(404, "Not Found")
        if req.bearer not in self.keys.get(name, {}).values():
            return Reply(401, "key_auth_access_denied")
        if req.method != "POST":
            return Reply(405, "Method Not Allowed")
        traffic = self.endpoints[name]["properties"].get("traffic") or {}
        deployment = req.headers.get("azureml-model-deployment") or max(traffic, key=traffic.get, default=None)
        if not deployment or (name, deployment) not in self.deployments:
            return Reply(404, "No valid deployments to route to. Please check that the endpoint has at least one "
                         "deployment with positive weight values or use a deployment specific header to route.")
        try:
            body = req.json()
        except ValueError:
            return Reply(400, {"error": "request body is not JSON"})
        if not isinstance(body, dict) or "input_data" not in body:
            return Reply(400, {"error": "input_data is required"})
        self.scored.append({"endpoint": name, "deployment": deployment, "request": body})
        return Reply(200, {"output": self.reply_text})

    # -- MLflow tracking: MLflow's own server app over a SQLite store ---------------------------------
    # The workspace's tracking URI maps to https://<region>.api.azureml.ms/mlflow/v2.0/<workspace scope>;
    # what follows the scope is MLflow's REST API, answered by mlflow.server's Flask app in process.
    def _mlflow_app(self):
        if self._mlflow_server is None:
            import mlflow.server.handlers as handlers
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

            store = SqlAlchemyStore(f"sqlite:///{self.folder}/mlflow.db", str(self.folder / "mlartifacts"))
            handlers._tracking_store = store  # set before the first request: no process-wide tracking URI
            from mlflow.server import app

            self._mlflow_server = (store, app.test_client())
        return self._mlflow_server

    def log_loss(self, job: str, points: list[tuple[int, float]], eval_loss: float | None = None) -> None:
        """What the job's fine-tune step logs: a child run (tag mlflow.rootRunId = the pipeline job)
        with its training loss by step, and the eval loss once it has one."""
        from mlflow.entities import Metric, RunTag

        store, _ = self._mlflow_app()
        experiment = store.get_experiment_by_name(EXPERIMENT) or store.get_experiment(
            store.create_experiment(EXPERIMENT))
        runs = store.search_runs([experiment.experiment_id], f"tags.mlflow.rootRunId = '{job}'", 1, 10)
        run = runs[0] if runs else store.create_run(experiment.experiment_id, STAGING_CLIENT,
                                                     int(self.now * 1000), [RunTag("mlflow.rootRunId", job)],
                                                     "finetune_chat_completion")
        for step, loss in points:
            store.log_metric(run.info.run_id, Metric("loss", loss, int(self.now * 1000), step))
        if eval_loss is not None:
            store.log_metric(run.info.run_id, Metric("eval_loss", eval_loss, int(self.now * 1000), points[-1][0]))

    def _mlflow(self, req: Request) -> Reply:
        marker = "/api/2.0/mlflow/"
        scope = (f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/{PROVIDER}"
                 f"/workspaces/{WORKSPACE}")
        head, _, tail = req.path.partition(marker)
        if not tail or not head.endswith(scope):
            return Reply(404, {"error_code": "ENDPOINT_NOT_FOUND", "message": f"no MLflow route {req.path}"})
        _, client = self._mlflow_app()
        query = "&".join(f"{k}={v}" for k, values in req.query.items() for v in values)
        answer = client.open(marker + tail, method=req.method, query_string=query, data=req.body,
                             content_type=req.headers.get("content-type", "application/json"))
        return Reply(answer.status_code, answer.get_data(),
                     {"Content-Type": answer.headers.get("Content-Type", "application/json")})
