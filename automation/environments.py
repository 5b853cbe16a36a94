"""The `production` environment is the promotion gate: check it through GitHub's REST API before
any Azure call, and refuse (fail closed) unless it is one.

`require_production(client)` is what promotion calls; it raises `ProductionNotProtected` (a
ConfigError) naming each missing piece with the exact `gh api` command or settings page that fixes
it. `check_production(client)` returns the same findings without raising (`automation doctor`
prints them). There is no switch that skips the check.

What a gate is (GitHub's REST API, version 2022-11-28):

- `GET /repos/{owner}/{repo}/environments/production` answers 200 (404: it does not exist; a
  workflow that names a missing environment creates it, unprotected) with
  - a `protection_rules` item of `type: required_reviewers` with at least one reviewer, and
    `prevent_self_review: true` on it (whoever started the run cannot approve it);
  - `can_admins_bypass: false` (by default administrators may skip every protection rule);
  - `deployment_branch_policy: {protected_branches: false, custom_branch_policies: true}` and,
    from `GET .../environments/production/deployment-branch-policies`, exactly one policy: the
    default branch by its exact name, of type `branch`. `protected_branches: true` is refused: it
    admits every branch that a branch protection rule covers, today and later (a wildcard rule
    covers branches not yet created), which this check cannot see; `null` admits every branch,
    so a pull request's edited workflow or `gh workflow run --ref any-branch` can ask for the
    production identity.
- Required reviewers exist for public repositories on every plan, and for private or internal
  ones only on GitHub Enterprise ("If you are on a GitHub Free, GitHub Pro, or GitHub Team plan,
  other deployment protection rules, such as a wait timer or required reviewers, are only
  available for public repositories", REST docs, deployment environments). On those plans the
  gate is the default branch's protection instead, which promotion by merge makes effective:
  `GET /repos/{owner}/{repo}/branches/{default}/protection` with
  `required_pull_request_reviews.required_approving_review_count >= 1` and `enforce_admins.enabled`.
  That endpoint needs the Administration (read) permission, which a workflow's GITHUB_TOKEN cannot
  hold: a 403 refuses as well. GitHub Free has neither environments nor branch protection for
  private repositories: there the refusal says to make the repository public or change plans.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from automation.errors import ConfigError
from automation.github import GitHubClient, GitHubError, GitHubPermissionError

log = logging.getLogger(__name__)

PRODUCTION = "production"
STAGING = "staging"
# Plans whose private repositories have no required reviewers (GitHub's docs, "Deployments and
# environments"); `plan.name` of GET /orgs/{org} (owners only) or GET /user (the token's own).
LIMITED_PLANS = frozenset({"free", "pro", "team", "developer", "personal", "business_free"})
GATE_REVIEWERS = "required reviewers on the environment"
GATE_BRANCH_PROTECTION = "required reviews on the default branch (branch protection)"


@dataclass(frozen=True)
class Problem:
    """One missing piece and the exact command (or settings page) that fixes it."""

    what: str
    fix: str


@dataclass
class ProductionCheck:
    """What `check_production` found: the gate in force (None: none is), the problems, notes."""

    repository: str
    environment: str
    default_branch: str = "main"
    gate: str | None = None
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and self.gate is not None

    def message(self) -> str:
        head = (f"the `{self.environment}` environment of {self.repository} is not a promotion gate; "
                "promotion refuses to start until it is (fix each, then run `automation doctor`):")
        lines = [head]
        for i, problem in enumerate(self.problems, 1):
            lines.append(f"  {i}. {problem.what}")
            lines.extend("       " + line for line in problem.fix.splitlines())
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


class ProductionNotProtected(ConfigError):
    """The production environment is not a gate; carries the check with each problem and its fix."""

    def __init__(self, check: ProductionCheck):
        self.check = check
        super().__init__(check.message())

    def __reduce__(self):
        return type(self), (self.check,), self.__dict__


# ---------------------------------------------------------------------------------------------
# Reads


def _get(client: GitHubClient, path: str, **params: Any) -> dict[str, Any] | None:
    """GET `path` as JSON; None on 404. Other errors (403 included) raise."""
    try:
        body = client.request("GET", path, params=params or None).json()
    except GitHubError as err:
        if err.status == 404:
            return None
        raise
    return body if isinstance(body, dict) else {}


def repository(client: GitHubClient) -> dict[str, Any]:
    """GET /repos/{owner}/{repo}: default_branch, private, visibility, owner (login, id, type), id."""
    found = _get(client, f"/repos/{client.repository}")
    if found is None:
        raise ConfigError(f"GitHub answers 404 for the repository {client.repository}: check GITHUB_REPOSITORY "
                          "and that the token may read it")
    return found


def get_environment(client: GitHubClient, name: str) -> dict[str, Any] | None:
    """GET /repos/{owner}/{repo}/environments/{name}; None when it does not exist (404)."""
    return _get(client, f"/repos/{client.repository}/environments/{quote(name, safe='')}")


def branch_policies(client: GitHubClient, name: str) -> list[dict[str, Any]]:
    """GET .../environments/{name}/deployment-branch-policies: every page of `branch_policies`."""
    found: list[dict[str, Any]] = []
    page = 1
    while True:
        body = _get(client, f"/repos/{client.repository}/environments/{quote(name, safe='')}"
                            "/deployment-branch-policies", per_page=100, page=page) or {}
        items = body.get("branch_policies") or []
        found.extend(i for i in items if isinstance(i, dict))
        if len(items) < 100 or len(found) >= int(body.get("total_count") or 0):
            return found
        page += 1


def owner_plan(client: GitHubClient, repo: dict[str, Any]) -> str | None:
    """The owner's plan name where the token may see it (an organization's owners, or the user
    themself); None where GitHub does not say (a workflow's GITHUB_TOKEN never sees it)."""
    owner = repo.get("owner") or {}
    login = owner.get("login")
    try:
        if owner.get("type") == "Organization":
            body = _get(client, f"/orgs/{quote(str(login))}") or {}
        else:
            body = _get(client, "/user") or {}
            if body.get("login") != login:
                return None
    except GitHubPermissionError:
        return None
    except GitHubError as err:
        log.debug("cannot read the plan of %s: %s", login, err)
        return None
    plan = body.get("plan")
    name = plan.get("name") if isinstance(plan, dict) else None
    return str(name).lower() if name else None


# ---------------------------------------------------------------------------------------------
# The fixes, spelled out


def settings_url(repo: str, environment: dict[str, Any] | None = None) -> str:
    if environment and environment.get("id"):
        return f"https://github.com/{repo}/settings/environments/{environment['id']}/edit"
    return f"https://github.com/{repo}/settings/environments"


def _reviewers_of(environment: dict[str, Any] | None) -> list[dict[str, Any]]:
    for rule in (environment or {}).get("protection_rules") or []:
        if isinstance(rule, dict) and rule.get("type") == "required_reviewers":
            return [r for r in rule.get("reviewers") or [] if isinstance(r, dict)]
    return []


def put_environment_command(repo: str, name: str, environment: dict[str, Any] | None,
                            default_branch: str) -> str:
    """The one `gh api -X PUT` that makes `name` a gate. The PUT replaces every setting, so it
    carries the reviewers that are there already (or placeholders and how to find their ids)."""
    reviewers = [{"type": r.get("type"), "id": (r.get("reviewer") or {}).get("id")} for r in _reviewers_of(environment)
                 if (r.get("reviewer") or {}).get("id")]
    lookup = ""
    if not reviewers:
        reviewers = [{"type": "Team", "id": "TEAM_ID"}]
        lookup = ("# TEAM_ID: gh api orgs/ORG/teams/TEAM-SLUG --jq .id   (a person: type User, "
                  "gh api users/LOGIN --jq .id)\n")
    body = {"wait_timer": 0, "prevent_self_review": True, "can_admins_bypass": False, "reviewers": reviewers,
            "deployment_branch_policy": {"protected_branches": False, "custom_branch_policies": True}}
    text = json.dumps(body).replace('"TEAM_ID"', "TEAM_ID")
    return (f"{lookup}gh api -X PUT repos/{repo}/environments/{name} --input - <<'EOF'\n{text}\nEOF\n"
            f"# or {settings_url(repo, environment)}")


def branch_policy_command(repo: str, name: str, default_branch: str) -> str:
    return (f"gh api -X POST repos/{repo}/environments/{name}/deployment-branch-policies "
            f"-f name={default_branch} -f type=branch")


def branch_protection_command(repo: str, branch: str) -> str:
    body = {"required_status_checks": None, "enforce_admins": True,
            "required_pull_request_reviews": {"required_approving_review_count": 1,
                                              "require_code_owner_reviews": True,
                                              "require_last_push_approval": True},
            "restrictions": None}
    return (f"gh api -X PUT repos/{repo}/branches/{branch}/protection --input - <<'EOF'\n{json.dumps(body)}\nEOF\n"
            f"# or https://github.com/{repo}/settings/branches")


# ---------------------------------------------------------------------------------------------
# The check


def _environment_problems(check: ProductionCheck, environment: dict[str, Any], policies: list[dict[str, Any]] | None,
                          *, reviewers_needed: bool) -> list[Problem]:
    """What the environment lacks: reviewers and self-review (when `reviewers_needed`), the branch
    policy, the admin bypass. `policies` None: not read (the branch policy is already wrong)."""
    repo, name, branch = check.repository, check.environment, check.default_branch
    put = put_environment_command(repo, name, environment, branch)
    problems: list[Problem] = []
    rule = next((r for r in environment.get("protection_rules") or []
                 if isinstance(r, dict) and r.get("type") == "required_reviewers"), None)
    if reviewers_needed:
        if rule is None or not rule.get("reviewers"):
            problems.append(Problem(f"`{name}` has no required reviewers: nobody approves a promotion", put))
        elif rule.get("prevent_self_review") is not True:
            problems.append(Problem(f"`{name}` lets the person who started a promotion approve it "
                                    "(prevent_self_review is not true)", put))
    if environment.get("can_admins_bypass") is not False:
        said = ("GitHub does not say whether administrators may bypass it (no can_admins_bypass in the answer)"
                if "can_admins_bypass" not in environment else "administrators may bypass its protection rules")
        problems.append(Problem(f"`{name}`: {said}; uncheck *Allow administrators to bypass configured "
                                "protection rules*", put))
    policy = environment.get("deployment_branch_policy")
    if not isinstance(policy, dict):
        problems.append(Problem(
            f"`{name}` admits every branch (Deployment branches: No restriction): a pull request's edited workflow "
            f"or `gh workflow run --ref any-branch` can ask for the production identity; admit only `{branch}`",
            put + "\n" + branch_policy_command(repo, name, branch)))
    elif policy.get("protected_branches") is True or policy.get("custom_branch_policies") is not True:
        problems.append(Problem(
            f"`{name}` admits protected branches rather than `{branch}` by name (protected_branches: true admits "
            "every branch a protection rule or wildcard covers, now or later); choose *Selected branches and tags* "
            f"with the one rule `{branch}`",
            put + "\n" + branch_policy_command(repo, name, branch)))
    elif policies is not None:
        others = [p for p in policies if not (p.get("name") == branch and p.get("type", "branch") == "branch")]
        ours = [p for p in policies if p.get("name") == branch and p.get("type", "branch") == "branch"]
        fixes = [f"gh api -X DELETE repos/{repo}/environments/{name}/deployment-branch-policies/{p.get('id')}"
                 for p in others]
        if not ours:
            fixes.insert(0, branch_policy_command(repo, name, branch))
        if others or not ours:
            listed = ", ".join(f"{p.get('type', 'branch')} `{p.get('name')}`" for p in others) or "none"
            problems.append(Problem(f"`{name}`'s deployment branch policy must admit exactly the default branch "
                                    f"`{branch}`; it {'lacks it and ' if not ours else ''}admits also: {listed}",
                                    "\n".join(fixes)))
    return problems


def _branch_protection_problems(client: GitHubClient, check: ProductionCheck) -> list[Problem]:
    repo, branch = check.repository, check.default_branch
    fix = branch_protection_command(repo, branch)
    try:
        protection = _get(client, f"/repos/{repo}/branches/{quote(branch, safe='')}/protection")
    except GitHubPermissionError:
        return [Problem(f"cannot read the protection of `{branch}` (it needs the Administration: read permission, "
                        "which a workflow's GITHUB_TOKEN cannot hold): use a GitHub App token with "
                        "Administration: read for this step, or a plan with required reviewers", fix)]
    if protection is None:
        return [Problem(f"`{branch}` is not protected: no review is required before a merge", fix)]
    problems = []
    reviews = protection.get("required_pull_request_reviews") or {}
    if int(reviews.get("required_approving_review_count") or 0) < 1:
        problems.append(Problem(f"`{branch}`'s protection requires no approving review before a merge", fix))
    if (protection.get("enforce_admins") or {}).get("enabled") is not True:
        problems.append(Problem(f"`{branch}`'s protection does not apply to administrators "
                                "(enforce_admins is off)",
                                f"gh api -X POST repos/{repo}/branches/{branch}/protection/enforce_admins"))
    return problems


def check_production(client: GitHubClient, *, environment: str = PRODUCTION,
                     repo: dict[str, Any] | None = None) -> ProductionCheck:
    """Read the environment (and, where the plan has no required reviewers, the default branch's
    protection) and say whether it is a gate. Raises only for what GitHub would not answer at all
    (a network failure, a 5xx after retries, a token refused on the environment itself)."""
    repo = repo if repo is not None else repository(client)
    check = ProductionCheck(client.repository, environment, str(repo.get("default_branch") or "main"))
    name, full = environment, client.repository
    private = bool(repo.get("private")) or repo.get("visibility") in ("private", "internal")
    try:
        found = get_environment(client, name)
    except GitHubPermissionError as err:
        check.problems.append(Problem(f"this token cannot read the `{name}` environment ({err}); in a workflow, "
                                      "give the job `actions: read`", "permissions: {actions: read}"))
        return check
    plan = owner_plan(client, repo) if private else None
    limited = private and (plan is None or plan in LIMITED_PLANS)
    if found is None:
        what = (f"the `{name}` environment does not exist (a workflow that names it would create it unprotected)")
        if private and plan in ("free", None):
            what += ("; GitHub Free has no environments for private repositories: make the repository public, "
                     "or move to GitHub Pro, Team or Enterprise")
        check.problems.append(Problem(what, put_environment_command(full, name, None, check.default_branch)
                                      + "\n" + branch_policy_command(full, name, check.default_branch)))
        return check
    policy = found.get("deployment_branch_policy")
    policies = (branch_policies(client, name)
                if isinstance(policy, dict) and policy.get("custom_branch_policies") is True
                and policy.get("protected_branches") is not True else None)
    has_reviewers = bool(_reviewers_of(found))
    if has_reviewers or not limited:
        check.problems.extend(_environment_problems(check, found, policies, reviewers_needed=True))
        if not check.problems:
            check.gate = GATE_REVIEWERS
        return check
    # A private repository whose plan has (or may have) no required reviewers: the alternative.
    said = f"the owner's plan is `{plan}`" if plan else "GitHub does not tell this token the owner's plan"
    check.notes.append(
        f"{full} is private and {said}: on GitHub Free, Pro and Team a private repository has no required "
        f"reviewers, so the gate is branch protection's required reviews on `{check.default_branch}` (promotion "
        "runs only for what was merged there); on GitHub Enterprise, add required reviewers to the environment "
        "instead")
    problems = _environment_problems(check, found, policies, reviewers_needed=False)
    protection = _branch_protection_problems(client, check)
    problems.extend(protection)
    if protection:
        problems.append(Problem(
            f"no required reviewers on `{name}` ({said}: required reviewers need a public repository or GitHub "
            "Enterprise for a private one); either add them, or rely on the alternative above",
            put_environment_command(full, name, found, check.default_branch)))
    check.problems.extend(problems)
    if not check.problems:
        check.gate = GATE_BRANCH_PROTECTION
    return check


def require_production(client: GitHubClient, *, environment: str = PRODUCTION) -> ProductionCheck:
    """Promotion's first step, before any Azure call: the checked gate, or `ProductionNotProtected`
    (a ConfigError) naming each fix. Every error reading GitHub refuses too (it raises)."""
    check = check_production(client, environment=environment)
    if not check.ok:
        raise ProductionNotProtected(check)
    log.info("`%s` is a promotion gate: %s", environment, check.gate)
    return check
