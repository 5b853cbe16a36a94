"""A fake GitHub REST API on 127.0.0.1: the endpoints the product calls, with real-shaped answers.

Tokens stand for the identities a workflow meets:

- `WRITE_TOKEN`: the GITHUB_TOKEN of a same-repository pull request (`pull-requests: write`);
- `READ_TOKEN`: the GITHUB_TOKEN of a fork's pull request (read-only: writes answer 403);
- `ACTIONS_TOKEN`: the GITHUB_TOKEN of a job granted `actions: write` as well (it may enable and
  disable workflows; the others are refused with 403, as GitHub refuses a token without it);
- `PROMOTE_TOKEN`: the promote job's GITHUB_TOKEN (contents read, pull-requests write, actions
  read: it reads the `production` environment's protection);
- `USER_TOKEN`: a person's token (GET /user works, as with a PAT).

Installation tokens get 403 from GET /user and write as `github-actions[bot]`, as on github.com.
`fail_next` queues errors (5xx, 429 with Retry-After, rate-limited 403) for retry tests;
`requests` records every call with its status.

The request budget is GitHub's: every 200 to a GET carries a weak ETag (`W/"..."`, specific to the
token, as GitHub's are), a GET whose `If-None-Match` names it gets a 304 with no body, and only
the other answers are billed against the token's hourly limit (1,000 for an installation token,
as for GITHUB_TOKEN; 5,000 for a person's), with the `x-ratelimit-*` headers to match and a
rate-limited 403 once it is spent. `billed()` and `not_modified()` count them.
`parse_file_commands` reads `$GITHUB_OUTPUT` and `$GITHUB_ENV` as the runner does.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.loopback import LoopbackServer

WRITE_TOKEN = "ghs_fakeWriteInstallationToken0000000000"
ACTIONS_TOKEN = "ghs_fakeActionsWriteInstallationToken000"
READ_TOKEN = "ghs_fakeReadOnlyForkToken000000000000000"
USER_TOKEN = "ghp_fakePersonalAccessToken0000000000000"
# the promote job's GITHUB_TOKEN (promote.yml: contents read, pull-requests write, actions read): it
# reads the production environment's protection and comments on the merged pull request
PROMOTE_TOKEN = "ghs_fakePromoteJobInstallationToken00000"
# ACTIONS_ID_TOKEN_REQUEST_TOKEN: what a job granted `id-token: write` presents to the token service
OIDC_REQUEST_TOKEN = "fakeIdTokenRequestToken000000000000000000"

BOT = {"login": "github-actions[bot]", "id": 41898282, "node_id": "MDM6Qm90NDE4OTgyODI=",
       "type": "Bot", "site_admin": False}
OCTOCAT = {"login": "octocat", "id": 583231, "node_id": "MDQ6VXNlcjU4MzIzMQ==", "type": "User", "site_admin": False}
LIMIT = 65_536
# A reviewer team as the environments API lists it (the example of GitHub's REST description).
TEAM = {"id": 1, "node_id": "MDQ6VGVhbTE=", "url": "https://api.github.com/teams/1",
        "html_url": "https://github.com/orgs/github/teams/justice-league", "name": "Justice League",
        "slug": "justice-league", "description": "A great team.", "privacy": "closed",
        "notification_setting": "notifications_enabled", "permission": "admin",
        "members_url": "https://api.github.com/teams/1/members{/member}",
        "repositories_url": "https://api.github.com/teams/1/repos", "parent": None}


@dataclass
class Identity:
    user: dict[str, Any]
    can_write: bool
    installation: bool
    # An installation token's permissions (a job's `permissions:`); a person's token may do anything.
    permissions: dict[str, str] | None = None
    rate_limit: int | None = None  # requests an hour; None: 1,000 for an installation, 5,000 for a person

    def may(self, scope: str, level: str) -> bool:
        """Whether the token holds `scope` at `level` ("read" or "write")."""
        if not self.installation:
            return True
        held = (self.permissions or {
            "contents": "read", "metadata": "read", "actions": "read",
            "pull_requests": "write" if self.can_write else "read",
            "issues": "write" if self.can_write else "read"}).get(scope, "none")
        return held == "write" or (level == "read" and held == "read")

    @property
    def limit(self) -> int:
        return self.rate_limit or (1000 if self.installation else 5000)


@dataclass
class Failure:
    method: str
    path: re.Pattern
    status: int
    headers: dict[str, str]
    body: Any
    times: int


@dataclass
class Call:
    method: str
    path: str
    token: str | None
    body: Any
    status: int = 0  # what the fake answered
    billed: bool = False  # counted against the token's hourly limit (not a 304, not an injected failure)


@dataclass
class FakeGitHub:
    """Start with `with FakeGitHub() as github:`; `github.url` is the GITHUB_API_URL."""

    tokens: dict[str, Identity] = field(default_factory=lambda: {
        WRITE_TOKEN: Identity(BOT, can_write=True, installation=True),
        ACTIONS_TOKEN: Identity(BOT, can_write=True, installation=True, permissions={
            "contents": "read", "metadata": "read", "actions": "write", "pull_requests": "write",
            "issues": "write"}),
        READ_TOKEN: Identity(BOT, can_write=False, installation=True),
        PROMOTE_TOKEN: Identity(BOT, can_write=True, installation=True, permissions={
            "contents": "read", "metadata": "read", "actions": "read", "pull_requests": "write"}),
        USER_TOKEN: Identity(OCTOCAT, can_write=True, installation=False),
        OIDC_REQUEST_TOKEN: Identity(BOT, can_write=False, installation=True),
    })
    comments: dict[int, dict[str, Any]] = field(default_factory=dict)  # id -> comment, with "_issue"
    requests: list[Call] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    url: str = ""
    repo_ids: dict[str, int] = field(default_factory=dict)
    pulls: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)  # (repo, number) -> PR, "_files"
    trees: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)  # (repo, sha) -> path -> text
    oidc_requests: list[str] = field(default_factory=list)  # audiences asked for at /_oidc/token
    workflows: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)  # (repo, id) -> workflow
    used: dict[str, int] = field(default_factory=dict)  # token -> billed requests this hour
    # The setup `automation doctor` and the production gate read (tests/test_environments.py):
    repos: dict[str, dict[str, Any]] = field(default_factory=dict)  # repo -> GET /repos/{owner}/{repo} overrides
    orgs: dict[str, dict[str, Any]] = field(default_factory=dict)  # login -> GET /orgs/{org} (plan shown to people)
    environments: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)  # "_policies", "_variables"
    protections: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)  # (repo, branch) -> protection
    oidc_sub: dict[str, dict[str, Any]] = field(default_factory=dict)  # repo -> customization/sub answer
    codeowners_errors: dict[str, list[dict[str, Any]] | None] = field(default_factory=dict)  # None: no file
    repo_variables: dict[str, dict[str, str]] = field(default_factory=dict)  # repo -> Actions variables
    _next_id: int = 1_900_000_000
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- control --------------------------------------------------------------------------------
    def __enter__(self) -> FakeGitHub:
        fake = self

        class Handler(_Handler):
            github = fake

        self._loopback = LoopbackServer(Handler)
        self.url = self._loopback.url
        return self

    def __exit__(self, *exc: object) -> None:
        self._loopback.stop()

    def fail_next(self, method: str, path_pattern: str, status: int, *, times: int = 1,
                  headers: dict[str, str] | None = None, message: str = "Server Error", body: Any = None) -> None:
        """Answer the next `times` matching calls with this status (and body) before any other check."""
        if body is None:
            body = {"message": message, "documentation_url": "https://docs.github.com/rest"}
        self.failures.append(Failure(method, re.compile(path_pattern), status, headers or {}, body, times))

    def add_comment(self, repo: str, number: int, body: str, user: dict[str, Any] | None = None) -> dict[str, Any]:
        """A comment written by someone (a person by default), as if posted on github.com."""
        with self._lock:
            return self._create(repo, number, body, user or OCTOCAT)

    def issue_comments(self, repo: str, number: int) -> list[dict[str, Any]]:
        return [c for c in sorted(self.comments.values(), key=lambda c: c["id"]) if c["_issue"] == (repo, number)]

    def repo_id(self, repo: str) -> int:
        return self.repo_ids.setdefault(repo, 1_296_269 + len(self.repo_ids))

    def open_pull(self, repo: str, number: int, *, head_sha: str, files: dict[str, str | None],
                  base_sha: str = "b" * 40, head_repo: str | None = None, title: str = "Try a new experiment",
                  ) -> dict[str, Any]:
        """A pull request whose head commit `head_sha` changes `files` (path -> text; None: removed)."""
        with self._lock:
            head_repo = head_repo or repo
            now = _now()
            pr = {
                "url": f"{self.url}/repos/{repo}/pulls/{number}", "id": 1_000_000 + number,
                "node_id": f"PR_kwDO{number:x}", "html_url": f"https://github.com/{repo}/pull/{number}",
                "number": number, "state": "open", "locked": False, "title": title, "user": OCTOCAT,
                "body": None, "created_at": now, "updated_at": now, "closed_at": None, "merged_at": None,
                "merge_commit_sha": None, "draft": False,
                "head": {"label": f"{head_repo.split('/')[0]}:feature-{number}", "ref": f"feature-{number}",
                         "sha": head_sha, "user": OCTOCAT, "repo": self._repo(head_repo)},
                "base": {"label": f"{repo.split('/')[0]}:main", "ref": "main", "sha": base_sha, "user": OCTOCAT,
                         "repo": self._repo(repo)},
                "merged": False, "mergeable": True, "mergeable_state": "clean", "_files": {},
            }
            self.pulls[(repo, number)] = pr
        self.push(repo, number, head_sha, files)
        return pr

    def push(self, repo: str, number: int, head_sha: str, files: dict[str, str | None]) -> None:
        """A new head commit: the pull request now changes `files` (added to what it changed)."""
        with self._lock:
            pr = self.pulls[(repo, number)]
            pr["head"]["sha"], pr["updated_at"] = head_sha, _now()
            pr["_files"].update(files)
            self.trees[(repo, head_sha)] = {p: t for p, t in pr["_files"].items() if t is not None}

    def close_pull(self, repo: str, number: int, *, merged: bool = False, merge_commit: str | None = None) -> None:
        """Close the pull request; `merged`: its merge made `merge_commit` on the base branch (a
        squash commit of its own by default), which GET /commits/{sha}/pulls then finds."""
        with self._lock:
            pr = self.pulls[(repo, number)]
            now = _now()
            sha = (merge_commit or f"{number:x}".rjust(8, "0") + "c" * 32) if merged else None
            pr.update(state="closed", closed_at=now, updated_at=now, merged=merged, mergeable=None,
                      merged_at=now if merged else None, merge_commit_sha=sha)

    def _repo(self, full_name: str) -> dict[str, Any]:
        owner, name = full_name.split("/")
        return {"id": self.repo_id(full_name), "node_id": f"R_kgDO{self.repo_id(full_name):x}", "name": name,
                "full_name": full_name, "private": False, "owner": {**OCTOCAT, "login": owner},
                "html_url": f"https://github.com/{full_name}", "fork": full_name.split("/")[0] != "acme-ml",
                "url": f"{self.url}/repos/{full_name}", "default_branch": "main"}

    def repository(self, full_name: str) -> dict[str, Any]:
        """GET /repos/{owner}/{repo}: `_repo` with the visibility and owner `set_repository` gave."""
        extra = self.repos.get(full_name, {})
        body = self._repo(full_name)
        body["owner"] = {**body["owner"], "id": extra.get("_owner_id", 9_919),
                         "type": extra.get("_owner_type", "Organization")}
        body.update(private=extra.get("private", False), visibility=extra.get("visibility", "public"),
                    has_issues=True, archived=False, disabled=False)
        return body

    def calls(self, method: str | None = None) -> list[Call]:
        return [c for c in self.requests if method is None or c.method == method]

    def billed(self, token: str | None = None) -> int:
        """Requests that counted against the rate limit (of `token`, or of every token)."""
        return sum(1 for c in self.requests if c.billed and (token is None or c.token == token))

    def not_modified(self) -> int:
        """Conditional GETs answered 304: free under GitHub's primary rate limit."""
        return sum(1 for c in self.requests if c.status == 304)

    def add_workflow(self, repo: str, path: str, name: str | None = None, state: str = "active") -> dict[str, Any]:
        """A workflow file of the repository (`.github/workflows/loop.yml`), as GitHub lists it."""
        with self._lock:
            wid = 161_335 + len(self.workflows)
            now = _now()
            file = path.rsplit("/", 1)[-1]
            workflow = {
                "id": wid, "node_id": f"W_kwDO{wid:x}", "name": name or file, "path": path, "state": state,
                "created_at": now, "updated_at": now, "url": f"{self.url}/repos/{repo}/actions/workflows/{wid}",
                "html_url": f"https://github.com/{repo}/blob/main/{path}",
                "badge_url": f"https://github.com/{repo}/workflows/{name or file}/badge.svg",
            }
            self.workflows[(repo, wid)] = workflow
            return workflow

    def workflow(self, repo: str, workflow_id: str) -> dict[str, Any] | None:
        """By id or by file name (`loop.yml`), as GitHub finds `{workflow_id}`."""
        for (r, wid), workflow in self.workflows.items():
            if r == repo and (workflow_id == str(wid) or workflow_id == workflow["path"].rsplit("/", 1)[-1]):
                return workflow
        return None

    # -- environments, protection, OIDC, CODEOWNERS (the setup the doctor reads) -------------------
    def set_repository(self, repo: str, *, private: bool = False, visibility: str | None = None,
                       owner_type: str = "Organization", owner_id: int = 9_919, plan: str | None = None) -> None:
        """How GET /repos/{owner}/{repo} describes `repo`; `plan`: what GET /orgs/{org} shows a person."""
        with self._lock:
            self.repos[repo] = {"private": private, "visibility": visibility or ("private" if private else "public"),
                                "_owner_type": owner_type, "_owner_id": owner_id}
            owner = repo.split("/")[0]
            self.orgs[owner] = {"plan": plan}

    def add_environment(self, repo: str, name: str, *, reviewers: list[dict[str, Any]] | None = None,
                        prevent_self_review: bool = False, can_admins_bypass: bool | None = True,
                        branch_policy: str | list[str] | list[tuple[str, str]] | None = None, wait_timer: int = 0,
                        variables: dict[str, str] | None = None) -> dict[str, Any]:
        """An environment as GitHub keeps it. `reviewers`: TEAM/person dicts as `reviewer` (see TEAM);
        `branch_policy`: None (no restriction), "protected" (protected branches only), or the names
        (or (name, type) pairs) of the custom policies; `can_admins_bypass` None: left out of answers."""
        with self._lock:
            eid = 161_088_068 + len(self.environments)
            now = _now()
            rules: list[dict[str, Any]] = []
            rule_id = 3_736 + 10 * len(self.environments)
            if wait_timer:
                rules.append({"id": rule_id, "node_id": f"GA_kwDO{rule_id:x}", "type": "wait_timer",
                              "wait_timer": wait_timer})
            if reviewers:
                rules.append({"id": rule_id + 1, "node_id": f"GA_kwDO{rule_id + 1:x}",
                              "prevent_self_review": prevent_self_review, "type": "required_reviewers",
                              "reviewers": [{"type": "Team" if "slug" in r else "User", "reviewer": r}
                                            for r in reviewers]})
            policy: dict[str, bool] | None = None
            policies: list[dict[str, Any]] = []
            if branch_policy == "protected":
                policy = {"protected_branches": True, "custom_branch_policies": False}
            elif branch_policy is not None:
                policy = {"protected_branches": False, "custom_branch_policies": True}
                for i, item in enumerate(branch_policy):
                    pname, ptype = (item, "branch") if isinstance(item, str) else item
                    pid = 361_471 + i
                    policies.append({"id": pid, "node_id": f"MDE2OkdhdGVCcmFuY2hQb2xpY3k{pid}", "name": pname,
                                     "type": ptype})
            if policy is not None:
                rules.append({"id": rule_id + 2, "node_id": f"GA_kwDO{rule_id + 2:x}", "type": "branch_policy"})
            environment = {
                "id": eid, "node_id": f"EN_kwDO{eid:x}", "name": name,
                "url": f"{self.url}/repos/{repo}/environments/{name}",
                "html_url": f"https://github.com/{repo}/deployments/activity_log?environments_filter={name}",
                "created_at": now, "updated_at": now, "can_admins_bypass": can_admins_bypass,
                "protection_rules": rules, "deployment_branch_policy": policy,
                "_policies": policies, "_variables": dict(variables or {}),
            }
            if can_admins_bypass is None:
                del environment["can_admins_bypass"]
            self.environments[(repo, name)] = environment
            return environment

    def protect_branch(self, repo: str, branch: str, *, approvals: int = 1, enforce_admins: bool = True,
                       code_owners: bool = True) -> dict[str, Any]:
        """Classic branch protection on `branch`, as GET .../branches/{branch}/protection answers it."""
        base = f"{self.url}/repos/{repo}/branches/{branch}/protection"
        protection = {
            "url": base,
            "required_status_checks": None,
            "enforce_admins": {"url": f"{base}/enforce_admins", "enabled": enforce_admins},
            "required_linear_history": {"enabled": False}, "allow_force_pushes": {"enabled": False},
            "allow_deletions": {"enabled": False}, "block_creations": {"enabled": False},
            "required_conversation_resolution": {"enabled": False}, "lock_branch": {"enabled": False},
            "allow_fork_syncing": {"enabled": False},
            "required_signatures": {"url": f"{base}/required_signatures", "enabled": False},
        }
        if approvals:
            protection["required_pull_request_reviews"] = {
                "url": f"{base}/required_pull_request_reviews", "dismiss_stale_reviews": True,
                "require_code_owner_reviews": code_owners, "required_approving_review_count": approvals,
                "require_last_push_approval": True}
        with self._lock:
            self.protections[(repo, branch)] = protection
        return protection

    # -- state ----------------------------------------------------------------------------------
    def _create(self, repo: str, number: int, body: str, user: dict[str, Any]) -> dict[str, Any]:
        self._next_id += 1
        cid, now = self._next_id, _now()
        owner = repo.split("/")[0]
        comment = {
            "id": cid, "node_id": f"IC_kwDO{cid:x}", "url": f"{self.url}/repos/{repo}/issues/comments/{cid}",
            "html_url": f"https://github.com/{repo}/pull/{number}#issuecomment-{cid}", "body": body,
            "user": {**user, "avatar_url": f"https://avatars.githubusercontent.com/u/{user['id']}?v=4",
                     "url": f"{self.url}/users/{user['login']}", "html_url": f"https://github.com/{user['login']}"},
            "created_at": now, "updated_at": now, "issue_url": f"{self.url}/repos/{repo}/issues/{number}",
            "author_association": "OWNER" if user["login"] == owner else "NONE",
            "performed_via_github_app": {"id": 15368, "slug": "github-actions", "name": "GitHub Actions"}
            if user["type"] == "Bot" else None,
            "reactions": {"url": f"{self.url}/repos/{repo}/issues/comments/{cid}/reactions", "total_count": 0,
                          "+1": 0, "-1": 0, "laugh": 0, "hooray": 0, "confused": 0, "heart": 0, "rocket": 0,
                          "eyes": 0},
            "_issue": (repo, number),
        }
        self.comments[cid] = comment
        return comment


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _blob_sha(text: str) -> str:
    import hashlib

    data = text.encode()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _file_entry(url: str, repo: str, sha: str, path: str, text: str | None) -> dict[str, Any]:
    """One item of GET /repos/{owner}/{repo}/pulls/{pull_number}/files."""
    lines = 0 if text is None else text.count("\n")
    return {"sha": _blob_sha(text or ""), "filename": path, "status": "removed" if text is None else "added",
            "additions": lines, "deletions": 0 if text is not None else 1, "changes": lines or 1,
            "blob_url": f"https://github.com/{repo}/blob/{sha}/{path}",
            "raw_url": f"https://github.com/{repo}/raw/{sha}/{path}",
            "contents_url": f"{url}/repos/{repo}/contents/{path}?ref={sha}",
            "patch": "" if text is None else "@@ -0,0 +1 @@"}


