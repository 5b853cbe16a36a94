"""GitHub integration: workflow commands, job files, the event payload, and a small REST client.

Everything a workflow step needs from GitHub goes through here:

- workflow commands (`::error file=...::`), the job summary, `$GITHUB_OUTPUT` and `$GITHUB_ENV`;
- the event payload at `$GITHUB_EVENT_PATH` (the pull request's number, base, head, fork or not);
- the REST API at `$GITHUB_API_URL` with `$GITHUB_TOKEN` on `$GITHUB_REPOSITORY`: retries on 5xx
  and rate limits (honouring `Retry-After` and `x-ratelimit-reset`), pagination, and the one
  sticky PR comment per experiment that every push edits in place.

Requests are budgeted (GITHUB_TOKEN allows 1,000 an hour per repository): every GET is conditional
(`If-None-Match` with the ETag of the last answer to the same URL; a 304 does not count against the
primary rate limit), answers for a commit SHA are kept for good, a pull request's comments are
listed once per process and kept current from our own writes, and `GET /user` is never called in
Actions. `GitHubClient.counts` says what a process spent.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from automation import __version__
from automation.errors import AutomationError, ConfigError

log = logging.getLogger(__name__)

DEFAULT_API_URL = "https://api.github.com"
# The identity behind the workflow's GITHUB_TOKEN. Its installation token cannot read GET /user (403),
# so in Actions this is who we are without asking; AUTOMATION_BOT_LOGIN (or the older
# AUTOMATION_COMMENT_AUTHOR) names a GitHub App's bot instead, e.g. `my-app[bot]`.
ACTIONS_BOT = "github-actions[bot]"
BOT_LOGIN_VARIABLES = ("AUTOMATION_BOT_LOGIN", "AUTOMATION_COMMENT_AUTHOR")
_SHA = re.compile(r"[0-9a-f]{40}")
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


class _Cached:
    """The last 200 answer to a GET: its ETag, its headers that matter, and its body."""

    __slots__ = ("etag", "headers", "body")

    def __init__(self, etag: str, headers: dict[str, str], body: bytes):
        self.etag, self.headers, self.body = etag, headers, body


_KEPT_HEADERS = ("content-type", "link", "etag", "last-modified")


class ResponseCache:
    """ETags and bodies of GET answers, keyed by the URL with its query and no token: in memory
    for the process and, with `folder`, in small JSON files there (one per URL) for the next
    process on the same desk. Entries for a commit SHA never change and are kept apart
    (`immutable`). ETags are token-specific on GitHub, so a file cache only pays where the token
    stays the same (a person's token); in Actions each job has a new GITHUB_TOKEN."""

    def __init__(self, folder: Path | None = None):
        self.folder = Path(folder) if folder else None
        self._memory: dict[str, _Cached] = {}
        self._immutable: dict[str, Any] = {}

    def _file(self, kind: str, key: str) -> Path | None:
        if self.folder is None:
            return None
        return self.folder / kind / (hashlib.sha256(key.encode()).hexdigest()[:40] + ".json")

    def _read(self, kind: str, key: str) -> dict[str, Any] | None:
        path = self._file(kind, key)
        try:
            data = json.loads(path.read_text(encoding="utf-8")) if path else None
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) and data.get("key") == key else None

    def _write(self, kind: str, key: str, data: dict[str, Any]) -> None:
        path = self._file(kind, key)
        if path is None:
            return
        from automation.workspace import write_text_atomic

        try:
            write_text_atomic(path, json.dumps({"key": key, **data}), mode=0o600)
        except OSError as err:  # a cache that cannot be written costs requests, nothing else
            log.debug("GitHub cache: cannot write %s: %s", path, err)

    def get(self, key: str) -> _Cached | None:
        if key not in self._memory:
            data = self._read("etag", key)
            if data and isinstance(data.get("etag"), str):
                self._memory[key] = _Cached(data["etag"], dict(data.get("headers") or {}),
                                            base64.b64decode(data.get("body") or ""))
        return self._memory.get(key)

    def put(self, key: str, entry: _Cached) -> None:
        self._memory[key] = entry
        self._write("etag", key, {"etag": entry.etag, "headers": entry.headers,
                                  "body": base64.b64encode(entry.body).decode()})

    def fixed(self, key: str) -> tuple[bool, Any]:
        """(found, value) for an answer that cannot change (it names a commit SHA)."""
        if key not in self._immutable:
            data = self._read("sha", key)
            if data is None:
                return False, None
            self._immutable[key] = data.get("value")
        return True, self._immutable[key]

    def fix(self, key: str, value: Any) -> None:
        self._immutable[key] = value
        self._write("sha", key, {"value": value})


