"""Credentials that last: in a job with `id-token: write`, the Azure credential is a client
assertion that asks GitHub's token service for a fresh OIDC token whenever Entra ID needs one, so
an expired access token is simply requested again. Entra ID is a fake on loopback, reached through
azure-core's own requests transport."""

from __future__ import annotations

import json
import time
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs

import pytest
from azure.core.pipeline.transport import RequestsTransport

from automation.backends.azure.credentials import (
    AUDIENCE,
    OIDC_ATTEMPTS,
    credential,
    github_oidc_token_provider,
    oidc_token_url,
)
from automation.errors import AuthenticationError, ConfigError
from tests.fake_github import OIDC_REQUEST_TOKEN, FakeGitHub
from tests.loopback import LoopbackServer

TENANT, CLIENT = "72f988bf-86f1-41af-91ab-2d7cd011db47", "00000000-0000-0000-0000-0000000000c1"
SCOPE = "https://management.azure.com/.default"


class FakeEntra:
    """POST /{tenant}/oauth2/v2.0/token with a JWT client assertion -> an access token."""

    def __init__(self) -> None:
        self.requests: list[dict[str, str]] = []
        self.expires_in = 3600
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                form = {k: v[0] for k, v in parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode()).items()}
                fake.requests.append({"path": self.path, **form})
                ok = self.path == f"/{TENANT}/oauth2/v2.0/token" and form.get("client_assertion_type") == \
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer" and form.get("client_id") == CLIENT
                body = {"token_type": "Bearer", "expires_in": fake.expires_in, "ext_expires_in": fake.expires_in,
                        "access_token": f"access-{len(fake.requests)}"} if ok else \
                    {"error": "invalid_request", "error_description": "AADSTS900144: bad request"}
                data = json.dumps(body).encode()
                self.send_response(200 if ok else 400)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._loopback = LoopbackServer(Handler)
        self.url = self._loopback.url

    def close(self) -> None:
        self._loopback.stop()


class Loopback(RequestsTransport):
    """azure-core's requests transport, sending what is addressed to Entra ID to the fake."""

    def __init__(self, base: str):
        super().__init__()
        self.base = base

    def send(self, request, **kwargs):
        request.url = request.url.replace("https://login.microsoftonline.com", self.base)
        return super().send(request, **kwargs)


@pytest.fixture
def services():
    entra = FakeEntra()
    with FakeGitHub() as github:
        env = {"ACTIONS_ID_TOKEN_REQUEST_URL": f"{github.url}/_oidc/token?api-version=2.0",
               "ACTIONS_ID_TOKEN_REQUEST_TOKEN": OIDC_REQUEST_TOKEN, "AZURE_TENANT_ID": TENANT,
               "AZURE_CLIENT_ID": CLIENT}
        yield github, entra, env
    entra.close()


def test_an_expired_token_makes_the_credential_ask_github_again(services):
    github, entra, env = services
    entra.expires_in = 1
    cred = credential(env, transport=Loopback(entra.url))
    assert type(cred).__name__ == "ClientAssertionCredential"
    first = cred.get_token(SCOPE)
    assert first.token == "access-1" and github.oidc_requests == [AUDIENCE]
    assert entra.requests[0]["client_assertion"].startswith("eyJ.fake-oidc-1.")
    time.sleep(1.5)  # the access token has expired
    second = cred.get_token(SCOPE)
    assert second.token == "access-2" and github.oidc_requests == [AUDIENCE, AUDIENCE]
    assert entra.requests[1]["client_assertion"].startswith("eyJ.fake-oidc-2.")  # a fresh one, not the first
    entra.expires_in = 3600
    time.sleep(1.5)
    assert cred.get_token(SCOPE).token == "access-3"
    assert cred.get_token(SCOPE).token == "access-3"  # valid for an hour: served from the credential's cache
    assert len(github.oidc_requests) == 3 and len(entra.requests) == 3


def test_the_token_request_carries_the_runner_token_and_the_audience(services):
    github, _, env = services
    token = github_oidc_token_provider(env)()
    assert token.endswith(AUDIENCE)
    (call,) = github.requests
    assert call.path == "/_oidc/token" and call.token == OIDC_REQUEST_TOKEN


def test_outside_actions_it_is_the_default_credential_and_missing_ids_are_named(services):
    _, _, env = services
    assert type(credential({})).__name__ == "DefaultAzureCredential"
    with pytest.raises(ConfigError, match="AZURE_CLIENT_ID not set"):
        credential({k: v for k, v in env.items() if k != "AZURE_CLIENT_ID"})
    with pytest.raises(ConfigError, match="id-token: write"):
        github_oidc_token_provider({})


