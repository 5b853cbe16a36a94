"""Fine-tune, register, deploy, score, teardown and promote on the Azure backend, against the
in-memory MLClient; the pipeline job, model, endpoint and deployment are real SDK entities whose
REST payloads are checked."""

from __future__ import annotations

import json

import pytest
from azure.ai.ml import load_component

from automation import naming
from automation.backends.azure.backend import AzureBackend
from automation.errors import BackendError, ConfigError
from automation.record import DataPart, FinetunePart
from tests.fake_azure import (
    FakeMLClient,
    conflict,
    data_dir,
    experiment,
    plain_text_answer,
    quota_error,
    reference_clients,
    throttled,
    write_component,
)

A100 = "Standard_NC24ads_A100_v4"
MODEL_ID = "azureml://registries/azureml/models/Phi-4/versions/8"
TAGS = naming.resource_tags(repo="org/repo", pr=7, experiment="phi3-ultrachat", sha="abc1234def",
                            stage="staging", ttl_hours=48)


@pytest.fixture
def backend(clients):
    return AzureBackend(*clients, sleep=lambda s: None, poll_s=0,
                        metrics_reader=lambda uri, job: {"train_loss": 1.25, "eval_loss": 1.5,
                                                         "loss_curve": [(10, 2.0), (20, 1.5)]})


@pytest.fixture
def data(tmp_path):
    folder = data_dir(tmp_path)
    return DataPart(out_dir=str(folder), source="test", rows={"train_sft": 3, "test_sft": 3})


def _job_rest(job) -> dict:
    return job._to_rest_object().as_dict()


# -- fine-tune -------------------------------------------------------------------------------


def test_pipeline_job_payload(backend, clients, data):
    workspace, _ = clients
    name = backend.submit_finetune(experiment(), data, job_name="phi4-ultrachat-abc1234-cfg1234", tags=TAGS)
    assert name == "phi4-ultrachat-abc1234-cfg1234"
    (job,) = workspace.jobs.submitted
    assert job._validate().passed  # the SDK's own validation against the real component spec
    rest = _job_rest(job)
    props = rest["properties"]
    assert rest["name"] == name and props["experimentName"] == "phi4-ultrachat"
    assert props["displayName"] == "Phi-4-ultrachat-bs1-cosine-ds3-lora-save_limit1-seqlen2048"
    assert props["settings"]["force_rerun"] is True and props["settings"]["continue_on_step_failure"] is False
    assert props["settings"]["default_compute"] == "gpu-a100"
    assert props["tags"]["pr"] == "7" and props["outputs"]["trained_model"]["jobOutputType"] == "mlflow_model"
    (node,) = props["jobs"].values()
    inputs = {k: v.get("value", v.get("uri")) for k, v in node["inputs"].items()}
    assert node["inputs"]["mlflow_model_path"] == {"uri": MODEL_ID, "job_input_type": "mlflow_model"}
    for key in ("compute_model_import", "compute_preprocess", "compute_finetune", "compute_model_evaluation"):
        assert inputs[key] == "gpu-a100"
    assert not any(key.startswith("instance_type_") for key in inputs)  # a cluster: the component ignores them
    for key, split in (("train_file_path", "train_sft"), ("validation_file_path", "test_sft"),
                       ("test_file_path", "test_sft")):
        assert node["inputs"][key]["job_input_type"] == "uri_file"
        assert inputs[key].endswith(f"data/{split}.jsonl")
    assert inputs["number_of_gpu_to_use_finetuning"] == "1" and inputs["num_nodes_finetune"] == "1"
    assert inputs["apply_lora"] == "true" and inputs["apply_deepspeed"] == "true"
    # Phi-4's model_specific_defaults won over the experiment: stage 3, 16-bit, one epoch
    assert (inputs["deepspeed_stage"], inputs["precision"], inputs["num_train_epochs"]) == ("3", "16", "1")
    assert inputs["learning_rate"] == "5e-06" and inputs["lr_scheduler_type"] == "cosine"
    assert inputs["optim"] == "adamw_torch" and inputs["logging_strategy"] == "steps"
    assert inputs["ignore_mismatched_sizes"] == "false" and inputs["shm_size_finetune"] == "5g"
    assert node["outputs"]["mlflow_model_folder"]["value"] == "${{parent.outputs.trained_model}}"


