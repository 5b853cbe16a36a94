"""The in-process fake of MLClient (tests/fake_azure.py) held to the wire: every behaviour the fake
relies on, asked once of the fake and once of the real azure-ai-ml client talking HTTPS to the
stand-in (tests/standin/), and compared: the same call returns the same entity type and shape, or
raises the same exception type (and error_type / status). When the fake is kinder than the
service, a case fails here before a unit test passes on a behaviour Azure does not have.

A case that shows a drift nobody has fixed yet is xfail(strict=True) naming it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from tests.standin.proxy import Reply
from tests.standin.service import StandIn
from tests.standin.world import seed_reference_flow

ENDPOINT = "contract-endpoint-01"
JOB = "contract-job-0001"


@dataclass
class Sides:
    azure: StandIn
    wire: tuple[Any, Any]  # (workspace client, registry client): real MLClients on the wire
    fake: tuple[Any, Any]


@pytest.fixture(scope="module")
def sides(tmp_path_factory, component):
    from automation.backends.azure import connection
    from tests.fake_azure import reference_clients

    with StandIn(tmp_path_factory.mktemp("contract")) as azure, pytest.MonkeyPatch.context() as patch:
        seed_reference_flow(azure)
        for key, value in azure.env().items():
            patch.setenv(key, value)
        yield Sides(azure, (connection.workspace_client(), connection.registry_client("azureml")),
                    reference_clients(component))


@dataclass(frozen=True)
class Outcome:
    kind: str  # "returns" or "raises"
    what: Any  # the value's shape, or (exception type, error_type, status)


def outcome(fn: Callable[[], Any], shape: Callable[[Any], Any]) -> Outcome:
    try:
        value = fn()
    except Exception as err:  # the type is the point
        error_type = getattr(err, "error_type", None)
        return Outcome("raises", (type(err).__name__, getattr(error_type, "value", error_type),
                                  getattr(err, "status_code", None)))
    return Outcome("returns", shape(value))


def typename(value: Any) -> str:
    return type(value).__name__


def enum_or_str(value: Any) -> tuple[str, str]:
    """A status as the SDK hands it over: its type, and its value."""
    return typename(value), str(getattr(value, "value", value))


# -- setups: the same state on both sides -------------------------------------------------------

def _endpoint_on_both(sides: Sides, *, state: str = "Succeeded", deployments: tuple[str, ...] = (),
                      traffic: dict[str, int] | None = None) -> None:
    from azure.ai.ml.entities import ManagedOnlineDeployment, ManagedOnlineEndpoint

    ws = sides.fake[0]
    entity = ManagedOnlineEndpoint(name=ENDPOINT, auth_mode="key", tags={"pr": "7"}, traffic=traffic or {})
    ws.online_endpoints.items[ENDPOINT] = ws.online_endpoints._entity(entity, "Succeeded")
    ws.online_endpoints.busy.pop(ENDPOINT, None)
    ws.online_deployments.drop_endpoint(ENDPOINT)
    for name in deployments:
        ws.online_deployments.items[(ENDPOINT, name)] = ManagedOnlineDeployment(
            name=name, endpoint_name=ENDPOINT, model="azureml:m:1", instance_type="Standard_NC24ads_A100_v4",
            instance_count=1)
    if state != "Succeeded":
        ws.online_endpoints.busy[ENDPOINT] = 100
    sides.azure.add_endpoint(ENDPOINT, tags={"pr": "7"}, traffic=traffic, state=state, deployments=deployments)


def _job_on_both(sides: Sides, status: str = "Running") -> None:
    from azure.ai.ml import command

    azure, (ws, _) = sides.azure, sides.fake
    azure.jobs[JOB] = {"id": f"{azure._ws_prefix()}/jobs/{JOB}", "name": JOB,
                       "type": "Microsoft.MachineLearningServices/workspaces/jobs", "systemData": azure._system_data(),
                       "properties": {"jobType": "Command", "command": "echo hi", "environmentId":
                                      "azureml://registries/azureml/environments/acft-hf-nlp-gpu/versions/1",
                                      "computeId": "gpu-a100", "tags": {"pr": "7"}, "services": {}}}
    azure.job_states[JOB] = status
    job = command(name=JOB, command="echo hi", environment="azureml:acft-hf-nlp-gpu:1", compute="gpu-a100",
                  tags={"pr": "7"})
    job._status = status
    ws.jobs.items[JOB] = job


# -- the cases ------------------------------------------------------------------------------------
# (id, setup(sides), call(ws, registry), shape(value)); shape only for calls that return.

def _model_shape(model) -> tuple:
    return typename(model), str(model.version), bool(model.tags.get("finetune_compute_allow_list")
                                                     or model.tags.get("model_specific_defaults"))


CASES: list[tuple[str, Callable | None, Callable, Callable]] = [
    ("registry model by version", None, lambda ws, reg: reg.models.get("Phi-4", version="8"), _model_shape),
    ("registry model, missing version", None, lambda ws, reg: reg.models.get("Phi-4", version="999"), typename),
    ("registry model, label latest", None, lambda ws, reg: reg.models.get("Phi-4", label="latest"), _model_shape),
    ("registry model, latest of an archived model", None,
     lambda ws, reg: reg.models.get("Phi-3-mini-4k-instruct", label="latest"), _model_shape),
    ("registry model, latest of an unknown model", None,
     lambda ws, reg: reg.models.get("No-Such-Model", label="latest"), _model_shape),
    ("registry model's system metadata (models._get)", None,
     lambda ws, reg: reg.models._get("Phi-4", "8"),
     lambda rest: (typename(rest), sorted((rest.properties.get("systemMetadata") or {}).keys())[:3],
                   rest.properties.is_archived)),
    ("registry component, label latest", None,
     lambda ws, reg: reg.components.get("chat_completion_pipeline", label="latest"),
     lambda c: (typename(c), str(c.version), c.type)),
    ("compute cluster", None, lambda ws, reg: ws.compute.get("gpu-a100"),
     lambda c: (typename(c), c.size, enum_or_str(c.provisioning_state))),
    ("compute cluster, missing", None, lambda ws, reg: ws.compute.get("no-such-cluster"), typename),
    ("VM sizes", None, lambda ws, reg: list(ws.compute.list_sizes()),
     lambda sizes: sorted((typename(s), s.name, s.gpus) for s in sizes if s.name == "Standard_NC24ads_A100_v4")),
    ("job, missing", None, lambda ws, reg: ws.jobs.get("no-such-job"), typename),
    ("job, its status", _job_on_both, lambda ws, reg: ws.jobs.get(JOB),
     lambda job: (enum_or_str(job.status), job.tags.get("pr"))),
    ("jobs, listed with their tags", _job_on_both, lambda ws, reg: [j for j in ws.jobs.list() if j.name == JOB],
     lambda jobs: [(enum_or_str(j.status), j.tags.get("pr")) for j in jobs]),
    ("job, cancelled", _job_on_both, lambda ws, reg: (ws.jobs.begin_cancel(JOB).result(), ws.jobs.get(JOB))[1],
     lambda job: enum_or_str(job.status)),
    ("endpoint, missing", None, lambda ws, reg: ws.online_endpoints.get("no-such-endpoint"), typename),
    ("endpoint", _endpoint_on_both, lambda ws, reg: ws.online_endpoints.get(ENDPOINT),
     lambda e: (typename(e), e.auth_mode.lower(), enum_or_str(e.provisioning_state), e.tags.get("pr"),
                bool(e.scoring_uri))),
    ("endpoints, listed", _endpoint_on_both, lambda ws, reg: [e for e in ws.online_endpoints.list() if e.name == ENDPOINT],
     lambda es: [(typename(e), e.tags.get("pr")) for e in es]),
    ("deployment while the endpoint is updating (409)",
     lambda s: _endpoint_on_both(s, state="Updating"),
     lambda ws, reg: ws.online_deployments.begin_create_or_update(_deployment()).result(), typename),
    ("deployment, missing", _endpoint_on_both,
     lambda ws, reg: ws.online_deployments.get(name="demo", endpoint_name=ENDPOINT), typename),
    ("deployment with traffic, deleted (400)",
     lambda s: _endpoint_on_both(s, deployments=("demo",), traffic={"demo": 100}),
     lambda ws, reg: ws.online_deployments.begin_delete(name="demo", endpoint_name=ENDPOINT).result(), typename),
    ("traffic to an unknown deployment (400)", _endpoint_on_both,
     lambda ws, reg: ws.online_endpoints.begin_create_or_update(_endpoint_with_traffic({"nope": 100})).result(),
     typename),
    ("invoke, unknown deployment", lambda s: _endpoint_on_both(s, deployments=("demo",), traffic={"demo": 100}),
     lambda ws, reg: ws.online_endpoints.invoke(ENDPOINT, request_file=_request_file(), deployment_name="blue"),
     typename),
    ("invoke", lambda s: _endpoint_on_both(s, deployments=("demo",), traffic={"demo": 100}),
     lambda ws, reg: ws.online_endpoints.invoke(ENDPOINT, request_file=_request_file(), deployment_name="demo"),
     lambda raw: (typename(raw), sorted(json.loads(raw)))),
    ("workspace's MLflow tracking URI", None, lambda ws, reg: ws.workspaces.get(ws.workspace_name),
     lambda w: (typename(w), w.mlflow_tracking_uri.split("/mlflow/")[0].split("://")[0],
                w.mlflow_tracking_uri.split("/mlflow/")[1].split("/")[0])),
    ("model version registered again with another path", lambda s: _model_on_both(s),
     lambda ws, reg: ws.models.create_or_update(_model("azureml://jobs/another-job/outputs/trained_model")),
     typename),
    ("workspace models of an unknown name", None, lambda ws, reg: list(ws.models.list(name="no-such-model")), len),
]

DRIFT = {
    # id -> why the fake still differs from the wire (xfail strict: fix the fake, then drop the entry)
}


def _model(path: str):
    from azure.ai.ml.entities import Model

    return Model(name="Phi-4-ultrachat", version="1796518000", type="mlflow_model", path=path)


def _model_on_both(sides: Sides) -> None:
    first = _model("azureml://jobs/contract-job-0001/outputs/trained_model")
    sides.fake[0].models.versions.pop("Phi-4-ultrachat", None)
    sides.fake[0].models.create_or_update(first)
    sides.azure.models.pop(("Phi-4-ultrachat", "1796518000"), None)
    sides.wire[0].models.create_or_update(first)


def _deployment():
    from azure.ai.ml.entities import ManagedOnlineDeployment

    return ManagedOnlineDeployment(name="demo", endpoint_name=ENDPOINT, model="azureml:m:1",
                                   instance_type="Standard_NC24ads_A100_v4", instance_count=1)


def _endpoint_with_traffic(traffic: dict[str, int]):
    from azure.ai.ml.entities import ManagedOnlineEndpoint

    return ManagedOnlineEndpoint(name=ENDPOINT, auth_mode="key", tags={"pr": "7"}, traffic=traffic)


def _request_file() -> str:
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / "sample_score.json"
    path.write_text(json.dumps({"input_data": {"input_string": [[{"role": "user", "content": "hi"}]],
                                               "parameters": {"max_new_tokens": 8}}, "params": {}}))
    return str(path)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_the_fake_answers_as_the_wire_does(sides, case, request):
    name, setup, call, shape = case
    if name in DRIFT:
        request.applymarker(pytest.mark.xfail(strict=True, reason=DRIFT[name]))
    if setup:
        setup(sides)
    wire = outcome(lambda: call(*sides.wire), shape)
    if setup:
        setup(sides)  # the call may have changed the state; both sides start from the same one
    fake = outcome(lambda: call(*sides.fake), shape)
    assert fake == wire, f"{name}: the fake {fake} but the service {wire}"


def test_a_gateway_plain_text_answer_reads_alike(sides):
    """A scoring gateway's plain-text 502: the SDK's `validate_response` turns it into an MlException
    from the JSON ValueError on the wire; the fake builds its error with that very function."""
    from tests.fake_azure import plain_text_answer

    _endpoint_on_both(sides, deployments=("demo",), traffic={"demo": 100})
    sides.azure.fail("POST", rf"{ENDPOINT}\..*inference\.ml\.azure\.com/score$",
                     Reply(502, "upstream connect error or disconnect/reset before headers"), times=10)
    wire = outcome(lambda: sides.wire[0].online_endpoints.invoke(ENDPOINT, request_file=_request_file(),
                                                                  deployment_name="demo"), typename)
    sides.fake[0].fail("online_endpoints.invoke", plain_text_answer(502, "upstream connect error"))
    fake = outcome(lambda: sides.fake[0].online_endpoints.invoke(ENDPOINT, request_file=_request_file(),
                                                                  deployment_name="demo"), typename)
    assert fake == wire


def test_the_spec_extracts_name_their_source_and_accept_the_specs_own_examples():
    """tests/fixtures/arm/spec/ holds definitions of azure-rest-api-specs at a named commit; the
    x-ms-examples of the same folder (tests/fixtures/arm/*.json) pass the checker unchanged."""
    import re

    from tests.standin import schemas, spec

    for name in schemas.FILES:
        source = schemas.source(name)
        assert source["repo"] == "Azure/azure-rest-api-specs" and re.fullmatch(r"[0-9a-f]{40}", source["commit"])
        assert source["path"].endswith("/" + name)
    assert "/stable/2025-12-01/" in schemas.source("mfe.json")["path"]  # azure-ai-ml 1.35's arm_ml_service
    for example, schema in (("online_endpoint_get.json", "OnlineEndpointTrackedResource"),
                            ("online_deployment_create.json", "OnlineDeploymentTrackedResource"),
                            ("pipeline_job_get.json", "JobBaseResource"),
                            ("model_version_get.json", "ModelVersionResource")):
        assert schemas.problems(schema, spec.example(example)) == [], example


def test_the_schema_checker_refuses_what_the_spec_does_not_allow(tmp_path):
    """Each kind of drift a stand-in could make: a key no definition declares (through allOf), an
    enum value, a missing required key, null where the spec has no x-nullable, a discriminator no
    definition derives, a wrong type, a bad date-time; and the stand-in flags its own drifting answer."""
    from tests.standin import schemas, spec
    from tests.standin.proxy import Request

    endpoint = json.loads(json.dumps(spec.example("online_endpoint_get.json")))
    endpoint["properties"]["authMode"] = "Key"
    assert schemas.problems("OnlineEndpointTrackedResource", endpoint) == []
    bad = json.loads(json.dumps(endpoint))
    bad["properties"]["provisioningState"] = "Provisioned"
    bad["properties"]["scoringUrl"] = "https://x/score"
    bad["properties"]["traffic"] = {"blue": "100"}
    bad["kind"] = None
    bad["systemData"]["createdAt"] = "yesterday"
    del bad["location"]
    found = schemas.problems("OnlineEndpointTrackedResource", bad)
    assert sorted(found) == sorted([
        "$: OnlineEndpointTrackedResource requires location",
        "$.kind: null where the spec allows none",
        "$.systemData.createdAt: 'yesterday' is not a date-time",
        "$.properties.provisioningState: 'Provisioned' is not one of "
        "['Creating', 'Deleting', 'Succeeded', 'Failed', 'Updating', 'Canceled'] (EndpointProvisioningState)",
        "$.properties: key 'scoringUrl' is not in the spec (OnlineEndpoint)",
        "$.properties.traffic.blue: '100' is not an integer"]), found
    job = json.loads(json.dumps(spec.example("pipeline_job_get.json")))
    job["properties"]["jobType"] = "Notebook"
    assert schemas.problems("JobBaseResource", job) == [
        "$.properties.jobType: 'Notebook' names no definition deriving from JobBase"]
    job["properties"]["jobType"] = "Pipeline"
    job["properties"]["inputs"] = {"lr": {"jobInputType": "literal"}, "data": {"jobInputType": "uri_folder",
                                                                             "uri": "azureml://x", "path": "x"}}
    assert sorted(schemas.problems("JobBaseResource", job)) == [
        "$.properties.inputs.data: key 'path' is not in the spec (UriFolderJobInput)",
        "$.properties.inputs.lr: LiteralJobInput requires value"]
    with StandIn(tmp_path / "standin") as azure:
        azure.add_endpoint("drifting", state="Provisioned")
        path = f"{azure._ws_prefix()}/onlineEndpoints/drifting"
        request = Request("GET", "management.azure.com", path, {"api-version": ["2025-12-01"]}, {}, b"")
        azure._check_spec(request, Reply(200, azure.endpoints["drifting"]))
        assert azure.spec_problems == [
            "answer 200 GET Microsoft.MachineLearningServices/workspaces/ws-staging/onlineEndpoints/drifting: "
            "$.properties.provisioningState: 'Provisioned' is not one of ['Creating', 'Deleting', 'Succeeded', "
            "'Failed', 'Updating', 'Canceled'] (EndpointProvisioningState)"]


def test_the_stand_in_answers_every_contract_case_within_the_spec(sides):
    assert sides.azure.spec_problems == []
