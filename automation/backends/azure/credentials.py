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
from collections.abc import Callable, Mapping
from typing import Any

from automation.errors import ConfigError

log = logging.getLogger(__name__)

AUDIENCE = "api://AzureADTokenExchange"  # what Entra ID's federated credentials expect
REQUEST_URL, REQUEST_TOKEN = "ACTIONS_ID_TOKEN_REQUEST_URL", "ACTIONS_ID_TOKEN_REQUEST_TOKEN"


def github_oidc_available(env: Mapping[str, str] | None = None) -> bool:
    """True in a job granted `id-token: write` (GitHub then sets both variables)."""
    env = os.environ if env is None else env
    return bool(env.get(REQUEST_URL) and env.get(REQUEST_TOKEN))


def github_oidc_token_provider(env: Mapping[str, str] | None = None, *, timeout_s: float = 30.0,
                               audience: str = AUDIENCE) -> Callable[[], str]:
    """A function returning a fresh GitHub OIDC token for `audience` on every call (each token
    is valid for minutes; the request token behind it lasts as long as the job)."""
    env = dict(os.environ if env is None else env)
    url, token = env.get(REQUEST_URL), env.get(REQUEST_TOKEN)
    if not url or not token:
        raise ConfigError(f"{REQUEST_URL} and {REQUEST_TOKEN} are not set: grant the job `id-token: write`")

    def fetch() -> str:
        import httpx

        try:
            response = httpx.get(url, params={"audience": audience}, timeout=timeout_s,
                                 headers={"Authorization": f"bearer {token}", "Accept": "application/json"})
            response.raise_for_status()
            value = response.json()["value"]
        except (httpx.HTTPError, ValueError, KeyError) as err:
            raise ConfigError(f"could not get a GitHub OIDC token: {type(err).__name__}: {err}") from err
        log.debug("fetched a fresh GitHub OIDC token for %s", audience)
        return value

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
