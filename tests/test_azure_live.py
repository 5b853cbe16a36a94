"""Live checks against a real workspace: read-only (no GPU hours). Skipped unless the Azure
variables are set and AUTOMATION_AZURE_LIVE=1; the full flow runs with `automation run` on an
azure experiment."""

from __future__ import annotations

import os

import pytest

from tests.fake_azure import experiment

LIVE = os.environ.get("AUTOMATION_AZURE_LIVE") == "1" and all(
    os.environ.get(v) for v in ("AZURE_SUBSCRIPTION_ID", "AZURE_RESOURCE_GROUP", "AZURE_ML_WORKSPACE"))

pytestmark = [
    pytest.mark.azure,
    pytest.mark.skipif(not LIVE, reason="live Azure test: set AZURE_SUBSCRIPTION_ID, AZURE_RESOURCE_GROUP, "
                       "AZURE_ML_WORKSPACE, AZURE_ML_TEST_CLUSTER and AUTOMATION_AZURE_LIVE=1"),
]


def test_live_validate_and_list():
    from automation.backends.azure.backend import AzureBackend

    backend = AzureBackend()
    cluster = os.environ.get("AZURE_ML_TEST_CLUSTER", "gpu-a100")
    size = os.environ.get("AZURE_ML_TEST_SIZE", "Standard_NC24ads_A100_v4")
    assert isinstance(backend.validate_compute(experiment(compute__cluster=cluster, compute__size=size)), list)
    assert isinstance(backend.list_endpoints({"managed_by": "gitops-finetune"}), list)
