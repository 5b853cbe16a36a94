"""The Azure backend against an in-memory MLClient, with real SDK entities checked through their
REST payloads. No network: the fake plays Azure's answers and faults."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from azure.ai.ml import load_component
from azure.ai.ml.entities import VmSize
from azure.core.exceptions import ServiceRequestError

from automation.backends import get_backend
from automation.backends.azure import connection, retry
from automation.backends.azure.backend import AzureBackend
from automation.errors import BackendError, ConfigError
from tests.conftest import REPO
from tests.fake_azure import (
    experiment,
    quota_error,
    reference_clients,
    throttled,
    unavailable,
    write_component,
)

MODEL_ID = "azureml://registries/azureml/models/Phi-3-mini-4k-instruct/versions/10"
A100 = "Standard_NC24ads_A100_v4"


@pytest.fixture(scope="module")
def component(tmp_path_factory):
    return load_component(write_component(tmp_path_factory.mktemp("component")))


@pytest.fixture
def clients(component):
    return reference_clients(component)


@pytest.fixture
def sleeps():
    return []


@pytest.fixture
def backend(clients, sleeps):
    workspace, registry = clients
    return AzureBackend(workspace, registry, sleep=sleeps.append, poll_s=0,
                        metrics_reader=lambda uri, job: {"train_loss": 1.25, "eval_loss": 1.5, "uri": uri})


# -- connection ------------------------------------------------------------------------------


def test_workspace_from_environment():
    env = {"AZURE_SUBSCRIPTION_ID": "sub", "AZURE_RESOURCE_GROUP": "rg", "AZURE_ML_WORKSPACE": "ws"}
    s = connection.workspace_settings(env, [])
    assert (s.subscription_id, s.resource_group, s.workspace_name, s.source) == ("sub", "rg", "ws", "environment")


def test_missing_settings_are_named_in_one_error(tmp_path):
    with pytest.raises(ConfigError) as err:
        connection.workspace_settings({"AZURE_RESOURCE_GROUP": "rg"}, [tmp_path])
    assert "AZURE_SUBSCRIPTION_ID, AZURE_ML_WORKSPACE" in str(err.value)
    with pytest.raises(ConfigError, match="AZURE_SUBSCRIPTION_ID, AZURE_RESOURCE_GROUP, AZURE_ML_WORKSPACE"):
        connection.workspace_settings({}, [tmp_path])


def test_workspace_from_config_json(tmp_path):
    (tmp_path / ".azureml").mkdir()
    (tmp_path / ".azureml" / "config.json").write_text(json.dumps(
        {"subscription_id": "sub", "resource_group": "rg", "workspace_name": "ws"}))
    s = connection.workspace_settings({}, [tmp_path])
    assert (s.workspace_name, s.source) == ("ws", str(tmp_path / ".azureml" / "config.json"))
    (tmp_path / "config.json").write_text(json.dumps({"subscription_id": "sub"}))
    with pytest.raises(ConfigError, match="resource_group, workspace_name"):
        connection.workspace_settings({}, [tmp_path])


def test_registered_by_name_and_lazy():
    backend = get_backend("azure")
    assert isinstance(backend, AzureBackend) and backend._workspace is None
    code = "import automation.backends, automation.cli, sys; print('azure.ai.ml' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"


# -- validate --------------------------------------------------------------------------------


def test_validate_returns_model_specific_default_warnings(backend):
    warnings = backend.validate_compute(experiment())
    assert warnings == ["model_specific_defaults overrides optimization.deepspeed_stage: 2 -> 3"]


@pytest.mark.parametrize("tags, size, message", [
    ({"finetune_compute_allow_list": "['Standard_NC24rs_v3']"}, A100, "not in the model's finetune_compute_allow_list"),
    ({"compute_allow_list": "['standard_nc24rs_v3']"}, A100, "compute_allow_list: standard_nc24rs_v3"),
    ({}, "Standard_NC24", "K80 size"),
    ({"finetune_compute_allow_list": "[oops"}, A100, "not a Python-literal list"),
    ({"inference_compute_allow_list": "['Standard_NC24ads_A100_v4']"}, A100,
     "deployment.instance_type Standard_NC6s_v3 is not in the model's inference_compute_allow_list"),
])
def test_validate_refuses_sizes_outside_the_model_tags(backend, clients, tags, size, message):
    workspace, registry = clients
    registry.models.versions["Phi-3-mini-4k-instruct"]["10"].tags = tags
    workspace.compute.clusters["gpu-a100"].size = size
    workspace.compute.sizes.append(VmSize(name="Standard_NC24", gpus=4))
    with pytest.raises(ConfigError, match=message):
        backend.validate_compute(experiment(compute__size=size))


def test_allow_list_is_case_insensitive(backend, clients):
    clients[1].models.versions["Phi-3-mini-4k-instruct"]["10"].tags = {
        "finetune_compute_allow_list": "['standard_nc24ads_a100_v4']"}
    assert backend.validate_compute(experiment()) == []


def test_validate_cluster_state_and_gpus(backend, clients):
    workspace, _ = clients
    with pytest.raises(ConfigError, match="gpus_per_node is 4, but Standard_NC24ads_A100_v4 has 1"):
        backend.validate_compute(experiment(compute__gpus_per_node=4))
    workspace.compute.sizes = [VmSize(name="Standard_NC12s_v3", gpus=2)]
    with pytest.raises(ConfigError, match="not offered .* available: Standard_NC12s_v3"):
        backend.validate_compute(experiment())
    workspace.compute.clusters["gpu-a100"]._provisioning_state = "Failed"
    with pytest.raises(ConfigError, match="failed state"):
        backend.validate_compute(experiment())
    del workspace.compute.clusters["gpu-a100"]
    with pytest.raises(ConfigError, match="does not exist .*create_if_missing"):
        backend.validate_compute(experiment())


def test_model_not_found_and_pinned_version(backend):
    with pytest.raises(ConfigError, match="Phi-3-mini-4k-instruct version 7 not found in registry azureml"):
        backend.validate_compute(experiment(model__version="7"))
    assert backend.validate_compute(experiment(model__version="10"))


def test_cluster_created_when_asked_falling_back_to_low_priority(backend, clients):
    workspace, _ = clients
    del workspace.compute.clusters["gpu-a100"]
    workspace.compute.refuse_tiers = {"dedicated"}
    backend.validate_compute(experiment(compute__create_if_missing=True, compute__nodes=2))
    created = workspace.compute.clusters["gpu-a100"]
    rest = created._to_rest_object().as_dict()["properties"]["properties"]
    assert rest["vmPriority"] == "LowPriority" and rest["vmSize"] == A100
    assert rest["scaleSettings"]["minNodeCount"] == 0 and rest["scaleSettings"]["maxNodeCount"] == 2
    assert workspace.calls.count("compute.begin_create_or_update") == 2


# -- faults ----------------------------------------------------------------------------------


def test_transient_errors_are_retried_honouring_retry_after(sleeps):
    answers = [throttled("7"), unavailable(), ServiceRequestError("Connection reset by peer"), "ok"]

    def flaky():
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert retry.call("reading", flaky, sleep=sleeps.append, base_delay=2) == "ok"
    assert sleeps == [7.0, 4.0, 8.0]


def test_quota_errors_are_not_retried_and_read_in_one_sentence(sleeps):
    calls = []

    def refuse():
        calls.append(1)
        raise quota_error()

    with pytest.raises(BackendError) as err:
        retry.call("creating deployment demo", refuse, sleep=sleeps.append)
    assert len(calls) == 1 and sleeps == []
    assert "\n" not in str(err.value)
    assert str(err.value).startswith("creating deployment demo refused for lack of quota: (QuotaExceeded) Not enough")


def test_retries_give_up_with_the_count(sleeps):
    def always():
        raise unavailable()

    with pytest.raises(BackendError, match="after 3 attempts: .*temporarily unavailable"):
        retry.call("listing endpoints", always, attempts=3, sleep=sleeps.append)
    assert len(sleeps) == 2


def test_mlflow_metrics_reads_the_pipeline_runs_and_the_loss_curve(tmp_path):
    """The real reader against a real MLflow store shaped like a pipeline job's child runs."""
    import mlflow

    from automation.backends.azure.backend import LOSS_CURVE, mlflow_metrics

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("chat_completion_Phi-3-mini-4k-instruct")
    with mlflow.start_run(tags={"mlflow.rootRunId": "job-1"}):
        for step, loss in [(10, 2.0), (20, 1.6), (30, 1.4)]:
            mlflow.log_metric("loss", loss, step=step)
        mlflow.log_metric("train_loss", 1.7)
    with mlflow.start_run(tags={"mlflow.rootRunId": "job-1"}):
        mlflow.log_metric("eval_loss", 1.5)
    with mlflow.start_run(tags={"mlflow.rootRunId": "another-job"}):
        mlflow.log_metric("eval_loss", 9.0)
    found = mlflow_metrics(uri, "job-1")
    assert found["eval_loss"] == 1.5 and found["train_loss"] == 1.7
    assert found[LOSS_CURVE] == [(10, 2.0), (20, 1.6), (30, 1.4)]
