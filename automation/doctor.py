"""`automation doctor`: check a fork's whole setup, read-only, and print each missing piece with the
exact command that fixes it. Exit 0 when all is well, 1 when something is missing, 2 on bad input.

    GITHUB_TOKEN=$(gh auth token) automation doctor [--repo OWNER/REPO]

What it reads (GET only, nothing is written anywhere):

- GitHub: the `staging` and `production` environments (production must be a promotion gate:
  automation/environments.py), the variables of each, the OIDC subject template
  (`actions/oidc/customization/sub`), the workflows' states (a fork's scheduled workflows start
  disabled), `codeowners/errors` and the CODEOWNERS file on the default branch;
- Microsoft Graph, with `AZURE_GRAPH_TOKEN` (`az account get-access-token --resource-type ms-graph
  --query accessToken -o tsv`): both identities' federated credentials against the subjects GitHub
  presents, and their service principals' object ids;
- Azure Resource Manager, with `AZURE_ACCESS_TOKEN` (`az account get-access-token --query
  accessToken -o tsv`): the role assignments of both identities (the pull-request identity must
  have nothing on the production workspace and no write on the registry), the production
  workspace and the registry.

Without a token for Graph or ARM those checks are skipped and the exact `az` commands that show the
same are printed instead. It needs the core install only: httpx, no Azure SDK.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import quote

from automation import environments
from automation.errors import ConfigError
from automation.github import GitHubClient, GitHubError, GitHubPermissionError

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
GRAPH_URL = "https://graph.microsoft.com"
ARM_URL = "https://management.azure.com"
GITHUB_ISSUER = "https://token.actions.githubusercontent.com"
EXCHANGE_AUDIENCE = "api://AzureADTokenExchange"
ROLE_ASSIGNMENTS_API = "2022-04-01"
ML_API = "2025-12-01"

COMMON_VARIABLES = ("AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_SUBSCRIPTION_ID", "AZURE_RESOURCE_GROUP",
                    "AZURE_ML_WORKSPACE")
# Staging's settings are repository variables: the loop's plan job (no environment) reads them to
# know that Azure is configured. Production's are the production environment's own, which override
# the repository's in the promote job only; they also say where staging is (candidates are read there).
REPOSITORY = "repository"
REQUIRED_VARIABLES = {REPOSITORY: COMMON_VARIABLES,
                      environments.PRODUCTION: (*COMMON_VARIABLES, "AZURE_ML_REGISTRY", "AZURE_STAGING_ML_WORKSPACE",
                                                "AZURE_STAGING_RESOURCE_GROUP")}
# Workflows every pull request needs, and the scheduled ones the loop turns off while idle.
WORKFLOWS = ("checks.yml", "loop.yml", "promote.yml")
SCHEDULED = ("tick.yml", "endpoint-sweeper.yml")
# Paths whose owners decide what the production job installs and runs (CODEOWNERS after the catch-all).
PLATFORM_PATHS = (".github/", "Makefile", "uv.lock", "pyproject.toml", "requirements/", "CODEOWNERS")
CODEOWNERS_PATHS = (".github/CODEOWNERS", "CODEOWNERS", "docs/CODEOWNERS")  # GitHub's search order
PLACEHOLDER = re.compile(r"@ORG/[\w.-]+")
# Built-in Azure roles by id (the same in every tenant): names for the report, and those that only read.
ROLE_NAMES = {
    "acdd72a7-3385-48ef-bd42-f606fba81ae7": "Reader",
    "b24988ac-6180-42a0-ab88-20f7382dd24c": "Contributor",
    "8e3af657-a8ff-443c-a75c-2fe8c4bcb635": "Owner",
    "18d7d88d-d35e-4fb5-a5c3-7773c20a72d9": "User Access Administrator",
    "f6c7c914-8db3-469d-8ca1-694a8f32e121": "AzureML Data Scientist",
    "e503ece1-11d0-4e8e-8e2c-7a6c3bf38815": "AzureML Compute Operator",
    "1823dd4f-9b8c-4ab6-ab4e-7397a3684615": "AzureML Registry User",
    "635dd51f-9968-44d3-b7fb-6d9a6bd613ae": "AzureML Metrics Writer (preview)",
}
READ_ONLY_ROLES = frozenset({"acdd72a7-3385-48ef-bd42-f606fba81ae7"})

TOKENS_HINT = ("export AZURE_GRAPH_TOKEN=$(az account get-access-token --resource-type ms-graph --query accessToken "
               "-o tsv) AZURE_ACCESS_TOKEN=$(az account get-access-token --query accessToken -o tsv)")

OK, FAIL, WARN, SKIP = "ok", "fail", "warn", "skip"
_MARKS = {OK: "ok", FAIL: "FAIL", WARN: "warn", SKIP: "skip"}


@dataclass(frozen=True)
class Finding:
    area: str
    what: str
    status: str  # ok | fail | warn (worth knowing, not wrong) | skip (could not check: the fix says how)
    fix: str = ""


class _Http:
    """GET JSON from Graph or ARM with a bearer token; (status, body)."""

    def __init__(self, token: str, timeout_s: float = 30.0, transport: Any = None):
        import httpx

        self._client = httpx.Client(timeout=timeout_s, transport=transport, headers={
            "Authorization": f"Bearer {token}", "Accept": "application/json"})

    def get(self, url: str, params: Mapping[str, str] | None = None) -> tuple[int, Any]:
        import httpx

        try:
            response = self._client.get(url, params=params)
        except httpx.HTTPError as err:
            return 0, {"error": {"code": type(err).__name__, "message": str(err)}}
        try:
            body = response.json()
        except ValueError:
            body = {"error": {"code": str(response.status_code), "message": response.text[:300]}}
        return response.status_code, body

    def close(self) -> None:
        self._client.close()


def _error_text(body: Any) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return f"{error.get('code', '')}: {error.get('message', '')}".strip(": ")
    return str(body)[:200]


def subject_prefix(customization: Mapping[str, Any] | None, repo: Mapping[str, Any], full_name: str) -> tuple[str, str]:
    """(prefix, form) of the `sub` GitHub presents, from GET .../actions/oidc/customization/sub:
    `sub_claim_prefix` when the answer has it; else immutable (`repo:OWNER@ID/REPO@ID`) when
    `use_immutable_subject` is true, else classic (`repo:OWNER/REPO`)."""
    customization = customization or {}
    prefix = customization.get("sub_claim_prefix")
    if isinstance(prefix, str) and prefix.startswith("repo:"):
        return prefix, "immutable" if "@" in prefix else "classic"
    owner, name = full_name.split("/")
    if customization.get("use_immutable_subject") is True and repo.get("id") and (repo.get("owner") or {}).get("id"):
        return f"repo:{owner}@{repo['owner']['id']}/{name}@{repo['id']}", "immutable"
    return f"repo:{full_name}", "classic"


def expected_subject(customization: Mapping[str, Any] | None, prefix: str, environment: str,
                     repo: Mapping[str, Any]) -> str | None:
    """The `sub` of a job in `environment`: `PREFIX:environment:NAME` with the default template; with
    a custom one (use_default false), its claims in order as `key:value`; None where a claim
    depends on the run (a workflow ref, the actor) and cannot be known here."""
    customization = customization or {}
    if customization.get("use_default", True) is not False or not customization.get("include_claim_keys"):
        return f"{prefix}:environment:{environment}"
    owner = (repo.get("owner") or {})
    known = {"repo": prefix.removeprefix("repo:"), "context": f"environment:{environment}",
             "environment": environment, "repository_owner": owner.get("login"),
             "repository_owner_id": owner.get("id"), "repository": repo.get("full_name"),
             "repository_id": repo.get("id"), "repository_visibility": repo.get("visibility")}
    parts = []
    for key in customization["include_claim_keys"]:
        if key == "context":
            parts.append(known["context"])
        elif known.get(key) is not None:
            parts.append(f"{key}:{known[key]}")
        else:
            return None
    return ":".join(parts)


def _covers(scope: str, resource: str) -> bool:
    """Whether a role assignment at `scope` applies to `resource` (at it or above it); a management
    group or the root covers everything the doctor cannot place, so it counts (fail closed)."""
    scope, resource = scope.rstrip("/").lower(), resource.rstrip("/").lower()
    if not scope or scope.startswith("/providers/microsoft.management/"):
        return True
    return resource == scope or resource.startswith(scope + "/")


def _role_of(assignment: Mapping[str, Any]) -> tuple[str, str]:
    definition = str((assignment.get("properties") or {}).get("roleDefinitionId") or "")
    guid = definition.rsplit("/", 1)[-1].lower()
    return guid, ROLE_NAMES.get(guid, guid or "?")


class Doctor:
    """One run over a repository's setup; `run()` returns the findings in order."""

    def __init__(self, client: GitHubClient, *, graph_token: str | None = None, arm_token: str | None = None,
                 graph_url: str = GRAPH_URL, arm_url: str = ARM_URL, transport: Any = None):
        self.client = client
        self.repo_name = client.repository
        self.graph = _Http(graph_token, transport=transport) if graph_token else None
        self.arm = _Http(arm_token, transport=transport) if arm_token else None
        self.graph_url, self.arm_url = graph_url.rstrip("/"), arm_url.rstrip("/")
        self.findings: list[Finding] = []
        self.variables: dict[str, dict[str, str]] = {}
        self.subjects: dict[str, str | None] = {}

    def close(self) -> None:
        for http in (self.graph, self.arm):
            if http is not None:
                http.close()

    def add(self, area: str, what: str, status: str, fix: str = "") -> None:
        self.findings.append(Finding(area, what, status, fix))

    # -- the run ---------------------------------------------------------------------------------
    def run(self) -> list[Finding]:
        self.repo = environments.repository(self.client)
        self.default_branch = str(self.repo.get("default_branch") or "main")
        self.check_environments()
        self.check_variables()
        self.check_oidc()
        self.check_federated_credentials()
        self.check_roles_and_resources()
        self.check_workflows()
        self.check_codeowners()
        return self.findings

    # -- GitHub: environments and variables --------------------------------------------------------
    def check_environments(self) -> None:
        repo = self.repo_name
        production = environments.check_production(self.client, repo=self.repo)
        for problem in production.problems:
            self.add("production", problem.what, FAIL, problem.fix)
        for note in production.notes:
            self.add("production", note, WARN)
        if production.ok:
            self.add("production", f"`production` is a promotion gate: {production.gate}, only "
                                   f"`{production.default_branch}` deploys, no admin bypass", OK)
        try:
            staging = environments.get_environment(self.client, environments.STAGING)
        except GitHubPermissionError as err:
            self.add("staging", f"cannot read the `staging` environment: {err}", SKIP,
                     f"gh api repos/{repo}/environments/staging")
            return
        if staging is None:
            self.add("staging", "the `staging` environment does not exist (the loop's Azure jobs and the sweeper "
                                "run in it)", FAIL, f"gh api -X PUT repos/{repo}/environments/staging")
            return
        rules = [r.get("type") for r in staging.get("protection_rules") or [] if isinstance(r, dict)]
        reset = (f"gh api -X PUT repos/{repo}/environments/staging --input - <<'EOF'\n"
                 '{"wait_timer": 0, "reviewers": null, "deployment_branch_policy": null}\nEOF')
        if "required_reviewers" in rules:
            self.add("staging", "`staging` has required reviewers: every tick of the loop would wait for a person",
                     FAIL, reset)
        elif staging.get("deployment_branch_policy"):
            self.add("staging", "`staging` restricts deployment branches: the loop's jobs run for pull requests "
                                "(refs/pull/N/merge) and would be refused", FAIL, reset)
        else:
            self.add("staging", "`staging` exists, admits the pull requests' jobs, no reviewers", OK)

    def _environment_variables(self, name: str) -> dict[str, str] | None:
        found: dict[str, str] = {}
        page = 1
        while True:
            try:
                body = self.client.request("GET", f"/repos/{self.repo_name}/environments/{name}/variables",
                                           params={"per_page": 30, "page": page}).json()
            except GitHubError as err:
                if err.status == 404:
                    return {}
                raise
            items = body.get("variables") or []
            found.update({str(v.get("name")): str(v.get("value")) for v in items if isinstance(v, dict)})
            if len(items) < 30 or len(found) >= int(body.get("total_count") or 0):
                return found
            page += 1

    def _repository_variables(self) -> dict[str, str]:
        body = self.client.request("GET", f"/repos/{self.repo_name}/actions/variables",
                                   params={"per_page": 30}).json()
        return {str(v.get("name")): str(v.get("value")) for v in body.get("variables") or [] if isinstance(v, dict)}

    def check_variables(self) -> None:
        for name, required in REQUIRED_VARIABLES.items():
            scope = f"--env {name} " if name != REPOSITORY else ""
            where = "the repository" if name == REPOSITORY else f"`{name}`"
            try:
                values = self._repository_variables() if name == REPOSITORY else self._environment_variables(name)
            except GitHubPermissionError:
                self.add("variables", f"this token cannot read the variables of {where} (a person's token can)",
                         SKIP, f"gh variable list {scope}--repo {self.repo_name}")
                continue
            except GitHubError as err:
                self.add("variables", f"cannot read the variables of {where}: {err}", FAIL,
                         f"gh variable list {scope}--repo {self.repo_name}")
                continue
            self.variables[name] = values or {}
            if name == REPOSITORY:  # the pull-request identity's settings
                self.variables[environments.STAGING] = self.variables[name]
            missing = [v for v in required if not (values or {}).get(v)]
            for variable in missing:
                self.add("variables", f"{where} lacks the variable {variable}", FAIL,
                         f"gh variable set {variable} {scope}--repo {self.repo_name} --body 'VALUE'")
            if not missing:
                self.add("variables", f"{where} has {', '.join(required)}", OK)
        staging, production = (self.variables.get(REPOSITORY), self.variables.get(environments.PRODUCTION))
        if staging and production and production.get("AZURE_STAGING_ML_WORKSPACE") and \
                production["AZURE_STAGING_ML_WORKSPACE"] != staging.get("AZURE_ML_WORKSPACE"):
            self.add("variables", f"`production`'s AZURE_STAGING_ML_WORKSPACE ({production['AZURE_STAGING_ML_WORKSPACE']})"
                                  f" is not the staging workspace ({staging.get('AZURE_ML_WORKSPACE')})", FAIL,
                     f"gh variable set AZURE_STAGING_ML_WORKSPACE --env production --repo {self.repo_name} "
                     f"--body '{staging.get('AZURE_ML_WORKSPACE')}'")
        if staging and production:
            for variable, meaning in (("AZURE_CLIENT_ID", "identity"), ("AZURE_ML_WORKSPACE", "workspace")):
                if staging.get(variable) and staging.get(variable) == production.get(variable):
                    self.add("variables", f"`production` and `staging` share one {meaning} ({variable} "
                                          f"{staging[variable]}): production needs its own", FAIL,
                             f"gh variable set {variable} --env production --repo {self.repo_name} --body 'VALUE'")
        try:
            body = self.client.request("GET", f"/repos/{self.repo_name}/actions/variables",
                                       params={"per_page": 30}).json()
        except GitHubError:
            return
        names = {str(v.get("name")) for v in body.get("variables") or [] if isinstance(v, dict)}
        if "AZURE_CLIENT_ID_PRODUCTION" in names:
            self.add("variables", "the repository variable AZURE_CLIENT_ID_PRODUCTION is left over: every job can "
                                  "read it; the production identity is the `production` environment's "
                                  "AZURE_CLIENT_ID", WARN,
                     f"gh variable delete AZURE_CLIENT_ID_PRODUCTION --repo {self.repo_name}")

    # -- OIDC subjects and federated credentials ---------------------------------------------------
    def check_oidc(self) -> None:
        repo = self.repo_name
        read = f"gh api repos/{repo}/actions/oidc/customization/sub"
        try:
            body = self.client.request("GET", f"/repos/{repo}/actions/oidc/customization/sub").json()
        except GitHubError as err:
            body = None
            self.add("oidc", f"cannot read the OIDC subject template ({err}); assuming GitHub's default", WARN, read)
        prefix, form = subject_prefix(body, self.repo, repo)
        if body is not None and "sub_claim_prefix" not in body:
            self.add("oidc", f"GitHub's answer has no sub_claim_prefix; the prefix is taken as {form}: {prefix}",
                     WARN, read)
        for name in (environments.STAGING, environments.PRODUCTION):
            self.subjects[name] = expected_subject(body, prefix, name, self.repo)
        custom = body is not None and body.get("use_default") is False
        if custom and any(s is None for s in self.subjects.values()):
            self.add("oidc", f"a custom subject template ({', '.join(body.get('include_claim_keys') or [])}) has "
                             "claims only a run knows: compare the subject azure/login prints with the federated "
                             "credentials", WARN, read)
        else:
            shown = "; ".join(f"{k}: {v}" for k, v in self.subjects.items())
            self.add("oidc", f"{'custom' if custom else 'default'} template, {form} subjects ({shown})", OK)

    def _identity(self, environment: str) -> str | None:
        return (self.variables.get(environment) or {}).get("AZURE_CLIENT_ID") or None

    def _az_credentials(self, client_id: str, environment: str) -> str:
        resource_group = (self.variables.get(environment) or {}).get("AZURE_RESOURCE_GROUP") or "RESOURCE_GROUP"
        return (f"az ad app federated-credential list --id {client_id} "
                "--query \"[].{name:name, issuer:issuer, subject:subject, audiences:join(',', audiences)}\" -o table\n"
                f"# a user-assigned managed identity instead:\n"
                f"az identity federated-credential list --identity-name IDENTITY_NAME --resource-group "
                f"{resource_group} -o table")

    def _create_credential(self, client_id: str, environment: str, subject: str) -> str:
        parameters = json.dumps({"name": f"github-{environment}", "issuer": GITHUB_ISSUER, "subject": subject,
                                 "audiences": [EXCHANGE_AUDIENCE]})
        return f"az ad app federated-credential create --id {client_id} --parameters '{parameters}'"

    def check_federated_credentials(self) -> None:
        for environment in (environments.STAGING, environments.PRODUCTION):
            client_id, subject = self._identity(environment), self.subjects.get(environment)
            who = "pull-request" if environment == environments.STAGING else "production"
            if not client_id:
                self.add("credentials", f"no {who} identity to check (`{environment}` has no AZURE_CLIENT_ID)", SKIP)
                continue
            if self.graph is None:
                self.add("credentials", f"the {who} identity's federated credentials were not read (set "
                                        "AZURE_GRAPH_TOKEN); each must be issuer "
                                        f"{GITHUB_ISSUER}, audience {EXCHANGE_AUDIENCE}, subject "
                                        f"{subject or 'as azure/login prints it'}", SKIP,
                         self._az_credentials(client_id, environment))
                continue
            url = f"{self.graph_url}/v1.0/applications(appId='{quote(client_id)}')/federatedIdentityCredentials"
            status, body = self.graph.get(url)
            if status != 200:
                why = ("not an app registration (a managed identity's credentials live in ARM)" if status == 404
                       else f"Graph answered {status} {_error_text(body)}")
                self.add("credentials", f"cannot read the {who} identity's federated credentials: {why}", SKIP,
                         self._az_credentials(client_id, environment))
                continue
            credentials = [c for c in body.get("value") or [] if isinstance(c, dict)]
            github = [c for c in credentials if c.get("issuer") == GITHUB_ISSUER]
            matching = [c for c in github if c.get("subject") == subject
                        and EXCHANGE_AUDIENCE in (c.get("audiences") or [])]
            if subject is None:
                self.add("credentials", f"the {who} identity trusts: "
                         + (", ".join(str(c.get("subject")) for c in github) or "no GitHub subject"), WARN)
            elif not matching:
                self.add("credentials", f"the {who} identity has no federated credential for {subject} (issuer "
                                        f"{GITHUB_ISSUER}, audience {EXCHANGE_AUDIENCE}): its jobs fail with "
                                        "AADSTS700213", FAIL, self._create_credential(client_id, environment, subject))
            else:
                self.add("credentials", f"the {who} identity trusts {subject}", OK)
            foreign = [c for c in github if c.get("subject") != subject]
            flexible = [c for c in credentials if c.get("claimsMatchingExpression")]
            if environment == environments.PRODUCTION and subject is not None and (foreign or flexible):
                names = ", ".join(f"{c.get('name')} ({c.get('subject') or 'a claims expression'})"
                                  for c in foreign + flexible)
                self.add("credentials", f"the production identity also trusts other GitHub subjects: {names}; only "
                                        f"{subject} may reach production", FAIL,
                         "\n".join(f"az ad app federated-credential delete --id {client_id} "
                                   f"--federated-credential-id {c.get('id')}" for c in foreign + flexible))
            if environment == environments.STAGING and self.subjects.get(environments.PRODUCTION) in {
                    c.get("subject") for c in github}:
                self.add("credentials", "the pull-request identity trusts the production subject", FAIL,
                         f"az ad app federated-credential list --id {client_id} -o table  # then delete that one")

    # -- Azure: role assignments, the production workspace, the registry ---------------------------
    def _ids(self) -> tuple[str, str, str] | None:
        production = self.variables.get(environments.PRODUCTION) or {}
        subscription, group = production.get("AZURE_SUBSCRIPTION_ID"), production.get("AZURE_RESOURCE_GROUP")
        workspace, registry = production.get("AZURE_ML_WORKSPACE"), production.get("AZURE_ML_REGISTRY")
        if not (subscription and group and workspace and registry):
            return None
        registry_group = production.get("AZURE_ML_REGISTRY_RESOURCE_GROUP") or group
        base = f"/subscriptions/{subscription}/resourceGroups"
        provider = "providers/Microsoft.MachineLearningServices"
        return (subscription, f"{base}/{group}/{provider}/workspaces/{workspace}",
                f"{base}/{registry_group}/{provider}/registries/{registry}")

    def _principal(self, client_id: str) -> str | None:
        if self.graph is None:
            return None
        status, body = self.graph.get(f"{self.graph_url}/v1.0/servicePrincipals(appId='{quote(client_id)}')")
        return str(body.get("id")) if status == 200 and isinstance(body, dict) and body.get("id") else None

    def check_roles_and_resources(self) -> None:
        ids = self._ids()
        pr_client, prod_client = self._identity(environments.STAGING), self._identity(environments.PRODUCTION)
        if ids is None:
            self.add("azure", "the production workspace and registry are not named (variables above): role "
                              "assignments and the registry not checked", SKIP)
            return
        subscription, workspace_id, registry_id = ids
        self._check_resource("the production workspace", workspace_id,
                             f"az ml workspace create --name {workspace_id.rsplit('/', 1)[-1]} --resource-group "
                             f"{workspace_id.split('/')[4]}")
        self._check_resource("the registry", registry_id,
                             f"az ml registry create --resource-group {registry_id.split('/')[4]} --file registry.yml"
                             f"   # registry.yml: name: {registry_id.rsplit('/', 1)[-1]}, location, "
                             "replication_locations")
        for client_id, who in ((pr_client, "pull-request"), (prod_client, "production")):
            if not client_id:
                continue
            listing = f"az role assignment list --assignee {client_id} --all -o table"
            if self.arm is None or self.graph is None:
                need = " and ".join(n for n, t in (("AZURE_GRAPH_TOKEN", self.graph), ("AZURE_ACCESS_TOKEN", self.arm))
                                    if t is None)
                self.add("roles", f"the {who} identity's role assignments were not read (set {need})"
                         + (": it must have none on the production workspace or the registry"
                            if who == "pull-request" else ""), SKIP, listing)
                continue
            principal = self._principal(client_id)
            if principal is None:
                self.add("roles", f"no service principal found for the {who} identity {client_id}", FAIL,
                         f"az ad sp create --id {client_id}")
                continue
            status, body = self.arm.get(
                f"{self.arm_url}/subscriptions/{subscription}/providers/Microsoft.Authorization/roleAssignments",
                {"api-version": ROLE_ASSIGNMENTS_API, "$filter": f"assignedTo('{principal}')"})
            if status != 200:
                self.add("roles", f"cannot list the {who} identity's role assignments: ARM answered {status} "
                                  f"{_error_text(body)}", SKIP, listing)
                continue
            assignments = [a for a in body.get("value") or [] if isinstance(a, dict)]
            if who == "pull-request":
                self._pull_request_roles(client_id, assignments, workspace_id, registry_id)
            else:
                self._production_roles(client_id, assignments, workspace_id, registry_id)

    def _check_resource(self, what: str, resource_id: str, create: str) -> None:
        if self.arm is None:
            self.add("azure", f"{what} was not read (set AZURE_ACCESS_TOKEN)", SKIP,
                     f"az resource show --ids {resource_id} --query id -o tsv")
            return
        status, body = self.arm.get(f"{self.arm_url}{resource_id}", {"api-version": ML_API})
        if status == 200:
            self.add("azure", f"{what} exists: {resource_id}", OK)
        elif status == 404:
            self.add("azure", f"{what} does not exist: {resource_id}", FAIL, create)
        else:
            self.add("azure", f"cannot read {what}: ARM answered {status} {_error_text(body)}", SKIP,
                     f"az resource show --ids {resource_id}")

    def _pull_request_roles(self, client_id: str, assignments: list[dict[str, Any]], workspace_id: str,
                            registry_id: str) -> None:
        bad = []
        for assignment in assignments:
            scope = str((assignment.get("properties") or {}).get("scope") or "")
            guid, name = _role_of(assignment)
            if _covers(scope, workspace_id):
                bad.append((assignment, f"{name} at {scope} reaches the production workspace"))
            elif _covers(scope, registry_id) and guid not in READ_ONLY_ROLES:
                bad.append((assignment, f"{name} at {scope} may write to the registry"))
        for assignment, why in bad:
            self.add("roles", f"the pull-request identity holds {why}: any writer's pull request could change "
                              "production", FAIL,
                     f"az role assignment delete --ids {assignment.get('id')}")
        if not bad:
            self.add("roles", "the pull-request identity has no role on the production workspace and cannot "
                              "write to the registry", OK)

    def _production_roles(self, client_id: str, assignments: list[dict[str, Any]], workspace_id: str,
                          registry_id: str) -> None:
        scopes = [str((a.get("properties") or {}).get("scope") or "") for a in assignments]
        for resource, what, role in ((workspace_id, "the production workspace", "AzureML Data Scientist"),
                                     (registry_id, "the registry", "AzureML Registry User")):
            if any(_covers(scope, resource) for scope in scopes):
                self.add("roles", f"the production identity has a role on {what}", OK)
            else:
                self.add("roles", f"the production identity has no role on {what}: promotion would fail", FAIL,
                         f"az role assignment create --assignee {client_id} --role \"{role}\" --scope {resource}")

    # -- workflows and CODEOWNERS ----------------------------------------------------------------------
    def check_workflows(self) -> None:
        repo = self.repo_name
        try:
            listed = self.client.request("GET", f"/repos/{repo}/actions/workflows", params={"per_page": 100}).json()
        except GitHubError as err:
            self.add("workflows", f"cannot list the workflows ({err})", SKIP, f"gh workflow list --all --repo {repo}")
            return
        by_file = {str(w.get("path", "")).rsplit("/", 1)[-1]: w for w in listed.get("workflows") or []}
        for file in (*WORKFLOWS, *SCHEDULED):
            workflow = by_file.get(file)
            enable = f"gh workflow enable {file} --repo {repo}"
            if workflow is None:
                self.add("workflows", f"{file} is not known to GitHub: enable Actions for the repository", FAIL,
                         f"https://github.com/{repo}/actions")
                continue
            state = workflow.get("state")
            if state == "active":
                self.add("workflows", f"{file} is enabled", OK)
            elif file in SCHEDULED and state == "disabled_manually":
                self.add("workflows", f"{file} is disabled: the loop turns it off while nothing is in flight and "
                                      "on again with the next Azure submission; nothing to do unless a job is "
                                      "running", WARN, enable)
            else:
                why = {"disabled_fork": "a fork's workflows start disabled",
                       "disabled_inactivity": "GitHub disabled it after 60 days without activity"}.get(
                    str(state), f"state {state}")
                self.add("workflows", f"{file} is disabled ({why})", FAIL, enable)

    def check_codeowners(self) -> None:
        repo = self.repo_name
        try:
            body = self.client.request("GET", f"/repos/{repo}/codeowners/errors",
                                       params={"ref": self.default_branch}).json()
        except GitHubError as err:
            if err.status == 404:
                self.add("codeowners", "there is no CODEOWNERS file on the default branch", FAIL,
                         f"git show upstream/{self.default_branch}:CODEOWNERS > CODEOWNERS   # this template's "
                         "(git remote add upstream URL-OF-THE-TEMPLATE), then replace @ORG/ with your organisation")
            else:
                self.add("codeowners", f"cannot read codeowners/errors ({err})", SKIP,
                         f"gh api repos/{repo}/codeowners/errors")
            return
        errors = [e for e in body.get("errors") or [] if isinstance(e, dict)]
        for error in errors:
            self.add("codeowners", f"{error.get('path', 'CODEOWNERS')}:{error.get('line')}: {error.get('kind')}: "
                                   f"{str(error.get('source', '')).strip()}", FAIL,
                     str(error.get("suggestion") or error.get("message") or "").strip())
        text, path = None, "CODEOWNERS"
        for candidate in CODEOWNERS_PATHS:
            try:
                text = self.client.file_text(candidate, self.default_branch)
            except GitHubError:
                text = None
            if text is not None:
                path = candidate
                break
        if text is None:
            if not errors:
                self.add("codeowners", "CODEOWNERS has no errors", OK)
            return
        for problem, fix in codeowners_problems(text, path):
            self.add("codeowners", problem, FAIL, fix)
        if not errors and not codeowners_problems(text, path):
            self.add("codeowners", f"{path}: a catch-all owner first, the build and workflow files owned, "
                                   "no errors", OK)


