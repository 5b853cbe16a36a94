"""One stand-in for every service the product's Azure SDKs reach, on the wire (tests/standin/proxy.py):

| host | what |
|---|---|
| pipelines…actions.githubusercontent.com | GitHub's OIDC token service (identity.py) |
| login.microsoftonline.com | Entra ID's token endpoint, federated client assertion (identity.py) |
| management.azure.com | ARM, Microsoft.MachineLearningServices: two workspaces (staging `ws-staging` in `rg-ml`, production's `ws-prod` in `rg-ml-prod`), each with computes, jobs, models, datastores, online endpoints and deployments (long-running operations), listKeys; VM sizes; role scopes per identity (names.ROLES: 403 AuthorizationFailed) |
| <region>.api.azureml.ms | registry discovery, the registries' data plane (`azureml`: models, components; production's `reg-chat`: models, the `import` that `models.share` starts), the MLflow tracking API |
| <account>.blob.core.windows.net | the workspace's default blob datastore (job inputs are uploaded there) |
| <endpoint>.<region>.inference.ml.azure.com | scoring, with the endpoint's key |

Strict as the services are: a bearer token that Entra issued, for the right audience and unexpired;
a known api-version; a JSON body where one is due; 404/409 bodies in ARM's error shape; long-running
operations driven through `Azure-AsyncOperation` / `Location` with provisioningState transitions.
Faults are queued per (method, path pattern): 429 with Retry-After, 503, 409, a dropped connection.
Every request is logged (`calls`), so tests and the benchmark count them.
"""

from __future__ import annotations

import re
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.standin import identity
from tests.standin.arm import ArmService, Operation, Space
from tests.standin.ca import TestCA
from tests.standin.dataplane import DataPlane
from tests.standin.identity import Identities, arm_error
from tests.standin.names import (
    ARM_HOST,
    BLOB_HOST,
    PRODUCTION_CLIENT,
    PRODUCTION_REGISTRY,
    PRODUCTION_RESOURCE_GROUP,
    PRODUCTION_STORAGE_ACCOUNT,
    PRODUCTION_WORKSPACE,
    REGION,
    REGISTRY_HOST,
    RESOURCE_GROUP,
    STAGING_CLIENT,
    STORAGE_ACCOUNT,
    SUBSCRIPTION,
    WORKSPACE,
    now_iso,
)
from tests.standin.proxy import DROP, Proxy, Reply, Request


def _forget_credentials() -> None:
    """The product keeps one credential per process and identity (connection.credential); a test
    process starts many stand-ins, each with its own signing key, so none may inherit a cache."""
    try:
        from automation.backends.azure.connection import forget_credentials
    except ImportError:
        return
    forget_credentials()


@dataclass
class Call:
    method: str
    host: str
    path: str
    query: dict[str, list[str]]
    status: int
    client: str = ""  # the identity behind the bearer token (an Entra app id), where one was presented


@dataclass
class Fault:
    method: str
    pattern: re.Pattern
    reply: Reply
    times: int