def default_cache_folder(env: Mapping[str, str] | None = None) -> Path | None:
    """Where the on-disk GitHub cache lives: `<workspace>/cache/github`, on by default outside
    Actions (a desk's token stays the same, so its ETags keep answering 304) and off in Actions
    (a new runner and a new token each job). AUTOMATION_GITHUB_CACHE=0 turns it off, =1 on."""
    env = os.environ if env is None else env
    wanted = (env.get("AUTOMATION_GITHUB_CACHE") or "").strip().lower()
    if wanted in ("0", "false", "no", "off"):
        return None
    if not wanted and env.get("GITHUB_ACTIONS") == "true":
        return None
    from automation.workspace import home

    return home() / "cache" / "github"


class GitHubClient:
    """The few REST calls this project makes, with retries, pagination and a request budget.

    Retried: network errors and 5xx (exponential backoff), 429 and rate-limited 403 (waiting for
    `Retry-After`, else until `x-ratelimit-reset`, else at least a minute as GitHub asks for
    secondary limits). A wait longer than `max_wait_s` is not slept through: it raises.

    Budget: every GET sends `If-None-Match` with the ETag of the last answer to that URL, and a
    304 (free under the primary rate limit) is answered from the cache. `counts` holds what this
    client spent: `sent` (HTTP requests), `billed` (those that count against the rate limit, all
    but the 304s), `not_modified` (304s), `cached` (reads answered without a request). A client
    is one process's view: its comment lists and pull list are kept for its lifetime.
    """

    def __init__(self, token: str, repository: str, api_url: str = DEFAULT_API_URL, *,
                 max_attempts: int = 5, backoff_s: float = 1.0, max_wait_s: float = 300.0,
                 timeout_s: float = 30.0, sleep: Callable[[float], None] = time.sleep,
                 cache: ResponseCache | None = None, conditional: bool = True):
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", repository or ""):
            raise ConfigError(f"GITHUB_REPOSITORY must be OWNER/NAME, got {repository!r}")
        self.repository = repository
        self.api_url = api_url.rstrip("/")
        self.max_attempts, self.backoff_s, self.max_wait_s = max_attempts, backoff_s, max_wait_s
        self._sleep = sleep
        self._login: str | None = None
        self.cache = cache if cache is not None else ResponseCache()
        self.conditional = conditional
        self.counts: Counter[str] = Counter()
        self.rate_limit: dict[str, str] = {}  # the x-ratelimit-* headers of the last answer
        self._comments: dict[int, list[dict[str, Any]]] = {}  # issue number -> its comments, in id order
        self._listed_pulls: dict[int, dict[str, Any]] = {}  # from this process's list_pulls
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
        kwargs.setdefault("cache", ResponseCache(default_cache_folder(env)))
        return cls(token, repository, env.get("GITHUB_API_URL") or DEFAULT_API_URL, **kwargs)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> GitHubClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def budget_line(self) -> str:
        """What this process spent, for a log or the job summary."""
        c = self.counts
        left = self.rate_limit.get("x-ratelimit-remaining")
        limit = self.rate_limit.get("x-ratelimit-limit")
        tail = f"; {left} of {limit} left this hour" if left and limit else ""
        return (f"GitHub API: {c['billed']} billed request(s), {c['not_modified']} free 304(s), "
                f"{c['cached']} read(s) answered from memory{tail}")

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

    @staticmethod
    def _cache_key(url: str, params: Mapping[str, Any] | None) -> str:
        from urllib.parse import urlencode

        query = urlencode(sorted((str(k), str(v)) for k, v in (params or {}).items()))
        return f"{url}{'&' if '?' in url else '?'}{query}" if query else url

    def _account(self, response) -> None:
        self.counts["sent"] += 1
        self.counts["not_modified" if response.status_code == 304 else "billed"] += 1
        limits = {k: v for k, v in response.headers.items() if k.lower().startswith("x-ratelimit-")}
        if limits:
            self.rate_limit = limits

    def request(self, method: str, path: str, *, json_body: Any = None,
                params: Mapping[str, Any] | None = None):
        import httpx

        url = self._url(path)
        key = self._cache_key(url, params) if method == "GET" and self.conditional else None
        for attempt in range(self.max_attempts):
            last = attempt == self.max_attempts - 1
            cached = self.cache.get(key) if key else None
            headers = {"If-None-Match": cached.etag} if cached else None
            try:
                response = self._http.request(method, url, json=json_body, params=params, headers=headers)
            except httpx.TransportError as err:
                if last:
                    raise GitHubError(f"{method} {url}: {type(err).__name__}: {err}") from err
                wait, why = self.backoff_s * 2 ** attempt, type(err).__name__
            else:
                self._account(response)
                if response.status_code == 304 and cached is not None:
                    return self._from_cache(key, cached, response)
                if response.is_success:
                    if key and response.headers.get("etag"):
                        kept = {h: response.headers[h] for h in _KEPT_HEADERS if h in response.headers}
                        self.cache.put(key, _Cached(response.headers["etag"], kept, response.content))
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

    def _from_cache(self, key: str, cached: _Cached, not_modified):
        """The cached answer, as a 200, for a 304 (whose own ETag, if new, is kept)."""
        import httpx

        etag = not_modified.headers.get("etag")
        if etag and etag != cached.etag:
            cached = _Cached(etag, {**cached.headers, "etag": etag}, cached.body)
            self.cache.put(key, cached)
        headers = {**cached.headers, **{k: v for k, v in not_modified.headers.items()
                                        if k.lower().startswith("x-ratelimit-")}}
        return httpx.Response(200, headers=headers, content=cached.body, request=not_modified.request)

    def paginate(self, path: str, params: Mapping[str, Any] | None = None,
                 max_pages: int | None = None) -> Iterator[Any]:
        """Every item of a list endpoint, following the `Link: <...>; rel="next"` headers. With
        `max_pages`, a list longer than that raises `TooManyPages` after yielding those pages."""
        url: str | None = path
        query: Mapping[str, Any] | None = {"per_page": 100, **(params or {})}
        pages = 0
        while url:
            if max_pages is not None and pages >= max_pages:
                raise TooManyPages(f"{path}: more than {max_pages} page(s)")
            response = self.request("GET", url, params=query)
            pages += 1
            yield from response.json()
            url, query = _next_link(response.headers.get("link", "")), None  # the link holds the query

    # -- calls ----------------------------------------------------------------------------------
    def viewer_login(self) -> str:
        """Who the token writes as, without a request where that is known: AUTOMATION_BOT_LOGIN
        (or AUTOMATION_COMMENT_AUTHOR) when set (a GitHub App's `name[bot]`); in Actions
        `github-actions[bot]`, the GITHUB_TOKEN's author (its GET /user answers 403); elsewhere
        GET /user (a person's token), falling back to the Actions bot on 403."""
        if self._login is None:
            override = next((os.environ[v] for v in BOT_LOGIN_VARIABLES if os.environ.get(v)), None)
            if override:
                self._login = override
            elif in_actions():
                self._login = ACTIONS_BOT
            else:
                try:
                    self._login = self.request("GET", "/user").json()["login"]
                except GitHubPermissionError:
                    self._login = ACTIONS_BOT  # an installation token cannot read /user
        return self._login

    # -- issue comments: listed once per process, kept current from our own writes ---------------
    def list_issue_comments(self, number: int, *, fresh: bool = False) -> list[dict[str, Any]]:
        """The comments of issue/PR `number`, oldest first. Listed once per client (process):
        later calls answer from memory, kept current by this client's create/update/delete.
        `fresh=True` reads GitHub again (conditionally: a 304 when nothing changed is free), for
        what another job may have written meanwhile."""
        if fresh or number not in self._comments:
            self._comments[number] = sorted(
                self.paginate(f"/repos/{self.repository}/issues/{number}/comments"), key=lambda c: c["id"])
        else:
            self.counts["cached"] += 1
        return [dict(c) for c in self._comments[number]]

    def prime_issue_comments(self, pulls: Iterable[Mapping[str, Any]], *, max_pages: int | None = None) -> list[int]:
        """List the comments of many pull requests at once through the repository's comment list
        (`GET /repos/{owner}/{repo}/issues/comments?since=`, 100 a page, every issue), since the
        oldest of `pulls` (dicts with `number` and `created_at`, as list_pulls returns) was opened,
        and keep them as if each PR had been listed. Worth it from two PRs on; it reads at most
        `max_pages` pages (default: one per PR, never more than listing each would cost) and
        primes nothing when the list is longer. Returns the PR numbers primed."""
        pulls = [p for p in pulls if isinstance(p.get("number"), int) and p.get("created_at")]
        todo = {int(p["number"]) for p in pulls} - set(self._comments)
        if not todo:
            return []
        since = min(str(p["created_at"]) for p in pulls if p["number"] in todo)
        found: dict[int, list[dict[str, Any]]] = {n: [] for n in todo}
        try:
            for comment in self.paginate(f"/repos/{self.repository}/issues/comments",
                                         {"since": since, "sort": "created", "direction": "asc"},
                                         max_pages=max_pages if max_pages is not None else len(todo)):
                number = _issue_number(comment)
                if number in found:
                    found[number].append(comment)
        except TooManyPages as err:
            log.info("not priming the comment lists: %s", err)
            return []
        for number, comments in found.items():
            self._comments[number] = sorted(comments, key=lambda c: c["id"])
        return sorted(found)

    def forget_comments(self, number: int | None = None) -> None:
        """Drop the kept comment list of `number` (every one with None): the next read lists again."""
        if number is None:
            self._comments.clear()
        else:
            self._comments.pop(number, None)

    def _keep_comment(self, comment: dict[str, Any], number: int | None = None) -> None:
        number = number if number is not None else _issue_number(comment)
        kept = self._comments.get(number) if number is not None else None
        if kept is None:
            return
        kept[:] = sorted([c for c in kept if c["id"] != comment["id"]] + [comment], key=lambda c: c["id"])

    def create_issue_comment(self, number: int, body: str) -> dict[str, Any]:
        created = self.request("POST", f"/repos/{self.repository}/issues/{number}/comments",
                               json_body={"body": body}).json()
        self._keep_comment(created, number)
        return created

    def update_issue_comment(self, comment_id: int, body: str) -> dict[str, Any]:
        updated = self.request("PATCH", f"/repos/{self.repository}/issues/comments/{comment_id}",
                               json_body={"body": body}).json()
        self._keep_comment(updated)
        return updated

    def delete_issue_comment(self, comment_id: int) -> None:
        self.request("DELETE", f"/repos/{self.repository}/issues/comments/{comment_id}")
        for kept in self._comments.values():
            kept[:] = [c for c in kept if c["id"] != comment_id]

    # -- pull requests (the reconcile loop's desired state) --------------------------------------
    def get_pull(self, number: int, *, fresh: bool = True) -> dict[str, Any]:
        """GET /repos/{owner}/{repo}/pulls/{pull_number}: state, merged, head and base. With
        `fresh=False`, the pull request as this process's list_pulls saw it, when it did (the
        list lacks `merged`, `mergeable` and `mergeable_state`; `merged_at` says merged)."""
        if not fresh and number in self._listed_pulls:
            self.counts["cached"] += 1
            return dict(self._listed_pulls[number])
        return self.request("GET", f"/repos/{self.repository}/pulls/{number}").json()

    def list_pulls(self, state: str = "open") -> list[dict[str, Any]]:
        pulls = list(self.paginate(f"/repos/{self.repository}/pulls", {"state": state}))
        self._listed_pulls.update((p["number"], p) for p in pulls if isinstance(p.get("number"), int))
        return pulls

    def list_pull_files(self, number: int, head_sha: str | None = None) -> list[dict[str, Any]]:
        """The files a pull request changes (GitHub lists at most 3000). With `head_sha` (the
        PR's head commit as last seen), the answer is kept for good under that commit, in memory
        and in the cache folder, and read from there next time: a commit's changes never change.
        It is kept only when GitHub's answer is for that commit (its `contents_url` refs say so)."""
        key = f"{self.api_url}/repos/{self.repository}/pulls/{number}/files@{head_sha}"
        if head_sha and _SHA.fullmatch(head_sha):
            found, files = self.cache.fixed(key)
            if found:
                self.counts["cached"] += 1
                return [dict(f) for f in files]
        files = list(self.paginate(f"/repos/{self.repository}/pulls/{number}/files"))
        if head_sha and _SHA.fullmatch(head_sha) and any(
                f"ref={head_sha}" in (f.get("contents_url") or "") for f in files):
            self.cache.fix(key, files)
        return files

    def file_text(self, path: str, ref: str) -> str | None:
        """A file's text at a commit (GET .../contents/{path}?ref=); None when it is not there.
        At a full commit SHA the answer (text or absence) is kept for good."""
        from urllib.parse import quote

        key = f"{self.api_url}/repos/{self.repository}/contents/{path}@{ref}"
        fixed = bool(_SHA.fullmatch(ref or ""))
        if fixed:
            found, text = self.cache.fixed(key)
            if found:
                self.counts["cached"] += 1
                return text
        try:
            body = self.request("GET", f"/repos/{self.repository}/contents/{quote(path)}", params={"ref": ref}).json()
        except GitHubError as err:
            if err.status == 404:
                if fixed:
                    self.cache.fix(key, None)
                return None
            raise
        if not isinstance(body, dict) or body.get("type") != "file":
            return None
        if body.get("encoding") != "base64":  # over 1 MB the API answers without content: not an experiment
            raise GitHubError(f"{path}@{ref[:7]}: the contents API returned no content (encoding "
                              f"{body.get('encoding')!r}); is the file over 1 MB?")
        text = base64.b64decode(body.get("content", "")).decode("utf-8")
        if fixed:
            self.cache.fix(key, text)
        return text

    # -- workflows (the scheduled tick turns itself off when idle) --------------------------------
    def _workflow_path(self, workflow: str | int) -> str:
        """A workflow's id, or its file name (`loop.yml`; a path such as
        `.github/workflows/loop.yml` is cut to its file name, which is what GitHub takes)."""
        from urllib.parse import quote

        name = str(workflow).rsplit("/", 1)[-1]
        if not name:
            raise ConfigError(f"not a workflow file name or id: {workflow!r}")
        return f"/repos/{self.repository}/actions/workflows/{quote(name)}"

    def get_workflow(self, workflow: str | int) -> dict[str, Any]:
        """GET .../actions/workflows/{workflow_id}: id, name, path, state and the rest."""
        return self.request("GET", self._workflow_path(workflow)).json()

    def workflow_state(self, workflow: str | int) -> str:
        """`active`, `disabled_manually`, `disabled_inactivity` (GitHub turns off the schedules
        of a repository without activity for 60 days), `disabled_fork` or `deleted`."""
        return str(self.get_workflow(workflow).get("state"))

    def enable_workflow(self, workflow: str | int) -> None:
        """PUT .../enable (204): the workflow runs on its triggers again, schedule included.
        Idempotent; needs `actions: write` (GitHubPermissionError without it)."""
        self.request("PUT", self._workflow_path(workflow) + "/enable")

    def disable_workflow(self, workflow: str | int) -> None:
        """PUT .../disable (204): state `disabled_manually`. A disabled workflow runs on none of
        its triggers (pull_request and workflow_dispatch included), so only a workflow that holds
        the schedule alone should be disabled. Needs `actions: write`."""
        self.request("PUT", self._workflow_path(workflow) + "/disable")