def _content_entry(url: str, repo: str, ref: str, path: str, text: str) -> dict[str, Any]:
    """GET /repos/{owner}/{repo}/contents/{path}?ref=: a file, its content base64 in 60-char lines."""
    import base64

    encoded = base64.b64encode(text.encode()).decode()
    blob = _blob_sha(text)
    self_url = f"{url}/repos/{repo}/contents/{path}?ref={ref}"
    return {"type": "file", "encoding": "base64", "size": len(text.encode()), "name": path.rsplit("/", 1)[-1],
            "path": path, "content": "\n".join(encoded[i:i + 60] for i in range(0, len(encoded), 60)) + "\n",
            "sha": blob, "url": self_url, "git_url": f"{url}/repos/{repo}/git/blobs/{blob}",
            "html_url": f"https://github.com/{repo}/blob/{ref}/{path}",
            "download_url": f"https://raw.githubusercontent.com/{repo}/{ref}/{path}",
            "_links": {"self": self_url, "git": f"{url}/repos/{repo}/git/blobs/{blob}",
                       "html": f"https://github.com/{repo}/blob/{ref}/{path}"}}


def _public(comment: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in comment.items() if not k.startswith("_")}


class _Handler(BaseHTTPRequestHandler):
    github: FakeGitHub
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *args: object) -> None:  # quiet
        pass

    # -- plumbing -------------------------------------------------------------------------------
    _call: Call | None = None
    _identity: Identity | None = None

    def _send(self, status: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        github, call, me = self.github, self._call, self._identity
        etag = None
        if me is not None and call is not None and call.method == "GET" and status == 200:
            # GitHub's ETags are weak and token-specific: another token's ETag never matches.
            etag = 'W/"' + hashlib.sha256(call.token.encode() + b"\0" + data).hexdigest() + '"'
            if _etag_matches(self.headers.get("If-None-Match"), etag):
                status, data, body = 304, b"", None
        billed = me is not None and call is not None and status != 304
        if billed:
            github.used[call.token] = github.used.get(call.token, 0) + 1
        if call is not None:
            call.status, call.billed = status, billed
        self.send_response(status)
        if body is not None:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        if status != 304:
            self.send_header("Content-Length", str(len(data)))
        if etag:
            self.send_header("ETag", etag)
            self.send_header("Cache-Control", "private, max-age=60, s-maxage=60")
            self.send_header("Vary", "Accept, Authorization, Cookie, X-GitHub-OTP, Accept-Encoding")
        self.send_header("X-GitHub-Api-Version-Selected", "2022-11-28")
        self.send_header("X-GitHub-Request-Id", f"FAKE:{id(self):X}")
        limit = me.limit if me is not None else 5000
        used = github.used.get(call.token, 0) if me is not None and call is not None else 1
        defaults = {"x-ratelimit-limit": str(limit), "x-ratelimit-remaining": str(max(limit - used, 0)),
                    "x-ratelimit-reset": str(int(time.time()) + 3600), "x-ratelimit-used": str(used),
                    "x-ratelimit-resource": "core"}
        for key, value in {**defaults, **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, **extra: Any) -> None:
        self._send(status, {"message": message, "documentation_url": "https://docs.github.com/rest",
                            "status": str(status), **extra})

    def _handle(self, method: str) -> None:
        github = self.github
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        auth = self.headers.get("Authorization", "")
        token = auth.split(" ", 1)[1] if auth.lower().startswith(("bearer ", "token ")) else None
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            self._error(400, "Problems parsing JSON")
            return
        with github._lock:
            self._call, self._identity = Call(method, parts.path, token, body), None
            github.requests.append(self._call)
            for failure in github.failures:
                if failure.times > 0 and failure.method == method and failure.path.search(parts.path):
                    failure.times -= 1
                    self._send(failure.status, failure.body, failure.headers)
                    return
            if parts.path == "/_oidc/token":
                # The runner's ID token service (ACTIONS_ID_TOKEN_REQUEST_URL, which ends in
                # `?api-version=2.0`): only the job's request token, never another GitHub token,
                # and the query must keep its api-version beside the audience (actions/toolkit appends
                # `&audience=...`); `httpx.get(url, params=...)` would drop the api-version.
                self._oidc_token(method, token, parse_qs(parts.query))
                return
            identity = github.tokens.get(token or "")
            if token is None:
                self._error(401, "Requires authentication")
                return
            if identity is None:
                self._error(401, "Bad credentials")
                return
            if github.used.get(token, 0) >= identity.limit:
                self._send(403, {"message": "API rate limit exceeded for installation. If you reach out to GitHub "
                                            "Support for help, please include the request ID.",
                                 "documentation_url": "https://docs.github.com/rest/overview/rate-limits-for-the-rest-api",
                                 "status": "403"},
                           {"x-ratelimit-limit": str(identity.limit), "x-ratelimit-remaining": "0",
                            "x-ratelimit-used": str(identity.limit)})
                return
            self._identity = identity
            self._route(method, parts.path, parse_qs(parts.query), body, identity)

    def _oidc_token(self, method: str, token: str | None, query: dict[str, list[str]]) -> None:
        """A fresh JWT per request, for the audience asked for."""
        github = self.github
        if token != OIDC_REQUEST_TOKEN:
            self._error(401, "Bad credentials" if token else "Requires authentication")
        elif method != "GET":
            self._error(404, "Not Found")
        elif query.get("api-version") != ["2.0"] or not query.get("audience", [""])[0]:
            self._error(400, "api-version=2.0 and audience are required")
        else:
            audience = query["audience"][0]
            github.oidc_requests.append(audience)
            self._send(200, {"value": f"eyJ.fake-oidc-{len(github.oidc_requests)}.{audience}", "count": 1})

    def _route(self, method: str, path: str, query: dict[str, list[str]], body: Any, me: Identity) -> None:
        github = self.github
        if path == "/user" and method == "GET":
            if me.installation:
                self._error(403, "Resource not accessible by integration")
            else:
                self._send(200, {**me.user, "name": "The Octocat", "public_repos": 8})
            return
        if match := re.fullmatch(r"/repos/([\w.-]+/[\w.-]+)/pulls", path):
            state = query.get("state", ["open"])[0]
            if method != "GET" or state not in ("open", "closed", "all"):
                self._error(422 if method == "GET" else 404, "Validation Failed" if method == "GET" else "Not Found")
                return
            found = [pr for (repo, _), pr in sorted(github.pulls.items(), key=lambda kv: -kv[0][1])
                     if repo == match.group(1) and state in ("all", pr["state"])]
            self._page(found, query, f"{github.url}/repos/{match.group(1)}/pulls", {"state": state},
                       lambda pr: {k: v for k, v in _public(pr).items()
                                   if k not in ("merged", "mergeable", "mergeable_state")})
            return
        if match := re.fullmatch(r"/repos/([\w.-]+/[\w.-]+)/commits/([0-9a-f]{7,40})/pulls", path):
            # "List pull requests associated with a commit": merged ones whose merge made it, open ones
            # whose head it is (GitHub's answer, in the pull list's shape)
            if method != "GET":
                self._error(404, "Not Found")
                return
            sha = match.group(2)
            found = [pr for (repo, _), pr in sorted(github.pulls.items())
                     if repo == match.group(1) and sha in (pr.get("merge_commit_sha"), pr["head"]["sha"])]
            self._page(found, query, f"{github.url}{path}", {},
                       lambda pr: {k: v for k, v in _public(pr).items()
                                   if k not in ("merged", "mergeable", "mergeable_state")})
            return
        if match := re.fullmatch(r"/repos/([\w.-]+/[\w.-]+)/pulls/(\d+)(/files)?", path):
            pr = github.pulls.get((match.group(1), int(match.group(2))))
            if pr is None or method != "GET":
                self._error(404, "Not Found")
            elif match.group(3):
                self._page([_file_entry(github.url, match.group(1), pr["head"]["sha"], p, t)
                            for p, t in sorted(pr["_files"].items())], query,
                           f"{github.url}/repos/{match.group(1)}/pulls/{match.group(2)}/files", {}, lambda f: f)
            else:
                self._send(200, _public(pr))
            return
        if match := re.fullmatch(r"/repos/([\w.-]+/[\w.-]+)/contents/(.+)", path):
            from urllib.parse import unquote

            repo, file_path = match.group(1), unquote(match.group(2))
            ref = query.get("ref", [None])[0]
            text = github.trees.get((repo, ref or ""), {}).get(file_path)
            if method != "GET" or text is None:
                self._error(404, "Not Found")
            else:
                self._send(200, _content_entry(github.url, repo, ref, file_path, text))
            return
        if match := re.fullmatch(r"/repos/([\w.-]+/[\w.-]+)/actions/workflows(?:/([^/]+)(?:/(enable|disable))?)?",
                                 path):
            self._workflows(method, match.group(1), match.group(2), match.group(3), query, me)
            return
        if match := re.fullmatch(r"/repos/([\w.-]+/[\w.-]+)/issues/comments", path):
            # GET /repos/{owner}/{repo}/issues/comments: every issue's comments, `since` an update time
            if method != "GET":
                self._error(404, "Not Found")
                return
            repo, since = match.group(1), query.get("since", [""])[0]
            items = [c for c in sorted(github.comments.values(), key=lambda c: c["id"])
                     if c["_issue"][0] == repo and c["updated_at"] >= since]
            if query.get("sort", [""])[0] == "updated":
                items.sort(key=lambda c: (c["updated_at"], c["id"]))
            if query.get("direction", ["asc"])[0] == "desc" and "sort" in query:
                items.reverse()
            keep = {k: v[0] for k, v in query.items() if k in ("since", "sort", "direction")}
            self._page(items, query, f"{github.url}/repos/{repo}/issues/comments", keep, _public)
            return
        if match := re.fullmatch(r"/repositories/(\d+)/issues/(\d+)/comments", path):
            # Where GitHub's pagination links point: the repository by id.
            repo = next((r for r, i in github.repo_ids.items() if i == int(match.group(1))), None)
            if repo is None or method != "GET":
                self._error(404, "Not Found")
            else:
                self._list(repo, int(match.group(2)), query)
            return
        if match := re.fullmatch(r"/repos/([\w.-]+/[\w.-]+)/issues/(\d+)/comments", path):
            repo, number = match.group(1), int(match.group(2))
            if method == "GET":
                self._list(repo, number, query)
            elif method == "POST":
                if not me.can_write:
                    self._error(403, "Resource not accessible by integration")
                elif not isinstance(body, dict) or not isinstance(body.get("body"), str):
                    self._error(422, "Invalid request.\n\n\"body\" wasn't supplied.")
                elif len(body["body"]) > LIMIT:
                    self._too_long()
                else:
                    self._send(201, _public(github._create(repo, number, body["body"], me.user)))
            else:
                self._error(404, "Not Found")
            return
        if match := re.fullmatch(r"/repos/([\w.-]+/[\w.-]+)/issues/comments/(\d+)", path):
            comment = github.comments.get(int(match.group(2)))
            if comment is None or comment["_issue"][0] != match.group(1):
                self._error(404, "Not Found")
            elif method == "GET":
                self._send(200, _public(comment))
            elif not me.can_write:
                self._error(403, "Resource not accessible by integration")
            elif method == "PATCH":
                # As on github.com, anyone with write access may edit any comment: the author check
                # is the client's job.
                if not isinstance(body, dict) or not isinstance(body.get("body"), str):
                    self._error(422, "Invalid request.")
                elif len(body["body"]) > LIMIT:
                    self._too_long()
                else:
                    comment.update(body=body["body"], updated_at=_now())
                    self._send(200, _public(comment))
            elif method == "DELETE":
                del github.comments[comment["id"]]
                self._send(204)
            else:
                self._error(404, "Not Found")
            return
        if self._setup(method, path, query, me):
            return
        self._error(404, "Not Found")

    def _setup(self, method: str, path: str, query: dict[str, list[str]], me: Identity) -> bool:
        """The reads of a repository's setup (all GET, real shapes and statuses): the repository,
        an organization's plan, environments with their branch policies and variables, branch
        protection, the OIDC subject template, CODEOWNERS errors, Actions variables. Whether the
        path was one of them."""
        github = self.github
        repo_path = r"/repos/([\w.-]+/[\w.-]+)"
        routes = [
            (repo_path, "metadata"),
            (r"/orgs/([\w.-]+)", "metadata"),
            (repo_path + r"/environments", "actions"),
            (repo_path + r"/environments/([^/]+)", "actions"),
            (repo_path + r"/environments/([^/]+)/deployment-branch-policies", "actions"),
            (repo_path + r"/environments/([^/]+)/variables", "environments"),
            (repo_path + r"/branches/([^/]+)/protection", "administration"),
            (repo_path + r"/actions/oidc/customization/sub", "actions"),
            (repo_path + r"/codeowners/errors", "contents"),
            (repo_path + r"/actions/variables", "actions_variables"),
        ]
        found = next(((i, scope, m) for i, (pattern, scope) in enumerate(routes)
                      if (m := re.fullmatch(pattern, path))), None)
        if found is None:
            return False
        index, scope, match = found
        if method != "GET":
            self._error(404, "Not Found")
            return True
        if scope != "metadata" and not me.may(scope, "read"):
            self._error(403, "Resource not accessible by integration")
            return True
        from urllib.parse import unquote

        groups = [unquote(g) for g in match.groups()]
        if index == 0:
            self._send(200, github.repository(groups[0]))
        elif index == 1:
            org = github.orgs.get(groups[0])
            if org is None:
                self._error(404, "Not Found")
            else:
                body = {"login": groups[0], "id": 9_919, "node_id": "MDEyOk9yZ2FuaXphdGlvbjk5MTk=",
                        "url": f"{github.url}/orgs/{groups[0]}", "type": "Organization"}
                if not me.installation and org.get("plan"):  # the plan: owners only, never an installation
                    body["plan"] = {"name": org["plan"], "space": 976562499, "private_repos": 999999,
                                    "filled_seats": 4, "seats": 5}
                self._send(200, body)
        elif index == 2:
            found = [_public(e) for (r, _), e in sorted(github.environments.items()) if r == groups[0]]
            self._send(200, {"total_count": len(found), "environments": found})
        else:
            self._setup_item(index, groups, query)
        return True

    def _setup_item(self, index: int, groups: list[str], query: dict[str, list[str]]) -> None:
        github = self.github
        repo = groups[0]
        if index in (3, 4, 5):
            environment = github.environments.get((repo, groups[1]))
            if environment is None:
                self._error(404, "Not Found")
            elif index == 3:
                self._send(200, _public(environment))
            elif index == 4:
                per_page = min(int(query.get("per_page", ["30"])[0]), 100)
                page = int(query.get("page", ["1"])[0])
                items = environment["_policies"]
                self._send(200, {"total_count": len(items),
                                 "branch_policies": items[(page - 1) * per_page: page * per_page]})
            else:
                per_page = min(int(query.get("per_page", ["10"])[0]), 30)  # GitHub: at most 30 a page
                page = int(query.get("page", ["1"])[0])
                now = environment["created_at"]
                items = [{"name": k, "value": v, "created_at": now, "updated_at": now}
                         for k, v in sorted(environment["_variables"].items())]
                self._send(200, {"total_count": len(items), "variables": items[(page - 1) * per_page: page * per_page]})
        elif index == 6:
            protection = github.protections.get((repo, groups[1]))
            if protection is None:
                self._send(404, {"message": "Branch not protected",
                                 "documentation_url": "https://docs.github.com/rest/branches/branch-protection"
                                                      "#get-branch-protection", "status": "404"})
            else:
                self._send(200, protection)
        elif index == 7:
            # A repository that never set a template: the default, and (since GitHub's immutable
            # subjects) `use_immutable_subject` and `sub_claim_prefix`; this one is an older, classic one.
            self._send(200, github.oidc_sub.get(repo, {"use_default": True, "use_immutable_subject": False,
                                                       "sub_claim_prefix": f"repo:{repo}"}))
        elif index == 8:
            errors = github.codeowners_errors.get(repo, [])
            if errors is None:
                self._error(404, "Not Found")
            else:
                self._send(200, {"errors": errors})
        else:
            now = _now()
            items = [{"name": k, "value": v, "created_at": now, "updated_at": now}
                     for k, v in sorted(github.repo_variables.get(repo, {}).items())]
            self._send(200, {"total_count": len(items), "variables": items})

    def _workflows(self, method: str, repo: str, workflow_id: str | None, verb: str | None,
                   query: dict[str, list[str]], me: Identity) -> None:
        """GET .../actions/workflows[/{workflow_id}] and PUT .../{workflow_id}/enable|disable, with
        the answers GitHub's description gives: 200 with the workflow, 204 with no body."""
        github = self.github
        if (method, verb) not in (("GET", None), ("PUT", "enable"), ("PUT", "disable")):
            self._error(404, "Not Found")
            return
        if not me.may("actions", "write" if verb else "read"):
            self._error(403, "Resource not accessible by integration")
            return
        if workflow_id is None:
            found = [w for (r, _), w in sorted(github.workflows.items()) if r == repo]
            self._send(200, {"total_count": len(found), "workflows": found})
            return
        workflow = github.workflow(repo, workflow_id)
        if workflow is None:
            self._error(404, "Not Found")
        elif verb is None:
            self._send(200, workflow)
        else:
            workflow.update(state="active" if verb == "enable" else "disabled_manually", updated_at=_now())
            self._send(204)

    def _page(self, items: list, query: dict[str, list[str]], base: str, keep: dict[str, str], shape) -> None:
        per_page = min(int(query.get("per_page", ["30"])[0]), 100)
        page = int(query.get("page", ["1"])[0])
        last = max((len(items) + per_page - 1) // per_page, 1)
        extra = "".join(f"&{k}={v}" for k, v in keep.items())
        links = [f'<{base}?per_page={per_page}{extra}&page={page + 1}>; rel="next"'] if page < last else []
        chunk = items[(page - 1) * per_page: page * per_page]
        self._send(200, [shape(i) for i in chunk], {"Link": ", ".join(links)} if links else None)

    def _too_long(self) -> None:
        self._error(422, "Validation Failed", errors=[{
            "resource": "IssueComment", "code": "custom", "field": "body",
            "message": f"body is too long (maximum is {LIMIT} characters)"}])

    def _list(self, repo: str, number: int, query: dict[str, list[str]]) -> None:
        per_page = min(int(query.get("per_page", ["30"])[0]), 100)
        page = int(query.get("page", ["1"])[0])
        items = self.github.issue_comments(repo, number)
        last = max((len(items) + per_page - 1) // per_page, 1)
        chunk = items[(page - 1) * per_page: page * per_page]
        base = f"{self.github.url}/repositories/{self.github.repo_id(repo)}/issues/{number}/comments"
        links = []
        if page < last:
            links += [f'<{base}?per_page={per_page}&page={page + 1}>; rel="next"',
                      f'<{base}?per_page={per_page}&page={last}>; rel="last"']
        if page > 1:
            links += [f'<{base}?per_page={per_page}&page=1>; rel="first"',
                      f'<{base}?per_page={per_page}&page={page - 1}>; rel="prev"']
        self._send(200, [_public(c) for c in chunk], {"Link": ", ".join(links)} if links else None)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def do_PUT(self) -> None:
        self._handle("PUT")


def _etag_matches(header: str | None, etag: str) -> bool:
    """If-None-Match uses the weak comparison: `W/"x"` matches `"x"` and `W/"x"`; `*` matches all."""
    if not header:
        return False
    if header.strip() == "*":
        return True
    bare = etag.removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == bare for tag in header.split(","))


def parse_file_commands(text: str) -> dict[str, str]:
    """Read $GITHUB_OUTPUT / $GITHUB_ENV as the runner does: `k=v` lines and `k<<DELIM` blocks."""
    values, lines, i = {}, text.split("\n"), 0
    while i < len(lines):
        line = lines[i]
        if "<<" in line and ("=" not in line or line.index("<<") < line.index("=")):
            name, delimiter = line.split("<<", 1)
            end = lines.index(delimiter, i + 1)
            values[name] = "\n".join(lines[i + 1:end])
            i = end + 1
            continue
        if line:
            name, value = line.split("=", 1)
            values[name] = value
        i += 1
    return values
