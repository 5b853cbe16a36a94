"""Azure ML jobs as the reconcile loop sees them: found by name or tags, read without waiting,
cancelled with `jobs.begin_cancel` (Running -> CancelRequested -> Canceled).

`JOB_STATES` is the one table of the service's job statuses (the REST enum JobStatus, azure-ai-ml
1.35 `azure.ai.ml.constants.JobStatus`), used by the reconcile loop and by the waits alike. Two of
them are not an end although the SDK's own `jobs.stream` stops on them (RunHistoryConstants
.TERMINAL_STATUSES): NotResponding (the job stopped reporting; it may recover) and Paused. A job that
stays in one of them past its deadline (`STALL_DEADLINES_S`) is treated as failed: stuck.

A tick is a fresh process, so the time a job has been in that state is read from the job itself:
its `systemData.lastModifiedAt` (common-types v3 `systemData`, "the timestamp of resource last
modification (UTC)"; azure-ai-ml's `creation_context.last_modified_at`), which the service moves
when the job's status changes. A job whose answer carries no such time gets no deadline across
ticks (a single wait still bounds it: AzureBackend._poll_until_done).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
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


def last_modified_s(job: Any) -> float | None:
    """The job's systemData.lastModifiedAt as seconds since the epoch; None when it has none."""
    stamp = getattr(getattr(job, "creation_context", None), "last_modified_at", None)
    if isinstance(stamp, str):
        try:
            stamp = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        except ValueError:
            return None
    if not isinstance(stamp, datetime):
        return None
    return (stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).timestamp()


def stuck_for(job: Any, now: float | None = None) -> float | None:
    """How long the job has been NotResponding or Paused, when that is at least the state's deadline;
    None otherwise (another state, still within it, or a job that carries no time)."""
    status = state_text(getattr(job, "status", None))
    deadline = stall_deadline_s(status)
    since = last_modified_s(job) if deadline is not None else None
    if since is None:
        return None
    held = (time.time() if now is None else now) - since
    return held if held >= deadline else None


def _created_at(job: Any) -> str | None:
    context = getattr(job, "creation_context", None)
    created = getattr(context, "created_at", None)
    if created is None:
        return (getattr(job, "tags", None) or {}).get("created_at")
    return created.strftime("%Y-%m-%dT%H:%M:%SZ") if hasattr(created, "strftime") else str(created)


def job_info(job: Any, now: float | None = None) -> JobInfo:
    """The reconcile loop's view of a job; one stuck past its state's deadline (`stuck_for`) is
    failed, its error saying so."""
    status = state_text(getattr(job, "status", None), "Unknown")
    error = getattr(job, "error", None)
    state = job_state(status).state
    stuck = stuck_for(job, now)
    if stuck is not None:
        state, error = JOB_FAILED, stuck_message(job.name, status, stuck, getattr(job, "studio_url", None))
    return JobInfo(name=job.name, state=state, backend_status=status,
                   tags=dict(getattr(job, "tags", None) or {}), url=getattr(job, "studio_url", None),
                   created_at=_created_at(job), error=str(error) if error else None)