@dataclass
class StandIn(ArmService, DataPlane):
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
    shared_models: dict[tuple[str, str], dict] = field(default_factory=dict)  # production's registry (reg-chat)
    replies: dict[str, Any] = field(default_factory=dict)  # deployment -> its scoring text, or a Reply
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
    spec_problems: list[str] = field(default_factory=list)  # bodies off azure-rest-api-specs (schemas.py)
    spec_checked: list[str] = field(default_factory=list)  # "request|answer <schema>" of each body checked
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _mlflow_server: Any = None  # (store, Flask test client), made on first use

    def __post_init__(self) -> None:
        self.identities = Identities(clock=lambda: self.now)
        self.identities.apps[STAGING_CLIENT] = identity.Identity(STAGING_CLIENT, self.identities.subject)
        self.identities.apps[PRODUCTION_CLIENT] = identity.Identity(
            PRODUCTION_CLIENT, identity.SUBJECT_PREFIX + "production")
        # the staging workspace's stores are this object's own fields (tests and the benchmark read them)
        self.spaces = {
            WORKSPACE: Space(WORKSPACE, RESOURCE_GROUP, "c0ffee00-0000-4000-8000-000000000001", STORAGE_ACCOUNT,
                             jobs=self.jobs, job_states=self.job_states, models=self.models, computes=self.computes,
                             endpoints=self.endpoints, deployments=self.deployments, keys=self.keys),
            PRODUCTION_WORKSPACE: Space(PRODUCTION_WORKSPACE, PRODUCTION_RESOURCE_GROUP,
                                        "c0ffee00-0000-4000-8000-000000000002", PRODUCTION_STORAGE_ACCOUNT),
        }
        self.production = self.spaces[PRODUCTION_WORKSPACE]

    # -- control --------------------------------------------------------------------------------
    def __enter__(self) -> StandIn:
        _forget_credentials()  # a credential of this process holds tokens of an earlier stand-in
        self._stack = ExitStack()
        self.ca = TestCA(self.folder / "ca")
        self.proxy = self._stack.enter_context(Proxy(self.ca, self.route))
        return self

    def __exit__(self, *exc: object) -> None:
        _forget_credentials()
        self._stack.close()
        if self._mlflow_server is not None:
            import mlflow.server.handlers as handlers

            handlers._tracking_store = None
            self._mlflow_server[0].engine.dispose()

    def session(self):
        """A `requests` session that reaches the stand-in as the SDKs do: through its proxy, trusting
        its CA, ignoring the machine's own proxy settings."""
        import requests

        env = self.env()
        session = requests.Session()
        session.trust_env = False
        session.proxies = {"https": env["HTTPS_PROXY"]}
        session.verify = env["REQUESTS_CA_BUNDLE"]
        return session

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
            **(self.production_variables() if production else {}),
        }

    @staticmethod
    def production_variables() -> dict[str, str]:
        """The `production` environment's variables (tests/fork_setup.PRODUCTION_VARIABLES): its own
        workspace and resource group, the registry, and where staging's candidates are."""
        return {"AZURE_RESOURCE_GROUP": PRODUCTION_RESOURCE_GROUP, "AZURE_ML_WORKSPACE": PRODUCTION_WORKSPACE,
                "AZURE_ML_REGISTRY": PRODUCTION_REGISTRY, "AZURE_STAGING_ML_WORKSPACE": WORKSPACE,
                "AZURE_STAGING_RESOURCE_GROUP": RESOURCE_GROUP}

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
        """The job moves to `state` now (the stand-in's clock): its systemData.lastModifiedAt moves
        with it, as the service stamps a job's status change."""
        with self._lock:
            if self.job_states.get(name) != state and name in self.jobs:
                self.jobs[name]["systemData"]["lastModifiedAt"] = now_iso(self.now)
            self.job_states[name] = state

    def count(self, host: str | None = None) -> int:
        return len([c for c in self.calls if host is None or c.host == host])

    # -- routing --------------------------------------------------------------------------------
    def route(self, req: Request) -> Reply:
        if self.slow_s:
            time.sleep(self.slow_s)
        with self._lock:
            reply = self._route(req)
            claims = self.identities.access_tokens.get(req.bearer or "") or {}
            self.calls.append(Call(req.method, req.host, req.path, req.query, reply.status, claims.get("appid", "")))
            self._check_spec(req, reply)
            return reply

    def _check_spec(self, req: Request, reply: Reply) -> None:
        """Every answer of the Azure ML resource provider (ARM, and the registry's data plane that
        mirrors its routes) and every PUT body the SDK sends, held to azure-rest-api-specs'
        definitions (schemas.py); what breaks them lands in `spec_problems`."""
        from tests.standin import schemas

        registry = req.path.startswith("/mferp/managementfrontend/")
        if req.host != ARM_HOST and not registry:
            return
        where = f"{req.method} {req.path.split('/providers/', 1)[-1]}"
        if req.method == "PUT" and (wanted := schemas.request_schema(req.method, req.path)):
            try:
                sent = req.json()
            except ValueError:
                sent = None
            if isinstance(sent, dict):
                self.spec_checked.append(f"request {wanted}")
                self.spec_problems += [f"request {where}: {p}" for p in schemas.problems(wanted, sent)]
        schema = schemas.route(req.method, req.path, reply.status)
        if schema is None or not isinstance(reply.body, dict):
            return
        body = reply.body
        if registry:
            body = schemas.without_registry_extensions(body)
        self.spec_checked.append(f"answer {schema}")
        self.spec_problems += [f"answer {reply.status} {where}: {p}" for p in schemas.problems(schema, body)]

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
        if req.host in (BLOB_HOST, f"{PRODUCTION_STORAGE_ACCOUNT}.blob.core.windows.net"):
            return self._blob(req)
        if req.host.endswith(f".{REGION}.inference.ml.azure.com"):
            return self._score(req)
        return Reply(502, f"the stand-in does not serve {req.host}")
