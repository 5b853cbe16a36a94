"""The production environment is the promotion gate (automation/environments.py): read through the
fake GitHub's environments, deployment branch policies, repository and branch protection endpoints,
and refused, fix by fix, unless it is one. There is no switch that skips the check."""

from __future__ import annotations

import pytest

from automation import environments
from automation.errors import ConfigError
from automation.github import GitHubClient, GitHubError
from tests.fake_github import TEAM, USER_TOKEN, WRITE_TOKEN, FakeGitHub, Identity
from tests.fork_setup import REPO, production_gate


@pytest.fixture
def fake():
    with FakeGitHub() as server:
        server.set_repository(REPO)
        yield server


def client(fake: FakeGitHub, token: str = WRITE_TOKEN) -> GitHubClient:
    return GitHubClient(token, REPO, fake.url, max_attempts=2, backoff_s=0, sleep=lambda s: None)


def refusal(fake: FakeGitHub, token: str = WRITE_TOKEN) -> environments.ProductionNotProtected:
    with pytest.raises(environments.ProductionNotProtected) as caught:
        environments.require_production(client(fake, token))
    return caught.value


def test_a_gate_passes_with_the_workflow_token(fake):
    production_gate(fake)
    check = environments.require_production(client(fake))
    assert check.ok and check.gate == environments.GATE_REVIEWERS
    paths = [c.path for c in fake.calls("GET")]
    assert f"/repos/{REPO}/environments/production" in paths
    assert f"/repos/{REPO}/environments/production/deployment-branch-policies" in paths
    assert all(c.method == "GET" for c in fake.requests)  # read-only


def test_a_missing_environment_is_refused_with_the_command_that_creates_it(fake):
    err = refusal(fake)
    assert isinstance(err, ConfigError) and err.exit_code == 2
    assert "does not exist" in str(err)
    assert f"gh api -X PUT repos/{REPO}/environments/production --input -" in str(err)
    assert f"gh api -X POST repos/{REPO}/environments/production/deployment-branch-policies -f name=main" in str(err)


@pytest.mark.parametrize(("overrides", "said", "fix"), [
    ({"reviewers": None}, "no required reviewers", '"reviewers": [{"type": "Team", "id": TEAM_ID}]'),
    ({"prevent_self_review": False}, "prevent_self_review is not true", '"prevent_self_review": true'),
    ({"can_admins_bypass": True}, "administrators may bypass", '"can_admins_bypass": false'),
    ({"can_admins_bypass": None}, "GitHub does not say whether administrators", '"can_admins_bypass": false'),
    ({"branch_policy": None}, "admits every branch", "-f name=main -f type=branch"),
    ({"branch_policy": "protected"}, "admits protected branches", '"custom_branch_policies": true'),
    ({"branch_policy": ["main", "feature/*"]}, "admits also: branch `feature/*`",
     "deployment-branch-policies/361472"),
    ({"branch_policy": ["main", ("v*", "tag")]}, "admits also: tag `v*`", "-X DELETE"),
    ({"branch_policy": ["release"]}, "lacks it and admits also: branch `release`", "-f name=main"),
    ({"branch_policy": []}, "lacks it", "-f name=main -f type=branch"),
])
def test_each_missing_setting_is_refused_naming_its_fix(fake, overrides, said, fix):
    production_gate(fake, **overrides)
    err = refusal(fake)
    assert said in str(err) and fix in str(err)
    assert len(err.check.problems) == 1, err.check.problems
    assert "settings/environments" in str(err) or "deployment-branch-policies" in str(err)


def test_the_put_keeps_the_reviewers_already_there(fake):
    production_gate(fake, can_admins_bypass=True)
    assert '"reviewers": [{"type": "Team", "id": 1}]' in str(refusal(fake))


