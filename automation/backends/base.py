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


class Backend(ABC):
    name: ClassVar[str]

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
    def metrics(self, finetune: FinetunePart) -> dict[str, Any]:
        """Training and evaluation metrics of a finished job, read from the tracking store."""

    @abstractmethod
    def register(self, experiment: Experiment, finetune: FinetunePart, *, model_name: str,
                 timestamp_version: str, tags: dict[str, str]) -> RegisterPart:
        """Register the job's model; the same job again returns the same version."""

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

    @abstractmethod
    def promote(self, experiment: Experiment, model: RegisterPart, *, endpoint_name: str,
                tags: dict[str, str]) -> PromotePart:
        """Mark the version for production and move the production endpoint to it, blue/green."""

    def log_run_files(self, finetune: FinetunePart, files: list[Path]) -> None:  # noqa: B027 (optional)
        """Attach files (the report, the scoring request, the experiment file) to the job's tracked run;
        a backend without a tracking store of its own keeps them in the run's artifact only."""
