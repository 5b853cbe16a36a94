"""`automation run EXPERIMENT --dry-run`: every operation a run would make, as YAML, with no
network call and no cloud SDK import. The payloads come from the same functions the backends use
(pipeline.component_inputs, endpoints.*_spec, registration_spec), so the plan cannot drift from
what is submitted.

What only the workspace can tell (GPUs per node of an unknown size, the model's
`model_specific_defaults` tag, the timestamp version) is shown as a `<...>` placeholder or a note.
"""

from __future__ import annotations

from typing import Any

import yaml

from automation import naming
from automation.spec import Experiment, apply_model_specific_defaults, run_display_name
from automation.vm_sizes import GPUS_PER_SIZE
from automation.workspace import run_dir

# GPUs per node of common fine-tuning sizes; validate confirms them with compute.list_sizes().
KNOWN_GPUS = GPUS_PER_SIZE  # the GPU table lives with the other VM size facts (vm_sizes.py)
TIMESTAMP_PLACEHOLDER = "<UTC timestamp at register>"


def _names(experiment: Experiment, repo: str, pr: int | None, sha: str) -> dict[str, Any]:
    cfg = naming.config_hash(experiment)

    def tags(stage: str) -> dict[str, str]:
        return naming.resource_tags(repo=repo, pr=pr, experiment=experiment.name, sha=sha, stage=stage,
                                    ttl_hours=experiment.deployment.ttl_hours)

    return {
        "job": naming.job_name(experiment.name, sha, cfg),
        "model": naming.model_name(experiment.model.name, experiment.data.dataset),
        "endpoint": naming.staging_endpoint_name(repo, pr, experiment.name),
        "data_dir": run_dir(experiment.name) / "data",
        "tags": tags,
    }


def _data_step(experiment: Experiment, data_dir) -> dict[str, Any]:
    d = experiment.data
    return {"stage": "data", "operation": "prepare data (local files)", "dataset": d.dataset,
            "splits": {s: f"{s}[0%:{d.sample_percent:g}%] -> {data_dir / f'{s}.jsonl'}"
                       for s in (d.train_split, d.test_split, d.sample_split)}}


