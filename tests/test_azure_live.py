"""Live checks against a real workspace. Skipped unless the Azure
variables are set and AUTOMATION_AZURE_LIVE=1: a read-only check, and (with
AUTOMATION_AZURE_LIVE_FLOW=1, as it spends GPU hours) the whole flow."""

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


FLOW = LIVE and os.environ.get("AUTOMATION_AZURE_LIVE_FLOW") == "1"


@pytest.mark.skipif(not FLOW, reason="the live flow spends GPU hours: set AUTOMATION_AZURE_LIVE_FLOW=1 as well")
def test_live_flow_end_to_end(tmp_path, monkeypatch):
    """The whole reference flow on a real workspace, small: the bundled sample data, a few steps;
    the staging endpoint is deleted at the end whatever happens."""
    from pathlib import Path

    import yaml

    from automation import stages

    repo = Path(__file__).resolve().parent.parent
    monkeypatch.setenv("AUTOMATION_HOME", str(tmp_path / "ws"))
    body = yaml.safe_load((repo / "experiments" / "phi4-ultrachat.yaml").read_text())
    body["data"] = {"dataset": str(repo / "data" / "ultrachat-sample"), "sample_percent": 100}
    body["compute"].update(cluster=os.environ.get("AZURE_ML_TEST_CLUSTER", "gpu-a100"),
                           size=os.environ.get("AZURE_ML_TEST_SIZE", "Standard_NC24ads_A100_v4"))
    body["training"].update(num_train_epochs=1, max_steps=5, max_seq_length=512)
    body["deployment"]["ttl_hours"] = 2
    path = tmp_path / "experiments" / "phi4-ultrachat.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(body))
    run = stages.open_run(path)
    try:
        stages.run_all(run)
    finally:
        stages.stage_teardown(run)
    assert run.record.score and run.record.score.reply.strip()
    assert run.record.registration and run.record.torn_down
