"""The experiment's training and optimization sections against the real chat_completion_pipeline
0.0.82 spec (tests/fixtures/azureml): every parameter input with its type, enum and default; the
rules its finetune step enforces at run time; the real model_specific_defaults tags; retired sizes.
No cloud SDK: the spec is read as YAML."""

from __future__ import annotations

import typing

import pytest
import yaml

from automation.backends.azure import pipeline
from automation.errors import ExperimentInvalid
from automation.spec import (
    ComputeSpec,
    OptimizationSpec,
    TrainingSpec,
    apply_model_specific_defaults,
    component_parameters,
    load_experiment,
)
from tests.conftest import REPO, write_experiment
from tests.fake_azure import COMPONENT_SPEC, EXPERIMENT, experiment, model_spec

SPEC = yaml.safe_load(COMPONENT_SPEC.read_text(encoding="utf-8"))
INPUTS = SPEC["inputs"]
SECTIONS = {"training": TrainingSpec, "optimization": OptimizationSpec}


def _field(name: str):
    return SECTIONS[component_parameters()[name]].model_fields[name]


def test_the_fixture_is_the_real_0_0_82_spec():
    assert SPEC["name"] == "chat_completion_pipeline" and SPEC["version"] == pipeline.CHECKED_VERSION == "0.0.82"
    assert len(INPUTS) == 69 and "mlflow_model_folder" in SPEC["outputs"]
    assert INPUTS["optim"]["enum"] == ["adamw_torch", "adafactor"]
    assert INPUTS["evaluation_strategy"]["enum"] == ["epoch", "steps", "disable"]


def test_every_input_is_a_field_an_infrastructure_input_or_named_as_not_passed():
    infrastructure = {"mlflow_model_path", "train_file_path", "validation_file_path", "test_file_path",
                      "number_of_gpu_to_use_finetuning", "num_nodes_finetune", "shm_size_finetune",
                      *(f"compute_{s}" for s in ("model_import", "preprocess", "finetune", "model_evaluation")),
                      *(f"instance_type_{s}" for s in ("model_import", "preprocess", "finetune"))}
    parameters = set(component_parameters())
    assert parameters <= set(INPUTS), parameters - set(INPUTS)
    assert set(INPUTS) == parameters | infrastructure | set(pipeline.NOT_PASSED)
    assert not parameters & set(pipeline.NOT_PASSED)


@pytest.mark.parametrize("name", sorted(component_parameters()))
def test_each_parameter_has_the_component_type_enum_and_default(name):
    spec, field = INPUTS[name], _field(name)
    kind = field.annotation
    enum = spec.get("enum")
    if enum == ["true", "false"]:
        assert kind is bool
    elif enum:
        assert [str(v) for v in typing.get_args(kind)] == [str(v) for v in enum]
    else:
        assert kind is {"integer": int, "number": float}[spec["type"]]
    default = spec["default"]
    expected = float(default) if spec["type"] == "number" else default  # YAML reads 1e-8 as a string
    assert pipeline.component_value(name, field.default) == expected
    if "min" in spec:
        assert any(getattr(m, "ge", None) == spec["min"] for m in field.metadata), field.metadata


@pytest.mark.parametrize("changes, path, message", [
    ({"training__optim": "adamw_hf"}, "training.optim", "'adamw_torch' or 'adafactor'"),
    ({"training__auto_find_batch_size": True}, "training.auto_find_batch_size",
     "does not work with optimization.apply_deepspeed"),
    ({"optimization__deepspeed_stage": 3, "optimization__apply_ort": True}, "optimization.apply_ort",
     "DeepSpeed stage 3 does not work with ORT"),
    ({"training__evaluation_steps_interval": 0.5}, "training.evaluation_steps_interval",
     "only applies with evaluation_strategy: steps"),
    ({"training__evaluation_steps_interval": 1.5}, "training.evaluation_steps_interval", "less than or equal to 1"),
    ({"training__logging_strategy": "no"}, "training.logging_strategy", "'epoch' or 'steps'"),
    ({"deployment__instance_type": "Standard_NC6s_v3"}, "deployment.instance_type", "retired on 2025-09-30"),
    ({"compute__size": "Standard_NC24s_v3"}, "compute.size", "retired on 2025-09-30"),
    ({"compute__serverless": True}, "compute.cluster", "does not apply with compute.serverless: true"),
    ({"compute__cluster": None}, "compute.cluster", "is required for backend: azure (or set compute.serverless"),
])
def test_values_the_component_refuses_at_run_time_are_refused_here(tmp_path, changes, path, message):
    body = experiment().model_dump(mode="json", exclude_defaults=True)
    for dotted, value in changes.items():
        section, _, key = dotted.partition("__")
        body.setdefault(section, {})[key] = value
    file = write_experiment(tmp_path, body, name=body["name"])
    with pytest.raises(ExperimentInvalid) as caught:
        load_experiment(file)
    found = [str(i) for i in caught.value.issues]
    assert any(f.startswith(f"{path} at ") and message in f for f in found), found


