"""What the registry says about a model: its fine-tuning dates and compute allow-lists.

The azureml registry has said it in two places over time (Azure/azureml-assets, the model's
spec.yaml): tags (`finetune_compute_allow_list`, `FinetuneRetirementDate`, ..., Python-literal
strings, as the SDK writes every tag value with `str()`), and since June 2026 the model's system
metadata (`deprecation.finetuneRetirementDate`, `supportedComputes.finetuneComputes`, ...). Both
are read, tags first. A model whose versions are all archived (retired ones are) has no `latest`:
see `compute.lookup_model`.
"""

from __future__ import annotations

import ast
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date
from typing import Any

from automation.errors import ConfigError

log = logging.getLogger(__name__)

FINETUNE_ALLOW_TAGS = ("finetune_compute_allow_list", "compute_allow_list")
INFERENCE_ALLOW_TAG = "inference_compute_allow_list"
CHAT_TASK = "chat-completion"
# (tag name, system metadata key under `deprecation`) of each date
DATE_KEYS = {
    "finetune_deprecation": ("FinetuneDeprecationDate", "finetuneDeprecationDate"),
    "finetune_retirement": ("FinetuneRetirementDate", "finetuneRetirementDate"),
    "inference_deprecation": ("InferenceDeprecationDate", "inferenceDeprecationDate"),
    "inference_retirement": ("InferenceRetirementDate", "inferenceRetirementDate"),
}
SKIP_METADATA_VARIABLE = "AUTOMATION_SKIP_REGISTRY_METADATA"  # go on when the metadata cannot be read
FIND_CURRENT = "`automation models` lists the chat models the registry offers for fine-tuning now"


@dataclass(frozen=True)
class Lifecycle:
    finetune_deprecation: date | None = None
    finetune_retirement: date | None = None
    inference_deprecation: date | None = None
    inference_retirement: date | None = None

    def finetune_status(self, today: date) -> str:
        if self.finetune_retirement and self.finetune_retirement <= today:
            return "retired"
        if self.finetune_deprecation and self.finetune_deprecation <= today:
            return "deprecated"
        return "current"


def system_metadata(model: Any) -> dict[str, Any]:
    """The model's system metadata as a dict (the SDK keeps it in `_system_metadata`; empty when the
    service or the SDK version did not hand it over)."""
    raw = getattr(model, "system_metadata", None) or getattr(model, "_system_metadata", None)
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            return {}
    return dict(raw) if isinstance(raw, dict) else {}


def metadata_override(env: Mapping[str, str] | None = None) -> bool:
    """Whether the user chose to go on when the registry's metadata cannot be read."""
    env = os.environ if env is None else env
    return str(env.get(SKIP_METADATA_VARIABLE, "")).strip().lower() in ("1", "true", "yes")


def read_registry_metadata(registry_client, model: Any, call: Callable | None = None,
                           env: Mapping[str, str] | None = None) -> bool:
    """Fill in the model's system metadata from the registry's own answer; return whether it is archived.

    azure-ai-ml 1.35 drops both from the Model entity: `Model._from_rest_object` looks for
    `system_metadata` with hasattr(), which the arm model of a registry answer never has
    (azure/ai/ml/entities/_assets/_artifacts/model.py), and `isArchived` is not carried at all. They
    are read from the REST object the SDK's own private `ModelOperations._get(name, version)` returns
    (what `get` wraps; tests/test_azure_registry_metadata.py pins it against the real SDK).

    Fails closed: since 2026-07 a model such as Phi-4 keeps its compute allow-lists and lifecycle
    dates only there, so when the read fails the checks cannot be applied, and validation stops with
    a ConfigError, unless AUTOMATION_SKIP_REGISTRY_METADATA=1 says to go on without them (a warning).
    """
    what = f"the registry metadata of model {model.name}:{model.version}"
    get_raw = getattr(getattr(registry_client, "models", None), "_get", None)
    try:
        if get_raw is None:
            raise AttributeError("this azure-ai-ml has no ModelOperations._get")
        read = lambda: get_raw(model.name, str(model.version))  # noqa: E731
        properties = (call(f"reading {what}", read) if call is not None else read()).properties
    except Exception as err:
        reason = " ".join(str(err).split())[:300] or type(err).__name__
        if metadata_override(env):
            log.warning("could not read %s (%s); going on without its allow-lists and lifecycle dates because "
                        "%s=1 is set", what, reason, SKIP_METADATA_VARIABLE)
            return False
        raise ConfigError(f"could not read {what} ({reason}): its compute allow-lists and lifecycle dates "
                          "live there, so the checks cannot be applied; retry, or set "
                          f"{SKIP_METADATA_VARIABLE}=1 to go on without them") from err
    metadata = properties.get("systemMetadata") if hasattr(properties, "get") else None
    if metadata and not system_metadata(model):
        model._system_metadata = metadata
    return bool(getattr(properties, "is_archived", False))