def test_every_parameter_input_of_the_real_component_is_passed(backend, clients, data, component):
    """The experiment covers chat_completion_pipeline 0.0.82: each input is passed or named in NOT_PASSED."""
    from automation.backends.azure import pipeline

    workspace, _ = clients
    backend.submit_finetune(experiment(), data, job_name="job-1", tags=TAGS)
    (node,) = _job_rest(workspace.jobs.submitted[0])["properties"]["jobs"].values()
    declared = set(component.inputs)
    passed = set(node["inputs"])
    assert len(declared) == 69
    assert passed <= declared
    assert declared - passed == set(pipeline.NOT_PASSED) | {f"instance_type_{s}" for s in
                                                             ("model_import", "preprocess", "finetune")}


def test_real_phi3_defaults_are_merged_and_the_non_inputs_left_out(clients, data, component, caplog):
    """Phi-3-mini-4k-instruct version 15 as of 2025-02: forwarding learning_rate_min would fail the
    pipeline call (the component has no such input); it is named in a warning and not passed."""
    from datetime import date

    from azure.ai.ml.exceptions import UnexpectedKeywordError

    with pytest.raises(UnexpectedKeywordError, match="unexpected keyword argument 'learning_rate_min'"):
        component(learning_rate_min=5e-7)
    clients = reference_clients(component, models=[("Phi-3-mini-4k-instruct", "15", "2025-02-15")])
    backend = AzureBackend(*clients, sleep=lambda s: None, today=lambda: date(2025, 3, 1))
    phi3 = experiment(model__name="Phi-3-mini-4k-instruct", model__version="15")
    backend.submit_finetune(phi3, data, job_name="job-1", tags=TAGS)
    job = clients[0].jobs.submitted[0]
    assert job._validate().passed
    (node,) = _job_rest(job)["properties"]["jobs"].values()
    assert not {"learning_rate_min", "learning_rate_max"} & set(node["inputs"])
    assert node["inputs"]["logging_strategy"]["value"] == "steps"
    assert node["inputs"]["ignore_mismatched_sizes"]["value"] == "false"
    assert "model_specific_defaults holds learning_rate_min, learning_rate_max" in caplog.text


def test_serverless_job(backend, clients, data):
    workspace, _ = clients
    exp = experiment(compute={"serverless": True, "size": "Standard_NC48ads_A100_v4"})
    backend.submit_finetune(exp, data, job_name="job-1", tags=TAGS)
    job = workspace.jobs.submitted[0]
    assert job._validate().passed
    rest = _job_rest(job)["properties"]
    (node,) = rest["jobs"].values()
    inputs = {k: v.get("value") for k, v in node["inputs"].items()}
    assert rest["settings"]["default_compute"] == "serverless"
    assert {inputs[f"compute_{s}"] for s in ("model_import", "preprocess", "finetune", "model_evaluation")} == {
        "serverless"}
    assert inputs["instance_type_finetune"] == "Standard_NC48ads_A100_v4"
    assert inputs["instance_type_model_import"] == inputs["instance_type_preprocess"] == "Standard_D12_v2"
    assert inputs["number_of_gpu_to_use_finetuning"] == "2"


def test_pinned_component_version(clients, data, tmp_path):
    workspace, registry = clients
    registry.components.add(load_component(write_component(tmp_path, version="0.0.83")))
    backend = AzureBackend(*clients, sleep=lambda s: None)
    backend.submit_finetune(experiment(training__component_version="0.0.82"), data, job_name="job-1", tags=TAGS)
    assert workspace.jobs.submitted[0].jobs["finetune"].component.version == "0.0.82"
    backend.submit_finetune(experiment(), data, job_name="job-2", tags=TAGS)  # unpinned: the latest
    assert workspace.jobs.submitted[1].jobs["finetune"].component.version == "0.0.83"
    with pytest.raises(ConfigError, match=r"chat_completion_pipeline \(0.0.70\) not found in registry azureml"):
        backend.submit_finetune(experiment(training__component_version="0.0.70"), data, job_name="job-3", tags=TAGS)


