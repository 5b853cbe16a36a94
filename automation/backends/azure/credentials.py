"""Azure credentials that outlive the first access token.

In a GitHub Actions job, `Azure/login` trades one OIDC token for a CLI session that cannot be
refreshed once its access token expires (about an hour; Azure/azure-cli#28708, AADSTS700024).
Here the job's identity is a `ClientAssertionCredential` whose assertion is a fresh GitHub OIDC
token, asked for every time Entra ID needs one, so a job can call Azure for as long as it runs.
At a desk, or wherever the runner offers no OIDC token, it is `DefaultAzureCredential` as before.

Which identity: `AZURE_CLIENT_ID` (and `AZURE_TENANT_ID`). The workflow sets it from
`vars.AZURE_CLIENT_ID` for pull-request work and from `vars.AZURE_CLIENT_ID_PRODUCTION` only in
the job that runs in the `production` environment.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

from automation.errors import AuthenticationError, ConfigError

log = logging.getLogger(__name__)

AUDIENCE = "api://AzureADTokenExchange"  # what Entra ID's federated credentials expect
REQUEST_URL, REQUEST_TOKEN = "ACTIONS_ID_TOKEN_REQUEST_URL", "ACTIONS_ID_TOKEN_REQUEST_TOKEN"
# actions/toolkit's getIDToken (packages/core/src/oidc-utils.ts) makes up to 10 attempts; so do we,
# backing off 1, 2, 4, 8, then 10 s between them: at most 10 x OIDC_TIMEOUT_S + 65 s for one token.
OIDC_ATTEMPTS, OIDC_TIMEOUT_S, OIDC_MAX_DELAY_S = 10, 10.0, 10.0
# A GitHub ID token is valid for minutes (its `exp`); one is reused as the client assertion of every
# Entra request this process makes while more than this much of its life is left (Entra takes the
# same assertion more than once: azure-identity's WorkloadIdentityCredential sends the same
# projected token for as long as Kubernetes keeps it), so a job asks GitHub once, not once per scope.
OIDC_REUSE_MARGIN_S = 120.0


def _expires_at(token: str) -> float | None:
    """The `exp` claim of a JWT, unverified (Entra verifies it); None when it cannot be read."""
    import base64
    import json

    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(claims["exp"])
    except (IndexError, ValueError, KeyError, TypeError):
        return None


def github_oidc_available(env: Mapping[str, str] | None = None) -> bool:
    """True in a job granted `id-token: write` (GitHub then sets both variables)."""
    env = os.environ if env is None else env
    return bool(env.get(REQUEST_URL) and env.get(REQUEST_TOKEN))


def oidc_token_url(request_url: str, audience: str) -> str:
    """The token service's URL with the audience appended, as actions/toolkit builds it
    (`${url}&audience=${encodeURIComponent(audience)}`): the URL already carries `?api-version=2.0`,
    which `httpx.get(url, params=...)` would replace (httpx 0.28, encode/httpx#3433)."""
    separator = "&" if "?" in request_url else "?"
    encoded = quote(audience, safe="-_.!~*'()")  # what encodeURIComponent leaves as it is
    return f"{request_url}{separator}audience={encoded}"


def _transient(status: int) -> bool:
    return status == 429 or status >= 500


def github_oidc_token_provider(env: Mapping[str, str] | None = None, *, timeout_s: float = OIDC_TIMEOUT_S,
                               audience: str = AUDIENCE, attempts: int = OIDC_ATTEMPTS,
                               sleep: Callable[[float], None] = time.sleep,
                               now: Callable[[], float] = time.time) -> Callable[[], str]:
    """A function returning a GitHub OIDC token for `audience`: the last one while more than
    OIDC_REUSE_MARGIN_S of its life is left, else a fresh one (each token is valid for minutes; the
    request token behind it lasts as long as the job).

    5xx, 429 and connection errors are retried with backoff (at most `attempts` tries); what still
    fails raises AuthenticationError, naming the last answer."""
    env = dict(os.environ if env is None else env)
    url, token = env.get(REQUEST_URL), env.get(REQUEST_TOKEN)
    if not url or not token:
        raise ConfigError(f"{REQUEST_URL} and {REQUEST_TOKEN} are not set: grant the job `id-token: write`")
    token_url = oidc_token_url(url, audience)
    headers = {"Authorization": f"bearer {token}", "Accept": "application/json"}

    held: dict[str, Any] = {}

    def fetch() -> str:
        expires = held.get("expires")
        if expires is not None and expires - now() > OIDC_REUSE_MARGIN_S:
            return held["value"]
        value = fetch_fresh()
        held.update(value=value, expires=_expires_at(value))
        return value

    def fetch_fresh() -> str:
        import httpx

        last = "no attempt made"
        for attempt in range(1, attempts + 1):
            delay = min(2.0 ** (attempt - 1), OIDC_MAX_DELAY_S)
            try:
                response = httpx.get(token_url, timeout=timeout_s, headers=headers)
            except httpx.TransportError as err:  # connection refused/reset, timeouts: worth another try
                last = f"{type(err).__name__}: {err}"
            else:
                if response.status_code == 200:
                    try:
                        value = response.json()["value"]
                    except (ValueError, KeyError, TypeError) as err:
                        raise AuthenticationError(f"GitHub's OIDC token service answered without a token: "
                                                  f"{type(err).__name__}: {err}") from err
                    log.debug("fetched a fresh GitHub OIDC token for %s", audience)
                    return value
                last = f"HTTP {response.status_code}: {response.text[:200]}"
                if not _transient(response.status_code):
                    break
                retry_after = response.headers.get("Retry-After", "")
                if retry_after.isdigit():
                    delay = min(float(retry_after), OIDC_MAX_DELAY_S)
            if attempt < attempts:
                log.warning("GitHub OIDC token request failed (%s); retrying in %.0f s", last, delay)
                sleep(delay)
        raise AuthenticationError(f"could not get a GitHub OIDC token for {audience} after {attempt} "
                                  f"attempt(s): {last}")

    return fetch


def credential(env: Mapping[str, str] | None = None, **kwargs: Any):
    """The credential for Azure calls: GitHub OIDC as a refreshing client assertion in Actions,
    DefaultAzureCredential elsewhere. `kwargs` go to the credential (e.g. a transport in tests)."""
    env = os.environ if env is None else env
    if github_oidc_available(env):
        from azure.identity import ClientAssertionCredential

        tenant, client = env.get("AZURE_TENANT_ID"), env.get("AZURE_CLIENT_ID")
        if not tenant or not client:
            missing = [n for n, v in (("AZURE_TENANT_ID", tenant), ("AZURE_CLIENT_ID", client)) if not v]
            raise ConfigError(f"{' and '.join(missing)} not set: pass the identity's ids through the job's env")
        return ClientAssertionCredential(tenant, client, github_oidc_token_provider(env), **kwargs)
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential(**kwargs)
