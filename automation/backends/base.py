"""The backend interface: the same stages on Azure ML and on this machine.

Every method is idempotent where the cloud makes that possible: `submit_finetune` with a job name
that exists returns that job, `register` for a job that is registered returns that version,
`deploy` to an endpoint that serves the model returns it, `delete_endpoint` of a missing endpoint
returns False. Creation methods block until the resource is usable and return its record.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from automation.record import DataPart, DeployPart, FinetunePart, PromotePart, RegisterPart
from automation.spec import Experiment


@dataclass(frozen=True)
class EndpointInfo:
    """A live (or dead) endpoint found by its tags."""

    name: str
    url: str
    tags: dict[str, str]
    created_at: str
    alive: bool = True
    deployments: list[str] = field(default_factory=list)


# Job states, normalised from the backend's own (Azure ML's JobStatus values, MLflow's run status).
# Azure's table is azure/jobs.py JOB_STATES (the REST enum, every value).
JOB_WAITING = "waiting"      # submitted, not yet training: NotStarted, Queued, Preparing, Starting, ...; Paused
JOB_RUNNING = "running"      # training or collecting outputs: Running, Finalizing; NotResponding (may recover)
JOB_CANCELING = "canceling"  # CancelRequested: still billed until Canceled
JOB_COMPLETED = "completed"
JOB_FAILED = "failed"
JOB_CANCELED = "canceled"
IN_FLIGHT = frozenset({JOB_WAITING, JOB_RUNNING})
TERMINAL = frozenset({JOB_COMPLETED, JOB_FAILED, JOB_CANCELED})


@dataclass(frozen=True)
class JobInfo:
    """A fine-tune job as the backend reports it now, found by name or by its tags."""

    name: str
    state: str  # one of the JOB_* values above
    backend_status: str  # the backend's own word for it ("Running", "CancelRequested", ...)
    tags: dict[str, str] = field(default_factory=dict)
    url: str | None = None  # where a person watches it (the Azure ML studio)
    created_at: str | None = None  # ISO 8601, UTC
    error: str | None = None


@dataclass(frozen=True)
class ServingModel:
    """The model version an endpoint serves now: the deployment that takes its traffic."""

    endpoint_name: str
    deployment_name: str
    model_name: str
    version: str
    model_uri: str


def _smoke_request() -> dict[str, Any]:
    from automation.serving.contract import score_request

    return score_request([[{"role": "user", "content": "Say hello."}]], {"max_new_tokens": 8, "do_sample": False})


# What a promotion's candidate is asked before it gets any traffic, on either backend.
SMOKE_REQUEST = _smoke_request()


@dataclass(frozen=True)
class Candidate:
    """A version deployed on the production endpoint beside the live one, taking no traffic yet."""

    endpoint_name: str
    deployment_name: str
    model_uri: str  # as the production side names it (a registry id on Azure)
    live: ServingModel | None  # what takes the traffic now; None on a new endpoint


@dataclass(frozen=True)
class Progress:
    """The latest training step and loss of a running job, read from its tracking store."""

    step: int | None = None
    loss: float | None = None


class Backend(ABC):
    name: ClassVar[str]
    # False where an endpoint lives only as long as the process that started it (the local backend).
    endpoints_outlive_job: ClassVar[bool] = True
    # True where the fine-tune job runs the held-out evaluation itself (local); else the `evaluate`
    # stage asks the deployed endpoints after `score` (Azure).
    evaluates_in_finetune: ClassVar[bool] = True

    @abstractmethod
    def validate_compute(self, experiment: Experiment) -> list[str]:
        """Check the compute and model source; return warnings, raise ConfigError when unusable."""

    @abstractmethod
    def submit_finetune(self, experiment: Experiment, data: DataPart, *, job_name: str,
                        tags: dict[str, str]) -> str:
        """Start (or find) the fine-tune job named `job_name`; return its name."""

    @abstractmethod
    def wait_finetune(self, experiment: Experiment, job_name: str, *, stream: bool = True) -> FinetunePart:
        """Block until the job ends, showing progress; raise BackendError when it failed."""

    @abstractmethod
    def get_job(self, job_name: str) -> JobInfo | None:
        """The job named `job_name` as it is now; None when there is none. Never waits."""

    @abstractmethod
    def list_jobs(self, match_tags: dict[str, str] | None = None) -> list[JobInfo]:
        """Fine-tune jobs whose tags include every item of `match_tags`."""

    @abstractmethod
    def cancel_job(self, job_name: str) -> bool:
        """Ask for the job to stop; False when it had already ended or is gone. Never waits."""

    @abstractmethod
    def job_progress(self, job_name: str) -> Progress:
        """Latest step and training loss of a job (empty when nothing was logged yet)."""

    @abstractmethod
    def metrics(self, finetune: FinetunePart) -> dict[str, Any]:
        """Training and evaluation metrics of a finished job, read from the tracking store."""

    @abstractmethod
    def register(self, experiment: Experiment, finetune: FinetunePart, *, model_name: str,
                 timestamp_version: str, tags: dict[str, str]) -> RegisterPart:
        """Register the job's model; the same job again returns the same version."""

    def prepare_deploy(self, experiment: Experiment) -> None:
        """Called before a fine-tune that a deploy follows in the same process: start, in the
        background, what that deploy will need, so that it is ready when the fine-tune ends.
        Nothing by default; the local backend warms a server process."""
        return None

    @abstractmethod
    def deploy(self, experiment: Experiment, model: RegisterPart, *, endpoint_name: str,
               tags: dict[str, str]) -> DeployPart:
        """Create or update the endpoint to serve `model` with all traffic; return when ready."""

    @abstractmethod
    def invoke(self, endpoint_name: str, request: dict[str, Any], *, deployment: str | None = None) -> dict[str, Any]:
        """Send one scoring request (the chat-completion contract); return the parsed response."""

    @abstractmethod
    def list_endpoints(self, match_tags: dict[str, str] | None = None) -> list[EndpointInfo]:
        """Endpoints whose tags include every item of `match_tags`."""

    @abstractmethod
    def delete_endpoint(self, name: str) -> bool:
        """Delete an endpoint; False when it was already gone (which is success)."""

    # -- promotion, in steps: the candidate beside the live deployment at 0 % traffic, evaluated
    # there (stages.stage_promote), then the traffic moved; the previous deployment is kept for a
    # rollback until the next promotion.
    @abstractmethod
    def stage_candidate(self, experiment: Experiment, model: RegisterPart, *, endpoint_name: str,
                        tags: dict[str, str]) -> Candidate:
        """Make the version available to production (registry, alias) and deploy it on the production
        endpoint beside the live deployment, with no traffic; smoke-score it. A failure leaves the
        live deployment serving and removes the candidate. A rerun finds what exists."""

    @abstractmethod
    def shift_traffic(self, experiment: Experiment, candidate: Candidate, model: RegisterPart, *,
                      tags: dict[str, str]) -> PromotePart:
        """All traffic to the candidate; the deployment that served until now is kept (no traffic)
        for a rollback, any older one deleted. `tags` (the policy's verdict) go on the version."""

    @abstractmethod
    def remove_candidate(self, candidate: Candidate) -> None:
        """Delete a candidate that failed its evaluation; the live deployment is untouched."""

    @abstractmethod
    def rollback(self, endpoint_name: str) -> PromotePart:
        """All traffic back to the deployment kept by the last promotion; ConfigError when none is."""

    def promote(self, experiment: Experiment, model: RegisterPart, *, endpoint_name: str,
                tags: dict[str, str]) -> PromotePart:
        """The candidate staged and given the traffic, without an evaluation in between (the stage
        `promote` evaluates it in place first)."""
        candidate = self.stage_candidate(experiment, model, endpoint_name=endpoint_name, tags=tags)
        return self.shift_traffic(experiment, candidate, model, tags=tags)

    def delete_endpoints(self, match_tags: dict[str, str]) -> list[str]:
        """Delete every endpoint whose tags include `match_tags`; the names deleted. Missing is success."""
        return [e.name for e in self.list_endpoints(match_tags) if self.delete_endpoint(e.name)]

    def serving_model(self, endpoint_name: str) -> ServingModel | None:
        """The model the endpoint serves now; None when there is no such endpoint or nothing takes its
        traffic. Used by the endpoint evaluation of a backend that does not evaluate in its fine-tune."""
        return None

    def log_run_files(self, finetune: FinetunePart, files: list[Path]) -> None:  # noqa: B027 (optional)
        """Attach files (the report, the scoring request, the experiment file) to the job's tracked run;
        a backend without a tracking store of its own keeps them in the run's artifact only."""