def test_rerun_finds_the_existing_job(backend, clients, data):
    workspace, _ = clients
    for _ in range(2):
        assert backend.submit_finetune(experiment(), data, job_name="job-1", tags=TAGS) == "job-1"
    assert workspace.calls.count("jobs.create_or_update") == 1


def test_a_job_submitted_in_between_is_found(backend, clients, data):
    """Another run submits the same name between our get and create: the service refuses the name
    with a 400, and the job it names is reused."""
    workspace, _ = clients
    real_get = workspace.jobs.get
    seen = []

    def get_then_race(name):
        job = real_get(name) if seen else None
        seen.append(name)
        if job is None:
            other = AzureBackend(*clients, sleep=lambda s: None)
            workspace.jobs.get = real_get
            other.submit_finetune(experiment(), data, job_name=name, tags=TAGS)
            from tests.fake_azure import not_found
            raise not_found("job", name)
        return job

    workspace.jobs.get = get_then_race
    assert backend.submit_finetune(experiment(), data, job_name="job-1", tags=TAGS) == "job-1"
    assert len(workspace.jobs.submitted) == 1


def test_wait_streams_and_reads_metrics(backend, clients, data):
    workspace, _ = clients
    backend.submit_finetune(experiment(), data, job_name="job-1", tags=TAGS)
    part = backend.wait_finetune(experiment(), "job-1")
    assert "jobs.stream" in workspace.calls
    assert part.status == "completed" and part.model_uri == "azureml://jobs/job-1/outputs/trained_model"
    assert part.studio_url.startswith("https://ml.azure.com/runs/job-1")
    assert (part.train_loss, part.eval_loss) == (1.25, 1.5)
    assert [(p.step, p.loss) for p in part.train_loss_curve] == [(10, 2.0), (20, 1.5)]
    assert part.params["apply_lora"] == "true"


def test_failed_job_reports_status_error_and_url(backend, clients, data):
    workspace, _ = clients
    backend.submit_finetune(experiment(), data, job_name="job-1", tags=TAGS)
    workspace.jobs.outcome["job-1"] = ("Failed", "CUDA out of memory in finetune step")
    with pytest.raises(BackendError) as err:
        backend.wait_finetune(experiment(), "job-1")
    text = str(err.value)
    assert "ended Failed" in text and "CUDA out of memory" in text and "https://ml.azure.com/runs/job-1" in text


def test_wait_polls_without_streaming(backend, clients, data):
    workspace, _ = clients
    backend.submit_finetune(experiment(), data, job_name="job-1", tags=TAGS)
    workspace.jobs.items["job-1"]._status = "Completed"
    assert backend.wait_finetune(experiment(), "job-1", stream=False).status == "completed"
    assert "jobs.stream" not in workspace.calls


def test_missing_data_file_is_a_config_error(backend, tmp_path):
    from automation.errors import ConfigError

    part = DataPart(out_dir=str(tmp_path / "nothing"), source="x", rows={})
    with pytest.raises(ConfigError, match="train_sft.jsonl is missing"):
        backend.submit_finetune(experiment(), part, job_name="job-1", tags=TAGS)


# -- register --------------------------------------------------------------------------------


def test_register_payload_and_rerun(backend, clients):
    workspace, _ = clients
    finetune = FinetunePart(job_name="job-1")
    first = backend.register(experiment(), finetune, model_name="Phi-3-mini-4k-instruct-ultrachat-200k",
                             timestamp_version="1732400000", tags=TAGS)
    assert first.version == "1732400000" and first.model_uri == "azureml:Phi-3-mini-4k-instruct-ultrachat-200k:1732400000"
    stored = workspace.models.versions["Phi-3-mini-4k-instruct-ultrachat-200k"]["1732400000"]
    rest = stored._to_rest_object().as_dict()["properties"]
    assert rest["modelType"] == "mlflow_model" and rest["modelUri"] == "azureml://jobs/job-1/outputs/trained_model"
    assert rest["description"] == "Phi-4 fine tuned model for HuggingFaceH4/ultrachat_200k chat-completion"
    assert rest["tags"]["job_name"] == "job-1" and rest["tags"]["repo"] == "org/repo"
    again = backend.register(experiment(), finetune, model_name="Phi-3-mini-4k-instruct-ultrachat-200k",
                             timestamp_version="1732409999", tags=TAGS)
    assert again == first and workspace.calls.count("models.create_or_update") == 1


