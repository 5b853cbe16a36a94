"""ARM (management.azure.com), Microsoft.MachineLearningServices: the workspace, computes, VM sizes,
jobs, models, datastores, online endpoints and deployments (long-running operations) and listKeys:
the handlers of StandIn (service.py), as a mixin."""

from __future__ import annotations

import copy
import re
import secrets
import uuid
from dataclasses import dataclass, field
from typing import Any

from tests.standin import identity
from tests.standin.identity import ARM_RESOURCE, arm_error
from tests.standin.names import (
    API_VERSIONS,
    ARM_HOST,
    ML_HOST,
    MLFLOW_FLAVORS,
    PRODUCTION_REGISTRY,
    PROVIDER,
    REGION,
    RESOURCE_GROUP,
    STAGING_CLIENT,
    SUBSCRIPTION,
    TERMINAL_JOB_STATES,
    WORKSPACE,
    authorization_failed,
    may,
    now_iso,
)
from tests.standin.proxy import Reply, Request


@dataclass
class Operation:
    """A long-running operation: `polls` more status reads answer InProgress, then it is done."""
    id: str
    polls: int
    on_done: Any  # () -> None
    status: str = "InProgress"


@dataclass
class Space:
    """One workspace and what it holds: the staging one (the pull requests') and production's, each in
    its own resource group."""
    name: str
    resource_group: str
    workspace_id: str
    storage_account: str
    jobs: dict[str, dict] = field(default_factory=dict)
    job_states: dict[str, str] = field(default_factory=dict)
    models: dict[tuple[str, str], dict] = field(default_factory=dict)
    computes: dict[str, dict] = field(default_factory=dict)
    endpoints: dict[str, dict] = field(default_factory=dict)
    deployments: dict[tuple[str, str], dict] = field(default_factory=dict)
    keys: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return (f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{self.resource_group}/providers/{PROVIDER}"
                f"/workspaces/{self.name}")

    def arm_id(self, rest: str) -> str:
        return f"{self.prefix}{rest}"


_SCOPE = re.compile(rf"/subscriptions/([^/]+)/resourceGroups/([^/]+)/providers/{PROVIDER}/workspaces/([^/]+)(/.*)?",
                    re.IGNORECASE)


