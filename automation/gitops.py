"""The pull-request verbs: what a pull request changed, its one comment, and deleting what it left.

    automation changed [--base SHA --head SHA]   changed experiments -> job matrices on $GITHUB_OUTPUT;
                                                 removed experiments -> their staging endpoints deleted
    automation comment EXPERIMENT [--body-file F] create or update the PR's one comment for it
    automation cleanup [--pr N]                  delete every staging endpoint of a pull request
    automation sweep                             delete staging endpoints past their ttl_hours

`add_commands(subparsers)` registers them on the CLI. Every endpoint is found by its tags
(repo, pr, experiment, stage, created_at, ttl_hours, managed_by), never by stored state alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import Any

from automation import github
from automation.backends.azure import AZURE_SETTINGS, azure_settings_missing  # noqa: F401 (re-exported)
from automation.errors import AutomationError, ConfigError, ExperimentInvalid
from automation.naming import SUFFIXES, current_repo, is_experiment_path
from automation.spec import backend_of

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
# Repository variables the Azure jobs need (OIDC: an app registration's ids, no secret).
ZERO_SHA = "0" * 40


def _out(text: str = "") -> None:
    print(text, flush=True)


def _shown(text: str) -> str:
    """A file name from the pull request, safe to print: no line break can start a workflow
    command (`::error::`, `::add-mask::`) on the runner's log."""
    return text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text


def _cell(text: str) -> str:
    """A file name inside a markdown table cell of the job summary."""
    return "`" + _shown(text).replace("`", "'").replace("|", "\\|") + "`"


# ---------------------------------------------------------------------------------------------
# changed


@dataclass(frozen=True)
class Change:
    status: str  # added, modified, deleted
    path: str


