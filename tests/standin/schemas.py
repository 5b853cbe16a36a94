"""Bodies held to the schemas of azure-rest-api-specs (tests/fixtures/arm/spec/: the definitions of
Microsoft.MachineLearningServices 2025-12-01 `mfe.json` and `machineLearningServices.json` and of the
common types v3 they use, with their source commits).

Swagger 2.0 as autorest reads it, which plain JSON Schema does not:
- `allOf` is inheritance: a definition's properties are its own and its parents'; so
  `additionalProperties: false` refuses a key none of them declares (JSON Schema would refuse the
  parents' keys too);
- `discriminator`: a body validated against a base (JobBase, OnlineDeployment, JobInput, Compute...)
  is validated against the definition whose `x-ms-discriminator-value` (or name) its discriminator
  property holds and which inherits from that base; a value no definition declares is a problem;
- `x-nullable: true` lets a value be null;
- enums are held strictly (the spec marks them `modelAsString`, so a client must tolerate others,
  but a stand-in that invents a value is drifting);
- `readOnly` properties are allowed in requests (ARM ignores them) and answers alike;
- formats date-time, uuid, duration and uri are checked; patterns are searched, as autorest does.

`problems(schema, body)` lists every place the body breaks its schema, as `path: what`.
`route(method, host, path, status)` names the schema of an answer (and `request_schema` that of a
PUT body) for the routes the stand-in serves.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

SPEC = Path(__file__).resolve().parent.parent / "fixtures" / "arm" / "spec"
FILES = ("mfe.json", "machineLearningServices.json", "types.json", "managedidentity.json")
_DURATION = re.compile(r"^-?P(?!$)(\d+(\.\d+)?Y)?(\d+(\.\d+)?M)?(\d+(\.\d+)?W)?(\d+(\.\d+)?D)?"
                       r"(T(?=\d)(\d+(\.\d+)?H)?(\d+(\.\d+)?M)?(\d+(\.\d+)?S)?)?$")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


@cache
def documents() -> dict[str, dict[str, Any]]:
    return {name: json.loads((SPEC / name).read_text())["definitions"] for name in FILES}


def source(name: str) -> dict[str, str]:
    return json.loads((SPEC / name).read_text())["_source"]


def _resolve(ref: str, current: str) -> tuple[str, str]:
    """(file, definition) of a $ref seen in `current`."""
    target, _, pointer = ref.partition("#")
    name = pointer.removeprefix("/definitions/")
    document = target.rsplit("/", 1)[-1] if target else current
    if document not in documents() or name not in documents()[document]:
        raise KeyError(f"{ref} (from {current}) is not among the extracted definitions")
    return document, name


def _definition(document: str, name: str) -> dict[str, Any]:
    return documents()[document][name]


def _ancestors(document: str, name: str) -> list[tuple[str, str]]:
    """The definition and every definition it inherits from through allOf, nearest first."""
    seen: list[tuple[str, str]] = []
    todo = [(document, name)]
    while todo:
        key = todo.pop(0)
        if key in seen:
            continue
        seen.append(key)
        for parent in _definition(*key).get("allOf", []):
            if "$ref" in parent:
                todo.append(_resolve(parent["$ref"], key[0]))
    return seen


def _discriminator(document: str, name: str) -> tuple[str, str, str] | None:
    """(property, file, base) of the nearest discriminator along the definition's ancestry."""
    for key in _ancestors(document, name):
        prop = _definition(*key).get("discriminator")
        if prop:
            return prop, *key
    return None


def _subtype(document: str, base: str, value: Any) -> tuple[str, str] | None:
    """The definition that inherits from `base` and declares `value` as its discriminator value."""
    if value == base:
        return document, base
    for doc, defs in documents().items():
        for name, schema in defs.items():
            declared = schema.get("x-ms-discriminator-value", name)
            if declared == value and (document, base) in _ancestors(doc, name)[1:]:
                return doc, name
    return None


