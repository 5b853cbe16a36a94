"""The pull requests as the reconcile loop reads them from GitHub: state, head commit, the
experiment files they change (read at the head through the REST API), and the status line of
each experiment's comment, which says which commit's job was already reported done or failed."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from automation import github

log = logging.getLogger(__name__)

STATUS = re.compile(r"<!-- automation:status job=(?P<job>\S*) phase=(?P<phase>[a-z]+) -->")


@dataclass(frozen=True)
class PullRequest:
    number: int
    state: str  # "open" or "closed"
    merged: bool
    head_sha: str
    fork: bool

    @property
    def open(self) -> bool:
        return self.state == "open"

    @classmethod
    def from_api(cls, body: dict[str, Any], repository: str) -> PullRequest:
        head = body.get("head") or {}
        head_repo = (head.get("repo") or {}).get("full_name")
        return cls(number=int(body["number"]), state=str(body.get("state")),
                   merged=bool(body.get("merged") or body.get("merged_at")), head_sha=str(head.get("sha") or ""),
                   fork=head_repo != repository)


@dataclass(frozen=True)
class Source:
    """An experiment a pull request changes: its path and text at the head (None: removed)."""

    name: str
    path: str
    text: str | None


class PullRequests:
    """What the reconcile loop reads from GitHub, through the REST client."""

    def __init__(self, client: github.GitHubClient):
        self.client = client

    def get(self, number: int) -> PullRequest:
        return PullRequest.from_api(self.client.get_pull(number), self.client.repository)

    def open_ones(self) -> list[PullRequest]:
        return [PullRequest.from_api(p, self.client.repository) for p in self.client.list_pulls("open")]

    def experiments(self, pr: PullRequest) -> dict[str, Source]:
        """The experiment files the pull request adds or changes (text at its head) and removes."""
        from automation.gitops import is_experiment_path

        found: dict[str, Source] = {}
        for entry in self.client.list_pull_files(pr.number):
            path, status = entry["filename"], entry["status"]
            previous = entry.get("previous_filename")
            if previous and is_experiment_path(previous) and PurePosixPath(previous).stem != PurePosixPath(path).stem:
                found.setdefault(PurePosixPath(previous).stem, Source(PurePosixPath(previous).stem, previous, None))
            if not is_experiment_path(path):
                continue
            name = PurePosixPath(path).stem
            text = None if status == "removed" else self.client.file_text(path, pr.head_sha)
            found[name] = Source(name, path, text)
        return found

    def body(self, pr: int, experiment: str) -> str | None:
        """The body of our comment for the experiment, or None when there is none."""
        from automation.github import _ours
        from automation.report import MARKER

        ours = _ours(self.client.list_issue_comments(pr), MARKER.format(name=experiment), self.client.viewer_login())
        return (ours[0].get("body") or "") if ours else None

    def status(self, pr: int, experiment: str) -> tuple[str | None, str | None]:
        """(job, phase) from the status line of our comment for the experiment; (None, None) without one."""
        match = STATUS.search(self.body(pr, experiment) or "")
        return (match["job"], match["phase"]) if match else (None, None)

    def comment(self, pr: int, experiment: str, body: str) -> None:
        from automation.report import MARKER

        marker = MARKER.format(name=experiment)
        if marker not in body:
            body = f"{marker}\n{body}"
        try:
            github.upsert_comment(self.client, pr, github.fit_comment(body), marker)
        except github.GitHubPermissionError as err:  # a fork's read-only token: the job summary instead
            log.warning("could not comment on #%s (%s); the report is in the job summary", pr, err)
            github.report_to_summary(experiment, body)