def codeowners_problems(text: str, path: str = "CODEOWNERS") -> list[tuple[str, str]]:
    """What a CODEOWNERS file lacks: real owners instead of `@ORG/...`, a catch-all (`*`) first (the
    last matching line wins, so it must come first), and a line for each of PLATFORM_PATHS."""
    rules = []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = re.sub(r"(?<!\\)#.*", "", line).strip()  # a comment, unless escaped (`\#file`)
        if stripped:
            pattern, *owners = stripped.split()
            rules.append((number, pattern, owners))
    problems = []
    placeholders = sorted({owner for _, _, owners in rules for owner in owners if PLACEHOLDER.fullmatch(owner)})
    if placeholders:
        problems.append((f"{path} still names placeholder owners ({', '.join(placeholders)}): GitHub ignores them, "
                         "so nobody's review is required",
                         f"sed -i 's#@ORG/#@YOUR-ORG/#g' {path}   # then create the teams, give them write access, "
                         "and turn on *Require review from Code Owners* for the default branch"))
    if not rules or rules[0][1] != "*":
        problems.append((f"{path} has no catch-all owner (`* @OWNERS`) as its first rule: unlisted files need "
                         "nobody's review", f"sed -i '1i * @YOUR-ORG/mlops-platform' {path}"))
    named = {pattern.strip("/") for _, pattern, owners in rules if owners}
    for wanted in PLATFORM_PATHS:
        if wanted.strip("/") not in named:
            problems.append((f"{path} does not name an owner for {wanted}, which decides what the production job "
                             "installs or runs", f"echo '/{wanted} @YOUR-ORG/mlops-platform' >> {path}"))
    return problems