def _properties(document: str, name: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """Every property a definition has, its own and inherited: name -> (file, schema)."""
    found: dict[str, tuple[str, dict[str, Any]]] = {}
    for doc, ancestor in reversed(_ancestors(document, name)):
        for prop, schema in _definition(doc, ancestor).get("properties", {}).items():
            found[prop] = (doc, schema)
    return found


def _closed(document: str, name: str) -> bool:
    return _definition(document, name).get("additionalProperties") is False


def _check_format(fmt: str, value: str) -> str | None:
    if fmt == "date-time":
        try:
            datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return f"{value!r} is not a date-time"
    elif fmt == "uuid" and not _UUID.match(value):
        return f"{value!r} is not a uuid"
    elif fmt == "duration" and not _DURATION.match(value):
        return f"{value!r} is not an ISO 8601 duration"
    elif fmt == "uri" and not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", value):
        return f"{value!r} is not a uri"
    return None


_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool}


def _walk(schema: dict[str, Any], document: str, value: Any, path: str, out: list[str]) -> None:
    if value is None:
        if not schema.get("x-nullable"):
            target = schema
            if "$ref" in schema:
                target = _definition(*_resolve(schema["$ref"], document))
            if not target.get("x-nullable"):
                out.append(f"{path}: null where the spec allows none")
        return
    if "$ref" in schema:
        _definition_walk(*_resolve(schema["$ref"], document), value, path, out)
        return
    if "allOf" in schema or "discriminator" in schema:  # an inline definition with parents: not used inline
        out.append(f"{path}: inline allOf/discriminator is not supported by this checker")
        return
    _value_walk(schema, document, value, path, out, closed=schema.get("additionalProperties") is False,
                properties={k: (document, v) for k, v in schema.get("properties", {}).items()})


def _definition_walk(document: str, name: str, value: Any, path: str, out: list[str]) -> None:
    found = _discriminator(document, name)
    if found and isinstance(value, dict):
        prop, base_doc, base = found
        kind = value.get(prop)
        if kind is None:
            out.append(f"{path}: {name} needs its discriminator {prop}")
            return
        sub = _subtype(base_doc, base, kind)
        if sub is None:
            out.append(f"{path}.{prop}: {kind!r} names no definition deriving from {base}")
            return
        if sub != (base_doc, base) and (document, name) in _ancestors(*sub):
            document, name = sub
    schema = _definition(document, name)
    required = {r for doc, anc in _ancestors(document, name) for r in _definition(doc, anc).get("required", [])}
    if isinstance(value, dict):
        for key in sorted(required - set(value)):
            out.append(f"{path}: {name} requires {key}")
    merged = dict(schema)
    for doc, anc in _ancestors(document, name)[1:]:  # type, enum and the like may sit on a parent
        for key in ("type", "enum", "format", "pattern", "minLength"):
            if key in _definition(doc, anc) and key not in merged:
                merged[key] = _definition(doc, anc)[key]
    closed = any(_closed(doc, anc) for doc, anc in _ancestors(document, name)[:1])
    _value_walk(merged, document, value, path, out, closed=closed, properties=_properties(document, name),
                name=name)


def _value_walk(schema: dict[str, Any], document: str, value: Any, path: str, out: list[str], *, closed: bool,
                properties: dict[str, tuple[str, dict[str, Any]]], name: str = "") -> None:
    kind = schema.get("type") or ("object" if properties else None)
    label = f" ({name})" if name else ""
    if kind == "integer":
        if isinstance(value, bool) or not isinstance(value, int):
            out.append(f"{path}: {value!r} is not an integer{label}")
        return
    if kind == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            out.append(f"{path}: {value!r} is not a number{label}")
        return
    if kind in _TYPES and not isinstance(value, _TYPES[kind]):
        out.append(f"{path}: {type(value).__name__} where the spec has {kind}{label}")
        return
    if isinstance(value, str):
        if "enum" in schema and value not in schema["enum"]:
            out.append(f"{path}: {value!r} is not one of {schema['enum']}{label}")
        if schema.get("format") and (problem := _check_format(schema["format"], value)):
            out.append(f"{path}: {problem}")
        if "minLength" in schema and len(value) < schema["minLength"]:
            out.append(f"{path}: shorter than {schema['minLength']}")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            out.append(f"{path}: {value!r} does not match {schema['pattern']}")
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _walk(schema.get("items", {}), document, item, f"{path}[{i}]", out)
        return
    if isinstance(value, dict):
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if key in properties:
                doc, sub = properties[key]
                _walk(sub, doc, item, f"{path}.{key}", out)
            elif isinstance(extra, dict):
                _walk(extra, document, item, f"{path}.{key}", out)
            elif closed:
                out.append(f"{path}: key {key!r} is not in the spec{label}")


