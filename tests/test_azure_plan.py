"""The dry-run plan: every operation of a run as YAML, without network or cloud SDK."""

from __future__ import annotations

import subprocess
import sys

import yaml

from automation.backends.azure.plan import plan_run
from tests.conftest import LOCAL_EXPERIMENT, REPO
from tests.fake_azure import experiment


def _operations(text: str) -> list[dict]:
    return yaml.safe_load(text)["operations"]


def test_azure_plan_lists_every_operation_with_its_payload():
    ops = _operations(plan_run(experiment(), repo="org/repo", pr=7, sha="abc1234def"))
    assert [o["stage"] for o in ops] == ["validate", "data", "finetune", "register", "deploy", "deploy", "deploy",
                                        "score", "teardown"]
    job = ops[2]
    assert job["name"].startswith("phi4-ultrachat-abc1234-")
    assert job["display_name"] == "Phi-4-ultrachat-bs1-cosine-ds2-lora-save_limit1-seqlen2048"
    assert job["component"] == {"registry": "azureml", "name": "chat_completion_pipeline", "label": "latest"}
    assert job["settings"] == {"force_rerun": True, "continue_on_step_failure": False, "default_compute": "gpu-a100"}
    inputs = job["inputs"]
    assert inputs["mlflow_model_path"] == "azureml://registries/azureml/models/Phi-4/labels/latest"
    assert inputs["train_file_path"]["type"] == "uri_file" and inputs["train_file_path"]["path"].endswith("train_sft.jsonl")
    assert inputs["validation_file_path"]["path"].endswith("test_sft.jsonl")  # the eval loss is on the test split
    assert inputs["apply_lora"] == "true" and inputs["deepspeed_stage"] == "2" and inputs["number_of_gpu_to_use_finetuning"] == 1
    assert job["tags"]["pr"] == "7" and job["tags"]["stage"] == "finetune"
    model = ops[3]["model"]
    assert model["type"] == "mlflow_model" and model["path"] == f"azureml://jobs/{job['name']}/outputs/trained_model"
    endpoint, deployment, traffic = ops[4]["endpoint"], ops[5]["deployment"], ops[6]["traffic"]
    assert endpoint["auth_mode"] == "key" and endpoint["name"].startswith("spr7-") and len(endpoint["name"]) <= 32
    assert deployment["request_settings"]["request_timeout_ms"] == 90000
    assert deployment["liveness_probe"]["initial_delay"] == 600 and traffic == {"demo": 100}
    assert ops[8]["endpoints_with_tags"] == {"repo": "org/repo", "pr": "7", "experiment": "phi4-ultrachat",
                                             "stage": "staging"}


def test_unknown_size_and_experiment_defaults(monkeypatch):
    monkeypatch.setenv("AZURE_ML_COMPONENT_VERSION", "0.0.62")
    exp = experiment(compute__size="Standard_XYZ", compute__create_if_missing=True,
                     model__model_specific_defaults="{'learning_rate': 1e-5}")
    job = _operations(plan_run(exp, repo="o/r", pr=None, sha=""))[2]
    assert job["display_name"] == "<after list_sizes>"
    assert job["inputs"]["number_of_gpu_to_use_finetuning"].startswith("<")
    assert job["inputs"]["learning_rate"] == 1e-5 and job["component"]["version"] == "0.0.62"
    assert job["model_specific_defaults"] == ["model_specific_defaults overrides training.learning_rate: 5e-06 -> 1e-05"]
    validate = _operations(plan_run(exp, repo="o/r", pr=None, sha=""))[0]
    assert validate["create_if_missing"]["cluster"]["min_instances"] == 0


