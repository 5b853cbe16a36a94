"""Names, versions and role assignments of the stood-in Azure world (shared by service.py, arm.py
and dataplane.py)."""

from __future__ import annotations

import re
import time

from tests.standin.identity import arm_error
from tests.standin.proxy import Reply

SUBSCRIPTION = "00000000-1111-2222-3333-444444444444"
RESOURCE_GROUP = "rg-ml"
WORKSPACE = "ws-staging"
REGION = "westeurope"
PRODUCTION_RESOURCE_GROUP = "rg-ml-prod"  # production's own resource group (tests/fork_setup.py)
PRODUCTION_WORKSPACE = "ws-prod"
PRODUCTION_REGISTRY = "reg-chat"  # AZURE_ML_REGISTRY of the production environment
PRODUCTION_STORAGE_ACCOUNT = "wsprodstore0456"
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
# the registries the stand-in serves: name -> (subscription, resource group)
REGISTRIES = {"azureml": (REGISTRY_SUBSCRIPTION, "azureml-rg"),
              PRODUCTION_REGISTRY: (SUBSCRIPTION, PRODUCTION_RESOURCE_GROUP)}
REGISTRY_API_VERSIONS = {"2021-10-01-dataplanepreview"}
# what the service reads from a registered MLflow model's MLmodel file (a transformers chat model)
MLFLOW_FLAVORS = {"python_function": {"data": {"loader_module": "mlflow.transformers", "python_version": "3.10.14"}},
                  "transformers": {"data": {"task": "chat-completion", "transformers_version": "4.44.0"}}}
TERMINAL_JOB_STATES = {"Completed", "Failed", "Canceled"}


# -- role assignments (README, "Two trust zones": the identity table) --------------------------------
# The pull-request identity: AzureML Data Scientist on the staging workspace, nothing else. The
# production identity: AzureML Data Scientist on production's workspace, AzureML Registry User on the
# registry, Reader on the staging workspace (it reads the job and the version it shares from there).
ROLES: dict[str, dict[tuple[str, str], str]] = {
    STAGING_CLIENT: {("workspaces", WORKSPACE): "AzureML Data Scientist"},
    PRODUCTION_CLIENT: {("workspaces", PRODUCTION_WORKSPACE): "AzureML Data Scientist",
                        ("registries", PRODUCTION_REGISTRY): "AzureML Registry User",
                        ("workspaces", WORKSPACE): "Reader"},
}


def role_allows(role: str, method: str, rest: str) -> bool:
    """What each built-in role lets a caller do under its scope (the REST verbs of its actions):
    Reader `*/read` only (a POST such as listKeys or listSecrets is an action); AzureML Data Scientist
    everything in the workspace except writing the workspace itself and computes; AzureML Registry
    User everything on the registry's assets."""
    if role == "Reader":
        return method == "GET"
    if role == "AzureML Data Scientist":
        if method == "GET":
            return True
        return rest not in ("", "/") and not re.match(r"/computes(/|$)", rest, re.IGNORECASE)
    return role == "AzureML Registry User"


def may(client_id: str, kind: str, name: str, method: str, rest: str) -> bool:
    """Whether `client_id` holds a role on `kind`/`name` (workspaces or registries) that allows
    `method` on `rest` under it."""
    roles = ROLES.get(client_id, {})
    role = next((r for (k, n), r in roles.items() if k == kind and n.lower() == name.lower()), None)
    return role is not None and role_allows(role, method, rest)


def authorization_failed(client_id: str, method: str, scope: str, rest: str, kind: str = "workspaces") -> Reply:
    """ARM's 403 for a caller without the role (the body ARM answers, AuthorizationFailed)."""
    parts = [part for i, part in enumerate(rest.strip("/").split("/")) if i % 2 == 0 and part]
    verb = {"GET": "read", "PUT": "write", "PATCH": "write", "DELETE": "delete"}.get(method, "action")
    if verb == "action" and parts:
        parts, verb = parts[:-1], f"{parts[-1]}/action"
    action = f"{PROVIDER}/{kind}{''.join('/' + p for p in parts)}/{verb}"
    return arm_error(403, "AuthorizationFailed", f"The client '{client_id}' with object id '{client_id}' does not "
                     f"have authorization to perform action '{action}' over scope '{scope}{rest}' or the scope is "
                     "invalid. If access was recently granted, please refresh your credentials.")


def now_iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000+00:00", time.gmtime(seconds))