# ---------------------------------------------------------------------------------------------
# Output and the CLI


def failed(findings: Iterable[Finding]) -> bool:
    return any(f.status == FAIL for f in findings)


def render(findings: list[Finding], repository: str, *, file=None) -> None:
    """A table of every check, then each fix, numbered, printed as is (so it can be copied)."""
    import sys

    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    file = file or sys.stdout
    console = Console(file=file, highlight=False, soft_wrap=False, width=max(Console(file=file).width, 100))
    table = Table(title=f"automation doctor: {repository}", title_justify="left", show_lines=False)
    table.add_column("", no_wrap=True)
    table.add_column("area", no_wrap=True)
    table.add_column("check")
    table.add_column("fix", no_wrap=True)
    numbered: list[tuple[int, Finding]] = []
    for finding in findings:
        number = ""
        if finding.fix and finding.status != OK:
            numbered.append((len(numbered) + 1, finding))
            number = f"[{len(numbered)}]"
        style = {OK: "green", FAIL: "bold red", WARN: "yellow", SKIP: "cyan"}[finding.status]
        table.add_row(Text(_MARKS[finding.status], style=style), Text(finding.area), Text(finding.what),
                      Text(number))
    console.print(table)
    if numbered:
        print("\nFixes (exact commands; replace the words in CAPITALS):", file=file)
        for number, finding in numbered:
            print(f"\n[{number}] {finding.what}", file=file)
            for line in finding.fix.splitlines():
                print(f"    {line}", file=file)
    if any(f.status == SKIP and "AZURE_" in f.what and "TOKEN" in f.what for f in findings):
        print(f"\nTo run the Azure checks too (read-only tokens of your own az login):\n    {TOKENS_HINT}", file=file)
    counts = {s: sum(1 for f in findings if f.status == s) for s in (OK, FAIL, WARN, SKIP)}
    print(f"\n{counts[OK]} ok, {counts[FAIL]} missing, {counts[WARN]} to know, {counts[SKIP]} not checked "
          "(the commands above show them)" + ("" if counts[FAIL] else ": the setup is complete"), file=file)