def problems(schema: str, body: Any, path: str = "$") -> list[str]:
    """Where `body` breaks definition `schema` ("file#Name", or a name of mfe.json)."""
    document, _, name = schema.rpartition("#")
    out: list[str] = []
    _definition_walk(document or "mfe.json", name, body, path, out)
    return out


# -- which schema answers which route -------------------------------------------------------------
_WS = (r"/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.MachineLearningServices"
       r"/(?:workspaces|registries)/[^/]+")
_ROUTES: tuple[tuple[str, str, str], ...] = (
    # (methods, path after the workspace or registry, response definition)
    ("GET PUT", r"/jobs/[^/]+", "JobBaseResource"),
    ("GET", r"/jobs", "JobBaseResourceArmPaginatedResult"),
    ("GET", r"/models/[^/]+", "ModelContainerResource"),
    ("GET PUT", r"/models/[^/]+/versions/[^/]+", "ModelVersionResource"),
    ("GET", r"/models/[^/]+/versions", "ModelVersionResourceArmPaginatedResult"),
    ("GET", r"/components/[^/]+/versions/[^/]+", "ComponentVersionResource"),
    ("GET", r"/components/[^/]+/versions", "ComponentVersionResourceArmPaginatedResult"),
    ("GET PUT", r"/onlineEndpoints/[^/]+", "OnlineEndpointTrackedResource"),
    ("GET", r"/onlineEndpoints", "OnlineEndpointTrackedResourceArmPaginatedResult"),
    ("POST", r"/onlineEndpoints/[^/]+/listKeys", "EndpointAuthKeys"),
    ("GET PUT", r"/onlineEndpoints/[^/]+/deployments/[^/]+", "OnlineDeploymentTrackedResource"),
    ("GET", r"/onlineEndpoints/[^/]+/deployments", "OnlineDeploymentTrackedResourceArmPaginatedResult"),
    ("GET", r"/computes/[^/]+", "machineLearningServices.json#ComputeResource"),
)
_REQUESTS = {"PUT": ("JobBaseResource", "ModelVersionResource", "OnlineEndpointTrackedResource",
                     "OnlineDeploymentTrackedResource")}


def _rest(path: str) -> str | None:
    path = path.removeprefix("/mferp/managementfrontend")
    match = re.match(_WS, path, re.IGNORECASE)
    return path[match.end():] if match else None


def route(method: str, path: str, status: int) -> str | None:
    """The definition an answer of the Azure ML resource provider (ARM, or a registry's data plane
    that mirrors it) must follow: ErrorResponse for an error; None where this file has none."""
    rest = _rest(path)
    if rest is None:
        return None
    if status >= 400:
        return "types.json#ErrorResponse"
    for methods, pattern, schema in _ROUTES:
        if method in methods.split() and re.fullmatch(pattern, rest, re.IGNORECASE):
            return schema
    return None


def request_schema(method: str, path: str) -> str | None:
    """The definition the body of a PUT that the stand-in serves must follow."""
    schema = route(method, path, 200)
    return schema if schema in _REQUESTS.get(method, ()) else None


# The registry's data plane (api-version 2021-10-01-dataplanepreview, not this stable spec) answers
# a model version with its system metadata (compute allow-lists, lifecycle dates) beside the stable
# properties: the one key the stand-in sends there that 2025-12-01's ModelVersion lacks.
REGISTRY_EXTENSIONS = ("systemMetadata",)


def without_registry_extensions(body: dict[str, Any]) -> dict[str, Any]:
    def strip(item: Any) -> Any:
        if isinstance(item, dict) and isinstance(item.get("properties"), dict):
            item = {**item, "properties": {k: v for k, v in item["properties"].items()
                                           if k not in REGISTRY_EXTENSIONS}}
        return item

    if isinstance(body.get("value"), list):
        return {**body, "value": [strip(v) for v in body["value"]]}
    return strip(body)
