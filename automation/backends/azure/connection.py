"""Clients for the workspace and the model registry, with the project's credential (credentials.py)
and azure-core's retry policy set explicitly (`retry.AZURE_CORE_RETRY`: one layer of retries, not
azure-core's ten tries under ours).

The workspace comes from the environment (AZURE_SUBSCRIPTION_ID, AZURE_RESOURCE_GROUP,
AZURE_ML_WORKSPACE) or, when none of them is set, from an Azure ML `config.json` (the file the
portal offers for download), searched in the working folder and its `.azureml/` folder.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from automation.errors import ConfigError

WORKSPACE_VARIABLES = {
    "subscription_id": "AZURE_SUBSCRIPTION_ID",
    "resource_group": "AZURE_RESOURCE_GROUP",
    "workspace_name": "AZURE_ML_WORKSPACE",
}
CONFIG_KEYS = {"subscription_id": "subscription_id", "resource_group": "resource_group",
               "workspace_name": "workspace_name"}
DEFAULT_REGISTRY = "azureml"
# MLflow reads of the workspace (azureml-mlflow's REST store): per HTTP request, and retries of it,
# unless the environment sets them; the whole read is bounded too (backend.mlflow_metrics).
MLFLOW_HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "30", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"}
_WORKSPACE_SCOPE = re.compile(r".*/subscriptions/([^/]+)/resourceGroups/([^/]+)"
                              r"/providers/Microsoft\.MachineLearningServices/workspaces/([^/?]+)")


@dataclass(frozen=True)
class WorkspaceSettings:
    subscription_id: str
    resource_group: str
    workspace_name: str
    source: str  # "environment" or the config.json path


# Where the production job finds the candidates (variables of the production environment): the
# staging workspace, read only. Subscription and resource group default to production's.
STAGING_VARIABLES = {
    "subscription_id": "AZURE_STAGING_SUBSCRIPTION_ID",
    "resource_group": "AZURE_STAGING_RESOURCE_GROUP",
    "workspace_name": "AZURE_STAGING_ML_WORKSPACE",
}


def staging_settings(env: Mapping[str, str] | None = None) -> WorkspaceSettings | None:
    """The staging workspace as the production job names it, or None where it is this workspace."""
    env = os.environ if env is None else env
    name = env.get(STAGING_VARIABLES["workspace_name"], "").strip()
    if not name:
        return None
    here = {key: env.get(var, "").strip() for key, var in WORKSPACE_VARIABLES.items()}
    values = {key: env.get(var, "").strip() or here[key] for key, var in STAGING_VARIABLES.items()}
    if values == here:
        return None
    missing = [STAGING_VARIABLES[k] for k, v in values.items() if not v]
    if missing:
        raise ConfigError(f"the staging workspace is named but {', '.join(missing)} cannot be told")
    return WorkspaceSettings(**values, source="environment (staging)")


def _config_candidates(search_dirs: list[Path]) -> list[Path]:
    return [p for d in search_dirs for p in (d / "config.json", d / ".azureml" / "config.json")]


def workspace_settings(env: Mapping[str, str] | None = None,
                       search_dirs: list[Path] | None = None) -> WorkspaceSettings:
    """The workspace to use; one ConfigError naming every missing variable when it cannot be told."""
    env = os.environ if env is None else env
    values = {key: env.get(var, "").strip() for key, var in WORKSPACE_VARIABLES.items()}
    if all(values.values()):
        return WorkspaceSettings(**values, source="environment")
    if not any(values.values()):
        for path in _config_candidates(search_dirs or [Path.cwd()]):
            if path.is_file():
                return _from_config(path)
    missing = [var for key, var in WORKSPACE_VARIABLES.items() if not values[key]]
    raise ConfigError(
        f"Azure ML workspace not configured: set {', '.join(missing)} "
        "(or place the workspace's config.json in the working folder)")


def _from_config(path: Path) -> WorkspaceSettings:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: not a readable Azure ML config.json: {err}") from None
    missing = [key for key in CONFIG_KEYS.values() if not str(data.get(key) or "").strip()]
    if missing:
        raise ConfigError(f"{path}: missing {', '.join(missing)}")
    return WorkspaceSettings(data["subscription_id"], data["resource_group"], data["workspace_name"], str(path))


# One credential per process and identity: the workspace, each registry's and the MLflow clients share
# it, and with it azure-identity's token cache (one Entra request per scope, not one per client).
_CREDENTIALS: dict[tuple[str, ...], Any] = {}
_IDENTITY_VARIABLES = ("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "ACTIONS_ID_TOKEN_REQUEST_URL",
                       "ACTIONS_ID_TOKEN_REQUEST_TOKEN")


def credential():
    """A GitHub OIDC client assertion that refreshes itself in Actions; DefaultAzureCredential
    (the Azure CLI login, environment, managed identity) at a desk. See credentials.py.

    The same object for every client of this process while the identity variables stay the same."""
    from automation.backends.azure.credentials import credential as make

    key = tuple(os.environ.get(name, "") for name in _IDENTITY_VARIABLES)
    if key not in _CREDENTIALS:
        _CREDENTIALS[key] = make()
    return _CREDENTIALS[key]


def forget_credentials() -> None:
    """Drop the process's credentials (tests that change identity)."""
    _CREDENTIALS.clear()


