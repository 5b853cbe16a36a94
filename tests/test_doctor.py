"""`automation doctor` against the fake GitHub and the Graph/ARM stand-in: a fork set up as the
README asks passes; each missing piece fails and prints the command that fixes it; without Azure
tokens the Azure checks are skipped with the `az` commands that show the same; nothing is written."""

from __future__ import annotations

import io
import json

import pytest

from automation import cli, doctor
from automation.github import GitHubClient
from tests.fake_entra_arm import ARM_TOKEN, GRAPH_TOKEN, FakeEntraArm
from tests.fake_github import USER_TOKEN, WRITE_TOKEN, FakeGitHub
from tests.fork_setup import (
    CODEOWNERS,
    PREFIX,
    PRODUCTION_RG,
    PRODUCTION_WORKSPACE,
    REGISTRY,
    REPO,
    STAGING_VARIABLES,
    configure,
    production_gate,
)
from tests.standin.names import PRODUCTION_CLIENT, STAGING_CLIENT, SUBSCRIPTION


@pytest.fixture
def fork():
    with FakeGitHub() as github, FakeEntraArm() as azure:
        yield configure(github, azure)


def run(fork, token: str = USER_TOKEN, *, azure: bool = True) -> list[doctor.Finding]:
    client = GitHubClient(token, REPO, fork.github.url, max_attempts=1)
    with client:
        return doctor.diagnose(client, graph_token=GRAPH_TOKEN if azure else None,
                               arm_token=ARM_TOKEN if azure else None, graph_url=fork.azure.url,
                               arm_url=fork.azure.url)


def shown(findings) -> str:
    out = io.StringIO()
    doctor.render(findings, REPO, file=out)
    return out.getvalue()


def failures(findings) -> list[doctor.Finding]:
    return [f for f in findings if f.status == doctor.FAIL]


def test_a_fully_configured_fork_passes(fork):
    findings = run(fork)
    assert not failures(findings), shown(findings)
    assert not [f for f in findings if f.status == doctor.SKIP], shown(findings)
    areas = {f.area for f in findings if f.status == doctor.OK}
    assert areas == {"production", "staging", "variables", "oidc", "credentials", "azure", "roles", "workflows",
                     "codeowners"}
    assert "the setup is complete" in shown(findings)
    assert all(c.method == "GET" for c in fork.github.requests)  # read-only
    assert all(method == "GET" for method, _ in fork.azure.requests)


def test_the_cli_exits_0_then_1(fork, monkeypatch, capsys):
    monkeypatch.setenv("GITHUB_TOKEN", USER_TOKEN)
    monkeypatch.setenv("GITHUB_API_URL", fork.github.url)
    monkeypatch.setenv("AZURE_GRAPH_TOKEN", GRAPH_TOKEN)
    monkeypatch.setenv("AZURE_ACCESS_TOKEN", ARM_TOKEN)
    monkeypatch.setattr(doctor, "GRAPH_URL", fork.azure.url)
    monkeypatch.setattr(doctor, "ARM_URL", fork.azure.url)
    assert cli.main(["doctor", "--repo", REPO]) == 0
    assert "automation doctor: acme-ml/chat-finetune" in capsys.readouterr().out
    fork.github.environments.pop((REPO, "staging"))
    assert cli.main(["doctor", "--repo", REPO, "--json"]) == 1
    found = json.loads(capsys.readouterr().out)
    assert {"area": "staging", "status": "fail", "fix": f"gh api -X PUT repos/{REPO}/environments/staging",
            "what": found[next(i for i, f in enumerate(found) if f["area"] == "staging")]["what"]} in found


def test_bad_input_exits_2(monkeypatch, capsys):
    monkeypatch.delenv("GITHUB_TOKEN", raising=False)
    monkeypatch.delenv("GH_TOKEN", raising=False)
    assert cli.main(["doctor", "--repo", REPO]) == 2
    monkeypatch.setenv("GITHUB_TOKEN", "x")
    assert cli.main(["doctor", "--repo", "not a repo"]) == 2


def _staging_client_for_production(fork):
    fork.github.environments[(REPO, "production")]["_variables"]["AZURE_CLIENT_ID"] = STAGING_CLIENT


def _no_credential(fork):
    fork.production_app.credentials.clear()


def _pr_role_on_production(fork):
    fork.azure.assign(fork.staging_app, "AzureML Data Scientist", PRODUCTION_WORKSPACE)