def test_a_version_taken_by_another_jobs_output_is_named(backend, clients):
    """The service answers 400 "Asset paths cannot be updated" when the version exists with another
    path (the SDK's AssetPathException never comes: it compares azure-core's formatted message for
    equality; the wire stand-in shows it): it is reported as such, not as a failed request."""
    from azure.core.exceptions import HttpResponseError

    workspace, _ = clients
    name = "Phi-4-ultrachat-200k"
    backend.register(experiment(), FinetunePart(job_name="job-1"), model_name=name, timestamp_version="17", tags=TAGS)
    workspace.models.versions[name]["17"].tags = {}  # registered by hand: no job tag to find it by
    with pytest.raises(BackendError, match=f"^model {name} version 17 exists for another job's output") as caught:
        backend.register(experiment(), FinetunePart(job_name="job-2"), model_name=name, timestamp_version="17",
                         tags=TAGS)
    assert isinstance(caught.value.__cause__, HttpResponseError) and caught.value.__cause__.status_code == 400
    assert workspace.calls.count("models.create_or_update") == 2


# -- deploy, score, teardown -----------------------------------------------------------------


def _registered(backend, version="1732400000"):
    return backend.register(experiment(), FinetunePart(job_name=f"job-{version}"), model_name="phi3-uc",
                            timestamp_version=version, tags=TAGS)


def test_deploy_payloads(backend, clients):
    workspace, _ = clients
    part = backend.deploy(experiment(), _registered(backend), endpoint_name="spr7-phi3-12345678", tags=TAGS)
    assert part.deployment_name == "demo" and part.url.endswith("/score") and part.stage == "staging"
    endpoint, deployment, traffic = workspace.rest_payloads
    assert endpoint["properties"]["authMode"] == "Key" and endpoint["tags"]["experiment"] == "phi3-ultrachat"
    props = deployment["properties"]
    assert props["model"] == "azureml:phi3-uc:1732400000" and props["instanceType"] == A100
    assert deployment["sku"]["capacity"] == 1
    assert props["requestSettings"]["requestTimeout"] == "PT1M30S"  # 90000 ms
    assert props["livenessProbe"] == {"failureThreshold": 30, "initialDelay": "PT10M"}  # 600 s
    assert traffic["properties"]["traffic"] == {"demo": 100}
    again = backend.deploy(experiment(), _registered(backend), endpoint_name="spr7-phi3-12345678", tags=TAGS)
    assert again == part and workspace.calls.count("online_deployments.begin_create_or_update") == 1


def test_deploy_waits_for_an_updating_endpoint(backend, clients):
    workspace, _ = clients
    backend.deploy(experiment(), _registered(backend), endpoint_name="ep-1", tags=TAGS)
    workspace.online_endpoints.busy["ep-1"] = 3
    backend.deploy(experiment(), _registered(backend, "1732500000"), endpoint_name="ep-1", tags=TAGS)
    assert workspace.online_deployments.items[("ep-1", "demo")].model == "azureml:phi3-uc:1732500000"


def test_deploy_quota_error_is_one_sentence_not_retried(backend, clients):
    workspace, _ = clients
    workspace.fail("online_deployments.begin_create_or_update", quota_error())
    with pytest.raises(BackendError, match=r"^creating deployment demo on ep-1 refused for lack of quota"):
        backend.deploy(experiment(), _registered(backend), endpoint_name="ep-1", tags=TAGS)
    assert workspace.calls.count("online_deployments.begin_create_or_update") == 1


