"""Azure ML jobs as the reconcile loop sees them: found by name or tags, read without waiting,
cancelled with `jobs.begin_cancel` (Running -> CancelRequested -> Canceled).

`JOB_STATES` is the one table of the service's job statuses (the REST enum JobStatus, azure-ai-ml
1.35 `azure.ai.ml.constants.JobStatus`), used by the reconcile loop and by the waits alike. Two of
them are not an end although the SDK's own `jobs.stream` stops on them (RunHistoryConstants
.TERMINAL_STATUSES): NotResponding (the job stopped reporting; it may recover) and Paused. A job that
stays in one of them past its deadline (`STALL_DEADLINES_S`) is treated as failed: stuck.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from automation.backends.base import (
    JOB_CANCELED,
    JOB_CANCELING,
    JOB_COMPLETED,
    JOB_FAILED,
    JOB_RUNNING,
    JOB_WAITING,
    JobInfo,
)


@dataclass(frozen=True)
class JobState:
    status: str  # the service's word, as the REST enum spells it
    state: str  # the normalised JOB_* state
    note: str = ""

    @property
    def terminal(self) -> bool:
        return self.state in (JOB_COMPLETED, JOB_FAILED, JOB_CANCELED)


# Every value of the REST enum JobStatus, keyed lower-case.
JOB_STATES: dict[str, JobState] = {s.status.lower(): s for s in (
    JobState("NotStarted", JOB_WAITING),
    JobState("Starting", JOB_WAITING),
    JobState("Provisioning", JOB_WAITING),
    JobState("Preparing", JOB_WAITING),
    JobState("Queued", JOB_WAITING),
    JobState("Running", JOB_RUNNING),
    JobState("Finalizing", JOB_RUNNING),
    JobState("CancelRequested", JOB_CANCELING),
    JobState("Completed", JOB_COMPLETED),
    JobState("Failed", JOB_FAILED),
    JobState("Canceled", JOB_CANCELED),
    JobState("NotResponding", JOB_RUNNING, "may recover"),
    JobState("Paused", JOB_WAITING, "paused"),
)}
# How long a job may stay in a state that is not an end but may never end either.
STALL_DEADLINES_S = {"notresponding": 2 * 3600.0, "paused": 24 * 3600.0}
UNKNOWN = JobState("Unknown", JOB_WAITING, "a status this project does not know")


def state_text(value: Any, default: str = "") -> str:
    """The service's word for a status or provisioning state. azure-ai-ml 1.35 hands them over as
    the REST models' enums (`JobStatus.COMPLETED`, `EndpointProvisioningState.UPDATING`), whose
    str() is "JobStatus.COMPLETED", not "Completed": read the value."""
    if value is None or value == "":
        return default
    return str(getattr(value, "value", value))


def job_state(status: Any) -> JobState:
    """The table's entry for a status (any case, a str or the SDK's enum); "Cancelled" is read as
    Canceled; anything else is waiting, with a note, rather than an end the service never said."""
    key = state_text(status).lower()
    return JOB_STATES.get("canceled" if key == "cancelled" else key, UNKNOWN)


def is_terminal(status: Any) -> bool:
    return job_state(status).terminal


def stall_deadline_s(status: Any) -> float | None:
    return STALL_DEADLINES_S.get(state_text(status).lower())


def stuck_message(job_name: str, status: str, seconds: float, url: str | None = None) -> str:
    deadline = stall_deadline_s(status) or 0
    return (f"fine-tune job {job_name} has been {status} for {seconds / 60:.0f} min, past the "
            f"{deadline / 3600:g} h this project waits for a job in that state: treated as stuck (failed); "
            f"cancel it or resubmit; see {url or 'the Azure ML studio'}")


def _created_at(job: Any) -> str | None:
    context = getattr(job, "creation_context", None)
    created = getattr(context, "created_at", None)
    if created is None:
        return (getattr(job, "tags", None) or {}).get("created_at")
    return created.strftime("%Y-%m-%dT%H:%M:%SZ") if hasattr(created, "strftime") else str(created)


def job_info(job: Any) -> JobInfo:
    status = state_text(getattr(job, "status", None), "Unknown")
    error = getattr(job, "error", None)
    return JobInfo(name=job.name, state=job_state(status).state, backend_status=status,
                   tags=dict(getattr(job, "tags", None) or {}), url=getattr(job, "studio_url", None),
                   created_at=_created_at(job), error=str(error) if error else None)