def _pr_contributor_on_subscription(fork):
    fork.azure.assign(fork.staging_app, "Contributor", f"/subscriptions/{SUBSCRIPTION}")


def _pr_writes_registry(fork):
    fork.azure.assign(fork.staging_app, "AzureML Registry User", REGISTRY)


def _production_trusts_pull_requests(fork):
    fork.azure.add_credential(fork.production_app, f"{PREFIX}:pull_request", name="pr")


def _pr_trusts_production(fork):
    fork.azure.add_credential(fork.staging_app, f"{PREFIX}:environment:production", name="prod")


def _no_registry(fork):
    fork.azure.resources.discard(REGISTRY.lower())


def _production_without_registry_role(fork):
    fork.azure.assignments[:] = [a for a in fork.azure.assignments if a["properties"]["scope"] != REGISTRY]


def _fork_workflows(fork):
    for workflow in fork.github.workflows.values():
        workflow["state"] = "disabled_fork"


def _placeholders(fork):
    fork.github.trees[(REPO, "main")] = {"CODEOWNERS": CODEOWNERS.replace("@acme-ml/", "@ORG/")}


def _no_catch_all(fork):
    fork.github.trees[(REPO, "main")] = {"CODEOWNERS": CODEOWNERS.split("\n", 1)[1]}


def _unowned_lock(fork):
    fork.github.trees[(REPO, "main")] = {"CODEOWNERS": CODEOWNERS.replace("/uv.lock @acme-ml/mlops-platform\n", "")}


def _codeowners_errors(fork):
    # The first: the example of GitHub's REST description (components/schemas/codeowners-errors).
    fork.github.codeowners_errors[REPO] = [{
        "line": 7, "column": 3, "kind": "Invalid owner", "source": "* user",
        "suggestion": "The pattern `/` will never match anything, did you mean `*` instead?",
        "message": "Invalid owner on line 7:\n\n  * user\n    ^", "path": ".github/CODEOWNERS"}, {
        "line": 2, "column": 15, "kind": "Unknown owner", "source": "/experiments/ @acme-ml/ml-reviewers",
        "suggestion": "make sure @acme-ml/ml-reviewers exists and has write access to the repository",
        "message": "Unknown owner on line 2: make sure @acme-ml/ml-reviewers exists and has write access to the "
                   "repository\n\n  /experiments/ @acme-ml/ml-reviewers\n                ^",
        "path": "CODEOWNERS"}]


def _no_codeowners(fork):
    fork.github.codeowners_errors[REPO] = None