def test_the_audience_is_appended_to_the_api_version_as_actions_toolkit_does(services):
    """httpx 0.28 replaces a URL's query with `params=` (encode/httpx#3433): the token service then
    sees no api-version. The fake answers 400 to that, as the strict service would."""
    github, _, env = services
    url = oidc_token_url(env["ACTIONS_ID_TOKEN_REQUEST_URL"], AUDIENCE)
    assert url.endswith("/_oidc/token?api-version=2.0&audience=api%3A%2F%2FAzureADTokenExchange")
    assert github_oidc_token_provider(env)().endswith(AUDIENCE)
    assert github.oidc_requests == [AUDIENCE]


def test_the_fake_token_service_is_strict(services):
    import httpx

    github, _, env = services
    base = env["ACTIONS_ID_TOKEN_REQUEST_URL"].split("?")[0]
    bearer = {"Authorization": f"bearer {OIDC_REQUEST_TOKEN}"}
    assert httpx.get(base, params={"audience": AUDIENCE}, headers=bearer).status_code == 400
    assert httpx.get(f"{base}?api-version=2.0", headers=bearer).status_code == 400
    assert httpx.get(oidc_token_url(f"{base}?api-version=2.0", AUDIENCE)).status_code == 401
    other = {"Authorization": "bearer ghs_fakeWriteInstallationToken0000000000"}
    assert httpx.get(oidc_token_url(f"{base}?api-version=2.0", AUDIENCE), headers=other).status_code == 401
    assert github.oidc_requests == []


def test_transient_answers_of_the_token_service_are_retried_with_backoff(services):
    github, _, env = services
    github.fail_next("GET", "^/_oidc/token$", 503, times=2)
    github.fail_next("GET", "^/_oidc/token$", 429, headers={"Retry-After": "3"})
    sleeps: list[float] = []
    token = github_oidc_token_provider(env, sleep=sleeps.append)()
    assert token.endswith(AUDIENCE) and sleeps == [1.0, 2.0, 3.0]


def test_a_token_service_that_keeps_failing_is_an_authentication_error(services):
    github, _, env = services
    github.fail_next("GET", "^/_oidc/token$", 500, times=OIDC_ATTEMPTS)
    sleeps: list[float] = []
    with pytest.raises(AuthenticationError, match=f"after {OIDC_ATTEMPTS} attempt.*HTTP 500"):
        github_oidc_token_provider(env, sleep=sleeps.append)()
    assert len(sleeps) == OIDC_ATTEMPTS - 1 and max(sleeps) == 10.0
    assert github.oidc_requests == []

    refused = {**env, "ACTIONS_ID_TOKEN_REQUEST_TOKEN": "expired"}  # 401: no retry
    sleeps.clear()
    with pytest.raises(AuthenticationError, match="after 1 attempt.*HTTP 401"):
        github_oidc_token_provider(refused, sleep=sleeps.append)()
    assert sleeps == []


def test_dropped_connections_are_retried_then_an_authentication_error():
    import socket

    with socket.socket() as sock:  # a port nobody listens on: connection refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {"ACTIONS_ID_TOKEN_REQUEST_URL": f"http://127.0.0.1:{port}/_oidc/token?api-version=2.0",
           "ACTIONS_ID_TOKEN_REQUEST_TOKEN": OIDC_REQUEST_TOKEN}
    sleeps: list[float] = []
    with pytest.raises(AuthenticationError, match="after 3 attempt.*ConnectError"):
        github_oidc_token_provider(env, attempts=3, sleep=sleeps.append)()
    assert sleeps == [1.0, 2.0]


def test_an_authentication_error_comes_out_of_the_azure_credential_unchanged(services):
    """ClientAssertionCredential hands the provider's error on as it is: an AuthenticationError, which
    the CLI reports as a failed stage (exit 1), not as bad input (ConfigError, exit 2)."""
    _, entra, env = services
    cred = credential({**env, "ACTIONS_ID_TOKEN_REQUEST_TOKEN": "revoked"}, transport=Loopback(entra.url))
    with pytest.raises(AuthenticationError, match="HTTP 401") as caught:
        cred.get_token(SCOPE)
    assert caught.value.exit_code == 1 and entra.requests == []