class ArmService:
    # -- ARM ------------------------------------------------------------------------------------
    def _ws_prefix(self, workspace: str = WORKSPACE) -> str:
        return self.spaces[workspace].prefix

    def _space(self, subscription: str, group: str, name: str) -> Space | None:
        space = next((s for s in self.spaces.values() if s.name.lower() == name.lower()), None)
        if space is None or subscription != SUBSCRIPTION or space.resource_group.lower() != group.lower():
            return None
        return space

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
        scope = _SCOPE.fullmatch(path)
        if scope is None:
            return arm_error(404, "InvalidResourceType", f"The resource type could not be found for {path}.")
        subscription, group, name, rest = scope.groups()
        rest = rest or ""
        prefix = path[:len(path) - len(rest)]
        # ARM authorizes before it looks: no role at the scope is 403, whether or not the resource exists
        if not may(caller.client_id, "workspaces", name, req.method, rest):
            return authorization_failed(caller.client_id, req.method, prefix, rest)
        ws = self._space(subscription, group, name)
        if ws is None:
            return arm_error(404, "ResourceNotFound", f"The Resource '{PROVIDER}/workspaces/{name}' under "
                             f"resource group '{group}' was not found.")
        if rest == "" and req.method == "GET":
            return Reply(200, self.workspace_body(ws))
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
                return handler(req, ws, *match.groups())
        return arm_error(404, "NotFound", f"no route for {req.method} {rest}")

    def _arm_id(self, rest: str) -> str:
        return f"{self._ws_prefix()}{rest}"

    def _system_data(self) -> dict[str, Any]:
        stamp = now_iso(self.now)
        return {"createdAt": stamp, "createdBy": STAGING_CLIENT, "createdByType": "Application",
                "lastModifiedAt": stamp, "lastModifiedBy": STAGING_CLIENT, "lastModifiedByType": "Application"}

    def workspace_body(self, ws: Space | None = None) -> dict[str, Any]:
        """Workspaces_Get (2024-10-01-preview): the workspace, its MLflow tracking URI and discovery URL."""
        ws = ws or self.spaces[WORKSPACE]
        return {
            "id": ws.prefix, "name": ws.name, "type": f"{PROVIDER}/workspaces", "location": REGION,
            "kind": "Default", "sku": {"name": "Basic", "tier": "Basic"}, "tags": {},
            "identity": {"type": "SystemAssigned", "principalId": str(uuid.UUID(int=7)), "tenantId": identity.TENANT},
            "systemData": self._system_data(),
            "properties": {
                "friendlyName": ws.name, "provisioningState": "Succeeded",
                "workspaceId": ws.workspace_id,
                "storageAccount": f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{ws.resource_group}/providers/"
                                  f"Microsoft.Storage/storageAccounts/{ws.storage_account}",
                "discoveryUrl": f"https://{ML_HOST}/discovery",
                "mlFlowTrackingUri": f"azureml://{ML_HOST}/mlflow/v1.0{ws.prefix}",
                "publicNetworkAccess": "Enabled", "v1LegacyMode": False,
            },
        }

    # computes ---------------------------------------------------------------------------------
    def _compute(self, req: Request, ws: Space, name: str) -> Reply:
        if req.method != "GET":
            return arm_error(405, "MethodNotAllowed", f"{req.method} computes is not stood in")
        if name not in ws.computes:
            return arm_error(404, "ResourceNotFound", f"The Resource '{PROVIDER}/workspaces/{WORKSPACE}/computes/"
                             f"{name}' under resource group '{RESOURCE_GROUP}' was not found.")
        return Reply(200, ws.computes[name])

    def add_endpoint(self, name: str, *, tags: dict[str, str] | None = None, traffic: dict[str, int] | None = None,
                     state: str = "Succeeded", deployments: tuple[str, ...] = (), workspace: str = WORKSPACE) -> None:
        """An endpoint (and deployments) as the service holds it after its operations finished."""
        ws = self.spaces[workspace]
        scoring = f"https://{name}.{REGION}.inference.ml.azure.com/score"
        ws.endpoints[name] = {
            "id": ws.arm_id(f"/onlineEndpoints/{name}"), "name": name, "location": REGION,
            "type": f"{PROVIDER}/workspaces/onlineEndpoints", "tags": dict(tags or {}), "kind": "Managed",
            "identity": {"type": "SystemAssigned", "principalId": str(uuid.UUID(int=9)), "tenantId": identity.TENANT},
            "systemData": self._system_data(),
            "properties": {"authMode": "Key", "provisioningState": state, "scoringUri": scoring,
                           "properties": {"azureml.onlineendpointid": ws.arm_id(f"/onlineEndpoints/{name}")},
                           "swaggerUri": scoring.replace("/score", "/swagger.json"), "traffic": dict(traffic or {})}}
        ws.keys.setdefault(name, {"primaryKey": secrets.token_urlsafe(24), "secondaryKey": secrets.token_urlsafe(24)})
        for key in [k for k in ws.deployments if k[0] == name]:
            del ws.deployments[key]
        for deployment in deployments:
            ws.deployments[(name, deployment)] = {
                "id": ws.arm_id(f"/onlineEndpoints/{name}/deployments/{deployment}"), "name": deployment,
                "type": f"{PROVIDER}/workspaces/onlineEndpoints/deployments", "location": REGION, "tags": {},
                "kind": "Managed", "sku": {"name": "Default", "capacity": 1}, "systemData": self._system_data(),
                "properties": {"endpointComputeType": "Managed", "model": "azureml:m:1",
                               "instanceType": "Standard_NC24ads_A100_v4", "scaleSettings": {"scaleType": "Default"},
                               "provisioningState": "Succeeded"}}

    def add_cluster(self, name: str, size: str, state: str = "Succeeded") -> None:
        ws = self.spaces[WORKSPACE]
        ws.computes[name] = {
            "id": ws.arm_id(f"/computes/{name}"), "name": name, "type": f"{PROVIDER}/workspaces/computes",
            "location": REGION, "systemData": self._system_data(),
            "properties": {"computeType": "AmlCompute", "computeLocation": REGION, "provisioningState": state,
                           "isAttachedCompute": False, "disableLocalAuth": True,
                           "properties": {"vmSize": size, "vmPriority": "Dedicated", "osType": "Linux",
                                          "scaleSettings": {"maxNodeCount": 2, "minNodeCount": 0,
                                                            "nodeIdleTimeBeforeScaleDown": "PT120S"},
                                          "allocationState": "Steady", "currentNodeCount": 0, "targetNodeCount": 0,
                                          "remoteLoginPortPublicAccess": "Disabled", "enableNodePublicIp": True}}}

    # jobs -------------------------------------------------------------------------------------
    def _job_view(self, ws: Space, name: str) -> dict[str, Any]:
        body = copy.deepcopy(ws.jobs[name])
        body["properties"]["status"] = ws.job_states.get(name, "NotStarted")
        return body

    def _job(self, req: Request, ws: Space, name: str) -> Reply:
        if req.method == "GET":
            if name not in ws.jobs:
                return arm_error(404, "UserError", f"Job {name} not found.")  # what AML answers
            return Reply(200, self._job_view(ws, name))
        if req.method == "PUT":
            body = req.json()
            props = body.get("properties")
            if not isinstance(props, dict) or "jobType" not in props:
                return arm_error(400, "UserError", "properties.jobType is required.")
            if name in ws.jobs:
                return arm_error(400, "UserError", f"A job with this name already exists: {name}. "
                                 "Job names must be unique within a workspace.")
            missing = [k for k, v in (props.get("inputs") or {}).items()
                       if isinstance(v, dict) and str(v.get("uri", "")).startswith(("file:", "/"))]
            if missing:
                return arm_error(400, "UserError", f"inputs {missing} point at a local path")
            stored = {"id": ws.arm_id(f"/jobs/{name}"), "name": name, "type": f"{PROVIDER}/workspaces/jobs",
                      "systemData": self._system_data(), "properties": copy.deepcopy(props)}
            stored["properties"]["services"] = {
                "Studio": {"jobServiceType": "Studio",
                           "endpoint": f"https://ml.azure.com/runs/{name}?wsid={ws.prefix}"},
                "Tracking": {"jobServiceType": "Tracking", "endpoint": self.workspace_body(ws)["properties"]["mlFlowTrackingUri"]}}
            ws.jobs[name] = stored
            ws.job_states[name] = "NotStarted"
            return Reply(201, self._job_view(ws, name))
        return arm_error(405, "MethodNotAllowed", f"{req.method} jobs/{name}")

    def _jobs_list(self, req: Request, ws: Space) -> Reply:
        if req.method != "GET":
            return arm_error(405, "MethodNotAllowed", req.method)
        tag = req.arg("tag")
        found = [self._job_view(ws, n) for n, j in ws.jobs.items()
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

    def _job_cancel(self, req: Request, ws: Space, name: str) -> Reply:
        if req.method != "POST":
            return arm_error(405, "MethodNotAllowed", req.method)
        if name not in ws.jobs:
            return arm_error(404, "UserError", f"Job {name} not found.")
        state = ws.job_states.get(name, "NotStarted")
        if state in TERMINAL_JOB_STATES:
            return arm_error(400, "UserError", f"Cannot cancel job {name} in state {state}.")
        self.set_job_state(name, "CancelRequested")
        return self._start(lambda: None, location_only=True)

    # models -----------------------------------------------------------------------------------
    def _model_container(self, req: Request, ws: Space, name: str) -> Reply:
        versions = [k for k in ws.models if k[0] == name]
        if req.method == "GET":
            if not versions:
                return arm_error(404, "UserError", f"Model container {name} not found.")
            return Reply(200, {"id": ws.arm_id(f"/models/{name}"), "name": name,
                               "type": f"{PROVIDER}/workspaces/models", "systemData": self._system_data(),
                               "properties": {"latestVersion": max(v for _, v in versions), "isArchived": False}})
        return arm_error(405, "MethodNotAllowed", req.method)

    def _model_versions(self, req: Request, ws: Space, name: str) -> Reply:
        found = [ws.models[k] for k in sorted(ws.models) if k[0] == name]
        if req.method != "GET":
            return arm_error(405, "MethodNotAllowed", req.method)
        if not found:
            return arm_error(404, "UserError", f"Model container {name} not found.")
        return self._page(req, found)

    def _model_version(self, req: Request, ws: Space, name: str, version: str) -> Reply:
        key = (name, version)
        if req.method == "GET":
            if key not in ws.models:
                return arm_error(404, "UserError", f"Model {name}:{version} not found.")
            return Reply(200, ws.models[key])
        if req.method == "PUT":
            props = req.json().get("properties")
            if not isinstance(props, dict) or not props.get("modelUri"):
                return arm_error(400, "UserError", "properties.modelUri is required.")
            if key in ws.models and ws.models[key]["properties"]["modelUri"] != props["modelUri"]:
                # the SDK compares str(err) with "(UserError) Asset paths cannot be updated."
                return arm_error(400, "UserError", "Asset paths cannot be updated.")
            ws.models[key] = {"id": ws.arm_id(f"/models/{name}/versions/{version}"), "name": version,
                                "type": f"{PROVIDER}/workspaces/models/versions", "systemData": self._system_data(),
                                "properties": {"flavors": MLFLOW_FLAVORS, "isArchived": False, "stage": "Development",
                                               **props, "provisioningState": "Succeeded"}}
            return Reply(200, ws.models[key])
        return arm_error(405, "MethodNotAllowed", req.method)

    # datastores -------------------------------------------------------------------------------
    def _datastore_body(self, ws: Space) -> dict[str, Any]:
        return {"id": ws.arm_id("/datastores/workspaceblobstore"), "name": "workspaceblobstore",
                "type": f"{PROVIDER}/workspaces/datastores", "systemData": self._system_data(),
                "properties": {"datastoreType": "AzureBlob", "accountName": ws.storage_account,
                               "containerName": "azureml-blobstore-c0ffee00", "endpoint": "core.windows.net",
                               "protocol": "https", "isDefault": True,
                               "credentials": {"credentialsType": "AccountKey"},
                               "serviceDataAccessAuthIdentity": "WorkspaceSystemAssignedIdentity"}}

    def _datastores(self, req: Request, ws: Space) -> Reply:
        return Reply(200, {"value": [self._datastore_body(ws)]})

    def _datastore(self, req: Request, ws: Space, name: str) -> Reply:
        if name != "workspaceblobstore":
            return arm_error(404, "UserError", f"Datastore {name} not found.")
        return Reply(200, self._datastore_body(ws))

    def _datastore_secrets(self, req: Request, ws: Space, name: str) -> Reply:
        if req.method != "POST":
            return arm_error(405, "MethodNotAllowed", req.method)
        return Reply(200, {"secretsType": "AccountKey", "key": "c3RhbmRpbi1hY2NvdW50LWtleQ=="})

    # long-running operations ------------------------------------------------------------------
    def _start(self, on_done, *, body: Any = None, status: int = 202, location_only: bool = False,
               base: str | None = None, api_version: str = "2025-12-01") -> Reply:
        op = Operation(secrets.token_hex(8), self.lro_polls, on_done)
        self.operations[op.id] = op
        base = base or f"https://{ARM_HOST}/subscriptions/{SUBSCRIPTION}/providers/{PROVIDER}/locations/{REGION}"
        headers = {"Location": f"{base}/mfeOperationResults/{op.id}?api-version={api_version}",
                   "Retry-After": self.retry_after}
        if not location_only:
            headers["Azure-AsyncOperation"] = f"{base}/mfeOperationsStatus/{op.id}?api-version={api_version}"
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
            return Reply(202, None, {"Location": f"https://{req.host}{req.path}?api-version={req.arg('api-version')}",
                                     "Retry-After": self.retry_after})
        return Reply(200, None)

    def _busy(self, ws: Space, endpoint: str) -> bool:
        state = ws.endpoints.get(endpoint, {}).get("properties", {}).get("provisioningState")
        return state in ("Creating", "Updating", "Deleting") or any(
            d["properties"]["provisioningState"] in ("Creating", "Updating", "Deleting")
            for (e, _), d in ws.deployments.items() if e == endpoint)

    def _conflict(self, endpoint: str) -> Reply:
        return arm_error(409, "Conflict", f"Endpoint {endpoint} has an operation in progress; "
                         "wait for it to finish and try again.")

    # online endpoints -------------------------------------------------------------------------
    def _endpoint_view(self, ws: Space, name: str) -> dict[str, Any]:
        return copy.deepcopy(ws.endpoints[name])

    def _endpoints_list(self, req: Request, ws: Space) -> Reply:
        return self._page(req, [self._endpoint_view(ws, n) for n in ws.endpoints])

    def _endpoint(self, req: Request, ws: Space, name: str) -> Reply:
        if req.method == "GET":
            if name not in ws.endpoints:
                return arm_error(404, "UserError", f"Endpoint {name} not found.")
            return Reply(200, self._endpoint_view(ws, name))
        if req.method == "PUT":
            body = req.json()
            props = body.get("properties")
            if not isinstance(props, dict) or props.get("authMode") not in ("Key", "AMLToken", "AADToken"):
                return arm_error(400, "BadArgument", "properties.authMode must be Key, AMLToken or AADToken.")
            if not body.get("location"):
                return arm_error(400, "BadArgument", "location is required.")
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]{1,30}[A-Za-z0-9]", name):
                return arm_error(400, "BadArgument", f"Endpoint name {name} is invalid.")
            if name in ws.endpoints and self._busy(ws, name):
                return self._conflict(name)
            unknown = set(props.get("traffic") or {}) - {d for (e, d) in ws.deployments if e == name}
            if unknown:
                return arm_error(400, "BadArgument", f"Traffic refers to deployments that do not exist: {sorted(unknown)}")
            created = name not in ws.endpoints
            scoring = f"https://{name}.{REGION}.inference.ml.azure.com/score"
            stored = {"id": ws.arm_id(f"/onlineEndpoints/{name}"), "name": name,
                      "type": f"{PROVIDER}/workspaces/onlineEndpoints", "location": body["location"],
                      "kind": body.get("kind") or "Managed", "tags": body.get("tags") or {},
                      "identity": body.get("identity") or {"type": "SystemAssigned",
                                                           "principalId": str(uuid.uuid4()),
                                                           "tenantId": identity.TENANT},
                      "systemData": self._system_data(),
                      "properties": {"properties": {}, **props,
                                     "provisioningState": "Creating" if created else "Updating",
                                     "scoringUri": scoring, "swaggerUri": scoring.replace("/score", "/swagger.json"),
                                     "traffic": props.get("traffic") or {}}}
            ws.endpoints[name] = stored
            ws.keys.setdefault(name, {"primaryKey": secrets.token_urlsafe(24),
                                        "secondaryKey": secrets.token_urlsafe(24)})

            def done() -> None:
                if name in ws.endpoints:
                    ws.endpoints[name]["properties"]["provisioningState"] = "Succeeded"

            return self._start(done, body=self._endpoint_view(ws, name), status=201 if created else 200)
        if req.method == "DELETE":
            if name not in ws.endpoints:
                return Reply(204)
            if self._busy(ws, name):
                return self._conflict(name)
            ws.endpoints[name]["properties"]["provisioningState"] = "Deleting"

            def gone() -> None:
                ws.endpoints.pop(name, None)
                for key in [k for k in ws.deployments if k[0] == name]:
                    del ws.deployments[key]

            return self._start(gone)
        return arm_error(405, "MethodNotAllowed", req.method)

    def _model_refused(self, ws: Space, model: str) -> Reply | None:
        """A deployment names a model of its own workspace or of a registry: one of another workspace
        (production's deployment pointing at the staging workspace's version) is refused, and so is a
        registry version that is not there (a share that never happened)."""
        registry = re.fullmatch(r"azureml://registries/([^/]+)/models/([^/]+)/versions/([^/]+)", model)
        if registry:
            name, found = registry.group(1), (registry.group(2), registry.group(3))
            store = {"azureml": self.registry_models, PRODUCTION_REGISTRY: self.shared_models}.get(name)
            if store is None or found not in store:
                return arm_error(404, "UserError", f"Model {found[0]}:{found[1]} was not found in registry {name}.")
            return None
        other = re.match(rf"/subscriptions/[^/]+/resourceGroups/([^/]+)/providers/{PROVIDER}/workspaces/([^/]+)/models/",
                         model, re.IGNORECASE)
        if other and (other.group(2).lower(), other.group(1).lower()) != (ws.name.lower(), ws.resource_group.lower()):
            return arm_error(400, "UserError", f"The model {model} is not in workspace {ws.name}: a deployment "
                             "uses a model of its own workspace or of a registry.")
        return None

    def _endpoint_keys(self, req: Request, ws: Space, name: str) -> Reply:
        if req.method != "POST":
            return arm_error(405, "MethodNotAllowed", req.method)
        if name not in ws.endpoints:
            return arm_error(404, "UserError", f"Endpoint {name} not found.")
        return Reply(200, ws.keys[name])

    def _deployments_list(self, req: Request, ws: Space, endpoint: str) -> Reply:
        if endpoint not in ws.endpoints:
            return arm_error(404, "UserError", f"Endpoint {endpoint} not found.")
        return self._page(req, [copy.deepcopy(d) for (e, _), d in ws.deployments.items() if e == endpoint])

    def _deployment(self, req: Request, ws: Space, endpoint: str, name: str) -> Reply:
        key = (endpoint, name)
        if req.method == "GET":
            if key not in ws.deployments:
                return arm_error(404, "UserError", f"Deployment {name} of endpoint {endpoint} not found.")
            return Reply(200, copy.deepcopy(ws.deployments[key]))
        if endpoint not in ws.endpoints:
            return arm_error(404, "UserError", f"Endpoint {endpoint} not found.")
        if req.method == "PUT":
            body = req.json()
            props = body.get("properties")
            if not isinstance(props, dict) or props.get("endpointComputeType") != "Managed":
                return arm_error(400, "BadArgument", "properties.endpointComputeType must be Managed.")
            if not body.get("sku", {}).get("capacity") or not props.get("instanceType") or not props.get("model"):
                return arm_error(400, "BadArgument", "sku.capacity, properties.instanceType and properties.model "
                                 "are required.")
            refused = self._model_refused(ws, str(props["model"]))
            if refused is not None:
                return refused
            if self._busy(ws, endpoint):
                return self._conflict(endpoint)
            created = key not in ws.deployments
            ws.deployments[key] = {"id": ws.arm_id(f"/onlineEndpoints/{endpoint}/deployments/{name}"),
                                     "name": name, "type": f"{PROVIDER}/workspaces/onlineEndpoints/deployments",
                                     "location": body.get("location"), "tags": body.get("tags") or {},
                                     "kind": body.get("kind") or "Managed", "sku": body["sku"], "systemData": self._system_data(),
                                     "properties": {"scaleSettings": {"scaleType": "Default"},  # the service's defaults
                                                    "appInsightsEnabled": False, "egressPublicNetworkAccess": "Enabled",
                                                    **props,
                                                    "provisioningState": "Creating" if created else "Updating"}}

            def done() -> None:
                if key in ws.deployments:
                    ws.deployments[key]["properties"]["provisioningState"] = "Succeeded"

            return self._start(done, body=copy.deepcopy(ws.deployments[key]), status=201 if created else 200)
        if req.method == "DELETE":
            if key not in ws.deployments:
                return Reply(204)
            if ws.endpoints[endpoint]["properties"].get("traffic", {}).get(name):
                return arm_error(400, "BadArgument", f"Deployment {name} has traffic; move it first.")
            ws.deployments[key]["properties"]["provisioningState"] = "Deleting"
            return self._start(lambda: ws.deployments.pop(key, None))
        return arm_error(405, "MethodNotAllowed", req.method)
