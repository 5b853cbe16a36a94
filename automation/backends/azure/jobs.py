"""Azure ML jobs as the reconcile loop sees them: found by name or tags, read without waiting,
cancelled with `jobs.begin_cancel` (Running -> CancelRequested -> Canceled)."""

from __future__ import annotations

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

# azure.ai.ml's JobStatus values (the REST enum), lower-cased, mapped to the normalised states.
STATES = {
    "notstarted": JOB_WAITING, "queued": JOB_WAITING, "preparing": JOB_WAITING, "provisioning": JOB_WAITING,
    "starting": JOB_WAITING, "paused": JOB_WAITING, "unknown": JOB_WAITING,
    "running": JOB_RUNNING, "finalizing": JOB_RUNNING, "notresponding": JOB_RUNNING,
    "cancelrequested": JOB_CANCELING,
    "completed": JOB_COMPLETED, "failed": JOB_FAILED, "canceled": JOB_CANCELED, "cancelled": JOB_CANCELED,
}


def _created_at(job: Any) -> str | None:
    context = getattr(job, "creation_context", None)
    created = getattr(context, "created_at", None)
    if created is None:
        return (getattr(job, "tags", None) or {}).get("created_at")
    return created.strftime("%Y-%m-%dT%H:%M:%SZ") if hasattr(created, "strftime") else str(created)


def job_info(job: Any) -> JobInfo:
    status = str(getattr(job, "status", None) or "Unknown")
    error = getattr(job, "error", None)
    return JobInfo(name=job.name, state=STATES.get(status.lower(), JOB_WAITING), backend_status=status,
                   tags=dict(getattr(job, "tags", None) or {}), url=getattr(job, "studio_url", None),
                   created_at=_created_at(job), error=str(error) if error else None)
