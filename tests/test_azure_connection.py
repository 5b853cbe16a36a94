"""One credential per process, a GitHub ID token reused while it lasts, and the NotResponding/Paused
deadlines read from the job's own last-modified time (fast, in-process; the wire tests check the
same on the wire)."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest

from automation.backends.azure import connection, credentials, jobs
from automation.backends.base import JOB_FAILED, JOB_RUNNING, JOB_WAITING

ENV = {"ACTIONS_ID_TOKEN_REQUEST_URL": "https://token.actions.example/x?api-version=2.0",
       "ACTIONS_ID_TOKEN_REQUEST_TOKEN": "runner-token", "AZURE_TENANT_ID": "t", "AZURE_CLIENT_ID": "c"}


def _jwt(exp: float) -> str:
    body = base64.urlsafe_b64encode(json.dumps({"exp": exp}).encode()).rstrip(b"=").decode()
    return f"e30.{body}.sig"


def test_every_client_of_a_process_gets_the_same_credential(monkeypatch):
    connection.forget_credentials()
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    first = connection.credential()
    assert connection.credential() is first
    assert type(first).__name__ == "ClientAssertionCredential"
    monkeypatch.setenv("AZURE_CLIENT_ID", "another-identity")  # the promote job's identity
    other = connection.credential()
    assert other is not first and connection.credential() is other
    connection.forget_credentials()
    assert connection.credential() is not other
    connection.forget_credentials()


class _Answer:
    status_code = 200

    def __init__(self, value: str):
        self.value = value

    def json(self):
        return {"value": self.value}


def test_a_github_id_token_is_reused_while_enough_of_it_is_left(monkeypatch):
    import httpx

    now = [1000.0]
    issued: list[str] = []

    def get(url, **_):
        issued.append(_jwt(now[0] + 300))  # GitHub's tokens last minutes
        return _Answer(issued[-1])

    monkeypatch.setattr(httpx, "get", get)
    fetch = credentials.github_oidc_token_provider(ENV, now=lambda: now[0])
    token = fetch()
    now[0] += 170  # 130 s left: more than the margin
    assert fetch() == token and len(issued) == 1
    now[0] += 20  # 110 s left: a fresh one
    assert fetch() != token and len(issued) == 2


def test_a_token_whose_expiry_cannot_be_read_is_never_reused(monkeypatch):
    import httpx

    calls = []
    monkeypatch.setattr(httpx, "get", lambda url, **_: calls.append(url) or _Answer("opaque-token"))
    fetch = credentials.github_oidc_token_provider(ENV)
    fetch(), fetch()
    assert len(calls) == 2


def _job(status: str, modified: datetime | str | None) -> SimpleNamespace:
    return SimpleNamespace(name="j", status=status, tags={}, studio_url="https://ml.azure.com/runs/j", error=None,
                           creation_context=SimpleNamespace(created_at=None, last_modified_at=modified))


@pytest.mark.parametrize(("status", "deadline_h"), [("NotResponding", 2), ("Paused", 24)])
def test_a_stall_is_measured_from_the_jobs_last_modified_time(status, deadline_h):
    now = datetime(2026, 12, 6, 12, tzinfo=UTC)
    inside = _job(status, now - timedelta(hours=deadline_h) + timedelta(minutes=5))
    assert jobs.stuck_for(inside, now.timestamp()) is None
    assert jobs.job_info(inside, now.timestamp()).state == (JOB_RUNNING if status == "NotResponding" else JOB_WAITING)
    past = _job(status, now - timedelta(hours=deadline_h, minutes=5))
    assert jobs.stuck_for(past, now.timestamp()) == pytest.approx((deadline_h * 60 + 5) * 60)
    info = jobs.job_info(past, now.timestamp())
    assert info.state == JOB_FAILED and info.backend_status == status
    assert f"has been {status} for {deadline_h * 60 + 5} min, past the {deadline_h} h" in info.error
    as_text = _job(status, (now - timedelta(hours=deadline_h + 1)).isoformat().replace("+00:00", "Z"))
    assert jobs.stuck_for(as_text, now.timestamp()) is not None  # a string as a fake or a REST dict has it


def test_no_deadline_without_a_time_or_for_a_state_that_ends():
    now = datetime(2026, 12, 6, 12, tzinfo=UTC).timestamp()
    assert jobs.stuck_for(_job("NotResponding", None), now) is None
    assert jobs.stuck_for(_job("Running", datetime(2020, 1, 1, tzinfo=UTC)), now) is None
    naive = _job("Paused", datetime(2026, 12, 4, 12))  # a naive time is UTC, as the service means it
    assert jobs.stuck_for(naive, now) == pytest.approx(48 * 3600)


class _Jobs:
    def __init__(self, *items):
        self.items = {j.name: j for j in items}
        self.cancelled: list[str] = []

    def list(self):
        return list(self.items.values())

    def get(self, name):
        return self.items[name]

    def begin_cancel(self, name):
        self.cancelled.append(name)
        return SimpleNamespace(done=lambda: False)


def _stuck_job(name: str, hours: float) -> SimpleNamespace:
    modified = datetime.now(UTC) - timedelta(hours=hours)
    return SimpleNamespace(name=name, status="NotResponding", tags={"pr": "7"}, studio_url=None, error=None,
                           creation_context=SimpleNamespace(created_at=None, last_modified_at=modified))


def test_a_stuck_job_is_cancelled_once_whether_listed_or_read(monkeypatch):
    from automation.backends.azure.backend import AzureBackend

    monkeypatch.delenv("AZURE_STAGING_ML_WORKSPACE", raising=False)
    ws = SimpleNamespace(jobs=_Jobs(_stuck_job("older-commit", 3), _stuck_job("head", 3), _stuck_job("fresh", 1)))
    backend = AzureBackend(workspace_client=ws, sleep=lambda s: None)
    listed = {j.name: j.state for j in backend.list_jobs({"pr": "7"})}
    assert listed == {"older-commit": JOB_FAILED, "head": JOB_FAILED, "fresh": JOB_RUNNING}
    assert backend.get_job("head").state == JOB_FAILED  # still failed, though the service now says CancelRequested
    assert sorted(ws.jobs.cancelled) == ["head", "older-commit"]


def test_the_production_job_reports_a_stuck_staging_job_but_never_cancels_it():
    from automation.backends.azure.backend import AzureBackend

    staging = SimpleNamespace(jobs=_Jobs(_stuck_job("head", 30)))
    backend = AzureBackend(workspace_client=SimpleNamespace(jobs=_Jobs()), sleep=lambda s: None)
    backend._source = staging  # the production job reads candidates from the staging workspace
    assert backend.get_job("head").state == JOB_FAILED and staging.jobs.cancelled == []
