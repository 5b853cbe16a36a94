"""The workspace's metrics are read through the real mlflow + azureml-mlflow code, on loopback, with
the project's credential: azureml-mlflow's own chain (DefaultAzureCredential, then an interactive
browser, then a device code that waits ~15 min and prints a sign-in prompt) is never built, and
the read has a hard deadline."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit

import pytest

from automation.backends.azure.backend import LOSS_CURVE, AzureBackend, mlflow_metrics
from automation.errors import BackendError
from tests.fake_azure import TRACKING_URI, StaticCredential
from tests.loopback import LoopbackServer

SCOPE = ("/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg"
         "/providers/Microsoft.MachineLearningServices/workspaces/ws")


def _run(run_id: str, root: str, metrics: dict[str, float]) -> dict:
    return {"info": {"run_id": run_id, "run_uuid": run_id, "experiment_id": "1", "status": "FINISHED",
                     "start_time": 1, "lifecycle_stage": "active", "artifact_uri": ""},
            "data": {"metrics": [{"key": k, "value": v, "timestamp": 1, "step": 0} for k, v in metrics.items()],
                     "params": [], "tags": [{"key": "mlflow.rootRunId", "value": root}]}}


class FakeWorkspaceMlflow:
    """The workspace's MLflow REST API (`/mlflow/v2.0/<workspace scope>/api/2.0/mlflow/...`), as much
    as a metrics read asks of it; `hang` makes every answer wait until the test ends."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, str | None]] = []
        self.hang = threading.Event()
        self.release = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, body: dict, status: int = 200) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self) -> None:
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                fake.requests.append((self.command, parts.path, self.headers.get("Authorization")))
                if fake.hang.is_set():
                    fake.release.wait(30)
                    return
                prefix = f"/mlflow/v2.0{SCOPE}/api/2.0/mlflow/"
                if not parts.path.startswith(prefix):
                    self._answer({"error_code": "ENDPOINT_NOT_FOUND"}, 404)
                    return
                route = parts.path.removeprefix(prefix)
                if route == "experiments/search":
                    self._answer({"experiments": [{"experiment_id": "1", "name": "phi4-ultrachat",
                                                   "lifecycle_stage": "active"}]})
                elif route == "runs/search":
                    self._answer({"runs": [_run("step-ft", "job-1", {"loss": 1.4, "train_loss": 1.7}),
                                           _run("step-eval", "job-1", {"eval_loss": 1.5})]})
                elif route == "metrics/get-history":
                    query = parse_qs(parts.query)
                    assert query["run_id"] == ["step-ft"]
                    self._answer({"metrics": [{"key": query["metric_key"][0], "value": v, "timestamp": 1, "step": s}
                                              for s, v in [(10, 2.0), (20, 1.6), (30, 1.4)]]})
                else:
                    self._answer({"error_code": "ENDPOINT_NOT_FOUND"}, 404)

            do_GET = do_POST = _handle

        self._loopback = LoopbackServer(Handler)
        self.url = self._loopback.url

    def close(self) -> None:
        self.release.set()
        self._loopback.stop()


@pytest.fixture(autouse=True)
def mlflow_http_settings(monkeypatch):
    """The read sets MLflow's HTTP limits in os.environ when unset: undone after each test."""
    for name in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES"):
        monkeypatch.setenv(name, "recorded")  # so that teardown puts back what was there, even nothing
        monkeypatch.delenv(name)


@pytest.fixture
def tracking():
    server = FakeWorkspaceMlflow()
    yield server
    server.close()


@pytest.fixture
def no_interactive_credentials(monkeypatch):
    """azureml-mlflow's own chain may not even be built: each of its credentials raises when made."""
    import azure.identity
    import azureml.mlflow._internal.utils as azureml_utils

    made: list[str] = []

    def refuse(name: str):
        def make(*args, **kwargs):
            made.append(name)
            raise AssertionError(f"{name} constructed for an MLflow read")
        return make

    for name in ("DefaultAzureCredential", "InteractiveBrowserCredential", "DeviceCodeCredential",
                 "ChainedTokenCredential"):
        monkeypatch.setattr(azureml_utils, name, refuse(name))
        monkeypatch.setattr(azure.identity, name, refuse(name))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    return made


def test_the_workspace_is_read_with_the_projects_credential(tracking, no_interactive_credentials):
    credential = StaticCredential("project-token")
    found = mlflow_metrics(TRACKING_URI, "job-1", credential=credential, host_url=tracking.url)
    assert found["eval_loss"] == 1.5 and found["train_loss"] == 1.7
    assert found[LOSS_CURVE] == [(10, 2.0), (20, 1.6), (30, 1.4)]
    assert {auth for _, _, auth in tracking.requests} == {"Bearer project-token"}
    assert credential.scopes and all(s == ("https://management.azure.com/.default",) for s in credential.scopes)
    assert no_interactive_credentials == []


def test_the_backend_reads_with_the_mlclients_credential(tracking, no_interactive_credentials, clients, monkeypatch):
    from automation.backends.azure import backend as backend_module

    workspace, registry = clients
    workspace._credential = StaticCredential("mlclient-token")  # where MLClient keeps the one it was given
    real = backend_module.mlflow_metrics
    monkeypatch.setattr(backend_module, "mlflow_metrics",
                        lambda uri, job, **kw: real(uri, job, host_url=tracking.url, **kw))
    progress = AzureBackend(workspace, registry).job_progress("job-1")
    assert (progress.step, progress.loss) == (30, 1.4)
    assert {auth for _, _, auth in tracking.requests} == {"Bearer mlclient-token"}
    assert no_interactive_credentials == []


def test_a_service_that_does_not_answer_is_given_up_on(tracking, no_interactive_credentials, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    tracking.hang.set()
    with pytest.raises(BackendError, match="reading the metrics of job-1 through MLflow failed: .*"):
        mlflow_metrics(TRACKING_URI, "job-1", credential=StaticCredential(), host_url=tracking.url, timeout_s=60)
    assert len(tracking.requests) == 1  # one try, as configured: no retries under the timeout


def test_a_credential_that_blocks_hits_the_hard_deadline(tracking, no_interactive_credentials):
    """A credential that waits (as DeviceCodeCredential does for a person) cannot hold the read."""
    blocked = threading.Event()

    class Waiting(StaticCredential):
        def get_token(self, *scopes, **kwargs):
            blocked.wait(30)
            return super().get_token(*scopes, **kwargs)

    try:
        with pytest.raises(BackendError, match="took more than 1 s; gave up"):
            mlflow_metrics(TRACKING_URI, "job-1", credential=Waiting(), host_url=tracking.url, timeout_s=1)
    finally:
        blocked.set()
    assert no_interactive_credentials == []


def test_the_mlflow_http_limits_are_set_unless_the_environment_says(monkeypatch, tracking):
    import os

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")
    mlflow_metrics(TRACKING_URI, "job-1", credential=StaticCredential(), host_url=tracking.url)
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "30" and os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "5"


def test_a_tracking_uri_that_names_no_workspace_is_refused():
    with pytest.raises(BackendError, match="not a workspace's MLflow tracking URI"):
        mlflow_metrics("azureml://westeurope.api.azureml.ms/mlflow/v1.0/subscriptions/s/ws", "job-1",
                       credential=StaticCredential())