def _date(value: Any) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(str(value).strip()[:10])
    except ValueError:
        return None


def lifecycle_of(model: Any) -> Lifecycle:
    tags = dict(getattr(model, "tags", None) or {})
    deprecation = system_metadata(model).get("deprecation") or {}
    return Lifecycle(**{field: _date(tags.get(tag) or deprecation.get(key)) for field, (tag, key) in DATE_KEYS.items()})


def _literal_list(key: str, raw: Any) -> list[str]:
    try:
        value = ast.literal_eval(raw) if isinstance(raw, str) else raw
    except (ValueError, SyntaxError) as err:
        raise ConfigError(f"model tag {key} is not a Python-literal list: {err}") from None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple, set)):
        raise ConfigError(f"model tag {key} must be a list of VM sizes, got {raw!r}")
    return [str(v) for v in value]


def finetune_allow_list(model: Any) -> tuple[str, list[str]] | None:
    """(where it came from, sizes) of the model's fine-tune allow-list; None when it has none."""
    tags = dict(getattr(model, "tags", None) or {})
    for key in FINETUNE_ALLOW_TAGS:
        if tags.get(key) is not None:
            return key, _literal_list(key, tags[key])
    computes = (system_metadata(model).get("supportedComputes") or {}).get("finetuneComputes")
    return ("supportedComputes.finetuneComputes", [str(s) for s in computes]) if computes else None


def inference_allow_list(model: Any) -> tuple[str, list[str]] | None:
    tags = dict(getattr(model, "tags", None) or {})
    if tags.get(INFERENCE_ALLOW_TAG) is not None:
        return INFERENCE_ALLOW_TAG, _literal_list(INFERENCE_ALLOW_TAG, tags[INFERENCE_ALLOW_TAG])
    computes = (system_metadata(model).get("supportedComputes") or {}).get("inferenceComputes")
    return ("supportedComputes.inferenceComputes", [str(s) for s in computes]) if computes else None


def finetuning_tasks(model: Any) -> list[str]:
    tags = dict(getattr(model, "tags", None) or {})
    tasks = (system_metadata(model).get("tasks") or {}).get("fineTuningTasks") or []
    if not tasks and finetune_allow_list(model) is not None and tags.get("task"):
        tasks = [tags["task"]]  # the tag era: a fine-tune allow-list and the model's task
    return [str(t) for t in tasks]


def check_finetune_lifecycle(model: Any, today: date, archived: bool = False) -> list[str]:
    """Refuse a model retired for fine-tuning (or archived, as retired models are); warn when its
    fine-tuning is deprecated or will be."""
    life = lifecycle_of(model)
    what = f"model {model.name} version {model.version}"
    status = life.finetune_status(today)
    if status == "retired":
        raise ConfigError(f"{what} was retired for fine-tuning on {life.finetune_retirement}; {FIND_CURRENT}")
    if archived:
        raise ConfigError(f"{what} is archived in its registry (retired models are); {FIND_CURRENT}")
    warnings = []
    retires = f"; fine-tuning retires on {life.finetune_retirement}" if life.finetune_retirement else ""
    if status == "deprecated":
        warnings.append(f"{what} is deprecated for fine-tuning since {life.finetune_deprecation}{retires}")
    elif life.finetune_deprecation:
        warnings.append(f"{what} will be deprecated for fine-tuning on {life.finetune_deprecation}{retires}")
    elif life.finetune_retirement:
        warnings.append(f"{what}: fine-tuning retires on {life.finetune_retirement}")
    if life.inference_retirement and life.inference_retirement <= today:
        warnings.append(f"{what} was retired for inference on {life.inference_retirement}; "
                        "a deployment of the fine-tuned model may be refused")
    return warnings