def _git(args: list[str], cwd: Path | None = None) -> str:
    import subprocess

    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, timeout=120, check=False)
    except OSError as err:
        raise AutomationError(f"cannot run git: {err}") from None
    if done.returncode != 0:
        raise AutomationError(f"git {' '.join(args)}: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout.decode("utf-8", errors="surrogateescape")


def diff_changes(base: str, head: str, cwd: Path | None = None) -> list[Change]:
    """Experiment files added, modified and removed between the merge base of `base` and `head`.

    A rename is the old file removed and the new one added (its endpoints carry the old name);
    a rename that keeps the experiment's name is just a change. `-z` keeps odd file names intact.
    """
    for sha in (base, head):
        try:
            _git(["cat-file", "-e", f"{sha}^{{commit}}"], cwd)
        except AutomationError:
            raise ConfigError(f"commit {sha} is not in this clone; check out with `fetch-depth: 0` "
                              "(actions/checkout) so both ends of the pull request are here") from None
    if base == ZERO_SHA:  # a new branch: everything it has is new
        names = _git(["ls-tree", "-r", "-z", "--name-only", head], cwd).split("\0")
        return [Change("added", n) for n in names if is_experiment_path(n)]
    fields = _git(["diff", "--name-status", "-z", "-M", f"{base}...{head}"], cwd).split("\0")
    changes: list[Change] = []
    i = 0
    while i < len(fields) and fields[i]:
        status = fields[i][0]
        if status in "RC":
            old, new = fields[i + 1], fields[i + 2]
            i += 3
            old_is, new_is = is_experiment_path(old), is_experiment_path(new)
            same_name = old_is and new_is and PurePosixPath(old).stem == PurePosixPath(new).stem
            if status == "R" and old_is and not same_name:
                changes.append(Change("deleted", old))
            if new_is:
                changes.append(Change("modified" if status == "R" and same_name else "added", new))
            continue
        path = fields[i + 1]
        i += 2
        if is_experiment_path(path):
            changes.append(Change({"A": "added", "D": "deleted"}.get(status, "modified"), path))
    return changes


def describe(change: Change, root: Path) -> dict[str, Any]:
    """One matrix entry: the experiment, its file, its backend and whether it validates."""
    from automation.spec import load_experiment

    entry: dict[str, Any] = {"experiment": PurePosixPath(change.path).stem, "file": change.path,
                             "change": change.status}
    try:
        entry["backend"], entry["valid"] = load_experiment(root / change.path).backend, True
    except ExperimentInvalid:
        try:
            text = (root / change.path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            text = ""
        entry["backend"], entry["valid"] = backend_of(text, change.path), False
    return entry


def _matrix(entries: list[dict[str, Any]]) -> str:
    return json.dumps({"include": entries}, separators=(",", ":"))


@dataclass
class Plan:
    changed: list[dict[str, Any]]
    removed: list[dict[str, Any]]
    fork: bool
    azure_missing: list[str]

    @property
    def azure_allowed(self) -> bool:
        return not self.fork and not self.azure_missing

    def outputs(self) -> dict[str, str]:
        valid = [e for e in self.changed if e["valid"]]
        groups = {
            "matrix": self.changed,
            "local": [e for e in valid if e["backend"] == "local"],
            "azure": [e for e in valid if e["backend"] == "azure"],
            "azure_run": [e for e in valid if e["backend"] == "azure" and self.azure_allowed],
            "removed": self.removed,
            "azure_removed": [e for e in self.removed if e["backend"] != "local" and self.azure_allowed],
        }
        outputs = {}
        for name, entries in groups.items():
            outputs[name] = _matrix(entries)
            outputs["any" if name == "matrix" else f"any_{name}"] = "true" if entries else "false"
        return outputs

    def azure_skip_reason(self) -> str | None:
        if self.fork:
            return ("the pull request comes from a fork: it has no secrets and no OIDC token, so only "
                    "validation and the CPU preflight run")
        if self.azure_missing:
            return (f"the Azure settings are not configured (repository variables {', '.join(self.azure_missing)}); "
                    "see the README, \"Use it in your fork\"")
        return None

    def summary(self, deleted: dict[str, list[str]]) -> str:
        lines = ["### Experiments in this pull request", ""]
        if self.fork:
            lines += ["This pull request comes from a fork: no secrets, no Azure. Experiment files are "
                      "validated, local experiments run on the CPU runner, and the report lands in the job "
                      "summary when the token cannot comment.", ""]
        if self.changed:
            lines += ["| experiment | file | backend | change | runs |", "|---|---|---|---|---|"]
            for e in self.changed:
                lines.append(f"| {_cell(e['experiment'])} | {_cell(e['file'])} | {e['backend']} | {e['change']} | "
                             f"{self._runs(e)} |")
        else:
            lines.append("No experiment file was added or changed.")
        for e in self.removed:
            gone = deleted.get(e["experiment"], [])
            lines.append(f"\nRemoved {_cell(e['file'])}: " + (f"deleted {', '.join(f'`{n}`' for n in gone)}" if gone
                                                          else "no staging endpoint of it was running here"))
        return "\n".join(lines) + "\n"

    def _runs(self, entry: dict[str, Any]) -> str:
        if not entry["valid"]:
            return "validate (fails: see the annotations)"
        if entry["backend"] == "local":
            return "validate, the whole flow on the CPU runner, comment"
        if self.azure_allowed:
            return "validate, preflight, Azure ML fine-tune → staging → score → comment → promote"
        return "validate, preflight; Azure skipped: " + (self.azure_skip_reason() or "")


def make_plan(changes: list[Change], *, root: Path, base: str, fork: bool,
              env: dict[str, str] | None = None) -> Plan:
    changed = [describe(c, root) for c in changes if c.status != "deleted"]
    kept = {e["experiment"] for e in changed}
    removed = []
    for c in changes:
        name = PurePosixPath(c.path).stem
        if c.status == "deleted" and name not in kept:
            try:
                text = _git(["show", f"{base}:{c.path}"], root)
            except AutomationError:
                text = ""
            removed.append({"experiment": name, "file": c.path, "backend": backend_of(text, c.path)})
    return Plan(changed, removed, fork, azure_settings_missing(env))


def staging_match(pr: int | None, experiment: str | None = None) -> dict[str, str]:
    """The tags that select a pull request's staging endpoints (those of this repository)."""
    from automation.naming import MANAGED_BY

    match = {"repo": current_repo(), "pr": "" if pr is None else str(pr), "stage": "staging",
             "managed_by": MANAGED_BY}
    if experiment:
        match["experiment"] = experiment
    return match


def _teardown_each(backends: list[str], matches: list[dict[str, str]]) -> tuple[list[str], list[str]]:
    """Delete the endpoints matching any of `matches` on each backend; (deleted, errors)."""
    from automation.backends import get_backend
    resolved = [(name, get_backend(name)) for name in backends]  # an unknown name is bad input: raise
    deleted, errors = [], []
    for name, backend in resolved:
        for match in matches:
            try:
                deleted += backend.delete_endpoints(match)
            except AutomationError as err:
                errors.append(f"{name}: {err}")
    return deleted, errors


def cmd_changed(args: argparse.Namespace) -> int:
    event = github.read_event(args.event)
    pr_event = event.get("pull_request") or {}
    base = args.base or (pr_event.get("base") or {}).get("sha") or event.get("before")
    head = args.head or (pr_event.get("head") or {}).get("sha") or event.get("after")
    if not base or not head:
        raise ConfigError("no commits to compare: pass --base and --head, or run in a pull_request or push "
                          "workflow (GITHUB_EVENT_PATH)")
    pr = args.pr if args.pr is not None else github.pull_request_number(event)
    root = Path.cwd()
    plan = make_plan(diff_changes(base, head, root), root=root, base=base,
                     fork=github.is_fork(event, os.environ.get("GITHUB_REPOSITORY")))

    deleted: dict[str, list[str]] = {}
    errors: list[str] = []
    teardown_backends = ["local"] if args.teardown_backend is None else args.teardown_backend
    if plan.removed and teardown_backends:
        for entry in plan.removed:
            gone, failed = _teardown_each(teardown_backends, [staging_match(pr, entry["experiment"])])
            deleted[entry["experiment"]] = gone
            errors += failed

    outputs = plan.outputs()
    for name, value in outputs.items():
        if not github.set_output(name, value):
            _out(f"{name}={value}")
    for e in plan.changed:
        _out(f"{e['change']}: {_shown(e['file'])} ({e['backend']}{'' if e['valid'] else ', invalid'})")
    for e in plan.removed:
        gone = deleted.get(e["experiment"], [])
        _out(f"removed: {_shown(e['file'])}" + (f"; deleted endpoints {', '.join(gone)}" if gone else ""))
    reason = plan.azure_skip_reason()
    for e in plan.changed:
        if e["valid"] and e["backend"] == "azure" and reason:
            _out(github.annotation("notice", f"Azure jobs for {e['experiment']} skipped: {reason}.",
                                   file=e["file"], title="Azure skipped"))
    github.append_step_summary(plan.summary(deleted))
    for error in errors:
        _out(github.annotation("error", f"teardown of a removed experiment failed: {error}"))
    code = EXIT_FAILED if errors else EXIT_OK
    if args.validate and plan.changed:  # the same job validates: the first annotation after one pickup
        from automation.validation import validate_files

        code = max(code, validate_files([e["file"] for e in plan.changed]))
    return code


# ---------------------------------------------------------------------------------------------
# comment


def experiment_name(value: str) -> str:
    """`smollm2-ultrachat-local` or `experiments/smollm2-ultrachat-local.yaml` -> the name."""
    return PurePosixPath(value).stem if value.endswith(SUFFIXES) or "/" in value else value


def cmd_comment(args: argparse.Namespace) -> int:
    from automation.report import MARKER
    from automation.workspace import run_dir

    name = experiment_name(args.experiment)
    body_file = Path(args.body_file) if args.body_file else run_dir(name) / "report.md"
    try:
        body = body_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read the comment body {body_file}: {err}") from None
    pr = args.pr if args.pr is not None else github.pull_request_number(github.read_event())
    if pr is None:
        raise ConfigError("no pull request: pass --pr N, or run in a pull_request workflow")
    marker = MARKER.format(name=name)
    if marker not in body:
        body = f"{marker}\n{body}"
    in_summary = bool(os.environ.get("GITHUB_STEP_SUMMARY"))
    fitted = github.fit_comment(body, where="the job summary of this run" if in_summary else str(body_file))
    try:
        with github.GitHubClient.from_env() as client:
            result = github.upsert_comment(client, pr, fitted, marker)
    except github.GitHubPermissionError as err:
        # A fork's pull request gets a read-only token: the report goes to the job summary instead.
        github.report_to_summary(name, body)
        _out(github.annotation("notice", f"could not comment on pull request #{pr} ({err}); the report of "
                               f"{name} is in the job summary", title="report in the job summary"))
        return EXIT_OK
    if fitted != body and not github.in_job_summary(body):
        github.append_step_summary(body)
    github.append_step_summary(f"PR comment {result.action}: {result.url}")
    _out(f"comment {result.action} on pull request #{pr}: {result.url}"
         + (f" (removed {result.removed_duplicates} duplicate(s))" if result.removed_duplicates else ""))
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# cleanup and sweep


def _notice_without_azure(backends: list[str]) -> None:
    """In a workflow, say plainly when Azure endpoints were not looked for and why."""
    missing = azure_settings_missing()
    if github.in_actions() and "azure" not in backends and missing:
        _out(github.annotation("notice", "Azure settings are not configured (" + ", ".join(missing) + "): only "
                               "the local backend's endpoints were looked for", title="Azure skipped"))


def cmd_cleanup(args: argparse.Namespace) -> int:
    pr = args.pr if args.pr is not None else github.pull_request_number(github.read_event())
    if pr is None:
        raise ConfigError("no pull request: pass --pr N, or run in a pull_request workflow")
    backends = args.backend or ["local"]
    matches = [staging_match(pr, e) for e in args.experiment] or [staging_match(pr)]
    deleted, errors = _teardown_each(backends, matches)
    for name in deleted:
        _out(f"deleted: {name}")
    _out(f"pull request #{pr}: {len(deleted)} staging endpoint(s) deleted on {', '.join(backends)}")
    github.append_step_summary(f"Cleanup of pull request #{pr} on {', '.join(backends)}: "
                               + (", ".join(f"`{n}`" for n in deleted) if deleted else "nothing was running"))
    _notice_without_azure(backends)
    for error in errors:
        _out(github.annotation("error", f"cleanup failed: {error}"))
    return EXIT_FAILED if errors else EXIT_OK


def _parse_time(text: str) -> datetime | None:
    try:
        value = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def expiry(tags: dict[str, str]) -> datetime | None:
    """When a tagged endpoint expires: created_at + ttl_hours; None without both tags."""
    created = _parse_time(tags.get("created_at", ""))
    try:
        ttl = float(tags.get("ttl_hours", ""))
        return created + timedelta(hours=ttl) if created is not None and 0 < ttl < float("inf") else None
    except (ValueError, OverflowError):
        return None


def sweep(backend, now: datetime | None = None, *, dry_run: bool = False,
          closed: Callable[[int], bool] | None = None) -> tuple[list[str], list[str]]:
    """Delete this product's staging endpoints past their time to live, and (given `closed`) those of
    pull requests that are closed: the safety net under the loop's prune. (expired, left untouched).

    Only endpoints tagged managed_by, stage=staging, created_at and ttl_hours are candidates:
    anything untagged is somebody else's and is left alone."""
    from automation.naming import MANAGED_BY

    now = now or datetime.now(UTC)
    expired, untouched = [], []
    for endpoint in backend.list_endpoints({"managed_by": MANAGED_BY, "stage": "staging"}):
        until = expiry(endpoint.tags)
        pr = endpoint.tags.get("pr", "")
        if closed is not None and until is not None and pr.isdigit() and closed(int(pr)):
            until = now  # its pull request is closed: nothing wants it any more
        if until is None:
            log.warning("endpoint %s has no valid created_at/ttl_hours tags; left alone", endpoint.name)
            untouched.append(endpoint.name)
        elif until <= now:
            if not dry_run:
                backend.delete_endpoint(endpoint.name)  # already gone is success
            expired.append(endpoint.name)
        else:
            untouched.append(endpoint.name)
    return expired, untouched


def _closed_pulls() -> tuple[Callable[[int], bool] | None, github.GitHubClient | None]:
    """`closed(pr)` through the GitHub API when a token is there (each pull request read once)."""
    if not (os.environ.get("GITHUB_TOKEN") and os.environ.get("GITHUB_REPOSITORY")):
        return None, None
    client = github.GitHubClient.from_env()
    seen: dict[int, bool] = {}

    def closed(pr: int) -> bool:
        if pr not in seen:
            try:
                seen[pr] = client.get_pull(pr).get("state") == "closed"
            except github.GitHubError as err:
                log.warning("cannot read pull request #%s (%s); its endpoints keep their ttl", pr, err)
                seen[pr] = False
        return seen[pr]

    return closed, client


def cmd_sweep(args: argparse.Namespace) -> int:
    from automation.backends import get_backend

    backends = args.backend or ["local"]
    resolved = [(name, get_backend(name)) for name in backends]
    closed, client = _closed_pulls()
    failed = 0
    rows = []
    left = 0
    for name, backend in resolved:
        try:
            expired, kept = sweep(backend, dry_run=args.dry_run, closed=closed)
            left += len(kept)
        except AutomationError as err:
            failed += 1
            _out(github.annotation("error", f"sweep on {name} failed: {err}"))
            continue
        for endpoint in expired:
            _out(f"{'expired (dry run, kept)' if args.dry_run else 'deleted'}: {endpoint} ({name})")
            rows.append(f"| {name} | `{endpoint}` | {'expired (dry run)' if args.dry_run else 'deleted'} |")
        _out(f"{name}: {len(expired)} expired, {len(kept)} within their time to live or untagged")
    github.append_step_summary("### Endpoint sweep\n\n" + ("| backend | endpoint | |\n|---|---|---|\n" + "\n".join(rows)
                                                          if rows else "No staging endpoint is past its ttl_hours."))
    _notice_without_azure(backends)
    if client is not None:
        if args.self_workflow and not failed and not left and not args.dry_run:
            # idle costs nothing: no staging endpoint left to watch; the loop's next submission enables it again
            github.set_workflow(client, args.self_workflow, enabled=False)
        client.close()
    return EXIT_FAILED if failed else EXIT_OK


# ---------------------------------------------------------------------------------------------
# The parser


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register changed, comment, cleanup and sweep on the CLI's subparsers."""
    p = commands.add_parser("changed", help="changed experiment files -> job matrices ($GITHUB_OUTPUT); "
                                            "removed ones -> their staging endpoints deleted")
    p.add_argument("--base", help="base commit (default: the pull request's base from the event payload)")
    p.add_argument("--head", help="head commit (default: the pull request's head from the event payload)")
    p.add_argument("--pr", type=int, help="pull request number (default: from the event payload)")
    p.add_argument("--event", help="event payload file (default: $GITHUB_EVENT_PATH)")
    p.add_argument("--teardown-backend", action="append", default=None, metavar="BACKEND",
                   help="where to delete removed experiments' staging endpoints (repeatable; default local)")
    p.add_argument("--no-teardown", dest="teardown_backend", action="store_const", const=[],
                   help="only plan; delete nothing")
    p.add_argument("--validate", action="store_true",
                   help="also validate each changed experiment file (annotations on the diff; exit 2 when invalid)")
    p.set_defaults(handler=cmd_changed)

    p = commands.add_parser("comment", help="create or update this experiment's one comment on the pull request")
    p.add_argument("experiment", help="experiment name (or its file)")
    p.add_argument("--body-file", help="markdown to post (default: the workspace's runs/<experiment>/report.md)")
    p.add_argument("--pr", type=int, help="pull request number (default: from the event payload)")
    p.set_defaults(handler=cmd_comment)

    p = commands.add_parser("cleanup", help="delete every staging endpoint of a pull request, found by tags")
    p.add_argument("--pr", type=int, help="pull request number (default: from the event payload)")
    p.add_argument("--backend", action="append", default=[], help="backend to clean (repeatable; default local)")
    p.add_argument("--experiment", action="append", default=[], help="only this experiment (repeatable)")
    p.set_defaults(handler=cmd_cleanup)

    p = commands.add_parser("sweep", help="delete staging endpoints past their ttl_hours (tagged ones only)")
    p.add_argument("--backend", action="append", default=[], help="backend to sweep (repeatable; default local)")
    p.add_argument("--dry-run", action="store_true", help="list what is expired; delete nothing")
    p.add_argument("--self-workflow", metavar="FILE",
                   help="the sweeper's own workflow file: disabled when no staging endpoint is left (the "
                        "loop's next submission enables it again)")
    p.set_defaults(handler=cmd_sweep)