def diagnose(client: GitHubClient, *, graph_token: str | None = None, arm_token: str | None = None,
             graph_url: str = GRAPH_URL, arm_url: str = ARM_URL, transport: Any = None) -> list[Finding]:
    """Every check, in order (read-only)."""
    doctor = Doctor(client, graph_token=graph_token, arm_token=arm_token, graph_url=graph_url, arm_url=arm_url,
                    transport=transport)
    try:
        return doctor.run()
    finally:
        doctor.close()


def cmd_doctor(args: argparse.Namespace) -> int:
    env = os.environ
    token = env.get("GITHUB_TOKEN") or env.get("GH_TOKEN")
    repository = args.repo or env.get("GITHUB_REPOSITORY")
    if not token or not repository:
        missing = [n for n, v in (("GITHUB_TOKEN (or GH_TOKEN)", token), ("--repo OWNER/REPO", repository)) if not v]
        print(f"error: {' and '.join(missing)} needed: GITHUB_TOKEN=$(gh auth token) automation doctor "
              "--repo OWNER/REPO", flush=True)
        return EXIT_BAD_INPUT
    try:
        client = GitHubClient(token, repository, env.get("GITHUB_API_URL") or "https://api.github.com",
                              max_attempts=3)
    except ConfigError as err:
        print(f"error: {err}", flush=True)
        return EXIT_BAD_INPUT
    with client:
        findings = diagnose(client, graph_token=env.get("AZURE_GRAPH_TOKEN") or None,
                            arm_token=env.get("AZURE_ACCESS_TOKEN") or None, graph_url=GRAPH_URL, arm_url=ARM_URL)
    if args.json:
        print(json.dumps([asdict(f) for f in findings], indent=2))
    else:
        render(findings, repository)
    return EXIT_FAILED if failed(findings) else EXIT_OK


def add_command(commands) -> None:
    p = commands.add_parser("doctor", help="check this fork's setup (environments, variables, OIDC subjects, "
                                           "identities and roles, workflows, CODEOWNERS), read-only, with the "
                                           "command that fixes each missing piece")
    p.add_argument("--repo", help="OWNER/REPO (default: $GITHUB_REPOSITORY)")
    p.add_argument("--json", action="store_true", help="the findings as JSON instead of the table")
    p.set_defaults(handler=cmd_doctor)
