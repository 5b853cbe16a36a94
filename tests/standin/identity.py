"""GitHub's OIDC token service and Entra ID's token endpoint, as strict as the real ones.

- GitHub (`ACTIONS_ID_TOKEN_REQUEST_URL`, as actions/toolkit's `getIDToken` calls it,
  packages/core/src/oidc-utils.ts): GET with `Authorization: Bearer $ACTIONS_ID_TOKEN_REQUEST_TOKEN`;
  the URL the runner gives ends in `?api-version=2.0` and the client adds `&audience=...`. Without
  `api-version=2.0` the service answers 400, as Azure DevOps' distributed-task APIs do.
- Entra ID (login.microsoftonline.com/<tenant>/oauth2/v2.0/token), the client-credentials grant with a
  federated client assertion: `client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer`,
  the assertion a GitHub token this service issued, unexpired, for audience
  `api://AzureADTokenExchange`, whose subject is the identity's federated subject; the scope one
  resource's `/.default`. Errors are Entra's AADSTS bodies (400 invalid_client / invalid_scope ...).
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from tests.standin.proxy import Reply, Request

ACTIONS_HOST = "pipelinesghubeus21.actions.githubusercontent.com"
ACTIONS_PATH = "/xYz0AbC/00000000-0000-0000-0000-000000000000/_apis/distributedtask/hubs/Actions/plans/p1/jobs/j1/idtoken"
REQUEST_TOKEN = "ghs_standinIdTokenRequestToken00000000000"  # a job in the `staging` environment
PRODUCTION_REQUEST_TOKEN = "ghs_standinIdTokenRequestTokenProduction"  # the promote job (`production`)
SUBJECT_PREFIX = "repo:acme-ml/chat-finetune:environment:"
LOGIN_HOST = "login.microsoftonline.com"
EXCHANGE_AUDIENCE = "api://AzureADTokenExchange"
TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ARM_RESOURCE = "https://management.azure.com"
ML_RESOURCE = "https://ml.azure.com"


def _b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def jwt(claims: dict[str, Any]) -> str:
    """A JWT-shaped token (header.claims.signature); the stand-in knows what it issued."""
    return f"{_b64({'alg': 'RS256', 'typ': 'JWT', 'kid': 'standin'})}.{_b64(claims)}.{secrets.token_urlsafe(16)}"


def claims_of(token: str) -> dict[str, Any]:
    part = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def entra_error(status: int, error: str, code: int, description: str) -> Reply:
    return Reply(status, {"error": error, "error_description": f"AADSTS{code}: {description}",
                          "error_codes": [code], "timestamp": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
                          "trace_id": secrets.token_hex(8), "correlation_id": secrets.token_hex(8)})


@dataclass
class Identity:
    """An app registration with one federated credential (issuer GitHub, one subject)."""
    client_id: str
    subject: str  # its role assignments are names.ROLES[client_id]


@dataclass
class Identities:
    clock: Any  # () -> seconds since the epoch (the stand-in's clock)
    subject: str = "repo:acme-ml/chat-finetune:environment:staging"  # what this job's OIDC token says
    apps: dict[str, Identity] = field(default_factory=dict)
    github_tokens: dict[str, dict[str, Any]] = field(default_factory=dict)
    access_tokens: dict[str, dict[str, Any]] = field(default_factory=dict)
    oidc_requests: list[str] = field(default_factory=list)  # the query strings GitHub was asked with
    token_requests: list[dict[str, str]] = field(default_factory=list)
    access_token_lifetime_s: int = 3599
    oidc_lifetime_s: int = 300

    # -- GitHub's ID-token service --------------------------------------------------------------
    def github(self, req: Request) -> Reply:
        query = "&".join(f"{k}={v[0]}" for k, v in req.query.items())
        self.oidc_requests.append(query)
        if req.path != ACTIONS_PATH or req.method != "GET":
            return Reply(404, {"$id": "1", "message": "Not found", "typeKey": "NotFoundException"})
        if req.bearer not in (REQUEST_TOKEN, PRODUCTION_REQUEST_TOKEN):
            return Reply(401, {"$id": "1", "message": "TF400813: The user is not authorized to access this resource.",
                               "typeKey": "UnauthorizedRequestException"})
        if req.arg("api-version") != "2.0":
            return Reply(400, {"$id": "1", "innerException": None,
                               "message": "No api-version was supplied for the \"GET\" request. The supported "
                                          "api-versions are '2.0'.",
                               "typeName": "Microsoft.VisualStudio.Services.WebApi.VssVersionNotSpecifiedException",
                               "typeKey": "VssVersionNotSpecifiedException", "errorCode": 0, "eventId": 3000})
        audience = req.arg("audience")
        if not audience:
            return Reply(400, {"$id": "1", "message": "audience is required", "typeKey": "ArgumentException"})
        now = int(self.clock())
        subject = self.subject if req.bearer == REQUEST_TOKEN else SUBJECT_PREFIX + "production"
        token = jwt({"iss": "https://token.actions.githubusercontent.com", "aud": audience, "sub": subject,
                     "repository": "acme-ml/chat-finetune", "environment": subject.rsplit(":", 1)[-1],
                     "iat": now, "nbf": now, "exp": now + self.oidc_lifetime_s, "jti": secrets.token_hex(8)})
        self.github_tokens[token] = claims_of(token)
        return Reply(200, {"count": len(token), "value": token})

    # -- Entra ID -------------------------------------------------------------------------------
    def login(self, req: Request) -> Reply:
        parts = req.path.strip("/").split("/")
        if len(parts) != 4 or parts[1:] != ["oauth2", "v2.0", "token"] or req.method != "POST":
            return Reply(404, "Not Found")
        tenant = parts[0]
        if tenant != TENANT:
            return entra_error(400, "invalid_tenant", 90002, f"Tenant '{tenant}' not found.")
        if not req.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            return entra_error(400, "invalid_request", 900144, "The request body must contain the following "
                               "parameter: 'grant_type'.")
        form = {k: v[0] for k, v in parse_qs(req.body.decode()).items()}
        self.token_requests.append(form)
        if form.get("grant_type") != "client_credentials":
            return entra_error(400, "unsupported_grant_type", 70003, "The app requested an unsupported grant type.")
        app = self.apps.get(form.get("client_id", ""))
        if app is None:
            return entra_error(400, "unauthorized_client", 700016, f"Application with identifier "
                               f"'{form.get('client_id')}' was not found in the directory.")
        if form.get("client_assertion_type") != ASSERTION_TYPE or not form.get("client_assertion"):
            return entra_error(401, "invalid_client", 7000218, "The request body must contain the following "
                               "parameter: 'client_assertion' or 'client_secret'.")
        claims = self.github_tokens.get(form["client_assertion"])
        if claims is None:
            return entra_error(401, "invalid_client", 700211, "No matching federated identity record found for "
                               "presented assertion issuer.")
        if claims["aud"] != EXCHANGE_AUDIENCE:
            return entra_error(401, "invalid_client", 700212, f"No matching federated identity record found for "
                               f"presented assertion audience '{claims['aud']}'.")
        if claims["exp"] <= self.clock():
            return entra_error(401, "invalid_client", 700024, "Client assertion is not within its valid time range.")
        if claims["sub"] != app.subject:
            return entra_error(401, "invalid_client", 700213, f"No matching federated identity record found for "
                               f"presented assertion subject '{claims['sub']}'.")
        scope = form.get("scope", "")
        resources = [s.removesuffix("/.default") for s in scope.split() if s.endswith("/.default")]
        if len(resources) != 1 or resources[0].rstrip("/") not in (ARM_RESOURCE, ML_RESOURCE):
            return entra_error(400, "invalid_scope", 70011, f"The provided value for scope {scope} is not valid.")
        now = int(self.clock())
        token = jwt({"aud": resources[0].rstrip("/"), "iss": f"https://sts.windows.net/{TENANT}/", "tid": TENANT,
                     "appid": app.client_id, "oid": app.client_id, "iat": now, "nbf": now,
                     "exp": now + self.access_token_lifetime_s})
        self.access_tokens[token] = claims_of(token)
        return Reply(200, {"token_type": "Bearer", "expires_in": self.access_token_lifetime_s,
                           "ext_expires_in": self.access_token_lifetime_s, "access_token": token})

    def caller(self, req: Request, *audiences: str) -> tuple[Identity | None, Reply | None]:
        """The identity behind a bearer token for one of `audiences` (default ARM), or the ARM error
        the service answers."""
        audiences = audiences or (ARM_RESOURCE,)
        token = req.bearer
        if token is None:
            return None, arm_error(401, "AuthenticationFailed", "Authentication failed. The 'Authorization' "
                                   "header is missing.")
        claims = self.access_tokens.get(token)
        if claims is None:
            return None, arm_error(401, "InvalidAuthenticationToken", "The access token is invalid.")
        if claims["exp"] <= self.clock():
            return None, arm_error(401, "ExpiredAuthenticationToken", "The access token expiry UTC time is "
                                   "earlier than current UTC time.")
        if claims["aud"].rstrip("/") not in audiences:
            return None, arm_error(401, "InvalidAuthenticationTokenAudience", f"The access token has been "
                                   f"obtained for wrong audience or resource '{claims['aud']}'. It should "
                                   f"exactly match with one of the allowed audiences "
                                   f"{', '.join(repr(a + '/') for a in audiences)}.")
        return self.apps[claims["appid"]], None


def arm_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Reply:
    """ARM's error body (ErrorResponse in common-types/v5/types.json)."""
    return Reply(status, {"error": {"code": code, "message": message}},
                 {"x-ms-request-id": secrets.token_hex(16), **(headers or {})})