def test_values_the_component_accepts_are_accepted():
    assert experiment(training__evaluation_strategy="disable").training.evaluation_strategy == "disable"
    assert experiment(training__auto_find_batch_size=True, optimization__apply_deepspeed=False)
    assert experiment(optimization__deepspeed_stage=3, optimization__apply_ort=False)
    assert experiment(compute={"serverless": True, "size": "Standard_NC48ads_A100_v4"}).compute.serverless
    assert ComputeSpec().shm_size == "5g" and ComputeSpec().preprocess_size == "Standard_D12_v2"


@pytest.mark.parametrize("version, source_date, passed, ignored", [
    ("7", "2024-05-20", {"ignore_mismatched_sizes": False, "logging_strategy": "steps", "precision": 16}, []),
    ("15", "2025-02-15", {"learning_rate": 5e-6, "logging_steps": 10}, ["learning_rate_min", "learning_rate_max"]),
])
def test_real_phi3_model_specific_defaults(version, source_date, passed, ignored, caplog):
    """The tag as the registry holds it: str() of the spec's dict, as azure-ai-ml writes every tag."""
    tags = model_spec("Phi-3-mini-4k-instruct", version, source_date)["tags"]
    tag = str(tags["model_specific_defaults"])
    merged, warnings = apply_model_specific_defaults(experiment(), tag)
    for key, value in passed.items():
        section = component_parameters()[key]
        assert getattr(getattr(merged, section), key) == value
    overrides = [w for w in warnings if "overrides" in w]
    assert "model_specific_defaults overrides training.precision: 32 -> 16" in overrides
    assert len(overrides) == len([r for r in caplog.records if "overrides" in r.message])
    notes = [w for w in warnings if "overrides" not in w]
    assert notes == ([f"model_specific_defaults holds {', '.join(ignored)}, which are not inputs of "
                      "chat_completion_pipeline; not passed"] if ignored else [])
    assert not set(ignored) & set(pipeline.parameter_inputs(merged))


def test_defaults_that_break_a_run_time_rule_are_refused():
    with pytest.raises(ExperimentInvalid, match="auto_find_batch_size"):
        apply_model_specific_defaults(experiment(training__auto_find_batch_size=True, optimization__apply_deepspeed=False),
                                      "{'apply_deepspeed': 'true'}")


def test_committed_azure_experiments():
    phi3 = load_experiment(REPO / "experiments" / "phi3-mini-ultrachat.yaml")
    phi4 = load_experiment(REPO / "experiments" / "phi4-ultrachat.yaml")
    for exp in (phi3, phi4):
        assert exp.training.component_version == pipeline.CHECKED_VERSION
        assert exp.deployment.instance_type == "Standard_NC24ads_A100_v4"
    assert "RETIRED" in (REPO / "experiments" / "phi3-mini-ultrachat.yaml").read_text()
    current = model_spec("Phi-4", "8")
    assert phi4.model.name == current["name"] and phi4.model.version == current["version"]
    assert phi4.compute.size in current["system_metadata"]["supportedComputes"]["finetuneComputes"]
    assert phi4.deployment.instance_type in current["system_metadata"]["supportedComputes"]["inferenceComputes"]
    assert "deprecation" not in current["system_metadata"] and not current["is_archived"]
    assert EXPERIMENT["model"]["name"] == "Phi-4"