def test_transient_fault_during_deploy_is_retried_by_azure_core_alone(clients):
    """Two 429s on a PUT are retried inside azure-core's pipeline (as configured in connection.py);
    nothing reaches our own retries. A third and fourth would exhaust it: then the stage fails."""
    workspace, _ = clients
    sleeps: list[float] = []
    backend = AzureBackend(*clients, sleep=sleeps.append, poll_s=0)
    workspace.fail("online_endpoints.begin_create_or_update", throttled("1"), times=2)
    assert backend.deploy(experiment(), _registered(backend), endpoint_name="ep-1", tags=TAGS).endpoint_name == "ep-1"
    assert len(workspace.core_retries) == 2 and sleeps == []
    workspace.fail("online_endpoints.begin_create_or_update", throttled("1"), times=4)
    with pytest.raises(BackendError, match="^creating endpoint ep-2 failed: .*Rate limit"):
        backend.deploy(experiment(), _registered(backend), endpoint_name="ep-2", tags=TAGS)
    assert sleeps == []


@pytest.mark.parametrize("operation", ["online_deployments.begin_create_or_update",
                                       "online_endpoints.begin_create_or_update"])
def test_a_busy_endpoint_answering_409_is_waited_for_not_a_crash(clients, operation):
    """409 "operation in progress" on a begin_*: ResourceExistsError in the SDK, which is not "already
    exists" there; backed off and retried, and the deployment is made."""
    workspace, _ = clients
    sleeps: list[float] = []
    backend = AzureBackend(*clients, sleep=sleeps.append, poll_s=0)
    workspace.fail(operation, conflict(), times=2)
    part = backend.deploy(experiment(), _registered(backend), endpoint_name="ep-1", tags=TAGS)
    assert part.endpoint_name == "ep-1" and workspace.online_endpoints.items["ep-1"].traffic == {"demo": 100}
    assert sleeps == [15.0, 30.0] and workspace.core_retries == []


def test_a_409_that_does_not_pass_fails_the_stage_in_one_sentence(clients):
    workspace, _ = clients
    backend = AzureBackend(*clients, sleep=lambda s: None, poll_s=0)
    workspace.fail("online_deployments.begin_create_or_update", conflict(), times=6)
    with pytest.raises(BackendError, match="creating deployment demo on ep-1 failed after 6 attempts "
                                           r"\(the resource stayed busy"):
        backend.deploy(experiment(), _registered(backend), endpoint_name="ep-1", tags=TAGS)


def test_a_cancel_or_delete_on_a_busy_resource_is_retried(backend, clients, data):
    workspace, _ = clients
    backend.deploy(experiment(), _registered(backend), endpoint_name="ep-1", tags=TAGS)
    workspace.fail("online_endpoints.begin_delete", conflict())
    assert backend.delete_endpoint("ep-1") is True and "ep-1" not in workspace.online_endpoints.items
    backend.submit_finetune(experiment(), data, job_name="job-c", tags=TAGS)
    workspace.fail("jobs.begin_cancel", conflict())
    assert backend.cancel_job("job-c") is True and workspace.jobs.cancelled == ["job-c"]


def test_score_sends_the_request_file(backend, clients):
    workspace, _ = clients
    backend.deploy(experiment(), _registered(backend), endpoint_name="ep-1", tags=TAGS)
    request = {"input_data": {"input_string": [{"role": "user", "content": "Hi"}],
                              "parameters": {"temperature": 0.6, "top_p": 0.9, "do_sample": True,
                                             "max_new_tokens": 200}}, "params": {}}
    assert backend.invoke("ep-1", request, deployment="demo") == {"output": "Hello from Azure."}
    assert workspace.online_endpoints.invocations == [("ep-1", "demo", request)]
    with pytest.raises(BackendError, match="no endpoint named nope"):
        backend.invoke("nope", request)


def test_teardown_by_tags_and_missing_is_success(backend, clients):
    workspace, _ = clients
    backend.deploy(experiment(), _registered(backend), endpoint_name="ep-mine", tags=TAGS)
    backend.deploy(experiment(), _registered(backend), endpoint_name="ep-other", tags={**TAGS, "pr": "8"})
    found = backend.list_endpoints({"repo": "org/repo", "pr": "7"})
    assert [e.name for e in found] == ["ep-mine"] and found[0].deployments == ["demo"]
    assert found[0].created_at == TAGS["created_at"]
    assert backend.delete_endpoints({"repo": "org/repo", "pr": "7", "stage": "staging"}) == ["ep-mine"]
    assert sorted(workspace.online_endpoints.items) == ["ep-other"]
    assert backend.delete_endpoint("ep-mine") is False


