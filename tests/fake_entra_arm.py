"""A small stand-in for the two Azure APIs `automation doctor` reads, on 127.0.0.1:

- Microsoft Graph v1.0: `applications(appId='...')/federatedIdentityCredentials` and
  `servicePrincipals(appId='...')`, with Graph's error bodies (404 Request_ResourceNotFound,
  401 InvalidAuthenticationToken for a token of another audience);
- Azure Resource Manager: role assignments listed with `$filter=assignedTo('{objectId}')`
  (api-version 2022-04-01) at a subscription, and GET of a workspace or a registry
  (Microsoft.MachineLearningServices, 404 ResourceNotFound when absent).

A Graph token and an ARM token are different strings (`GRAPH_TOKEN`, `ARM_TOKEN`), as Entra issues
one per resource. The world is the README's: a pull-request identity and a production identity
(tests/standin/names.py's client ids), each an app registration with its service principal.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from tests.loopback import LoopbackServer

GRAPH_TOKEN = "eyJ0eXAiOiJKV1QiLCJub25jZSI6ImdyYXBoIn0.graph.standin"
ARM_TOKEN = "eyJ0eXAiOiJKV1QiLCJhdWQiOiJhcm0ifQ.arm.standin"
GITHUB_ISSUER = "https://token.actions.githubusercontent.com"
AUDIENCE = "api://AzureADTokenExchange"
ROLE = {  # built-in role definition ids
    "Reader": "acdd72a7-3385-48ef-bd42-f606fba81ae7",
    "Contributor": "b24988ac-6180-42a0-ab88-20f7382dd24c",
    "AzureML Data Scientist": "f6c7c914-8db3-469d-8ca1-694a8f32e121",
    "AzureML Registry User": "1823dd4f-9b8c-4ab6-ab4e-7397a3684615",
}


@dataclass
class App:
    app_id: str
    object_id: str  # the application object
    principal_id: str  # its service principal's object id (what role assignments name)
    credentials: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class FakeEntraArm:
    apps: dict[str, App] = field(default_factory=dict)
    assignments: list[dict[str, Any]] = field(default_factory=list)
    resources: set[str] = field(default_factory=set)  # ARM ids that exist (lower case)
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path)
    url: str = ""

    def __enter__(self) -> FakeEntraArm:
        fake = self

        class Handler(_Handler):
            azure = fake

        self._loopback = LoopbackServer(Handler)
        self.url = self._loopback.url
        return self

    def __exit__(self, *exc: object) -> None:
        self._loopback.stop()

    # -- control --------------------------------------------------------------------------------
    def add_app(self, app_id: str, *subjects: str) -> App:
        app = App(app_id, str(uuid.uuid4()), str(uuid.uuid4()))
        for i, subject in enumerate(subjects):
            self.add_credential(app, subject, name=f"github-{i}")
        self.apps[app_id] = app
        return app

    def add_credential(self, app: App, subject: str, *, name: str = "github", audience: str = AUDIENCE) -> None:
        app.credentials.append({"id": str(uuid.uuid4()), "name": name, "issuer": GITHUB_ISSUER, "subject": subject,
                                "description": None, "audiences": [audience]})

    def assign(self, app: App, role: str, scope: str) -> dict[str, Any]:
        name = str(uuid.uuid4())
        subscription = scope.split("/")[2] if scope.startswith("/subscriptions/") else ""
        assignment = {
            "properties": {
                "roleDefinitionId": f"/subscriptions/{subscription}/providers/Microsoft.Authorization/"
                                    f"roleDefinitions/{ROLE[role]}",
                "principalId": app.principal_id, "principalType": "ServicePrincipal", "scope": scope,
                "condition": None, "conditionVersion": None, "createdOn": "2026-11-30T09:12:43.5046130Z",
                "updatedOn": "2026-11-30T09:12:43.5046130Z", "createdBy": str(uuid.uuid4()),
                "updatedBy": str(uuid.uuid4()), "delegatedManagedIdentityResourceId": None, "description": None},
            "id": f"{scope}/providers/Microsoft.Authorization/roleAssignments/{name}",
            "type": "Microsoft.Authorization/roleAssignments", "name": name,
        }
        self.assignments.append(assignment)
        return assignment

    def add_resource(self, resource_id: str) -> None:
        self.resources.add(resource_id.lower())


class _Handler(BaseHTTPRequestHandler):
    azure: FakeEntraArm
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _graph_error(self, status: int, code: str, message: str) -> None:
        self._send(status, {"error": {"code": code, "message": message, "innerError": {
            "date": "2026-12-06T04:00:00", "request-id": str(uuid.uuid4()), "client-request-id": str(uuid.uuid4())}}})

    def _arm_error(self, status: int, code: str, message: str) -> None:
        self._send(status, {"error": {"code": code, "message": message}})

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        path, query = unquote(parts.path), parse_qs(parts.query)
        self.azure.requests.append(("GET", path))
        token = self.headers.get("Authorization", "").removeprefix("Bearer ")
        if path.startswith("/v1.0/"):
            if token != GRAPH_TOKEN:
                self._graph_error(401, "InvalidAuthenticationToken", "Access token validation failure. "
                                  "Invalid audience.")
            else:
                self._graph(path)
        elif path.startswith("/subscriptions/"):
            if token != ARM_TOKEN:
                self._arm_error(401, "InvalidAuthenticationToken", "The access token is invalid.")
            elif "api-version" not in query:
                self._arm_error(400, "MissingApiVersionParameter",
                                "The api-version query parameter (?api-version=) is required for all requests.")
            else:
                self._arm(path, query)
        else:
            self._arm_error(404, "NotFound", "Not found")

    def _graph(self, path: str) -> None:
        azure = self.azure
        if match := re.fullmatch(r"/v1\.0/applications\(appId='([^']+)'\)/federatedIdentityCredentials", path):
            app = azure.apps.get(match.group(1))
            if app is None:
                self._graph_error(404, "Request_ResourceNotFound", f"Resource '{match.group(1)}' does not exist or "
                                  "one of its queried reference-property objects are not present.")
            else:
                self._send(200, {"@odata.context": "https://graph.microsoft.com/v1.0/$metadata#applications("
                                 f"'{app.object_id}')/federatedIdentityCredentials", "value": app.credentials})
        elif match := re.fullmatch(r"/v1\.0/servicePrincipals\(appId='([^']+)'\)", path):
            app = azure.apps.get(match.group(1))
            if app is None:
                self._graph_error(404, "Request_ResourceNotFound", f"Resource '{match.group(1)}' does not exist or "
                                  "one of its queried reference-property objects are not present.")
            else:
                self._send(200, {"@odata.context": "https://graph.microsoft.com/v1.0/$metadata#servicePrincipals/"
                                 "$entity", "id": app.principal_id, "appId": app.app_id,
                                 "displayName": f"github-{app.app_id[:8]}", "servicePrincipalType": "Application",
                                 "accountEnabled": True})
        else:
            self._graph_error(400, "BadRequest", f"Resource not found for the segment '{path.split('/')[2]}'.")

    def _arm(self, path: str, query: dict[str, list[str]]) -> None:
        azure = self.azure
        if match := re.fullmatch(r"/subscriptions/([^/]+)/providers/Microsoft\.Authorization/roleAssignments", path):
            if query["api-version"][0] < "2022-04-01" and "$filter" in query:
                self._arm_error(400, "UnsupportedQuery", "assignedTo() needs api-version 2022-04-01 or later")
                return
            wanted = re.fullmatch(r"assignedTo\('([^']+)'\)", query.get("$filter", [""])[0])
            subscription = f"/subscriptions/{match.group(1)}".lower()
            found = [a for a in azure.assignments
                     if (wanted is None or a["properties"]["principalId"] == wanted.group(1))
                     and (a["properties"]["scope"].lower().startswith(subscription)
                          or a["properties"]["scope"].startswith("/providers/Microsoft.Management/"))]
            self._send(200, {"value": found})
        elif re.fullmatch(r"/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.MachineLearningServices/"
                          r"(workspaces|registries)/[^/]+", path, re.IGNORECASE):
            kind, name = path.split("/")[-2:]
            if path.lower() in azure.resources:
                self._send(200, {"id": path, "name": name, "type": f"Microsoft.MachineLearningServices/{kind}",
                                 "location": "westeurope", "properties": {"provisioningState": "Succeeded"}})
            else:
                group = path.split("/")[4]
                self._arm_error(404, "ResourceNotFound", f"The Resource 'Microsoft.MachineLearningServices/{kind}/"
                                f"{name}' under resource group '{group}' was not found. For more details please go "
                                "to https://aka.ms/ARMResourceNotFoundFix")
        else:
            self._arm_error(404, "InvalidResourceType", "The resource type could not be found.")
