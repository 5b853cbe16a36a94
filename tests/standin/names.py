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