# -- promote ---------------------------------------------------------------------------------


def test_promote_blue_green(backend, clients):
    workspace, _ = clients
    prod_tags = {**TAGS, "stage": "production"}
    first = backend.promote(experiment(), _registered(backend), endpoint_name="prod-phi3", tags=prod_tags)
    assert (first.deployment_name, first.previous_deployment) == ("v1732400000", None)
    assert workspace.models.versions["phi3-uc"]["1732400000"].tags["stage"] == "production"
    second = backend.promote(experiment(), _registered(backend, "1732500000"), endpoint_name="prod-phi3",
                             tags=prod_tags)
    assert (second.deployment_name, second.previous_deployment) == ("v1732500000", "v1732400000")
    # the previous deployment is kept, without traffic, until the next promotion: one step back
    assert workspace.online_deployments.of("prod-phi3") == ["v1732400000", "v1732500000"]
    assert workspace.online_endpoints.items["prod-phi3"].traffic == {"v1732500000": 100, "v1732400000": 0}
    smoke = [inv for inv in workspace.online_endpoints.invocations if inv[1] == "v1732500000"]
    assert len(smoke) == 1  # scored before traffic moved
    back = backend.rollback("prod-phi3")
    assert (back.deployment_name, back.model_version, back.previous_deployment) == \
        ("v1732400000", "1732400000", "v1732500000")
    assert workspace.online_endpoints.items["prod-phi3"].traffic == {"v1732400000": 100, "v1732500000": 0}
    assert backend.serving_model("prod-phi3").version == "1732400000"
    backend.rollback("prod-phi3")  # and forth again
    third = backend.promote(experiment(), _registered(backend, "1732600000"), endpoint_name="prod-phi3",
                            tags=prod_tags)
    assert third.previous_deployment == "v1732500000"
    assert workspace.online_deployments.of("prod-phi3") == ["v1732500000", "v1732600000"]  # the oldest goes


def test_rollback_without_a_kept_deployment_says_so(backend):
    backend.promote(experiment(), _registered(backend), endpoint_name="prod-phi3", tags=TAGS)
    with pytest.raises(ConfigError, match="no previous deployment is kept"):
        backend.rollback("prod-phi3")
    with pytest.raises(ConfigError, match="nothing to roll back"):
        backend.rollback("prod-none")


def test_failed_smoke_score_keeps_the_old_deployment(backend, clients):
    workspace, _ = clients
    backend.promote(experiment(), _registered(backend), endpoint_name="prod-phi3", tags=TAGS)
    workspace.online_endpoints.replies["v1732500000"] = json.dumps({"error": "model failed to load"})
    with pytest.raises(BackendError, match="smoke score of deployment v1732500000"):
        backend.promote(experiment(), _registered(backend, "1732500000"), endpoint_name="prod-phi3", tags=TAGS)
    assert workspace.online_deployments.of("prod-phi3") == ["v1732400000"]
    assert workspace.online_endpoints.items["prod-phi3"].traffic == {"v1732400000": 100}


def _with_production_registry(clients) -> tuple[AzureBackend, FakeMLClient]:
    workspace, registry = clients
    production = FakeMLClient(registry_name="prod-registry")
    workspace.registries["prod-registry"] = production
    return AzureBackend(workspace, registry, sleep=lambda s: None, production_registry="prod-registry",
                        registry_clients={"prod-registry": production}), production


def test_promote_shares_into_a_production_registry_once(clients):
    workspace, _ = clients
    backend, production = _with_production_registry(clients)
    backend.promote(experiment(), _registered(backend), endpoint_name="prod-phi3", tags=TAGS)
    assert production.models.get("phi3-uc", version="1732400000").name == "phi3-uc"
    backend.promote(experiment(), _registered(backend), endpoint_name="prod-phi3", tags=TAGS)  # rerun: finds it
    assert workspace.calls.count("models.share") == 1
    assert workspace.calls.count("online_deployments.begin_create_or_update") == 1


