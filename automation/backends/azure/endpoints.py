"""Managed online endpoints and deployments: the specs (pure dicts, shared with the dry-run plan),
the SDK entities built from them, and waiting for an endpoint to finish what it is doing."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from automation.backends.azure.jobs import state_text
from automation.errors import BackendError
from automation.spec import Experiment

STAGING_DEPLOYMENT = "demo"
BUSY_STATES = {"creating", "updating", "deleting", "provisioning"}


def endpoint_spec(name: str, tags: dict[str, str]) -> dict[str, Any]:
    return {"name": name, "auth_mode": "key", "tags": dict(tags)}


def deployment_spec(experiment: Experiment, *, endpoint_name: str, deployment_name: str, model_id: str,
                    tags: dict[str, str]) -> dict[str, Any]:
    d = experiment.deployment
    return {
        "name": deployment_name, "endpoint_name": endpoint_name, "model": model_id,
        "instance_type": d.instance_type, "instance_count": d.instance_count,
        "liveness_probe": {"initial_delay": d.liveness_initial_delay_s,
                           "failure_threshold": d.liveness_failure_threshold},
        "request_settings": {"request_timeout_ms": d.request_timeout_ms,
                             "max_concurrent_requests_per_instance": d.max_concurrent_requests_per_instance},
        "tags": dict(tags),
    }


def deployment_name_for_version(version: str) -> str:
    """Production deployments are named after the model version: `v<version>`, Azure's 3-32 chars."""
    cleaned = "".join(ch if ch.isalnum() else "-" for ch in str(version)).strip("-")
    return f"v{cleaned}"[:32].rstrip("-")


def build_endpoint(spec: dict[str, Any]):
    from azure.ai.ml.entities import ManagedOnlineEndpoint

    return ManagedOnlineEndpoint(**spec)


def build_deployment(spec: dict[str, Any]):
    from azure.ai.ml.entities import ManagedOnlineDeployment, OnlineRequestSettings, ProbeSettings

    spec = dict(spec)
    return ManagedOnlineDeployment(
        **{k: v for k, v in spec.items() if k not in ("liveness_probe", "request_settings")},
        liveness_probe=ProbeSettings(**spec["liveness_probe"]),
        request_settings=OnlineRequestSettings(**spec["request_settings"]),
    )


def wait_until_settled(get: Callable[[], Any], what: str, *, timeout_s: float = 1800, poll_s: float = 15,
                       sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic):
    """The resource once it is no longer Creating/Updating/Deleting: never race an operation."""
    deadline = clock() + timeout_s
    while True:
        resource = get()
        state = state_text(getattr(resource, "provisioning_state", None)).lower()
        if state not in BUSY_STATES:
            return resource
        if clock() >= deadline:
            raise BackendError(f"{what} still {state} after {timeout_s:.0f} s; try again later")
        sleep(poll_s)
