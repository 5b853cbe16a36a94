"""The run record: what each stage did, handed from stage to stage (and job to job) as JSON.

Every stage reads the record, does one thing, and writes the record back. In a workflow the
record travels between jobs as an artifact; on one machine it lives in the workspace at
`runs/<experiment>/record.json`.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from automation.workspace import run_dir, write_text_atomic


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StageTime(_Part):
    started_at: str
    seconds: float
    status: str = "ok"


class DataPart(_Part):
    out_dir: str
    source: str
    rows: dict[str, int]
    reused: bool = False


class LossPoint(_Part):
    step: int
    loss: float


class EvalPrompt(_Part):
    """One held-out conversation: the messages up to its last user turn, and the answer that followed."""

    prompt_id: str | None = None
    messages: list[dict[str, str]]
    reference: str | None = None


class ModelEval(_Part):
    """One model on the held-out evaluation (see automation/evaluation.py for each figure)."""

    model: str  # what was evaluated: the base model's name, the run, or `models:/<name>/<version>`
    eval_loss: float | None = None
    perplexity: float | None = None
    rouge_l: float | None = None
    mean_words: float | None = None
    empty_rate: float | None = None
    repetitive_rate: float | None = None
    replies: list[str] = Field(default_factory=list)
    rouge_l_each: list[float] = Field(default_factory=list)
    eval_loss_each: list[float] = Field(default_factory=list)  # per test conversation, where recorded


class EvaluationPart(_Part):
    """The base, candidate (fine-tuned) and, when one exists, production model on the same test split
    (eval loss) and the same prompts of the sample split (replies)."""

    test_split: str
    prompt_split: str
    max_new_tokens: int
    prompts: list[EvalPrompt] = Field(default_factory=list)
    models: dict[str, ModelEval] = Field(default_factory=dict)  # "base", "candidate", "production"
    production_version: str | None = None  # the registry version behind "production"
    seconds: float | None = None
    source: str = "finetune"  # where the replies came from: the fine-tune job, or "endpoints" (Azure)
    notes: list[str] = Field(default_factory=list)  # what was not measured on this backend, and why


class FinetunePart(_Part):
    job_name: str
    status: str = "completed"
    run_id: str | None = None
    model_uri: str | None = None  # where the trained model is (MLflow model URI or azureml path)
    output_dir: str | None = None
    studio_url: str | None = None
    tracking_store: str | None = None  # where the MLflow run lives: the SQLite file (local), the workspace (azure)
    mlflow_experiment_id: str | None = None
    base_eval_loss: float | None = None
    eval_loss: float | None = None
    train_loss: float | None = None
    train_loss_curve: list[LossPoint] = Field(default_factory=list)
    train_tokens: int | None = None
    tokens_per_second: float | None = None
    wall_seconds: float | None = None
    resumed_from: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    last_train_loss: float | None = None  # train_loss is the mean over the run
    max_steps: int | None = None
    evaluation: EvaluationPart | None = None


class RegisterPart(_Part):
    model_name: str
    version: str  # the registry's version (MLflow: 1, 2, ...; Azure: the timestamp)
    timestamp_version: str
    model_uri: str


class DeployPart(_Part):
    endpoint_name: str
    deployment_name: str
    url: str
    stage: str = "staging"


class ScorePart(_Part):
    request_file: str
    messages: list[dict[str, str]]
    reference: str | None = None
    reply: str
    latency_seconds: float
    prompt_id: str | None = None


class PromotePart(_Part):
    endpoint_name: str
    deployment_name: str
    url: str
    model_version: str
    previous_deployment: str | None = None
    policy_passed: bool | None = None
    policy_override: str | None = None  # the reason given for promoting against the policy
    evaluation: EvaluationPart | None = None  # in place: the candidate beside the live deployment


class RunRecord(_Part):
    experiment: str
    experiment_file: str
    backend: str
    config_hash: str
    repo: str = "local"
    pr: int | None = None
    sha: str = ""
    created_at: str = Field(default_factory=lambda: now_iso())
    stages: dict[str, StageTime] = Field(default_factory=dict)
    data: DataPart | None = None
    finetune: FinetunePart | None = None
    registration: RegisterPart | None = None
    deploy: DeployPart | None = None
    score: ScorePart | None = None
    plan_file: str | None = None  # the `run --dry-run` plan (YAML), shown in the report
    report_file: str | None = None
    bundle_dir: str | None = None  # the folder a workflow uploads as the run's artifact (`automation bundle`)
    promote: PromotePart | None = None
    torn_down: bool = False

    @staticmethod
    def default_path(experiment: str) -> Path:
        return run_dir(experiment) / "record.json"

    @classmethod
    def load(cls, path: Path) -> RunRecord:
        return cls.model_validate_json(Path(path).read_text(encoding="utf-8"))

    def save(self, path: Path) -> None:
        write_text_atomic(Path(path), json.dumps(self.model_dump(mode="json"), indent=2) + "\n")


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
