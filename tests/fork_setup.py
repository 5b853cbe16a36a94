"""A fork set up as the README asks, on the fake GitHub and the Graph/ARM stand-in: the two
environments (production a gate), their variables, the workflows, CODEOWNERS, both identities with
their federated credentials and roles, the production workspace and the registry. Tests break one
piece at a time (tests/test_doctor.py, tests/test_environments.py)."""

from __future__ import annotations

from dataclasses import dataclass

from tests.fake_entra_arm import FakeEntraArm
from tests.fake_github import TEAM, FakeGitHub
from tests.standin.names import PRODUCTION_CLIENT, STAGING_CLIENT, SUBSCRIPTION

REPO = "acme-ml/chat-finetune"
TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
PREFIX = f"repo:{REPO}"
STAGING_VARIABLES = {"AZURE_CLIENT_ID": STAGING_CLIENT, "AZURE_TENANT_ID": TENANT,
                     "AZURE_SUBSCRIPTION_ID": SUBSCRIPTION, "AZURE_RESOURCE_GROUP": "rg-ml",
                     "AZURE_ML_WORKSPACE": "ws-staging"}
PRODUCTION_VARIABLES = {"AZURE_CLIENT_ID": PRODUCTION_CLIENT, "AZURE_TENANT_ID": TENANT,
                        "AZURE_SUBSCRIPTION_ID": SUBSCRIPTION, "AZURE_RESOURCE_GROUP": "rg-ml-prod",
                        "AZURE_ML_WORKSPACE": "ws-prod", "AZURE_ML_REGISTRY": "reg-chat",
                        "AZURE_STAGING_ML_WORKSPACE": "ws-staging", "AZURE_STAGING_RESOURCE_GROUP": "rg-ml"}
ML = "providers/Microsoft.MachineLearningServices"
STAGING_RG = f"/subscriptions/{SUBSCRIPTION}/resourceGroups/rg-ml"
PRODUCTION_RG = f"/subscriptions/{SUBSCRIPTION}/resourceGroups/rg-ml-prod"
STAGING_WORKSPACE = f"{STAGING_RG}/{ML}/workspaces/ws-staging"
PRODUCTION_WORKSPACE = f"{PRODUCTION_RG}/{ML}/workspaces/ws-prod"
REGISTRY = f"{PRODUCTION_RG}/{ML}/registries/reg-chat"
CODEOWNERS = """\
* @acme-ml/mlops-platform
/experiments/ @acme-ml/ml-reviewers
/data/ @acme-ml/ml-reviewers
/automation/ @acme-ml/mlops-platform
/.github/ @acme-ml/mlops-platform
/Makefile @acme-ml/mlops-platform
/uv.lock @acme-ml/mlops-platform
/pyproject.toml @acme-ml/mlops-platform
/requirements/ @acme-ml/mlops-platform
/CODEOWNERS @acme-ml/mlops-platform
"""
WORKFLOW_FILES = ("checks.yml", "loop.yml", "promote.yml", "tick.yml", "endpoint-sweeper.yml", "ci.yml")


def production_gate(github: FakeGitHub, repo: str = REPO, **overrides) -> dict:
    """`production` as a gate: reviewers, no self-review, no admin bypass, only `main`."""
    settings = {"reviewers": [TEAM], "prevent_self_review": True, "can_admins_bypass": False,
                "branch_policy": ["main"], "variables": PRODUCTION_VARIABLES, **overrides}
    return github.add_environment(repo, "production", **settings)


@dataclass
class Fork:
    github: FakeGitHub
    azure: FakeEntraArm
    staging_app: object
    production_app: object


def configure(github: FakeGitHub, azure: FakeEntraArm, repo: str = REPO) -> Fork:
    github.set_repository(repo)
    production_gate(github, repo)
    github.add_environment(repo, "staging")
    github.repo_variables[repo] = dict(STAGING_VARIABLES)  # the loop's plan job reads them: repository variables
    for file in WORKFLOW_FILES:
        github.add_workflow(repo, f".github/workflows/{file}", file.removesuffix(".yml"))
    github.trees[(repo, "main")] = {"CODEOWNERS": CODEOWNERS}
    staging = azure.add_app(STAGING_CLIENT, f"{PREFIX}:environment:staging")
    production = azure.add_app(PRODUCTION_CLIENT, f"{PREFIX}:environment:production")
    azure.assign(staging, "AzureML Data Scientist", STAGING_WORKSPACE)
    azure.assign(production, "AzureML Data Scientist", PRODUCTION_WORKSPACE)
    azure.assign(production, "AzureML Registry User", REGISTRY)
    azure.assign(production, "Reader", STAGING_WORKSPACE)
    azure.add_resource(PRODUCTION_WORKSPACE)
    azure.add_resource(REGISTRY)
    return Fork(github, azure, staging, production)