def test_promote_shared_in_between_is_success(clients):
    """The version appears in the registry between our look and the share: the SDK's
    ValidationException("... already exists in registry") means done."""
    workspace, _ = clients
    backend, production = _with_production_registry(clients)
    model = _registered(backend)
    real_share = workspace.models.share

    def share_twice(*args, **kwargs):
        real_share(*args, **kwargs)
        return real_share(*args, **kwargs)

    workspace.models.share = share_twice
    part = backend.promote(experiment(), model, endpoint_name="prod-phi3", tags=TAGS)
    assert part.deployment_name == "v1732400000" and "phi3-uc" in production.models.versions


def test_production_deploys_from_the_registry_and_a_failed_smoke_test_changes_nothing(clients):
    workspace, _ = clients
    backend, production = _with_production_registry(clients)
    backend.promote(experiment(), _registered(backend), endpoint_name="prod-phi3", tags=TAGS)
    deployed = workspace.online_deployments.items[("prod-phi3", "v1732400000")]
    assert str(deployed.model).startswith("azureml://registries/prod-registry/models/phi3-uc/versions/")
    workspace.online_endpoints.replies["v1732500000"] = json.dumps({"error": "model failed to load"})
    with pytest.raises(BackendError, match="smoke score"):
        backend.promote(experiment(), _registered(backend, "1732500000"), endpoint_name="prod-phi3", tags=TAGS)
    assert workspace.online_deployments.of("prod-phi3") == ["v1732400000"]  # the candidate removed
    assert workspace.online_endpoints.items["prod-phi3"].traffic == {"v1732400000": 100}
    assert backend._production_model_id(_registered(backend)).startswith("azureml://registries/prod-registry/")


def test_transient_plain_text_scoring_failures_are_retried(backend, clients):
    workspace, _ = clients
    backend.deploy(experiment(), _registered(backend), endpoint_name="ep-1", tags=TAGS)
    workspace.fail("online_endpoints.invoke", plain_text_answer(502, "Bad Gateway"))
    workspace.fail("online_endpoints.invoke", plain_text_answer(503, "no healthy upstream"))
    request = {"input_data": {"input_string": [{"role": "user", "content": "Hi"}], "parameters": {}}, "params": {}}
    assert backend.invoke("ep-1", request, deployment="demo") == {"output": "Hello from Azure."}
    # the 502 reaches us (azure-core does not retry a POST's 502); the 503 is retried inside azure-core
    assert workspace.calls.count("online_endpoints.invoke") == 2 and len(workspace.core_retries) == 1


def test_dry_run_plan_matches_the_submitted_job(backend, clients, data):
    from automation.backends.azure.plan import plan_azure

    workspace, registry = clients
    registry.models.payloads["Phi-4"]["8"]["properties"]["tags"] = {}  # no defaults: the plan cannot know them
    backend.submit_finetune(experiment(), data, job_name="job-1", tags=TAGS)
    (node,) = _job_rest(workspace.jobs.submitted[0])["properties"]["jobs"].values()
    submitted = {k: v.get("value") for k, v in node["inputs"].items() if "value" in v}
    planned = plan_azure(experiment(), repo="org/repo", pr=7, sha="abc1234def")[2]
    assert submitted == {k: str(v) for k, v in planned["inputs"].items() if k in submitted}
    assert workspace.jobs.submitted[0].display_name == planned["display_name"]


def test_failed_first_promotion_removes_the_broken_deployment(backend, clients):
    workspace, _ = clients
    workspace.online_endpoints.replies["v1732400000"] = "not json"
    with pytest.raises(BackendError, match="non-JSON"):
        backend.promote(experiment(), _registered(backend), endpoint_name="prod-phi3", tags=TAGS)
    assert workspace.online_deployments.of("prod-phi3") == []


def test_sdk_validation_errors_become_backend_errors():
    from azure.ai.ml.exceptions import ValidationException

    from automation.backends.azure import retry

    def invalid():
        raise ValidationException(message="instance_count must be positive\nmore detail",
                                  no_personal_data_message="bad")

    with pytest.raises(BackendError, match="^creating deployment failed: instance_count must be positive$"):
        retry.call("creating deployment", invalid, sleep=lambda s: None)
