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


class FinetunePart(_Part):
    job_name: str
    status: str = "completed"
    run_id: str | None = None
    model_uri: str | None = None  # where the trained model is (MLflow model URI or azureml path)
    output_dir: str | None = None
    studio_url: str | None = None
    base_eval_loss: float | None = None
    eval_loss: float | None = None
    train_loss: float | None = None
    train_loss_curve: list[LossPoint] = Field(default_factory=list)
    train_tokens: int | None = None
    tokens_per_second: float | None = None
    wall_seconds: float | None = None
    resumed_from: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)


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
