"""GitHub integration: workflow commands, job files, the event payload, and a small REST client.

Everything a workflow step needs from GitHub goes through here:

- workflow commands (`::error file=...::`), the job summary, `$GITHUB_OUTPUT` and `$GITHUB_ENV`;
- the event payload at `$GITHUB_EVENT_PATH` (the pull request's number, base, head, fork or not);
- the REST API at `$GITHUB_API_URL` with `$GITHUB_TOKEN` on `$GITHUB_REPOSITORY`: retries on 5xx
  and rate limits (honouring `Retry-After` and `x-ratelimit-reset`), pagination, and the one
  sticky PR comment per experiment that every push edits in place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from automation import __version__
from automation.errors import AutomationError, ConfigError

log = logging.getLogger(__name__)

DEFAULT_API_URL = "https://api.github.com"
# The identity behind the workflow's GITHUB_TOKEN. Its installation token cannot read GET /user,
# so when that answers 401/403 this is who we are (AUTOMATION_COMMENT_AUTHOR overrides it for an
# app token of your own).
ACTIONS_BOT = "github-actions[bot]"
COMMENT_LIMIT = 65_536  # GitHub refuses a longer issue comment body (422)


def in_actions() -> bool:
    return os.environ.get("GITHUB_ACTIONS") == "true"


# ---------------------------------------------------------------------------------------------
# Workflow commands and job files


def _escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


def annotation(level: str, message: str, *, file: str | None = None, line: int | None = None,
               title: str | None = None) -> str:
    """A workflow command such as `::error file=experiments/x.yaml,line=14::...`, shown on the PR diff."""
    props = []
    if file:
        props.append(f"file={_escape_property(file)}")
    if line:
        props.append(f"line={line}")
    if title:
        props.append(f"title={_escape_property(title)}")
    joined = " " + ",".join(props) if props else ""
    return f"::{level}{joined}::{_escape_data(message)}"


def append_step_summary(markdown: str) -> bool:
    """Append to `$GITHUB_STEP_SUMMARY` when set; returns whether it was written."""
    path = os.environ.get("GITHUB_STEP_SUMMARY")
    if not path:
        return False
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(markdown.rstrip("\n") + "\n")
    with _summary_ledger(path).open("a", encoding="utf-8") as handle:
        handle.write(_summary_digest(markdown) + "\n")
    return True


def _summary_ledger(summary: str) -> Path:
    # Each step has its own summary file, and GitHub shows them one after another as the job's
    # summary: what this job already wrote is kept beside them, in the job's temporary folder.
    return Path(os.environ.get("RUNNER_TEMP") or Path(summary).parent) / "automation-job-summary.sha256"


def _summary_digest(markdown: str) -> str:
    """The digest of what a reader sees: hidden lines (the report's marker, a comment's status line) left out."""
    shown = [line for line in markdown.strip().splitlines() if not re.fullmatch(r"\s*<!--.*-->\s*", line)]
    return hashlib.sha256("\n".join(shown).strip().encode()).hexdigest()


def in_job_summary(markdown: str) -> bool:
    """Whether this job already wrote `markdown` to its summary (in this step or an earlier one)."""
    path = os.environ.get("GITHUB_STEP_SUMMARY")
    try:
        written = _summary_ledger(path).read_text(encoding="utf-8").split() if path else []
    except OSError:
        return False
    return _summary_digest(markdown) in written


def report_to_summary(experiment: str, body: str) -> None:
    """Where a PR comment could not be posted (a fork's read-only token): the report in the job
    summary, once. When the report stage of this job already wrote it there, a line that says so."""
    reason = "could not be posted as a PR comment: the token is read-only, as on pull requests from forks"
    if in_job_summary(body):
        append_step_summary(f"The report for <code>{experiment}</code> above {reason}.")
        return
    append_step_summary(f"<details open><summary>Report for <code>{experiment}</code> ({reason})</summary>"
                        f"\n\n{body}\n</details>")


_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


def _append_file_command(variable: str, name: str, value: str) -> bool:
    """`name=value`, or the heredoc form with a random delimiter when the value has line breaks, so
    a value can never smuggle in a second variable."""
    path = os.environ.get(variable)
    if not path:
        return False
    if not _NAME.match(name):
        raise ValueError(f"not a valid name for ${variable}: {name!r}")
    if "\n" in value or "\r" in value:
        delimiter = f"ghadelimiter_{uuid.uuid4()}"
        entry = f"{name}<<{delimiter}\n{value}\n{delimiter}\n"
    else:
        entry = f"{name}={value}\n"
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(entry)
    return True


def set_output(name: str, value: str) -> bool:
    """Write a step output to `$GITHUB_OUTPUT`; False when not in a workflow step."""
    return _append_file_command("GITHUB_OUTPUT", name, value)


def set_env(name: str, value: str) -> bool:
    """Export a variable to the job's later steps through `$GITHUB_ENV`."""
    return _append_file_command("GITHUB_ENV", name, value)


# ---------------------------------------------------------------------------------------------
# The event payload


def read_event(path: str | Path | None = None) -> dict[str, Any]:
    """The payload of the event that started the workflow ({} outside a workflow)."""
    path = path or os.environ.get("GITHUB_EVENT_PATH")
    if not path:
        return {}
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read the event payload {path}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"the event payload {path} is not a JSON object")
    return data


