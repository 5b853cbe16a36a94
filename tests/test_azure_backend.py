"""The Azure backend against an in-memory MLClient, with real SDK entities checked through their
REST payloads. No network: the fake plays Azure's answers and faults."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import date

import pytest
from azure.ai.ml.entities import VmSize
from azure.core.exceptions import ServiceRequestError

from automation.backends import get_backend
from automation.backends.azure import connection, retry
from automation.backends.azure.backend import AzureBackend
from automation.errors import BackendError, ConfigError
from tests.conftest import REPO
from tests.fake_azure import (
    conflict,
    experiment,
    http_error,
    plain_text_answer,
    quota_error,
    reference_clients,
    throttled,
    unavailable,
)

A100 = "Standard_NC24ads_A100_v4"
PHI3 = "Phi-3-mini-4k-instruct"


def retag(registry, tags: dict[str, str], name: str = "Phi-4", version: str = "8") -> None:
    """Replace a registry model's tags (as the registry stores them: strings) and drop its system
    metadata, so only these tags speak."""
    properties = registry.models.payloads[name][version]["properties"]
    properties["tags"] = dict(tags)
    properties.pop("systemMetadata", None)


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


def test_validate_merges_the_real_phi4_defaults_with_a_warning_each(backend):
    warnings = backend.validate_compute(experiment())
    assert warnings == ["model_specific_defaults overrides optimization.deepspeed_stage: 2 -> 3",
                        "model_specific_defaults overrides training.precision: 32 -> 16",
                        "model_specific_defaults overrides training.num_train_epochs: 3 -> 1"]


@pytest.mark.parametrize("tags, size, message", [
    ({"finetune_compute_allow_list": "['Standard_NC24rs_v3']"}, A100, "not in the model's finetune_compute_allow_list"),
    ({"compute_allow_list": "['standard_nc24rs_v3']"}, A100, "compute_allow_list: standard_nc24rs_v3"),
    ({}, "Standard_NC24", "K80 size"),
    ({"finetune_compute_allow_list": "[oops"}, A100, "not a Python-literal list"),
    ({"inference_compute_allow_list": "['Standard_NC48ads_A100_v4']"}, A100,
     "deployment.instance_type Standard_NC24ads_A100_v4 is not in the model's inference_compute_allow_list"),
])
def test_validate_refuses_sizes_outside_the_model_tags(backend, clients, tags, size, message):
    workspace, registry = clients
    retag(registry, tags)
    workspace.compute.clusters["gpu-a100"].size = size
    workspace.compute.sizes.append(VmSize(name="Standard_NC24", gpus=4))
    with pytest.raises(ConfigError, match=message):
        backend.validate_compute(experiment().model_copy(update={
            "compute": experiment().compute.model_copy(update={"size": size})}))


def test_allow_lists_from_system_metadata(backend, clients):
    """Phi-4's allow-lists live in its system metadata, which SDK 1.35 leaves out of the Model entity;
    the check reads them from the registry's answer (ModelOperations._get)."""
    workspace, registry = clients
    assert registry.models.get("Phi-4", version="8")._system_metadata is None  # as the real SDK gives it
    workspace.compute.clusters["gpu-a100"].size = "Standard_NC8as_T4_v3"
    with pytest.raises(ConfigError, match="Standard_NC8as_T4_v3 is not in the model's supportedComputes.finetuneComputes"):
        backend.validate_compute(experiment(compute__size="Standard_NC8as_T4_v3"))
    workspace.compute.clusters["gpu-a100"].size = A100
    with pytest.raises(ConfigError, match="Standard_NC12ads_A10_v4 is not in the model's "
                                          "supportedComputes.inferenceComputes"):
        backend.validate_compute(experiment(deployment__instance_type="Standard_NC12ads_A10_v4"))


def test_allow_list_is_case_insensitive(backend, clients):
    retag(clients[1], {"finetune_compute_allow_list": "['standard_nc24ads_a100_v4']"})
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


def test_serverless_needs_no_cluster(backend, clients):
    workspace, _ = clients
    del workspace.compute.clusters["gpu-a100"]
    exp = experiment(compute={"serverless": True, "size": "Standard_NC48ads_A100_v4"})
    assert len(backend.validate_compute(exp)) == 3
    assert "compute.get" not in workspace.calls
    with pytest.raises(ConfigError, match="Standard_NC8as_T4_v3 is not in the model's"):
        backend.validate_compute(experiment(compute={"serverless": True, "size": "Standard_NC8as_T4_v3"}))