def test_there_is_no_switch_to_skip_it(fake, monkeypatch):
    for name in ("AUTOMATION_SKIP_ENVIRONMENT_CHECK", "AUTOMATION_SKIP_PRODUCTION_CHECK"):
        monkeypatch.setenv(name, "1")
    production_gate(fake, reviewers=None)
    refusal(fake)


def test_a_token_that_cannot_read_environments_is_refused(fake):
    production_gate(fake)
    fake.tokens["ghs_noActions"] = Identity(TEAM, can_write=False, installation=True,
                                            permissions={"contents": "read", "metadata": "read"})
    err = refusal(fake, "ghs_noActions")
    assert "actions: read" in str(err)


def test_github_failing_refuses_too(fake):
    production_gate(fake)
    fake.fail_next("GET", r"/environments/production$", 502, times=5)
    with pytest.raises(GitHubError):
        environments.require_production(client(fake))


# -- private repositories: the plan may have no required reviewers -------------------------------


def test_private_repository_with_unknown_plan_names_the_alternative(fake):
    """The workflow's token sees no plan and cannot read branch protection: refused, saying why."""
    fake.set_repository(REPO, private=True, plan="team")
    production_gate(fake, reviewers=None)
    err = refusal(fake)
    text = str(err)
    assert "GitHub Free, Pro and Team" in text and "branch protection" in text
    assert "Administration: read" in text
    assert f"gh api -X PUT repos/{REPO}/branches/main/protection --input -" in text
    assert "required reviewers need a public repository or GitHub Enterprise" in text


def test_private_team_plan_with_branch_protection_is_a_gate(fake):
    fake.set_repository(REPO, private=True, plan="team")
    production_gate(fake, reviewers=None)
    fake.protect_branch(REPO, "main", approvals=1, enforce_admins=True)
    check = environments.require_production(client(fake, USER_TOKEN))
    assert check.gate == environments.GATE_BRANCH_PROTECTION
    assert any("owner's plan is `team`" in n for n in check.notes)


@pytest.mark.parametrize(("protect", "said"), [
    (None, "`main` is not protected"),
    ({"approvals": 0}, "requires no approving review"),
    ({"enforce_admins": False}, "does not apply to administrators"),
])
def test_private_team_plan_without_the_protection_is_refused(fake, protect, said):
    fake.set_repository(REPO, private=True, plan="pro", owner_type="User")
    fake.orgs.clear()
    production_gate(fake, reviewers=None)
    if protect is not None:
        fake.protect_branch(REPO, "main", **protect)
    err = refusal(fake, USER_TOKEN)
    assert said in str(err)


def test_the_alternative_still_needs_the_branch_policy_and_no_bypass(fake):
    fake.set_repository(REPO, private=True, plan="team")
    production_gate(fake, reviewers=None, branch_policy=None, can_admins_bypass=True)
    fake.protect_branch(REPO, "main")
    err = refusal(fake, USER_TOKEN)
    assert "admits every branch" in str(err) and "administrators may bypass" in str(err)


def test_private_enterprise_repository_needs_required_reviewers(fake):
    fake.set_repository(REPO, private=True, plan="enterprise")
    production_gate(fake, reviewers=None)
    fake.protect_branch(REPO, "main")
    err = refusal(fake, USER_TOKEN)
    assert "no required reviewers" in str(err) and not err.check.notes


def test_public_repository_never_takes_the_alternative(fake):
    production_gate(fake, reviewers=None)
    fake.protect_branch(REPO, "main")
    err = refusal(fake, USER_TOKEN)
    assert "no required reviewers" in str(err)


def test_private_free_repository_without_environments(fake):
    fake.set_repository(REPO, private=True, plan="free")
    err = refusal(fake, USER_TOKEN)
    assert "GitHub Free has no environments for private repositories" in str(err)


def test_reviewers_on_a_private_repository_are_the_gate(fake):
    fake.set_repository(REPO, private=True, plan="enterprise")
    production_gate(fake)
    assert environments.require_production(client(fake)).gate == environments.GATE_REVIEWERS
