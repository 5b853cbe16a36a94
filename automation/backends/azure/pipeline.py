"""The fine-tune pipeline job: `chat_completion_pipeline` from the registry, inputs as the reference.

`component_inputs` is pure (no SDK), so the dry-run plan and the real job share one source of
truth; `build_pipeline_job` feeds it to the real component through the `@pipeline` DSL.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from automation.spec import Experiment

log = logging.getLogger(__name__)

COMPONENT_NAME = "chat_completion_pipeline"
OUTPUT_NAME = "trained_model"
COMPONENT_OUTPUT = "mlflow_model_folder"
TRAINING_INPUTS = (
    "num_train_epochs", "max_steps", "per_device_train_batch_size", "per_device_eval_batch_size",
    "gradient_accumulation_steps", "auto_find_batch_size", "learning_rate", "lr_scheduler_type",
    "warmup_steps", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "optim",
    "precision", "seed", "max_seq_length", "pad_to_max_length", "evaluation_strategy", "eval_steps",
    "logging_steps", "save_total_limit", "apply_early_stopping", "early_stopping_patience",
    "early_stopping_threshold", "metric_for_best_model", "resume_from_checkpoint",
    "enable_full_determinism", "dataloader_num_workers",
)
OPTIMIZATION_INPUTS = ("apply_lora", "lora_r", "lora_alpha", "lora_dropout", "merge_lora_weights",
                       "apply_deepspeed", "deepspeed_stage", "apply_ort")
STRING_INPUTS = {"deepspeed_stage", "precision"}  # the component takes these as "2"/"3", "32"/"16"


def component_value(key: str, value: Any) -> Any:
    """The component speaks strings for booleans ("true"/"false") and for a few enums."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if key in STRING_INPUTS:
        return str(value)
    return value


def parameter_inputs(experiment: Experiment) -> dict[str, Any]:
    t, o = experiment.training, experiment.optimization
    values = {k: getattr(t, k) for k in TRAINING_INPUTS}
    values.update({k: getattr(o, k) for k in OPTIMIZATION_INPUTS})
    return {k: component_value(k, v) for k, v in values.items()}


def data_files(experiment: Experiment, data_dir: str | Path) -> dict[str, Path]:
    d = Path(data_dir)
    return {"train_file_path": d / f"{experiment.data.train_split}.jsonl",
            "test_file_path": d / f"{experiment.data.test_split}.jsonl"}


def component_inputs(experiment: Experiment, *, model_id: str, gpus_per_node: int | str,
                     data_dir: str | Path) -> dict[str, Any]:
    """Every input of the pipeline call, data files as paths (they become uri_file inputs)."""
    cluster = experiment.compute.cluster
    inputs: dict[str, Any] = {
        "mlflow_model_path": model_id,
        "compute_model_import": cluster, "compute_preprocess": cluster,
        "compute_finetune": cluster, "compute_model_evaluation": cluster,
        **{k: str(v) for k, v in data_files(experiment, data_dir).items()},
        "number_of_gpu_to_use_finetuning": gpus_per_node,
        "num_nodes_finetune": experiment.compute.nodes,
    }
    inputs.update(parameter_inputs(experiment))
    return inputs


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
    job.settings.default_compute = experiment.compute.cluster
    for key, value in job_settings().items():
        setattr(job.settings, key, value)
    return job


def trained_model_path(job_name: str) -> str:
    return f"azureml://jobs/{job_name}/outputs/{OUTPUT_NAME}"