def test_model_not_found_by_version_and_by_latest(backend, clients):
    from azure.ai.ml.exceptions import ValidationException
    from azure.core.exceptions import ResourceNotFoundError

    _, registry = clients
    with pytest.raises(ResourceNotFoundError):  # what the SDK raises for a version ...
        registry.models.get("Phi-4", version="7")
    with pytest.raises(ValidationException):  # ... and for label="latest" of a model with no active version
        registry.models.get(PHI3, label="latest")
    with pytest.raises(ConfigError, match="Phi-4 version 7 not found in registry azureml"):
        backend.validate_compute(experiment(model__version="7"))
    with pytest.raises(ConfigError, match=f"model {PHI3} has no active version in registry azureml "
                                          r"\(retired models are archived\); pin model.version"):
        backend.validate_compute(experiment(model__name=PHI3))
    assert backend.validate_compute(experiment(model__version="8"))


@pytest.mark.parametrize("state", ["2025-08-18", "2026-07-01"])
def test_a_model_retired_for_fine_tuning_is_refused_with_its_date(component, state):
    """Phi-3-mini-4k-instruct version 15: its retirement date in the tags (2025-08) or, since 2026-06, in
    the system metadata, with the version archived."""
    clients = reference_clients(component, models=[(PHI3, "15", state)])
    backend = AzureBackend(*clients, sleep=lambda s: None)
    with pytest.raises(ConfigError, match=f"model {PHI3} version 15 was retired for fine-tuning on 2025-08-30; "
                                          "`automation models` lists"):
        backend.validate_compute(experiment(model__name=PHI3, model__version="15"))


def test_an_archived_model_without_dates_is_refused(component):
    clients = reference_clients(component, models=[(PHI3, "15", "2026-07-01")])
    properties = clients[1].models.payloads[PHI3]["15"]["properties"]
    properties.pop("systemMetadata")
    backend = AzureBackend(*clients, sleep=lambda s: None)
    with pytest.raises(ConfigError, match="version 15 is archived in its registry"):
        backend.validate_compute(experiment(model__name=PHI3, model__version="15"))


@pytest.mark.parametrize("today, expected", [
    (date(2025, 5, 1), "will be deprecated for fine-tuning on 2025-06-30; fine-tuning retires on 2025-08-30"),
    (date(2025, 7, 15), "is deprecated for fine-tuning since 2025-06-30; fine-tuning retires on 2025-08-30"),
])
def test_a_warning_before_retirement(component, today, expected):
    clients = reference_clients(component, models=[(PHI3, "15", "2025-08-18")])
    backend = AzureBackend(*clients, sleep=lambda s: None, today=lambda: today)
    warnings = backend.validate_compute(experiment(model__name=PHI3, model__version="15"))
    assert warnings[0] == f"model {PHI3} version 15 {expected}"


def test_real_phi3_defaults_of_2025_pass_inputs_and_name_the_rest(component):
    """Version 15 as of 2025-02: `learning_rate_min`/`learning_rate_max` are not component inputs; they
    are named in one warning and not passed; `ignore_mismatched_sizes`/`logging_strategy` are inputs."""
    clients = reference_clients(component, models=[(PHI3, "15", "2025-02-15")])
    backend = AzureBackend(*clients, sleep=lambda s: None, today=lambda: date(2025, 3, 1))
    warnings = backend.validate_compute(experiment(model__name=PHI3, model__version="15"))
    assert warnings[-1] == ("model_specific_defaults holds learning_rate_min, learning_rate_max, which are not "
                            "inputs of chat_completion_pipeline; not passed")
    assert "model_specific_defaults overrides training.precision: 32 -> 16" in warnings


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


def answering(answers: list):
    """A call that raises or returns the next of `answers` each time."""
    def call():
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer
    return call


def test_what_azure_core_retried_is_not_retried_again(sleeps):
    """A 429/503 answer that reaches retry.call has been through azure-core's own retries (its
    RetryPolicy retries them on GET/PUT/DELETE): one layer of retries, so it fails at once."""
    for error in (throttled("7"), unavailable()):
        with pytest.raises(BackendError, match="^reading failed: "):
            retry.call("reading", answering([error, "ok"]), sleep=sleeps.append)
    assert sleeps == []


def test_what_azure_core_leaves_alone_is_retried_honouring_retry_after(sleeps):
    """A connection never made (ServiceRequestError), and a 429/502 answer to a POST without
    Retry-After: azure-core does not retry those."""
    post_429, post_502 = http_error(429, "TooManyRequests", "slow down"), http_error(502, "BadGateway", "bad")
    post_429.response.request.method = post_502.response.request.method = "POST"
    answers = [ServiceRequestError("Connection refused"), post_429, "ok"]
    assert retry.call("reading", answering(answers), sleep=sleeps.append, base_delay=2) == "ok"
    assert sleeps == [2.0, 4.0]
    assert retry.call("scoring", answering([post_502, "ok"]), sleep=sleeps.append) == "ok"
    assert not retry.retried_by_azure_core(post_502) and retry.retried_by_azure_core(throttled("7"))


