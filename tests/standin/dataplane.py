"""The data planes: registry discovery and the `azureml` registry, blob storage, scoring, MLflow
tracking: the handlers of StandIn (service.py), as a mixin."""

from __future__ import annotations

import base64
import copy
import hashlib
import re
import secrets
import time
from typing import Any

from tests.standin import identity
from tests.standin.identity import ARM_RESOURCE, arm_error
from tests.standin.names import (
    EXPERIMENT,
    ML_HOST,
    PROVIDER,
    REGION,
    REGISTRIES,
    REGISTRY_API_VERSIONS,
    REGISTRY_HOST,
    RESOURCE_GROUP,
    STAGING_CLIENT,
    SUBSCRIPTION,
    WORKSPACE,
    authorization_failed,
    may,
    now_iso,
)
from tests.standin.proxy import Reply, Request


class DataPlane:
    # -- <region>.api.azureml.ms: registry discovery and data plane, MLflow ---------------------
    def _ml(self, req: Request) -> Reply:
        # Azure ML's data plane takes a token for ARM or for Azure ML itself (https://ml.azure.com)
        caller, refusal = self.identities.caller(req, ARM_RESOURCE, identity.ML_RESOURCE)
        if refusal:
            return refusal
        path = req.path
        if match := re.fullmatch(r"/registrymanagement/v1.0/registries/([^/]+)/discovery", path):
            where = REGISTRIES.get(match.group(1))
            if where is None:
                return arm_error(404, "NotFound", f"Registry {match.group(1)} not found.")
            return Reply(200, {"registryName": match.group(1), "subscriptionId": where[0],
                               "resourceGroup": where[1], "primaryRegion": REGION,
                               "primaryRegionResourceProviderUri": f"https://{REGISTRY_HOST}/",
                               "registryFqdns": {REGION: {"primary": f"https://{ML_HOST}"}}})
        if path.startswith("/mlflow/v2.0/") or path.startswith("/mlflow/v1.0/"):
            return self._mlflow(req, caller)
        if path.startswith("/mferp/managementfrontend/"):
            return self._registry(req, caller, path.removeprefix("/mferp/managementfrontend"))
        return Reply(404, {"error": {"code": "NotFound", "message": f"no route for {req.method} {path}"}})

    def _registry(self, req: Request, caller, path: str) -> Reply:
        version = req.arg("api-version")
        if version not in REGISTRY_API_VERSIONS:
            return arm_error(400, "InvalidApiVersion", f"api-version {version} is not supported by the registry "
                             f"data plane; supported: {sorted(REGISTRY_API_VERSIONS)}")
        operation = re.fullmatch(rf"/subscriptions/[^/]+/providers/{PROVIDER}/locations/{REGION}"
                                 r"/(mfeOperationResults|mfeOperationsStatus)/([^/]+)", path)
        if operation:
            return self._operation(req, operation.group(2),
                                   kind="location" if operation.group(1).endswith("Results") else "async")
        match = re.fullmatch(rf"/subscriptions/([^/]+)/resourceGroups/([^/]+)/providers/{PROVIDER}"
                             r"/registries/([^/]+)(/.*)?", path)
        if not match or REGISTRIES.get(match.group(3)) != (match.group(1), match.group(2)):
            return arm_error(404, "NotFound", f"registry path {path} not found")
        registry, rest = match.group(3), match.group(4) or ""
        scope = path[:len(path) - len(rest)]
        if registry == "azureml":  # Microsoft's public registry: any signed-in caller reads it, nobody writes
            if req.method != "GET":
                return authorization_failed(caller.client_id, req.method, scope, rest, kind="registries")
            models = self.registry_models
        else:
            if not may(caller.client_id, "registries", registry, req.method, rest):
                return authorization_failed(caller.client_id, req.method, scope, rest, kind="registries")
            models = self.shared_models
        if rest == "/import" and registry != "azureml":
            return self._import(req, caller, registry)
        for pattern, store, kind in ((r"/models/([^/]+)/versions(?:/([^/]+))?", models, "Model"),
                                     (r"/components/([^/]+)/versions(?:/([^/]+))?",
                                      self.components if registry == "azureml" else {}, "Component")):
            match = re.fullmatch(pattern, rest)
            if not match:
                continue
            if req.method != "GET":
                return arm_error(405, "MethodNotAllowed", f"{req.method} {rest} is not stood in")
            name, version = match.groups()
            if version is not None:
                if (name, version) not in store:
                    return arm_error(404, "UserError", f"{kind} {name}:{version} not found in registry {registry}.")
                return Reply(200, copy.deepcopy(store[(name, version)]))
            found = sorted((v for (n, _), v in store.items() if n == name),
                           key=lambda v: v["systemData"]["createdAt"], reverse=True)
            if kind == "Model" and req.arg("listViewType") != "All":
                found = [v for v in found if not v["properties"].get("isArchived")]
            top = int(req.arg("$top") or 100)
            return Reply(200, {"value": found[:top]})
        return arm_error(404, "NotFound", f"no registry route for {req.method} {rest}")

    def _import(self, req: Request, caller, registry: str) -> Reply:
        """ResourceManagementAssetReference import (what `models.share` POSTs): copy a workspace's model
        version into the registry, a long-running operation. The caller must be able to read the source
        workspace's version (a role there) besides writing the registry."""
        if req.method != "POST":
            return arm_error(405, "MethodNotAllowed", req.method)
        try:
            props = req.json().get("properties")
        except (ValueError, AttributeError):
            return arm_error(400, "InvalidRequestContent", "The request content was invalid and could not be "
                             "deserialized.")
        if not isinstance(props, dict) or props.get("referenceType") != "Id":
            return arm_error(400, "UserError", "properties.referenceType must be Id.")
        source = re.fullmatch(r"azureml://locations/([^/]+)/workspaces/([^/]+)/models/([^/]+)/versions/([^/]+)",
                              str(props.get("sourceAssetId") or ""))
        name, version = props.get("destinationName"), props.get("destinationVersion")
        if source is None or not name or not version:
            return arm_error(400, "UserError", "sourceAssetId (azureml://locations/<region>/workspaces/<guid>/"
                             "models/<name>/versions/<version>), destinationName and destinationVersion are required.")
        region, guid, source_name, source_version = source.groups()
        ws = next((w for w in self.spaces.values() if w.workspace_id == guid), None)
        if ws is None or region != REGION:
            return arm_error(404, "UserError", f"Workspace {guid} not found in {region}.")
        rest = f"/models/{source_name}/versions/{source_version}"
        if not may(caller.client_id, "workspaces", ws.name, "GET", rest):
            return authorization_failed(caller.client_id, "GET", ws.prefix, rest)
        model = ws.models.get((source_name, source_version))
        if model is None:
            return arm_error(404, "UserError", f"Model {source_name}:{source_version} not found in workspace "
                             f"{ws.name}.")
        if (name, version) in self.shared_models:
            return arm_error(409, "UserError", f"Model {name}:{version} already exists in registry {registry}.")
        copied = {k: v for k, v in copy.deepcopy(model["properties"]).items()
                  if k in ("description", "tags", "properties", "flavors", "modelType", "jobName", "isAnonymous")}
        asset = f"azureml://registries/{registry}/models/{name}/versions/{version}"
        body = {"id": asset, "name": version, "type": f"{PROVIDER}/registries/models/versions",
                "systemData": {"createdAt": now_iso(self.now), "lastModifiedAt": now_iso(self.now)},
                "properties": {**copied, "modelUri": asset, "isArchived": False, "provisioningState": "Succeeded"}}

        def done() -> None:
            self.shared_models[(name, version)] = body

        base = (f"https://{REGISTRY_HOST}/mferp/managementfrontend/subscriptions/{REGISTRIES[registry][0]}"
                f"/providers/{PROVIDER}/locations/{REGION}")
        return self._start(done, base=base, api_version=next(iter(REGISTRY_API_VERSIONS)))

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
        name = req.host.split(".")[0]  # endpoint names are unique in a region, across workspaces
        ws = next((w for w in self.spaces.values() if name in w.endpoints), None)
        if ws is None or req.path != "/score":
            return Reply(404, "Not Found")
        if req.bearer not in ws.keys.get(name, {}).values():
            return Reply(401, "key_auth_access_denied")
        if req.method != "POST":
            return Reply(405, "Method Not Allowed")
        traffic = ws.endpoints[name]["properties"].get("traffic") or {}
        deployment = req.headers.get("azureml-model-deployment") or max(traffic, key=traffic.get, default=None)
        if not deployment or (name, deployment) not in ws.deployments:
            return Reply(404, "No valid deployments to route to. Please check that the endpoint has at least one "
                         "deployment with positive weight values or use a deployment specific header to route.")
        try:
            body = req.json()
        except ValueError:
            return Reply(400, {"error": "request body is not JSON"})
        if not isinstance(body, dict) or "input_data" not in body:
            return Reply(400, {"error": "input_data is required"})
        self.scored.append({"endpoint": name, "deployment": deployment, "request": body, "workspace": ws.name})
        answer = self.replies.get(deployment, self.reply_text)
        return answer if isinstance(answer, Reply) else Reply(200, {"output": answer})

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

    def _mlflow(self, req: Request, caller) -> Reply:
        marker = "/api/2.0/mlflow/"
        scope = (f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/{PROVIDER}"
                 f"/workspaces/{WORKSPACE}")
        head, _, tail = req.path.partition(marker)
        if not tail or not head.endswith(scope):
            return Reply(404, {"error_code": "ENDPOINT_NOT_FOUND", "message": f"no MLflow route {req.path}"})
        # the workspace's roles: a search is a read (experiments/runs/read); anything else POSTed writes
        method = "GET" if req.method == "GET" or tail.endswith("/search") else req.method
        if not may(caller.client_id, "workspaces", WORKSPACE, method, "/experiments/runs"):
            return authorization_failed(caller.client_id, req.method, scope, "/experiments/runs")
        _, client = self._mlflow_app()
        query = "&".join(f"{k}={v}" for k, values in req.query.items() for v in values)
        answer = client.open(marker + tail, method=req.method, query_string=query, data=req.body,
                             content_type=req.headers.get("content-type", "application/json"))
        return Reply(answer.status_code, answer.get_data(),
                     {"Content-Type": answer.headers.get("Content-Type", "application/json")})
