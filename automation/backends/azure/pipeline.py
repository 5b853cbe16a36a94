"""The fine-tune pipeline job: `chat_completion_pipeline` from the registry, inputs as the reference.

`component_inputs` is pure (no SDK), so the dry-run plan and the real job share one source of
truth; `build_pipeline_job` feeds it to the real component through the `@pipeline` DSL.

Checked against chat_completion_pipeline 0.0.82 (tests/fixtures/azureml/ holds its spec): every
parameter input is a training or optimization field; the inputs left out are in NOT_PASSED, with
the reason.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from automation.spec import Experiment

log = logging.getLogger(__name__)

COMPONENT_NAME = "chat_completion_pipeline"
CHECKED_VERSION = "0.0.82"  # the version whose spec the tests hold; experiments pin it in training
OUTPUT_NAME = "trained_model"
COMPONENT_OUTPUT = "mlflow_model_folder"
SERVERLESS = "serverless"  # the compute_* value that makes the component use its instance_type_* inputs
STRING_INPUTS = {"deepspeed_stage", "precision"}  # the component takes these as "2"/"3", "32"/"16"
# Inputs of 0.0.82 this project does not pass, and why.
NOT_PASSED = {
    "huggingface_id": "the model comes from a registry as mlflow_model_path",
    "pytorch_model_path": "the model comes from a registry as mlflow_model_path",
    "finetune_config_path": "registry models bundle their finetune config",
    "trust_remote_code": "only for raw Hugging Face models (huggingface_id)",
    "task_name": "fixed: ChatCompletion, the component's only value and default",
    "train_mltable_path": "the data stage writes JSONL files (train_file_path)",
    "validation_mltable_path": "the data stage writes JSONL files (validation_file_path)",
    "test_mltable_path": "the data stage writes JSONL files (test_file_path)",
    "deepspeed": "a custom DeepSpeed config file; deepspeed_stage selects the component's own",
    "evaluation_config": "its model evaluation steps are commented out in 0.0.82",
    "evaluation_config_params": "its model evaluation steps are commented out in 0.0.82",
    "instance_type_model_evaluation": "its model evaluation steps are commented out in 0.0.82",
}


def training_inputs() -> tuple[str, ...]:
    from automation.spec import NOT_COMPONENT_INPUTS, TrainingSpec

    return tuple(k for k in TrainingSpec.model_fields if k not in NOT_COMPONENT_INPUTS)


def optimization_inputs() -> tuple[str, ...]:
    from automation.spec import OptimizationSpec

    return tuple(OptimizationSpec.model_fields)


def component_value(key: str, value: Any) -> Any:
    """The component speaks strings for booleans ("true"/"false") and for a few enums."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if key in STRING_INPUTS:
        return str(value)
    return value


def parameter_inputs(experiment: Experiment) -> dict[str, Any]:
    t, o = experiment.training, experiment.optimization
    values = {k: getattr(t, k) for k in training_inputs()}
    values.update({k: getattr(o, k) for k in optimization_inputs()})
    return {k: component_value(k, v) for k, v in values.items()}


def data_files(experiment: Experiment, data_dir: str | Path) -> dict[str, Path]:
    """The test split is passed as the validation file too: given train, validation and test files the
    component slices nothing off the training data (preprocess.py), and its eval loss is on the test split.
    Without a validation file it would hold out 20 % of the training data and evaluate on that."""
    d = Path(data_dir)
    test = d / f"{experiment.data.test_split}.jsonl"
    return {"train_file_path": d / f"{experiment.data.train_split}.jsonl",
            "validation_file_path": test, "test_file_path": test}


def compute_inputs(experiment: Experiment) -> dict[str, Any]:
    """Where each step runs: the cluster, or serverless compute with the instance types."""
    c = experiment.compute
    target = SERVERLESS if c.serverless else c.cluster
    inputs: dict[str, Any] = {f"compute_{step}": target
                              for step in ("model_import", "preprocess", "finetune", "model_evaluation")}
    if c.serverless:
        inputs.update({"instance_type_model_import": c.preprocess_size, "instance_type_preprocess": c.preprocess_size,
                       "instance_type_finetune": c.size})
    inputs["shm_size_finetune"] = c.shm_size
    return inputs


def component_inputs(experiment: Experiment, *, model_id: str, gpus_per_node: int | str,
                     data_dir: str | Path) -> dict[str, Any]:
    """Every input of the pipeline call, data files as paths (they become uri_file inputs)."""
    inputs: dict[str, Any] = {
        "mlflow_model_path": model_id,
        **compute_inputs(experiment),
        **{k: str(v) for k, v in data_files(experiment, data_dir).items()},
        "number_of_gpu_to_use_finetuning": gpus_per_node,
        "num_nodes_finetune": experiment.compute.nodes,
    }
    inputs.update(parameter_inputs(experiment))
    return inputs


def default_compute(experiment: Experiment) -> str:
    return SERVERLESS if experiment.compute.serverless else str(experiment.compute.cluster)


def job_settings() -> dict[str, Any]:
    return {"force_rerun": True, "continue_on_step_failure": False}


def accepted_inputs(component, inputs: dict[str, Any], experiment: Experiment) -> dict[str, Any]:
    """Keep the inputs the component declares; a non-default value it cannot take is logged."""
    declared = set((getattr(component, "inputs", None) or {}).keys())
    if not declared:
        return inputs
    defaults = parameter_inputs(experiment.model_copy(update={
        "training": type(experiment.training)(), "optimization": type(experiment.optimization)()}))
    kept = {}
    for key, value in inputs.items():
        if key in declared:
            kept[key] = value
        elif defaults.get(key, object()) != value:
            log.warning("component %s has no input %s; the experiment's value %r is not used",
                        getattr(component, "name", COMPONENT_NAME), key, value)
    return kept


def build_pipeline_job(component, experiment: Experiment, *, model_id: str, gpus_per_node: int,
                       data_dir: str | Path, job_name: str, display_name: str, tags: dict[str, str]):
    """A real PipelineJob calling the registry component; output mapped to `trained_model`."""
    from azure.ai.ml import Input, dsl

    inputs = accepted_inputs(component, component_inputs(
        experiment, model_id=model_id, gpus_per_node=gpus_per_node, data_dir=data_dir), experiment)
    for key in data_files(experiment, data_dir):
        if key in inputs:
            inputs[key] = Input(type="uri_file", path=str(Path(inputs[key]).resolve()))

    @dsl.pipeline(name=job_name, description=f"fine-tune {experiment.model.name} ({experiment.name})")
    def finetune_pipeline():
        finetune = component(**inputs)
        return {OUTPUT_NAME: finetune.outputs[COMPONENT_OUTPUT]}

    job = finetune_pipeline()
    job.name = job_name
    job.display_name = display_name
    job.experiment_name = experiment.name
    job.tags = dict(tags)
    job.settings.default_compute = default_compute(experiment)
    for key, value in job_settings().items():
        setattr(job.settings, key, value)
    return job


def trained_model_path(job_name: str) -> str:
    return f"azureml://jobs/{job_name}/outputs/{OUTPUT_NAME}"
