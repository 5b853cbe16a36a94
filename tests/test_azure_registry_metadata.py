"""Phi-4's compute allow-lists and lifecycle dates live only in the registry's system metadata, read
through azure-ai-ml's private `ModelOperations._get`. A read that fails stops validation (fail
closed) unless AUTOMATION_SKIP_REGISTRY_METADATA=1 says otherwise; and the private read is pinned
against the real SDK, so an SDK change breaks this test, not the guard."""

from __future__ import annotations

import copy
import logging
from types import SimpleNamespace

import pytest

from automation.backends.azure import lifecycle
from automation.backends.azure.backend import AzureBackend
from automation.errors import ConfigError
from tests.fake_azure import (
    CannedTransport,
    StaticCredential,
    experiment,
    http_error,
    model_spec,
    unavailable,
)

VARIABLE = "AUTOMATION_SKIP_REGISTRY_METADATA"


@pytest.fixture
def backend(clients, monkeypatch):
    monkeypatch.delenv(VARIABLE, raising=False)
    return AzureBackend(*clients, sleep=lambda s: None, poll_s=0)


@pytest.mark.parametrize("error", [http_error(403, "AuthorizationFailed", "no read access to the registry"),
                                   unavailable()])
def test_a_failed_metadata_read_stops_validation_naming_the_override(backend, clients, error):
    """Before, the failure was logged at DEBUG and Phi-4's allow-lists silently stopped applying."""
    workspace, registry = clients
    registry.fail("models._get", error, times=5)  # a 503 beyond what azure-core retries
    workspace.compute.clusters["gpu-a100"].size = "Standard_NC8as_T4_v3"  # a T4: not in Phi-4's list
    with pytest.raises(ConfigError, match=f"could not read the registry metadata of model Phi-4:8 .*; retry, "
                                          f"or set {VARIABLE}=1 to go on without them"):
        backend.validate_compute(experiment(compute__size="Standard_NC8as_T4_v3"))


def test_the_override_goes_on_with_a_warning_naming_it(backend, clients, monkeypatch, caplog):
    workspace, registry = clients
    monkeypatch.setenv(VARIABLE, "1")
    registry.fail("models._get", http_error(403, "AuthorizationFailed", "no read access"))
    with caplog.at_level(logging.WARNING):
        backend.validate_compute(experiment())
    (warning,) = [r for r in caplog.records if VARIABLE in r.getMessage()]
    assert warning.levelno == logging.WARNING and "without its allow-lists and lifecycle dates" in warning.getMessage()


def test_an_sdk_without_the_private_read_fails_closed_too(monkeypatch):
    monkeypatch.delenv(VARIABLE, raising=False)
    registry = SimpleNamespace(models=SimpleNamespace())  # no _get
    with pytest.raises(ConfigError, match="no ModelOperations._get"):
        lifecycle.read_registry_metadata(registry, SimpleNamespace(name="Phi-4", version="8"))
    assert lifecycle.read_registry_metadata(registry, SimpleNamespace(name="Phi-4", version="8"),
                                            env={VARIABLE: "1"}) is False


def _registry_answers(payload: dict):
    """The registry as the SDK reaches it: discovery, then the model version (camelCase REST body)."""
    def answer(request):
        path = request.url.split("?")[0]
        if path.endswith("/registrymanagement/v1.0/registries/azureml/discovery"):
            return 200, {"registryName": "azureml", "primaryRegionResourceProviderUri": "https://eastus.api.azureml.ms/",
                         "subscriptionId": "11111111-1111-1111-1111-111111111111",
                         "resourceGroup": "registry-builtin-prod-eastus-01", "regions": []}
        if path.endswith("/subscriptions/11111111-1111-1111-1111-111111111111/resourceGroups/"
                         "registry-builtin-prod-eastus-01/providers/Microsoft.MachineLearningServices/"
                         "registries/azureml/models/Phi-4/versions/8"):
            return 200, payload
        return 404, {"error": {"code": "NotFound", "message": f"no {path}"}}
    return answer


@pytest.mark.parametrize("archived", [False, True])
def test_the_private_read_of_the_real_sdk_still_gives_the_metadata(archived, monkeypatch):
    """`MLClient(registry_name=...).models._get(name, version)` through the real SDK and azure-core:
    its signature, the request it makes and the REST object it returns (properties.get("systemMetadata"),
    properties.is_archived) are what lifecycle.read_registry_metadata relies on."""
    import inspect

    from azure.ai.ml.operations import ModelOperations

    from automation.backends.azure import connection
    from tests.fake_azure import FakeMLClient

    monkeypatch.delenv(VARIABLE, raising=False)
    assert list(inspect.signature(ModelOperations._get).parameters) == ["self", "name", "version"]
    spec = model_spec("Phi-4", "8", "2026-07-01")
    fake = FakeMLClient(registry_name="azureml")
    fake.models.publish({**spec, "is_archived": archived})
    payload = copy.deepcopy(fake.models.payloads["Phi-4"]["8"])
    transport = CannedTransport(_registry_answers(payload))
    client = connection.registry_client("azureml", credential_=StaticCredential(), transport=transport)
    model = SimpleNamespace(name="Phi-4", version="8", tags={}, _system_metadata=None)

    assert lifecycle.read_registry_metadata(client, model) is archived
    assert lifecycle.system_metadata(model) == spec["system_metadata"]
    allow = lifecycle.finetune_allow_list(model)
    assert allow is not None and allow[0] == "supportedComputes.finetuneComputes"
    assert "Standard_NC24ads_A100_v4" in allow[1]
    assert [r.method for r in transport.requests] == ["GET", "GET"]