def client_options(**extra: Any) -> dict[str, Any]:
    """What every MLClient gets besides its scope: MLClient hands its keyword arguments to each
    service client (their Configuration builds `RetryPolicy(**kwargs)`, their transport reads
    `connection_timeout`) and to the pipeline that `online_endpoints.invoke` posts through."""
    from automation.backends.azure.retry import AZURE_CORE_RETRY

    return {**AZURE_CORE_RETRY, **extra}


def workspace_client(settings: WorkspaceSettings | None = None, *, credential_=None, **extra: Any):
    from azure.ai.ml import MLClient

    s = settings or workspace_settings()
    return MLClient(credential_ or credential(), subscription_id=s.subscription_id,
                    resource_group_name=s.resource_group, workspace_name=s.workspace_name,
                    **client_options(**extra))


def registry_client(registry: str | None = None, *, credential_=None, **extra: Any):
    from azure.ai.ml import MLClient

    return MLClient(credential_ or credential(), registry_name=registry or DEFAULT_REGISTRY,
                    **client_options(**extra))


def workspace_mlflow_store(tracking_uri: str, credential, *, host_url: str | None = None):
    """azureml-mlflow's tracking store for the workspace of `tracking_uri`, authenticated with
    `credential`.

    Through MLflow's own store registry, azureml-mlflow 1.62 would build its own chain for an
    `azureml://` URI (`get_service_context_from_tracking_url_default_auth` in
    azureml/mlflow/_internal/utils.py): DefaultAzureCredential's credentials, then
    InteractiveBrowserCredential, then DeviceCodeCredential, which waits ~15 min per token and prints
    a sign-in prompt into the log. Its store takes a service context whose `auth` is any
    TokenCredential (what `get_mlflow_tracking_uri_v2` gives it for an SDK v2 client), so the store is
    made here with ours, and that chain is never built; nor is anything cached for the process. The
    cloud is named (AZUREML_CURRENT_CLOUD, else AzureCloud), so no cloud metadata is fetched either.
    `host_url` replaces `https://<host of the URI>` (a stand-in on loopback)."""
    from urllib.parse import urlsplit

    from azureml.mlflow._common._cloud.cloud import _get_cloud_or_default
    from azureml.mlflow._internal.utils import ServiceContext
    from azureml.mlflow._store.tracking.store import AzureMLRestStore

    from automation.errors import BackendError

    parts = urlsplit(tracking_uri)
    match = _WORKSPACE_SCOPE.match(parts.path)
    if parts.scheme != "azureml" or match is None:
        raise BackendError(f"not a workspace's MLflow tracking URI: {tracking_uri}")
    subscription, group, workspace = match.groups()
    cloud = _get_cloud_or_default(os.environ.get("AZUREML_CURRENT_CLOUD") or "AzureCloud")
    context = ServiceContext(host_url=host_url or f"https://{parts.netloc}", subscription_id=subscription,
                             workspace_name=workspace, resource_group_name=group, auth=credential, cloud=cloud)
    for name, value in MLFLOW_HTTP_SETTINGS.items():  # read by mlflow's http_request at each call
        os.environ.setdefault(name, value)
    return AzureMLRestStore(context)