@pytest.mark.parametrize(("breaks", "area", "said", "fix"), [
    (lambda f: f.github.environments.pop((REPO, "production")), "production", "does not exist",
     f"gh api -X PUT repos/{REPO}/environments/production --input -"),
    (lambda f: production_gate(f.github, can_admins_bypass=True), "production", "administrators may bypass",
     '"can_admins_bypass": false'),
    (lambda f: production_gate(f.github, branch_policy=None), "production", "admits every branch",
     "deployment-branch-policies -f name=main -f type=branch"),
    (lambda f: f.github.environments.pop((REPO, "staging")), "staging", "does not exist",
     f"gh api -X PUT repos/{REPO}/environments/staging"),
    (lambda f: f.github.add_environment(REPO, "staging", branch_policy=["main"], variables=STAGING_VARIABLES),
     "staging", "restricts deployment branches", '"reviewers": null, "deployment_branch_policy": null'),
    (lambda f: f.github.environments[(REPO, "production")]["_variables"].pop("AZURE_ML_REGISTRY"), "variables",
     "lacks the variable AZURE_ML_REGISTRY", f"gh variable set AZURE_ML_REGISTRY --env production --repo {REPO}"),
    (_staging_client_for_production, "variables", "share one identity",
     "gh variable set AZURE_CLIENT_ID --env production"),
    (_no_credential, "credentials", f"no federated credential for {PREFIX}:environment:production",
     f"az ad app federated-credential create --id {PRODUCTION_CLIENT}"),
    (_production_trusts_pull_requests, "credentials", "also trusts other GitHub subjects",
     f"az ad app federated-credential delete --id {PRODUCTION_CLIENT}"),
    (_pr_trusts_production, "credentials", "pull-request identity trusts the production subject",
     f"az ad app federated-credential list --id {STAGING_CLIENT}"),
    (_pr_role_on_production, "roles", "AzureML Data Scientist at", "az role assignment delete --ids"),
    (_pr_contributor_on_subscription, "roles", f"Contributor at /subscriptions/{SUBSCRIPTION} reaches",
     "az role assignment delete --ids"),
    (_pr_writes_registry, "roles", "may write to the registry", "az role assignment delete --ids"),
    (_production_without_registry_role, "roles", "production identity has no role on the registry",
     f'az role assignment create --assignee {PRODUCTION_CLIENT} --role "AzureML Registry User" --scope {REGISTRY}'),
    (_no_registry, "azure", "the registry does not exist", "az ml registry create --resource-group rg-ml-prod"),
    (_fork_workflows, "workflows", "loop.yml is disabled (a fork's workflows start disabled)",
     f"gh workflow enable loop.yml --repo {REPO}"),
    (_placeholders, "codeowners", "placeholder owners (@ORG/ml-reviewers, @ORG/mlops-platform)",
     "sed -i 's#@ORG/#@YOUR-ORG/#g' CODEOWNERS"),
    (_no_catch_all, "codeowners", "no catch-all owner", "sed -i '1i * @YOUR-ORG/mlops-platform' CODEOWNERS"),
    (_unowned_lock, "codeowners", "does not name an owner for uv.lock", "echo '/uv.lock @YOUR-ORG/mlops-platform'"),
    (_codeowners_errors, "codeowners", "CODEOWNERS:2: Unknown owner", "make sure @acme-ml/ml-reviewers exists"),
    (_codeowners_errors, "codeowners", ".github/CODEOWNERS:7: Invalid owner: * user", "did you mean `*` instead?"),
    (_no_codeowners, "codeowners", "no CODEOWNERS file", "CODEOWNERS"),
])
def test_each_missing_piece_fails_and_prints_its_fix(fork, breaks, area, said, fix):
    breaks(fork)
    findings = run(fork)
    failed = [f for f in failures(findings) if f.area == area and said in f.what]
    assert failed, shown(findings)
    assert any(fix in f.fix for f in failed), [f.fix for f in failed]
    text = shown(findings)
    assert fix.splitlines()[0] in text and "FAIL" in text
    assert doctor.failed(findings)


def test_the_pull_request_identity_holding_a_role_on_production_fails_the_cli(fork, monkeypatch, capsys):
    fork.azure.assign(fork.staging_app, "Reader", PRODUCTION_RG)
    monkeypatch.setenv("GITHUB_TOKEN", USER_TOKEN)
    monkeypatch.setenv("GITHUB_API_URL", fork.github.url)
    monkeypatch.setenv("AZURE_GRAPH_TOKEN", GRAPH_TOKEN)
    monkeypatch.setenv("AZURE_ACCESS_TOKEN", ARM_TOKEN)
    monkeypatch.setattr(doctor, "GRAPH_URL", fork.azure.url)
    monkeypatch.setattr(doctor, "ARM_URL", fork.azure.url)
    assert cli.main(["doctor", "--repo", REPO]) == 1
    out = capsys.readouterr().out
    assert "reaches the production workspace" in out and "az role assignment delete --ids" in out


def test_reader_on_the_registry_alone_is_allowed(fork):
    fork.azure.assign(fork.staging_app, "Reader", REGISTRY)
    assert not failures(run(fork))


def test_without_azure_tokens_the_az_commands_are_printed(fork):
    findings = run(fork, azure=False)
    assert not failures(findings)
    text = shown(findings)
    assert f"az ad app federated-credential list --id {PRODUCTION_CLIENT}" in text
    assert "az identity federated-credential list --identity-name IDENTITY_NAME" in text
    assert f"az role assignment list --assignee {STAGING_CLIENT} --all -o table" in text
    assert f"az resource show --ids {REGISTRY}" in text
    assert {f.area for f in findings if f.status == doctor.SKIP} == {"credentials", "roles", "azure"}
    assert not fork.azure.requests


def test_a_graph_token_is_not_an_arm_token(fork):
    client = GitHubClient(USER_TOKEN, REPO, fork.github.url, max_attempts=1)
    with client:
        findings = doctor.diagnose(client, graph_token=GRAPH_TOKEN, arm_token=GRAPH_TOKEN,
                                   graph_url=fork.azure.url, arm_url=fork.azure.url)
    skipped = [f for f in findings if f.status == doctor.SKIP]
    assert any("InvalidAuthenticationToken" in f.what for f in skipped)