def test_a_conflict_on_a_begin_operation_is_retried_until_the_resource_is_free(sleeps):
    """Every 409 of an ARM operation is ResourceExistsError; on a begin_* it means "operation in
    progress": backed off and retried (bounded), never taken for "already exists"."""
    from azure.core.exceptions import ResourceExistsError

    assert isinstance(conflict(), ResourceExistsError)
    from tests.fake_azure import Poller

    answers = [conflict(), conflict(), Poller("done")]
    assert retry.call("creating deployment demo", answering(answers), sleep=sleeps.append, begin=True) == "done"
    assert sleeps == [15.0, 30.0]
    sleeps.clear()
    with pytest.raises(BackendError, match="after 6 attempts .*stayed busy.*in progress"):
        retry.call("moving traffic", answering([conflict()] * 6), sleep=sleeps.append, begin=True)
    assert sleeps == [15.0, 30.0, 60.0, 120.0, 120.0]
    with pytest.raises(BackendError, match="^reading failed: .*in progress"):  # not a begin: not retried
        retry.call("reading", answering([conflict()]), sleep=sleeps.append)


def test_the_clients_get_one_explicit_retry_layer_from_azure_core():
    """A real MLClient built by connection.py: every request is tried at most 4 times by azure-core
    (retry_total=3) with its backoff, and the transports connect within 30 s."""
    from azure.ai.ml.operations._compute_operations import ComputeOperations

    from tests.fake_azure import CannedTransport, StaticCredential

    transport = CannedTransport(lambda request: (503, {"error": {"code": "ServiceUnavailable", "message": "busy"}}))
    settings = connection.WorkspaceSettings("00000000-0000-0000-0000-000000000000", "rg", "ws", "test")
    client = connection.workspace_client(settings, credential_=StaticCredential(), transport=transport)
    assert isinstance(client.compute, ComputeOperations)
    with pytest.raises(Exception) as caught:
        client.compute.get("gpu-a100")
    assert getattr(caught.value, "status_code", None) == 503
    assert [r.method for r in transport.requests] == ["GET"] * 4 and transport.sleeps == [2.0, 4.0]
    with pytest.raises(BackendError, match="reading cluster gpu-a100 failed: .*busy"):
        retry.call("reading cluster gpu-a100", lambda: client.compute.get("gpu-a100"), sleep=transport.sleeps.append)
    assert len(transport.requests) == 8 and transport.sleeps == [2.0, 4.0, 2.0, 4.0]  # no second layer

    plain = connection.workspace_client(settings, credential_=StaticCredential())
    timeouts = {c._client._pipeline._transport.connection_config.timeout
                for c in _service_clients(plain) if hasattr(c._client._pipeline._transport, "connection_config")}
    assert timeouts == {30}


def _service_clients(ml_client):
    return [v for k, v in vars(ml_client).items() if k.startswith("_service_client") and hasattr(v, "_client")]


def test_quota_errors_are_not_retried_and_read_in_one_sentence(sleeps):
    calls = []

    def refuse():
        calls.append(1)
        raise quota_error()

    with pytest.raises(BackendError) as err:
        retry.call("creating deployment demo", refuse, sleep=sleeps.append)
    assert len(calls) == 1 and sleeps == []
    assert "\n" not in str(err.value)
    assert str(err.value).startswith("creating deployment demo refused for lack of quota: (OutOfQuota) Not enough")


@pytest.mark.parametrize("status, body", [
    (502, "upstream connect error or disconnect/reset before headers. reset reason: connection termination"),
    (503, "no healthy upstream"),
    (504, "upstream request timeout"),
])
def test_plain_text_gateway_answers_are_retried(sleeps, status, body):
    """The SDK turns a non-JSON error answer into a bare MlException (validate_response); a scoring
    endpoint's gateway answers 502/503/504 so, and they pass."""
    from azure.ai.ml.exceptions import MlException

    error = plain_text_answer(status, body)
    assert type(error) is MlException and str(error) == body
    answers = [error, error, '{"output": "hi"}']

    assert retry.call("scoring ep", answering(answers), sleep=sleeps.append, base_delay=2) == '{"output": "hi"}'
    assert sleeps == [2.0, 4.0]