def test_plan_shows_the_pinned_component_and_serverless_compute(monkeypatch):
    monkeypatch.setenv("AZURE_ML_COMPONENT_VERSION", "0.0.80")  # the experiment's pin wins
    exp = experiment(training__component_version="0.0.82",
                     compute={"serverless": True, "size": "Standard_NC48ads_A100_v4"})
    validate, _, job = _operations(plan_run(exp, repo="o/r", pr=1, sha="abc"))[:3]
    assert job["component"] == {"registry": "azureml", "name": "chat_completion_pipeline", "version": "0.0.82"}
    assert validate["serverless"]["size"] == "Standard_NC48ads_A100_v4" and "cluster" not in validate
    assert job["compute"] == "serverless" and job["settings"]["default_compute"] == "serverless"
    assert job["inputs"]["compute_finetune"] == "serverless" and job["inputs"]["number_of_gpu_to_use_finetuning"] == 2
    assert job["inputs"]["instance_type_finetune"] == "Standard_NC48ads_A100_v4"


def test_local_plan():
    from automation.spec import Experiment

    ops = _operations(plan_run(Experiment.model_validate(LOCAL_EXPERIMENT), repo="local", pr=None, sha="abc"))
    assert [o["stage"] for o in ops] == ["validate", "data", "finetune", "register", "deploy", "score", "teardown"]
    assert ops[0]["model"] == "path: models/tiny" and ops[4]["endpoint"].startswith("sdev-")


def test_plan_needs_no_cloud_sdk():
    code = ("import sys; from tests.fake_azure import EXPERIMENT; from automation.spec import Experiment; "
            "from automation.backends.azure.plan import plan_run; "
            "plan_run(Experiment.model_validate(EXPERIMENT), repo='o/r', pr=1, sha='s'); "
            "print(sorted(m for m in sys.modules if m.startswith(('azure.ai.ml', 'azure.identity'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"


# -- the lists: retired sizes, the GPU table, what azure refuses offline ----------------------


def test_the_components_default_finetune_size_is_retired_offline():
    """Standard_NC24rs_v3 is NCv3 (retired with the other NCv3 sizes on 2025-09-30) and the default
    `instance_type_finetune` of chat_completion_pipeline: an experiment naming it fails validate."""
    import pytest
    from pydantic import ValidationError

    from automation.vm_sizes import retirement_of
    from tests.fake_azure import COMPONENT_SPEC

    spec = yaml.safe_load(COMPONENT_SPEC.read_text(encoding="utf-8"))
    default = spec["inputs"]["instance_type_finetune"]["default"]
    assert default == "Standard_nc24rs_v3" and retirement_of(default) == "2025-09-30"  # the spec's own spelling
    with pytest.raises(ValidationError, match="size: Standard_NC24rs_v3 was retired on 2025-09-30"):
        experiment(compute={"serverless": True, "size": "Standard_NC24rs_v3"})


def test_every_size_of_phi4s_allow_lists_has_its_gpus_in_the_table():
    from automation.vm_sizes import GPUS_PER_SIZE
    from tests.fake_azure import model_spec

    computes = model_spec("Phi-4", "8", "2026-07-01")["system_metadata"]["supportedComputes"]
    for size in computes["finetuneComputes"] + computes["inferenceComputes"]:
        assert size.lower() in GPUS_PER_SIZE, size
    assert GPUS_PER_SIZE["standard_nd96isr_h100_v5"] == 8
    ops = _operations(plan_run(experiment(compute={"cluster": "h100", "size": "Standard_ND96isr_H100_v5"}),
                               repo="org/repo", pr=7, sha="abc1234def"))
    assert ops[0]["cluster"]["gpus_per_node"] == 8 and ops[2]["inputs"]["number_of_gpu_to_use_finetuning"] == 8


def test_unmerged_lora_weights_are_refused_for_azure():
    """deploy and score serve the job's trained_model as one merged MLflow model."""
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="optimization.merge_lora_weights.*must be true on backend: azure"):
        experiment(optimization={"apply_lora": True, "merge_lora_weights": False})
    assert experiment(optimization={"apply_lora": True, "merge_lora_weights": True}).optimization.merge_lora_weights