def pull_request_number(event: Mapping[str, Any]) -> int | None:
    pr = event.get("pull_request") or {}
    number = pr.get("number", event.get("number"))
    return number if isinstance(number, int) else None


def head_sha(event: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> str | None:
    """The commit the run is about: the pull request's head commit on pull_request events, where
    `GITHUB_SHA` is GitHub's test-merge commit (not in the PR, and new whenever the base branch
    moves); `GITHUB_SHA` for every other event; None outside a workflow."""
    env = os.environ if env is None else env
    event = read_event(env.get("GITHUB_EVENT_PATH")) if event is None else event
    head = ((event.get("pull_request") or {}).get("head") or {}).get("sha")
    if isinstance(head, str) and head:
        return head
    return env.get("GITHUB_SHA") or None


def is_fork(event: Mapping[str, Any], repository: str | None = None) -> bool:
    """Whether the pull request comes from another repository (a deleted fork counts as one)."""
    pr = event.get("pull_request")
    if not pr:
        return False
    own = repository or (pr.get("base") or {}).get("repo", {}).get("full_name")
    head_repo = (pr.get("head") or {}).get("repo") or {}
    return head_repo.get("full_name") != own


# ---------------------------------------------------------------------------------------------
# The REST client


class GitHubError(AutomationError):
    """A GitHub API call failed (after retries, where retrying made sense)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class GitHubPermissionError(GitHubError):
    """403: the token may not do this (a read-only token on a fork's pull request)."""


def _message_of(response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(body, dict):
        details = "; ".join(str(e.get("message", e)) for e in body.get("errors", []) if isinstance(e, dict))
        return str(body.get("message", "")) + (f" ({details})" if details else "")
    return str(body)[:300]


class GitHubClient:
    """The few REST calls this project makes, with retries and pagination.

    Retried: network errors and 5xx (exponential backoff), 429 and rate-limited 403 (waiting for
    `Retry-After`, else until `x-ratelimit-reset`, else at least a minute as GitHub asks for
    secondary limits). A wait longer than `max_wait_s` is not slept through: it raises.
    """

    def __init__(self, token: str, repository: str, api_url: str = DEFAULT_API_URL, *,
                 max_attempts: int = 5, backoff_s: float = 1.0, max_wait_s: float = 300.0,
                 timeout_s: float = 30.0, sleep: Callable[[float], None] = time.sleep):
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", repository or ""):
            raise ConfigError(f"GITHUB_REPOSITORY must be OWNER/NAME, got {repository!r}")
        self.repository = repository
        self.api_url = api_url.rstrip("/")
        self.max_attempts, self.backoff_s, self.max_wait_s = max_attempts, backoff_s, max_wait_s
        self._sleep = sleep
        self._login: str | None = None
        import httpx

        self._http = httpx.Client(timeout=timeout_s, headers={
            "Authorization": f"Bearer {token}", "Accept": "application/vnd.github+json",
            "X-GitHub-Api-Version": "2022-11-28", "User-Agent": f"automation/{__version__}",
        })

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **kwargs: Any) -> GitHubClient:
        env = os.environ if env is None else env
        token, repository = env.get("GITHUB_TOKEN"), env.get("GITHUB_REPOSITORY")
        if not token or not repository:
            missing = [n for n, v in (("GITHUB_TOKEN", token), ("GITHUB_REPOSITORY", repository)) if not v]
            raise ConfigError(f"{' and '.join(missing)} not set: in a workflow pass "
                              "`GITHUB_TOKEN: ${{ github.token }}` through the step's env")
        return cls(token, repository, env.get("GITHUB_API_URL") or DEFAULT_API_URL, **kwargs)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> GitHubClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests -------------------------------------------------------------------------------
    def _url(self, path_or_url: str) -> str:
        if path_or_url.startswith(("http://", "https://")):
            # Pagination links are absolute; the token goes to the API host and nowhere else.
            if not path_or_url.startswith(self.api_url + "/"):
                raise GitHubError(f"refusing to follow a link off the API host: {path_or_url}")
            return path_or_url
        return self.api_url + path_or_url

    def _wait_for(self, response, attempt: int) -> float | None:
        """Seconds to wait before retrying this response; None when it is not worth retrying."""
        status, headers = response.status_code, response.headers
        if status >= 500:
            return self.backoff_s * 2 ** attempt
        rate_limited = status == 429 or (status == 403 and (
            headers.get("x-ratelimit-remaining") == "0" or "retry-after" in headers
            or "rate limit" in _message_of(response).lower()))
        if not rate_limited:
            return None
        retry_after = headers.get("retry-after")
        if retry_after:
            try:
                return max(float(retry_after), 0.0)
            except ValueError:
                from email.utils import parsedate_to_datetime

                try:
                    return max(parsedate_to_datetime(retry_after).timestamp() - time.time(), 0.0)
                except (TypeError, ValueError):
                    pass
        reset = headers.get("x-ratelimit-reset")
        if headers.get("x-ratelimit-remaining") == "0" and reset and reset.isdigit():
            return max(int(reset) - time.time(), 0.0) + 1.0
        return max(60.0, self.backoff_s * 2 ** attempt)  # a secondary limit that says nothing

    def request(self, method: str, path: str, *, json_body: Any = None,
                params: Mapping[str, Any] | None = None):
        import httpx

        url = self._url(path)
        for attempt in range(self.max_attempts):
            last = attempt == self.max_attempts - 1
            try:
                response = self._http.request(method, url, json=json_body, params=params)
            except httpx.TransportError as err:
                if last:
                    raise GitHubError(f"{method} {url}: {type(err).__name__}: {err}") from err
                wait, why = self.backoff_s * 2 ** attempt, type(err).__name__
            else:
                if response.is_success:
                    return response
                wait = self._wait_for(response, attempt)
                why = f"{response.status_code} {_message_of(response)}"
                if wait is None or last or wait > self.max_wait_s:
                    # 403 is a token without the right (a fork's); 401 a broken token: an error.
                    error = GitHubPermissionError if response.status_code == 403 and wait is None else GitHubError
                    suffix = f" (retrying would mean waiting {wait:.0f} s)" if wait and wait > self.max_wait_s else ""
                    raise error(f"{method} {url}: {why}{suffix}", response.status_code)
            log.warning("GitHub %s %s: %s; retrying in %.1f s", method, url, why, wait)
            self._sleep(wait)
        raise AssertionError("unreachable")

    def paginate(self, path: str, params: Mapping[str, Any] | None = None) -> Iterator[Any]:
        """Every item of a list endpoint, following the `Link: <...>; rel="next"` headers."""
        url: str | None = path
        query: Mapping[str, Any] | None = {"per_page": 100, **(params or {})}
        while url:
            response = self.request("GET", url, params=query)
            yield from response.json()
            url, query = _next_link(response.headers.get("link", "")), None  # the link holds the query

    # -- calls ----------------------------------------------------------------------------------
    def viewer_login(self) -> str:
        """Who the token writes as: GET /user for a person's token; the Actions bot when /user
        answers 403, as it does to an installation token."""
        if self._login is None:
            override = os.environ.get("AUTOMATION_COMMENT_AUTHOR")
            if override:
                self._login = override
            else:
                try:
                    self._login = self.request("GET", "/user").json()["login"]
                except GitHubPermissionError:
                    self._login = ACTIONS_BOT  # an installation token (GITHUB_TOKEN) cannot read /user
        return self._login

    def list_issue_comments(self, number: int) -> list[dict[str, Any]]:
        return list(self.paginate(f"/repos/{self.repository}/issues/{number}/comments"))

    def create_issue_comment(self, number: int, body: str) -> dict[str, Any]:
        return self.request("POST", f"/repos/{self.repository}/issues/{number}/comments",
                            json_body={"body": body}).json()

    def update_issue_comment(self, comment_id: int, body: str) -> dict[str, Any]:
        return self.request("PATCH", f"/repos/{self.repository}/issues/comments/{comment_id}",
                            json_body={"body": body}).json()

    def delete_issue_comment(self, comment_id: int) -> None:
        self.request("DELETE", f"/repos/{self.repository}/issues/comments/{comment_id}")

    # -- pull requests (the reconcile loop's desired state) --------------------------------------
    def get_pull(self, number: int) -> dict[str, Any]:
        """GET /repos/{owner}/{repo}/pulls/{pull_number}: state, merged, head and base."""
        return self.request("GET", f"/repos/{self.repository}/pulls/{number}").json()

    def list_pulls(self, state: str = "open") -> list[dict[str, Any]]:
        return list(self.paginate(f"/repos/{self.repository}/pulls", {"state": state}))

    def list_pull_files(self, number: int) -> list[dict[str, Any]]:
        """The files a pull request changes (GitHub lists at most 3000)."""
        return list(self.paginate(f"/repos/{self.repository}/pulls/{number}/files"))

    def file_text(self, path: str, ref: str) -> str | None:
        """A file's text at a commit (GET .../contents/{path}?ref=); None when it is not there."""
        import base64
        from urllib.parse import quote

        try:
            body = self.request("GET", f"/repos/{self.repository}/contents/{quote(path)}", params={"ref": ref}).json()
        except GitHubError as err:
            if err.status == 404:
                return None
            raise
        if not isinstance(body, dict) or body.get("type") != "file":
            return None
        if body.get("encoding") != "base64":  # over 1 MB the API answers without content: not an experiment
            raise GitHubError(f"{path}@{ref[:7]}: the contents API returned no content (encoding "
                              f"{body.get('encoding')!r}); is the file over 1 MB?")
        return base64.b64decode(body.get("content", "")).decode("utf-8")


def _next_link(header: str) -> str | None:
    for part in header.split(","):
        match = re.match(r'\s*<([^>]+)>\s*;(.*)', part)
        if match and re.search(r'rel="?next"?', match.group(2)):
            return match.group(1)
    return None


# ---------------------------------------------------------------------------------------------
# The sticky comment


def _closers(text: str) -> list[str]:
    """What closes the code fence and <details> blocks left open at the end of `text`."""
    fence = None
    for line in text.split("\n"):
        stripped = line.strip()
        match = re.match(r"^(`{3,}|~{3,})", stripped)
        if not match:
            continue
        if fence is None:
            fence = match.group(1)
        elif stripped.startswith(fence) and stripped.strip(fence[0]) == "":
            fence = None
    opened = len(re.findall(r"<details\b", text)) - len(re.findall(r"</details>", text))
    return ([fence] if fence else []) + ["</details>"] * max(opened, 0)


def fit_comment(body: str, limit: int = COMMENT_LIMIT, *, where: str = "the job summary of this run") -> str:
    """`body` cut to fit GitHub's comment limit, at a line break, with open code fences and
    <details> closed and a note saying how much was left out and where the whole text is."""
    if len(body) <= limit:
        return body
    budget = limit - 600  # room for the note and the closing lines
    while True:
        cut = body[: max(budget, 0)]
        if "\n" in cut:
            cut = cut[: cut.rfind("\n")]
        note = (f"> **Cut:** this comment is {len(body):,} characters, over GitHub's {limit:,}-character "
                f"limit; the last {len(body) - len(cut):,} are left out. The whole report is in {where}.")
        result = "\n".join([cut, *_closers(cut), "", note]) + "\n"
        if len(result) <= limit:
            return result
        if budget <= 0:  # pathological input (thousands of open blocks): cut without closing them
            return body[: max(limit - len(note) - 2, 0)] + "\n\n" + note[: limit - 2]
        budget -= len(result) - limit


@dataclass(frozen=True)
class CommentResult:
    action: str  # "created", "updated" or "unchanged"
    comment_id: int
    url: str
    removed_duplicates: int = 0


def _ours(comments: list[dict[str, Any]], marker: str, login: str) -> list[dict[str, Any]]:
    """Comments with the marker AND written by us: a person quoting our marker is never edited."""
    found = [c for c in comments
             if marker in (c.get("body") or "") and (c.get("user") or {}).get("login") == login]
    return sorted(found, key=lambda c: c["id"])


def upsert_comment(client: GitHubClient, number: int, body: str, marker: str) -> CommentResult:
    """Create the one comment that carries `marker` on issue/PR `number`, or edit it in place.

    Two jobs racing can both create one; after creating, the older of ours is kept (and given
    this body) and the newer ones deleted, so the pull request ends with exactly one.
    """
    if marker not in body:
        body = f"{marker}\n{body}"
    login = client.viewer_login()
    ours = _ours(client.list_issue_comments(number), marker, login)
    if ours:
        keep, action = ours[0], "unchanged"
        if keep.get("body") != body:
            keep, action = client.update_issue_comment(keep["id"], body), "updated"
        extra = ours[1:]
    else:
        created = client.create_issue_comment(number, body)
        ours = _ours(client.list_issue_comments(number), marker, login) or [created]
        keep, action, extra = ours[0], "created", ours[1:]
        if keep["id"] != created["id"]:
            keep, action = client.update_issue_comment(keep["id"], body), "updated"
    for duplicate in extra:
        client.delete_issue_comment(duplicate["id"])
    return CommentResult(action, keep["id"], keep.get("html_url", ""), len(extra))