def test_the_workflow_token_cannot_read_variables(fork):
    """A workflow's GITHUB_TOKEN has no Environments permission: the variables are skipped with the
    gh command, and the rest still runs."""
    findings = run(fork, WRITE_TOKEN)
    skipped = [f for f in findings if f.area == "variables" and f.status == doctor.SKIP]
    assert [f.fix for f in skipped] == [f"gh variable list --repo {REPO}", f"gh variable list --env production --repo {REPO}"]


def test_an_idle_tick_is_worth_knowing_not_a_failure(fork):
    for workflow in fork.github.workflows.values():
        if workflow["path"].endswith(("tick.yml", "endpoint-sweeper.yml")):
            workflow["state"] = "disabled_manually"
    findings = run(fork)
    assert not failures(findings)
    warned = [f for f in findings if f.area == "workflows" and f.status == doctor.WARN]
    assert len(warned) == 2 and "turns it off while nothing is in flight" in warned[0].what


@pytest.mark.parametrize(("answer", "prefix", "warned"), [
    ({"use_default": True, "use_immutable_subject": True,
      "sub_claim_prefix": "repo:acme-ml@9919/chat-finetune@1296269"}, "repo:acme-ml@9919/chat-finetune@1296269",
     False),
    ({"use_default": True, "use_immutable_subject": True}, "repo:acme-ml@9919/chat-finetune@1296269", True),
    ({"use_default": True}, "repo:acme-ml/chat-finetune", True),
])
def test_subjects_follow_github_s_prefix_with_a_fallback(fork, answer, prefix, warned):
    fork.github.oidc_sub[REPO] = answer
    findings = run(fork)
    subject = f"{prefix}:environment:production"
    if prefix != PREFIX:
        assert any(subject in f.what and f.status == doctor.FAIL for f in findings)
        fork.azure.add_credential(fork.production_app, subject)
        fork.azure.add_credential(fork.staging_app, f"{prefix}:environment:staging")
        fork.production_app.credentials[:] = fork.production_app.credentials[1:]  # the classic one goes
        findings = run(fork)
    assert not failures(findings), shown(findings)
    assert any(f.area == "oidc" and f.status == doctor.WARN for f in findings) == warned


def test_a_custom_template(fork):
    fork.github.oidc_sub[REPO] = {"use_default": False, "include_claim_keys": ["repo", "context"]}
    assert not failures(run(fork))
    fork.github.oidc_sub[REPO] = {"use_default": False, "include_claim_keys": ["repo", "context", "job_workflow_ref"]}
    findings = run(fork)
    assert any(f.area == "oidc" and "claims only a run knows" in f.what for f in findings)


def test_the_repository_s_own_codeowners_is_complete_but_for_its_placeholders():
    from pathlib import Path

    text = (Path(__file__).parents[1] / "CODEOWNERS").read_text(encoding="utf-8")
    problems = doctor.codeowners_problems(text)
    assert [p for p, _ in problems] == [problems[0][0]] and "placeholder owners" in problems[0][0]


def test_a_private_repository_on_team_gates_with_branch_protection(fork):
    fork.github.set_repository(REPO, private=True, plan="team")
    production_gate(fork.github, reviewers=None)
    findings = run(fork)
    assert any(f.area == "production" and "Administration" not in f.what and f.status == doctor.FAIL
               and "not protected" in f.what for f in findings)
    fork.github.protect_branch(REPO, "main")
    findings = run(fork)
    assert not failures(findings), shown(findings)
    assert any(f.area == "production" and f.status == doctor.WARN and "GitHub Free, Pro and Team" in f.what
               for f in findings)
    assert any(f.area == "production" and f.status == doctor.OK and "branch protection" in f.what for f in findings)


def test_an_identity_graph_does_not_know(fork):
    """Not an app registration (a managed identity's credentials are in ARM, not Graph), or a wrong
    client id: the credentials are skipped with both az commands, and with no service principal
    there is nothing to hold roles."""
    fork.azure.apps.pop(PRODUCTION_CLIENT)  # Graph answers 404 Request_ResourceNotFound
    findings = run(fork)
    skipped = [f for f in findings if f.area == "credentials" and f.status == doctor.SKIP]
    assert skipped and "az identity federated-credential list" in skipped[0].fix
    assert any(f.area == "roles" and "no service principal" in f.what for f in failures(findings))