def plan_azure(experiment: Experiment, *, repo: str, pr: int | None, sha: str,
               component_version: str | None = None) -> list[dict[str, Any]]:
    from automation.backends.azure import compute, endpoints, pipeline
    from automation.backends.azure.backend import registration_spec

    names = _names(experiment, repo, pr, sha)
    m, c = experiment.model, experiment.compute
    registry = m.registry or "azureml"
    model_ref = "labels/latest" if m.version == "latest" else f"versions/{m.version}"
    merged, overrides = apply_model_specific_defaults(experiment, m.model_specific_defaults)
    gpus: int | str = c.gpus_per_node
    if gpus == "auto":
        gpus = KNOWN_GPUS.get((c.size or "").lower(), "<gpus of the size, from compute.list_sizes()>")
    inputs = pipeline.component_inputs(merged, model_id=f"azureml://registries/{registry}/models/{m.name}/{model_ref}",
                                       gpus_per_node=gpus, data_dir=names["data_dir"])
    for key in pipeline.data_files(merged, names["data_dir"]):
        inputs[key] = {"type": "uri_file", "path": inputs[key]}
    compute_check = ({"serverless": True, "size": c.size, "preprocess_size": c.preprocess_size, "gpus_per_node": gpus}
                     if c.serverless else {"name": c.cluster, "size": c.size, "gpus_per_node": gpus})
    validate = {"stage": "validate",
                "operation": "registry.models.get + " + ("" if c.serverless else "compute.get + ") + "compute.list_sizes",
                "model": {"registry": registry, "name": m.name, "version": m.version},
                "serverless" if c.serverless else "cluster": compute_check,
                "checks": ["the model is not retired for fine-tuning (a warning before its deprecation date)",
                           *([] if c.serverless else ["cluster exists and is not failed"]),
                           "size in the model's finetune_compute_allow_list (or compute_allow_list), else not K80",
                           "deployment.instance_type in the model's inference_compute_allow_list when tagged",
                           "the model's model_specific_defaults tag, merged with a warning per key"]}
    if c.create_if_missing:
        validate["create_if_missing"] = {"operation": "compute.begin_create_or_update",
                                         "cluster": compute.cluster_spec(experiment),
                                         "fallback_tier": "low_priority"}
    version = experiment.training.component_version or component_version
    job = {
        "stage": "finetune", "operation": "jobs.create_or_update (after jobs.get finds no job of this name)",
        "name": names["job"], "experiment_name": experiment.name,
        "display_name": run_display_name(merged, gpus) if isinstance(gpus, int) else "<after list_sizes>",
        "component": {"registry": registry, "name": pipeline.COMPONENT_NAME,
                      **({"version": version} if version else {"label": "latest"})},
        "compute": pipeline.default_compute(experiment), "nodes": c.nodes, "inputs": inputs,
        "outputs": {pipeline.OUTPUT_NAME: {"type": "mlflow_model", "from": pipeline.COMPONENT_OUTPUT}},
        "settings": {**pipeline.job_settings(), "default_compute": pipeline.default_compute(experiment)},
        "tags": names["tags"]("finetune"),
    }
    if overrides:
        job["model_specific_defaults"] = overrides
    model = registration_spec(merged, names["job"], model_name=names["model"], version=TIMESTAMP_PLACEHOLDER,
                              tags=names["tags"]("register"))
    model_id = f"azureml:{names['model']}:{TIMESTAMP_PLACEHOLDER}"
    staging = names["tags"]("staging")
    deployment = endpoints.deployment_spec(
        merged, endpoint_name=names["endpoint"], deployment_name=endpoints.STAGING_DEPLOYMENT, model_id=model_id,
        tags={**staging, "model": names["model"], "model_version": TIMESTAMP_PLACEHOLDER})
    return [
        validate, _data_step(experiment, names["data_dir"]), job,
        {"stage": "register", "operation": "models.create_or_update (unless the job is registered)", "model": model},
        {"stage": "deploy", "operation": "online_endpoints.begin_create_or_update",
         "endpoint": endpoints.endpoint_spec(names["endpoint"], staging)},
        {"stage": "deploy", "operation": "online_deployments.begin_create_or_update", "deployment": deployment},
        {"stage": "deploy", "operation": "online_endpoints.begin_create_or_update",
         "traffic": {endpoints.STAGING_DEPLOYMENT: 100}},
        {"stage": "score", "operation": "online_endpoints.invoke", "endpoint": names["endpoint"],
         "deployment": endpoints.STAGING_DEPLOYMENT, "request_file": str(run_dir(experiment.name) / "sample_score.json"),
         "parameters": experiment.sample.parameters.model_dump(exclude_none=True)},
        {"stage": "teardown", "operation": "online_endpoints.begin_delete (unless --keep-endpoint)",
         "endpoints_with_tags": {k: staging[k] for k in ("repo", "pr", "experiment", "stage")}},
    ]


def plan_local(experiment: Experiment, *, repo: str, pr: int | None, sha: str) -> list[dict[str, Any]]:
    names = _names(experiment, repo, pr, sha)
    source = next((f"{k}: {getattr(experiment.model, k)}" for k in ("package", "path", "hub_id")
                   if getattr(experiment.model, k)), experiment.model.name)
    return [
        {"stage": "validate", "operation": "check the model source and memory", "model": source},
        _data_step(experiment, names["data_dir"]),
        {"stage": "finetune", "operation": "TRL SFT + PEFT LoRA on this machine (MLflow run)", "job": names["job"],
         "device": experiment.compute.device, "training": experiment.training.model_dump(),
         "optimization": experiment.optimization.model_dump()},
        {"stage": "register", "operation": "MLflow model version", "model": names["model"],
         "tags": names["tags"]("register")},
        {"stage": "deploy", "operation": "start a local endpoint process", "endpoint": names["endpoint"],
         "tags": names["tags"]("staging")},
        {"stage": "score", "operation": "POST /score", "endpoint": names["endpoint"]},
        {"stage": "teardown", "operation": "stop the endpoint process (unless --keep-endpoint)",
         "endpoint": names["endpoint"]},
    ]


def plan_run(experiment: Experiment, *, repo: str, pr: int | None, sha: str) -> str:
    """The plan of `automation run` as YAML text: what a reviewer reads before GPU hours are spent."""
    import os

    if experiment.backend == "azure":
        steps = plan_azure(experiment, repo=repo, pr=pr, sha=sha,
                           component_version=os.environ.get("AZURE_ML_COMPONENT_VERSION") or None)
    else:
        steps = plan_local(experiment, repo=repo, pr=pr, sha=sha)
    document = {"experiment": experiment.name, "backend": experiment.backend, "repo": repo, "pr": pr, "sha": sha,
                "operations": steps}
    return yaml.safe_dump(_plain(document), sort_keys=False, allow_unicode=True, width=120)


def _plain(value: Any) -> Any:
    """Paths and other objects as strings, so the YAML is plain."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)