class TooManyPages(GitHubError):
    """A list longer than the pages the caller was willing to read."""


def _issue_number(comment: Mapping[str, Any]) -> int | None:
    match = re.search(r"/issues/(\d+)$", str(comment.get("issue_url") or ""))
    return int(match.group(1)) if match else None


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

    Requests: none to find the comment when this client already listed the PR's comments (it
    keeps them current), then one PATCH when the body changed; a new comment costs a POST and
    one fresh listing.
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
        # Another job may have created one too: read GitHub again (the one request this costs is
        # paid once per experiment; every later run edits in place from the kept list).
        ours = _ours(client.list_issue_comments(number, fresh=True), marker, login) or [created]
        keep, action, extra = ours[0], "created", ours[1:]
        if keep["id"] != created["id"]:
            keep, action = client.update_issue_comment(keep["id"], body), "updated"
    for duplicate in extra:
        client.delete_issue_comment(duplicate["id"])
    return CommentResult(action, keep["id"], keep.get("html_url", ""), len(extra))


def set_workflow(client: GitHubClient, workflow: str | None, *, enabled: bool) -> None:
    """Enable or disable a scheduled workflow (the tick, the sweeper); a failure is a warning: the
    next event's plan enables it again when something is live, and an idle run disables it again."""
    if not workflow:
        return
    try:
        state = client.workflow_state(workflow)
        if enabled and state != "active":
            client.enable_workflow(workflow)
            print(f"enabled {workflow}: something is in flight", flush=True)
        elif not enabled and state == "active":
            client.disable_workflow(workflow)
            print(f"disabled {workflow}: nothing is in flight; the next submission enables it again", flush=True)
    except GitHubError as err:
        log.warning("could not %s %s: %s", "enable" if enabled else "disable", workflow, err)
