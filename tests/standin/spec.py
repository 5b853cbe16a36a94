"""The x-ms-examples of azure-rest-api-specs kept in tests/fixtures/arm/, and a key-set comparison
with them. The stand-in is held to the spec's schemas by schemas.py; this stays for the examples
themselves (the contract test passes them through schemas.py as a check of the extract)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "arm"

# Optional keys the examples leave out, each declared by the named definition of the 2025-12-01 mfe.json.
EXTRA_KEYS = {
    "online_endpoint_get.json": {"properties.keys", "properties.publicNetworkAccess", "properties.mirrorTraffic"},
    "online_deployment_create.json": {"properties.egressPublicNetworkAccess", "properties.dataCollector"},
    "pipeline_job_get.json": {"properties.jobs", "properties.isArchived", "properties.identity",
                              "properties.componentId", "properties.notificationSetting", "properties.sourceJobId"},
    "model_version_get.json": {"properties.isArchived", "properties.stage", "properties.jobName",
                               "properties.provisioningState", "properties.intellectualProperty"},
}
# Fields whose value is an enum of the spec (azure-ai-ml's arm_ml_service models are generated from it).
ENUMS = {
    "properties.provisioningState": {"online_endpoint_get.json": "EndpointProvisioningState",
                                     "online_deployment_create.json": "DeploymentProvisioningState"},
    "properties.authMode": {"online_endpoint_get.json": "EndpointAuthMode"},
    "properties.status": {"pipeline_job_get.json": "JobStatus"},
    "properties.jobType": {"pipeline_job_get.json": "JobType"},
    "properties.endpointComputeType": {"online_deployment_create.json": "EndpointComputeType"},
}


@cache
def example(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())["body"]


def _paths(body: Any, prefix: str = "") -> tuple[set[str], set[str]]:
    """Dotted key paths, and the paths of free-form maps: an example level keyed "string" (a
    dictionary type) or left empty (`tags: {}`, `settings: {}`: free-form objects in the spec)."""
    out: set[str] = set()
    maps: set[str] = set()
    if isinstance(body, dict):
        for key, value in body.items():
            path = f"{prefix}{key}"
            out.add(path)
            if key == "string" or value == {}:
                maps.add(path if value == {} else prefix.rstrip("."))
            inner, inner_maps = _paths(value, path + ".")
            out |= inner
            maps |= inner_maps
    return out, maps


def _allowed(name: str) -> tuple[set[str], set[str]]:
    paths, maps = _paths(example(name))
    return paths | EXTRA_KEYS.get(name, set()), maps


def problems(name: str, body: dict[str, Any]) -> list[str]:
    """What in `body` the spec does not know, for the resource of example `name`."""
    from azure.ai.ml._restclient.arm_ml_service import models

    allowed, maps = _allowed(name)
    found = []

    def walk(node: Any, prefix: str) -> None:
        if not isinstance(node, dict) or prefix.rstrip(".") in maps:
            return
        for key, value in node.items():
            path = f"{prefix}{key}"
            if path not in allowed and not any(path.startswith(e + ".") for e in EXTRA_KEYS.get(name, ())):
                found.append(f"{name}: key {path} is not in the spec")
                continue
            if path in ENUMS and name in ENUMS[path]:
                known = {m.value for m in getattr(models, ENUMS[path][name])}
                if value not in known:
                    found.append(f"{name}: {path}={value!r} is not one of {sorted(known)}")
            if path not in EXTRA_KEYS.get(name, ()):
                walk(value, path + ".")

    walk(body, "")
    return found
