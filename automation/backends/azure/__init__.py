"""The Azure ML backend: the reference flow (REFERENCE.md steps 1-10) through azure-ai-ml.

Nothing here imports azure.ai.ml at module import time; the SDK is loaded by the functions that
use it, so `automation validate` stays fast.
"""

import os

# The repository (or environment) variables that say Azure ML is configured for this fork.
AZURE_SETTINGS = ("AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_SUBSCRIPTION_ID", "AZURE_RESOURCE_GROUP",
                  "AZURE_ML_WORKSPACE")


def azure_settings_missing(env: dict[str, str] | None = None) -> list[str]:
    env = os.environ if env is None else env
    return [name for name in AZURE_SETTINGS if not env.get(name)]