def test_plain_text_refusals_and_sdk_validation_are_not_retried(sleeps):
    from azure.ai.ml.exceptions import ValidationException

    for error in (plain_text_answer(401, "Unauthorized"),
                  ValidationException(message="Cannot specify both version and label.", no_personal_data_message="x")):
        with pytest.raises(BackendError, match="^scoring ep failed: "):
            retry.call("scoring ep", lambda e=error: (_ for _ in ()).throw(e), sleep=sleeps.append)
    assert sleeps == []


def test_not_found_passes_through_and_already_exists_only_where_the_caller_asks(component):
    """What the callers catch is what the SDK raises: they are not wrapped, whatever their type."""
    from azure.ai.ml.exceptions import ValidationException
    from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

    from tests.fake_azure import already_in_registry, no_latest_version

    for error in (no_latest_version("x", "registry azureml"), ResourceNotFoundError("gone")):
        with pytest.raises(type(error)):
            retry.call("reading", lambda e=error: (_ for _ in ()).throw(e), sleep=lambda s: None)
    existing = [already_in_registry(), http_error(400, "UserError", "A job with this ID already exists."), conflict()]
    for error in existing:
        with pytest.raises(BackendError):
            retry.call("creating", lambda e=error: (_ for _ in ()).throw(e), sleep=lambda s: None)
        with pytest.raises(type(error)):
            retry.call("creating", lambda e=error: (_ for _ in ()).throw(e), sleep=lambda s: None,
                       passthrough=retry.is_already_exists)
        assert retry.is_already_exists(error)
    other = ValidationException(message="Cannot specify both version and label.", no_personal_data_message="x")
    assert not retry.is_not_found(other) and not retry.is_already_exists(other)
    assert isinstance(existing[1], HttpResponseError) and not retry.is_already_exists(http_error(400, "X", "bad"))


def test_retries_give_up_with_the_count(sleeps):
    def always():
        raise ServiceRequestError("Connection refused")

    with pytest.raises(BackendError, match="after 3 attempts: Connection refused"):
        retry.call("listing endpoints", always, sleep=sleeps.append)
    assert sleeps == [2.0, 4.0]


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


# -- automation models -----------------------------------------------------------------------


def test_catalog_lists_current_chat_models_with_compute_and_dates(clients, capsys):
    import argparse

    from automation.backends.azure.catalog import cmd_models, finetunable_chat_models

    _, registry = clients
    (phi4,) = finetunable_chat_models(registry, today=date(2026, 12, 1))  # Phi-3-mini is archived: not listed
    assert (phi4.name, phi4.version, phi4.status) == ("Phi-4", "8", "current")
    assert A100 in phi4.finetune_sizes and "Standard_NC40ads_H100_v5" in phi4.finetune_sizes
    assert phi4.life.finetune_retirement is None
    everything = finetunable_chat_models(registry, include_archived=True, today=date(2026, 12, 1))
    assert [(e.name, e.status, str(e.life.finetune_retirement)) for e in everything] == [
        ("Phi-4", "current", "None"), (PHI3, "retired", "2025-08-30")]
    assert cmd_models(argparse.Namespace(registry="azureml", all=True, name="phi-3"), lambda name: registry) == 0
    out = capsys.readouterr().out
    assert PHI3 in out and "2025-08-30" in out and "Phi-4 " not in out


def test_catalog_reads_the_tag_era(component):
    from automation.backends.azure.catalog import finetunable_chat_models

    _, registry = reference_clients(component, models=[(PHI3, "15", "2025-08-18")])
    (entry,) = finetunable_chat_models(registry, today=date(2025, 7, 1))
    assert entry.status == "deprecated" and str(entry.life.finetune_deprecation) == "2025-06-30"
    assert entry.finetune_sizes[0] == A100 and "Standard_NC6s_v3" in entry.inference_sizes


def test_a_long_running_operation_is_waited_for_a_bounded_time():
    """A begin_* is waited for at most LRO_TIMEOUT_S; one still running then says so, instead of
    holding the leg past its job limit. A cancel is not waited for at all."""
    class Running:  # an LROPoller whose operation never ends
        waited: list[float | None] = []

        def wait(self, timeout=None):
            self.waited.append(timeout)

        def done(self):
            return False

        def status(self):
            return "InProgress"

        def result(self, timeout=None):
            raise AssertionError("result() of an unfinished operation is never asked for")

    poller = Running()
    with pytest.raises(BackendError, match=r"creating deployment demo still running after 40 min \(status InProgress\)"):
        retry.call("creating deployment demo", lambda: poller, begin=True)
    assert poller.waited == [retry.LRO_TIMEOUT_S] == [2400]
    assert retry.call("cancelling job j", lambda: poller, begin=True, wait=False) is poller
