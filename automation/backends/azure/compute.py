"""Validation against the workspace: the model, the GPU cluster, its size and GPU count.

The rules are the reference's (REFERENCE.md step 3): the model's `finetune_compute_allow_list`
(older models: `compute_allow_list`; since 2026 also the system metadata's finetuneComputes) when
present, else no K80 size; GPUs per node from `compute.list_sizes()`; and, stricter than the
reference, a deployment instance type outside the inference allow-list is refused, and so is a
model retired for fine-tuning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from automation.backends.azure import lifecycle, retry
from automation.backends.azure.jobs import state_text
from automation.errors import ConfigError
from automation.spec import Experiment

log = logging.getLogger(__name__)

K80_SIZES = frozenset({"standard_nc6", "standard_nc12", "standard_nc24", "standard_nc24r"})


@dataclass(frozen=True)
class ComputeCheck:
    cluster: str
    size: str
    gpus_per_node: int
    created: bool = False


def today_utc() -> date:
    return datetime.now(UTC).date()


def check_finetune_size(size: str, model: Any) -> None:
    allow = lifecycle.finetune_allow_list(model)
    if allow is not None:
        where, sizes = allow
        if size.lower() not in {s.lower() for s in sizes}:
            raise ConfigError(f"compute size {size} is not in the model's {where}: {', '.join(sizes)}")
    elif size.lower() in K80_SIZES:
        raise ConfigError(f"compute size {size} is a K80 size, which cannot fine-tune this model; "
                          "choose a V100 or A100 size")


def check_inference_size(instance_type: str, model: Any) -> None:
    allow = lifecycle.inference_allow_list(model)
    if allow is not None and instance_type.lower() not in {s.lower() for s in allow[1]}:
        raise ConfigError(f"deployment.instance_type {instance_type} is not in the model's "
                          f"{allow[0]}: {', '.join(allow[1])}")


def gpus_of_size(sizes: list[Any], size: str) -> int:
    """The `gpus` of the list_sizes entry named `size`; an error listing the sizes when none is."""
    for entry in sizes:
        if (getattr(entry, "name", "") or "").lower() == size.lower():
            gpus = getattr(entry, "gpus", None) or 0
            if gpus < 1:
                raise ConfigError(f"compute size {size} has no GPU; fine-tuning needs a GPU size")
            return int(gpus)
    names = sorted(getattr(e, "name", "") for e in sizes if getattr(e, "name", None))
    raise ConfigError(f"compute size {size} is not offered in this workspace's region; available: "
                      f"{', '.join(names) or 'none'}")


def lookup_model(registry_client, experiment: Experiment, call: Callable = retry.call):
    """The registry model by version, or by label `latest`.

    Not found comes as ResourceNotFoundError for a version and as ValidationException for `latest`
    (see retry.is_not_found). `latest` lists the active versions only, so a model whose versions are
    all archived, as retired models are, has none."""
    from azure.ai.ml.exceptions import MlException
    from azure.core.exceptions import ResourceNotFoundError

    m = experiment.model
    where = f"registry {m.registry or 'azureml'}"
    try:
        if m.version == "latest":
            return call(f"looking up model {m.name}",
                        lambda: registry_client.models.get(m.name, label="latest"))
        return call(f"looking up model {m.name}:{m.version}",
                    lambda: registry_client.models.get(m.name, version=m.version))
    except (ResourceNotFoundError, MlException) as err:
        if not retry.is_not_found(err):
            raise
        if m.version == "latest":
            raise ConfigError(f"model {m.name} has no active version in {where} (retired models are archived); "
                              f"pin model.version to read its dates, or see {lifecycle.FIND_CURRENT}") from None
        raise ConfigError(f"model {m.name} version {m.version} not found in {where}") from None


def cluster_spec(experiment: Experiment, tier: str = "dedicated") -> dict[str, Any]:
    """What `create_if_missing` creates: scales to zero so an idle cluster costs nothing."""
    c = experiment.compute
    return {"name": c.cluster, "size": c.size, "min_instances": 0, "max_instances": c.nodes, "tier": tier,
            "idle_time_before_scale_down": 120}


def ensure_cluster(client, experiment: Experiment, call: Callable = retry.call):
    """The cluster, created (dedicated, else low priority) when missing and the experiment asks."""
    from azure.ai.ml.entities import AmlCompute
    from azure.core.exceptions import ResourceNotFoundError

    from automation.errors import BackendError

    name = experiment.compute.cluster
    try:
        return call(f"reading cluster {name}", lambda: client.compute.get(name)), False
    except ResourceNotFoundError:  # compute.get reads ARM directly: a 404 maps to ResourceNotFoundError
        if not experiment.compute.create_if_missing:
            raise ConfigError(f"compute cluster {name} does not exist in the workspace; create it, or set "
                              "compute.create_if_missing: true and give the pull-request identity the "
                              "AzureML Compute Operator role on the workspace (AzureML Data Scientist "
                              "cannot create compute)") from None
    last: Exception | None = None
    for tier in ("dedicated", "low_priority"):
        cluster = AmlCompute(**cluster_spec(experiment, tier))
        try:
            created = call(f"creating cluster {name} ({tier})",
                           lambda c=cluster: client.compute.begin_create_or_update(c), begin=True)
            log.info("created cluster %s (%s, %s, 0-%d nodes)", name, experiment.compute.size, tier,
                     experiment.compute.nodes)
            return created, True
        except BackendError as err:
            last = err
            log.warning("could not create cluster %s as %s: %s", name, tier, err)
    raise last  # type: ignore[misc]


def validate(workspace_client, registry_client, experiment: Experiment,
             call: Callable = retry.call, today: date | None = None,
             ) -> tuple[ComputeCheck, Any, list[str], Experiment]:
    """Every workspace check of `validate`; returns the compute, the model, the warnings and the
    experiment with the model's `model_specific_defaults` merged (each override warned once, here)."""
    from automation.spec import apply_model_specific_defaults

    model = lookup_model(registry_client, experiment, call)
    tags = dict(getattr(model, "tags", None) or {})
    archived = lifecycle.read_registry_metadata(registry_client, model, call)
    warnings = lifecycle.check_finetune_lifecycle(model, today or today_utc(), archived)
    created = False
    if experiment.compute.serverless:
        size = str(experiment.compute.size)  # no cluster: the component asks for this size per step
    else:
        cluster, created = ensure_cluster(workspace_client, experiment, call)
        state = state_text(getattr(cluster, "provisioning_state", None))
        if state.lower() == "failed":
            raise ConfigError(f"compute cluster {experiment.compute.cluster} is in a failed state; fix or recreate it")
        size = getattr(cluster, "size", None) or experiment.compute.size
        if experiment.compute.size and size.lower() != experiment.compute.size.lower():
            raise ConfigError(f"compute cluster {experiment.compute.cluster} has size {size}, "
                              f"but the experiment says compute.size {experiment.compute.size}")
    check_finetune_size(size, model)
    sizes = list(call("listing VM sizes", lambda: workspace_client.compute.list_sizes()))
    gpus = gpus_of_size(sizes, size)
    wanted = experiment.compute.gpus_per_node
    if wanted != "auto" and wanted != gpus:
        raise ConfigError(f"compute.gpus_per_node is {wanted}, but {size} has {gpus} GPU(s) per node")
    check_inference_size(experiment.deployment.instance_type, model)
    merged_experiment, merged = apply_model_specific_defaults(
        experiment, tags.get("model_specific_defaults") or experiment.model.model_specific_defaults)
    for warning in warnings:
        log.warning(warning)
    cluster_name = "serverless" if experiment.compute.serverless else str(experiment.compute.cluster)
    return ComputeCheck(cluster_name, size, gpus, created), model, warnings + merged, merged_experiment
