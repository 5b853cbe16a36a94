"""automation.github against a fake GitHub on loopback: job files, event payloads, retries,
pagination, and the sticky comment that is only ever ours."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from automation import github
from automation.errors import ConfigError
from tests.fake_github import (
    ACTIONS_TOKEN,
    BOT,
    OCTOCAT,
    READ_TOKEN,
    USER_TOKEN,
    WRITE_TOKEN,
    FakeGitHub,
    parse_file_commands,
)

EVENTS = Path(__file__).parent / "events"
REPO_NAME = "acme-ml/chat-finetune"
MARKER = "<!-- automation:report experiment=tiny-pr -->"


@pytest.fixture
def fake():
    with FakeGitHub() as server:
        yield server


class Sleeps(list):
    """Records the waits instead of sleeping them, so retry tests take no time."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def client(fake: FakeGitHub, token: str = WRITE_TOKEN, **kwargs) -> github.GitHubClient:
    return github.GitHubClient(token, REPO_NAME, fake.url, **kwargs)


# ---------------------------------------------------------------------------------------------
# Job files and the event payload


def test_outputs_and_env_are_written_as_the_runner_reads_them(tmp_path, monkeypatch):
    output, env = tmp_path / "output", tmp_path / "env"
    monkeypatch.setenv("GITHUB_OUTPUT", str(output))
    monkeypatch.setenv("GITHUB_ENV", str(env))
    assert github.set_output("matrix", json.dumps({"include": [{"experiment": "a"}]}))
    assert github.set_output("notes", "line one\nINJECTED=1\nline three")
    assert github.set_env("RECORD", "run-record/record.json")
    values = parse_file_commands(output.read_text())
    assert json.loads(values["matrix"]) == {"include": [{"experiment": "a"}]}
    assert values["notes"] == "line one\nINJECTED=1\nline three" and "INJECTED" not in values
    assert parse_file_commands(env.read_text()) == {"RECORD": "run-record/record.json"}
    with pytest.raises(ValueError):
        github.set_output("bad=name", "x")
    monkeypatch.delenv("GITHUB_OUTPUT")
    assert github.set_output("matrix", "{}") is False


def test_event_payloads(monkeypatch):
    opened = github.read_event(EVENTS / "pull_request.opened.json")
    fork = github.read_event(EVENTS / "pull_request.fork.opened.json")
    closed = github.read_event(EVENTS / "pull_request.closed.json")
    assert github.pull_request_number(opened) == 42 and github.pull_request_number(fork) == 57
    assert github.pull_request_number(closed) == 42 and closed["pull_request"]["merged"] is True
    assert not github.is_fork(opened, REPO_NAME) and github.is_fork(fork, REPO_NAME)
    assert github.is_fork(fork)  # the base repository from the payload itself
    gone = json.loads(json.dumps(fork))
    gone["pull_request"]["head"]["repo"] = None  # a fork deleted after opening its pull request
    assert github.is_fork(gone, REPO_NAME)
    monkeypatch.delenv("GITHUB_EVENT_PATH", raising=False)
    assert github.read_event() == {}  # not in a workflow
    assert github.pull_request_number({"ref": "refs/heads/main"}) is None


def test_head_sha_is_the_pull_requests_head_not_the_merge_commit():
    """On pull_request GITHUB_SHA is GitHub's test-merge commit; names and tags use the head."""
    opened = github.read_event(EVENTS / "pull_request.opened.json")
    merge = "f" * 40
    head = opened["pull_request"]["head"]["sha"]
    assert head != merge
    assert github.head_sha(opened, {"GITHUB_SHA": merge}) == head
    assert github.head_sha({"ref": "refs/heads/main"}, {"GITHUB_SHA": merge}) == merge  # push, schedule
    assert github.head_sha({}, {}) is None  # outside a workflow


def test_a_broken_event_payload_is_bad_input(tmp_path):
    (tmp_path / "event.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="not a JSON object"):
        github.read_event(tmp_path / "event.json")
    with pytest.raises(ConfigError, match="cannot read"):
        github.read_event(tmp_path / "missing.json")


def test_client_needs_token_and_repository():
    with pytest.raises(ConfigError, match="GITHUB_TOKEN not set"):
        github.GitHubClient.from_env({"GITHUB_REPOSITORY": REPO_NAME})
    with pytest.raises(ConfigError, match="OWNER/NAME"):
        github.GitHubClient.from_env({"GITHUB_TOKEN": "x", "GITHUB_REPOSITORY": "not a repo"})


# ---------------------------------------------------------------------------------------------
# Retries


def test_5xx_is_retried_with_exponential_backoff(fake):
    fake.fail_next("GET", r"/comments$", 502, times=2, message="Bad Gateway")
    sleeps = Sleeps()
    with client(fake, sleep=sleeps) as gh:
        assert gh.list_issue_comments(42) == []
    assert sleeps == [1.0, 2.0]
    assert len(fake.calls("GET")) == 3


def test_5xx_gives_up_after_max_attempts(fake):
    fake.fail_next("POST", r"/comments$", 503, times=10, message="Service Unavailable")
    sleeps = Sleeps()
    with client(fake, sleep=sleeps, max_attempts=4) as gh, pytest.raises(github.GitHubError) as err:
        gh.create_issue_comment(42, "hi")
    assert err.value.status == 503 and "Service Unavailable" in str(err.value)
    assert sleeps == [1.0, 2.0, 4.0] and len(fake.calls("POST")) == 4


def test_429_honours_retry_after(fake):
    fake.fail_next("GET", r"/comments$", 429, headers={"Retry-After": "7"}, message="Too Many Requests")
    sleeps = Sleeps()
    with client(fake, sleep=sleeps) as gh:
        gh.list_issue_comments(42)
    assert sleeps == [7.0]


def test_primary_rate_limit_waits_until_reset(fake):
    reset = int(time.time()) + 30
    fake.fail_next("GET", r"/comments$", 403, message="API rate limit exceeded for installation ID 1.",
                   headers={"x-ratelimit-remaining": "0", "x-ratelimit-reset": str(reset)})
    sleeps = Sleeps()
    with client(fake, sleep=sleeps) as gh:
        gh.list_issue_comments(42)
    assert len(sleeps) == 1 and 25 <= sleeps[0] <= 32


def test_secondary_rate_limit_without_headers_waits_a_minute(fake):
    fake.fail_next("POST", r"/comments$", 403,
                   message="You have exceeded a secondary rate limit. Please wait a few minutes before you try again.")
    sleeps = Sleeps()
    with client(fake, sleep=sleeps) as gh:
        gh.create_issue_comment(42, "hello")
    assert sleeps == [60.0] and len(fake.issue_comments(REPO_NAME, 42)) == 1


def test_a_rate_limit_too_far_away_is_not_slept_through(fake):
    fake.fail_next("GET", r"/comments$", 403, message="API rate limit exceeded",
                   headers={"x-ratelimit-remaining": "0", "x-ratelimit-reset": str(int(time.time()) + 3000)})
    sleeps = Sleeps()
    with client(fake, sleep=sleeps) as gh, pytest.raises(github.GitHubError, match="retrying would mean waiting"):
        gh.list_issue_comments(42)
    assert sleeps == []


def test_a_permission_error_is_not_retried(fake):
    sleeps = Sleeps()
    with client(fake, READ_TOKEN, sleep=sleeps) as gh, pytest.raises(github.GitHubPermissionError) as err:
        gh.create_issue_comment(42, "hi")
    assert err.value.status == 403 and "Resource not accessible by integration" in str(err.value)
    assert sleeps == []


def test_network_errors_are_retried_then_reported():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sleeps = Sleeps()
    with github.GitHubClient("t", REPO_NAME, f"http://127.0.0.1:{port}", sleep=sleeps, max_attempts=3) as gh:
        with pytest.raises(github.GitHubError, match="ConnectError"):
            gh.list_issue_comments(1)
    assert sleeps == [1.0, 2.0]


# ---------------------------------------------------------------------------------------------
# Pagination and identity


def test_listing_follows_every_page(fake):
    for i in range(250):
        fake.add_comment(REPO_NAME, 42, f"comment {i}")
    with client(fake) as gh:
        comments = gh.list_issue_comments(42)
    assert [c["body"] for c in comments] == [f"comment {i}" for i in range(250)]
    gets = fake.calls("GET")
    assert len(gets) == 3 and gets[1].path.startswith("/repositories/")  # GitHub's own next links


def test_a_next_link_off_the_api_host_is_refused(fake):
    fake.fail_next("GET", r"/comments$", 200, body=[],
                   headers={"Link": '<https://evil.example/steal?page=2>; rel="next"'})
    with client(fake) as gh, pytest.raises(github.GitHubError, match="off the API host"):
        gh.list_issue_comments(42)


def test_who_we_are(fake, monkeypatch):
    for name in ("AUTOMATION_COMMENT_AUTHOR", "AUTOMATION_BOT_LOGIN", "GITHUB_ACTIONS"):
        monkeypatch.delenv(name, raising=False)
    with client(fake, WRITE_TOKEN) as gh:
        assert gh.viewer_login() == "github-actions[bot]"  # /user answers 403 to an installation token
    with client(fake, USER_TOKEN) as gh:
        assert gh.viewer_login() == "octocat"
    monkeypatch.setenv("AUTOMATION_COMMENT_AUTHOR", "acme-ml-bot[bot]")
    with client(fake, WRITE_TOKEN) as gh:
        assert gh.viewer_login() == "acme-ml-bot[bot]"


# ---------------------------------------------------------------------------------------------
# The sticky comment


def test_one_comment_created_then_edited_in_place(fake):
    with client(fake) as gh:
        first = github.upsert_comment(gh, 42, f"{MARKER}\nfirst", MARKER)
        second = github.upsert_comment(gh, 42, f"{MARKER}\nsecond", MARKER)
        third = github.upsert_comment(gh, 42, f"{MARKER}\nsecond", MARKER)
    assert (first.action, second.action, third.action) == ("created", "updated", "unchanged")
    assert first.comment_id == second.comment_id == third.comment_id
    comments = fake.issue_comments(REPO_NAME, 42)
    assert len(comments) == 1 and comments[0]["body"] == f"{MARKER}\nsecond"
    assert comments[0]["user"]["login"] == BOT["login"]
    assert len(fake.calls("POST")) == 1 and len(fake.calls("PATCH")) == 1


def test_the_marker_is_added_when_missing(fake):
    with client(fake) as gh:
        github.upsert_comment(gh, 42, "no marker here", MARKER)
        github.upsert_comment(gh, 42, "still none", MARKER)
    (comment,) = fake.issue_comments(REPO_NAME, 42)
    assert comment["body"] == f"{MARKER}\nstill none"


def test_someone_elses_comment_with_our_marker_is_never_edited(fake):
    quoted = fake.add_comment(REPO_NAME, 42, f"Quoting the bot:\n{MARKER}\nlooks wrong", OCTOCAT)
    with client(fake) as gh:
        result = github.upsert_comment(gh, 42, f"{MARKER}\nreport", MARKER)
    assert result.action == "created" and result.comment_id != quoted["id"]
    assert fake.comments[quoted["id"]]["body"] == f"Quoting the bot:\n{MARKER}\nlooks wrong"
    assert not fake.calls("PATCH") and not fake.calls("DELETE")


def test_other_experiments_comments_are_left_alone(fake):
    other = "<!-- automation:report experiment=tiny-pr-2 -->"
    with client(fake) as gh:
        github.upsert_comment(gh, 42, f"{other}\nthe other one", other)
        github.upsert_comment(gh, 42, f"{MARKER}\nthis one", MARKER)
        github.upsert_comment(gh, 42, f"{MARKER}\nthis one, again", MARKER)
    bodies = sorted(c["body"] for c in fake.issue_comments(REPO_NAME, 42))
    assert bodies == sorted([f"{other}\nthe other one", f"{MARKER}\nthis one, again"])


def test_duplicates_from_a_race_are_folded_into_the_oldest(fake):
    oldest = fake.add_comment(REPO_NAME, 42, f"{MARKER}\nrun A", BOT)
    fake.add_comment(REPO_NAME, 42, f"{MARKER}\nrun B", BOT)
    with client(fake) as gh:
        result = github.upsert_comment(gh, 42, f"{MARKER}\nrun C", MARKER)
    assert result.comment_id == oldest["id"] and result.removed_duplicates == 1
    (comment,) = fake.issue_comments(REPO_NAME, 42)
    assert comment["body"] == f"{MARKER}\nrun C"


def test_a_second_creator_racing_us_still_ends_with_one_comment(fake, monkeypatch):
    # Another job's comment appears between our listing and our POST: our POST is not the oldest.
    racer, created = [], []
    with client(fake) as gh:
        post = gh.create_issue_comment

        def racing_post(number: int, body: str) -> dict:
            racer.append(fake.add_comment(REPO_NAME, 42, f"{MARKER}\nthe other job", BOT))
            created.append(post(number, body))
            return created[-1]

        monkeypatch.setattr(gh, "create_issue_comment", racing_post)
        result = github.upsert_comment(gh, 42, f"{MARKER}\nours", MARKER)
        assert [c["body"] for c in gh.list_issue_comments(42)] == [f"{MARKER}\nours"]  # the kept list
    assert result.comment_id == racer[0]["id"] and result.removed_duplicates == 1
    assert created[0]["id"] not in fake.comments
    assert [c["body"] for c in fake.issue_comments(REPO_NAME, 42)] == [f"{MARKER}\nours"]


# ---------------------------------------------------------------------------------------------
# The size limit


def test_github_refuses_a_body_over_the_limit(fake):
    with client(fake) as gh, pytest.raises(github.GitHubError, match="body is too long"):
        gh.create_issue_comment(42, "x" * (github.COMMENT_LIMIT + 1))


def test_a_long_report_is_cut_with_fences_and_details_closed(fake):
    reply = "\n".join(f"line {i}: " + "words " * 12 for i in range(2000))
    body = f"{MARKER}\n## Report\n\n<details><summary>Reply</summary>\n\n```text\n{reply}\n```\n\n</details>\n"
    fitted = github.fit_comment(body)
    assert len(body) > github.COMMENT_LIMIT >= len(fitted)
    assert fitted.startswith(f"{MARKER}\n## Report")
    assert "> **Cut:** this comment is" in fitted and "the job summary of this run" in fitted
    assert fitted.count("```") % 2 == 0 and fitted.count("<details>") == fitted.count("</details>")
    with client(fake) as gh:
        github.upsert_comment(gh, 42, fitted, MARKER)  # GitHub takes it
    assert github.fit_comment("short") == "short"


@settings(max_examples=60, deadline=None)
@given(st.text(min_size=0, max_size=200), st.integers(min_value=0, max_value=3000))
def test_fit_comment_always_fits(chunk, repeat):
    body = (chunk or "`") * repeat
    fitted = github.fit_comment(body, limit=2000)
    assert len(fitted) <= 2000
    if len(body) <= 2000:
        assert fitted == body


# ---------------------------------------------------------------------------------------------
# A fork's job summary: the report once

def _comment_or_summary(gh: github.GitHubClient, pr: int, experiment: str, body: str) -> None:
    """What a reconcile leg does with a report: the sticky comment, else (403) the job summary."""
    marker = f"<!-- automation:report experiment={experiment} -->"
    try:
        github.upsert_comment(gh, pr, github.fit_comment(body), marker)
    except github.GitHubPermissionError:
        github.report_to_summary(experiment, body)


@pytest.mark.parametrize("steps", ["one step (a reconcile leg)", "two steps (report, then comment)"])
def test_a_forks_job_summary_holds_the_report_once(fake, tmp_path, monkeypatch, steps):
    monkeypatch.setenv("RUNNER_TEMP", str(tmp_path))
    summaries = [tmp_path / "step_summary_1", tmp_path / "step_summary_2"]
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summaries[0]))
    report = f"{MARKER}\n## Experiment `tiny-pr`\n\n" + "\n".join(f"| row {i} | eval loss 1.{i:03d} |" for i in range(400))
    assert github.append_step_summary(report)  # what the report stage writes
    if steps.startswith("two"):
        monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summaries[1]))
    with client(fake, READ_TOKEN) as gh:  # a fork's token: the comment answers 403
        # The reconcile leg comments the report with its status line after the marker.
        body = report.replace(MARKER, f"{MARKER}\n<!-- automation:status job=j phase=done -->", 1)
        _comment_or_summary(gh, 57, "tiny-pr", body)
    assert fake.issue_comments(REPO_NAME, 57) == []
    job_summary = "".join(p.read_text() for p in summaries if p.exists())  # what GitHub shows
    assert job_summary.count("| row 399 | eval loss 1.399 |") == 1
    assert "The report for <code>tiny-pr</code> above could not be posted as a PR comment" in job_summary

    monkeypatch.setenv("RUNNER_TEMP", str(tmp_path / "another-job"))  # a job without the report stage
    (tmp_path / "another-job").mkdir()
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path / "another-job" / "step_summary"))
    with client(fake, READ_TOKEN) as gh:
        _comment_or_summary(gh, 57, "tiny-pr", body)
    alone = (tmp_path / "another-job" / "step_summary").read_text()
    assert alone.count("| row 399 | eval loss 1.399 |") == 1 and "Report for <code>tiny-pr</code>" in alone


# ---------------------------------------------------------------------------------------------
# The request budget


def test_the_fake_answers_conditional_requests_as_github_does(fake):
    """A weak ETag on every 200 to a GET, 304 with no body to If-None-Match (weak comparison),
    nothing billed for it; another token's ETag never matches (GitHub's are token-specific)."""
    import httpx

    fake.open_pull(REPO_NAME, 7, head_sha="a" * 40, files={"experiments/x.yaml": "name: x\n"})
    url = f"{fake.url}/repos/{REPO_NAME}/pulls/7"
    first = httpx.get(url, headers={"Authorization": f"Bearer {WRITE_TOKEN}"})
    etag = first.headers["etag"]
    assert first.status_code == 200 and etag.startswith('W/"') and etag.endswith('"')
    assert first.headers["x-ratelimit-limit"] == "1000" and first.headers["x-ratelimit-remaining"] == "999"
    for sent in (etag, etag.removeprefix("W/"), f'"nope", {etag}'):
        again = httpx.get(url, headers={"Authorization": f"Bearer {WRITE_TOKEN}", "If-None-Match": sent})
        assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
        assert again.headers["x-ratelimit-remaining"] == "999"  # a 304 is free
    other = httpx.get(url, headers={"Authorization": f"Bearer {USER_TOKEN}", "If-None-Match": etag})
    assert other.status_code == 200 and other.headers["x-ratelimit-limit"] == "5000"
    fake.push(REPO_NAME, 7, "b" * 40, {})
    moved = httpx.get(url, headers={"Authorization": f"Bearer {WRITE_TOKEN}", "If-None-Match": etag})
    assert moved.status_code == 200 and moved.json()["head"]["sha"] == "b" * 40
    assert fake.not_modified() == 3 and fake.billed() == 3 and fake.billed(WRITE_TOKEN) == 2


def test_repeated_reads_are_conditional_and_free(fake):
    fake.open_pull(REPO_NAME, 7, head_sha="a" * 40, files={"experiments/x.yaml": "name: x\n"})
    with client(fake) as gh:
        first = gh.get_pull(7)
        assert gh.get_pull(7) == first  # a 304, answered from the cache
        fake.close_pull(REPO_NAME, 7)
        assert gh.get_pull(7)["state"] == "closed"  # changed: a 200 again
        assert gh.list_pulls() == [] and gh.list_pulls() == []
    assert fake.billed() == 3 and fake.not_modified() == 2
    assert gh.counts["billed"] == 3 and gh.counts["not_modified"] == 2 and gh.counts["sent"] == 5
    assert "3 billed request(s), 2 free 304(s)" in gh.budget_line() and "997 of 1000 left" in gh.budget_line()
    sent = [c for c in fake.calls("GET")]
    assert [c.status for c in sent] == [200, 304, 200, 200, 304]


def test_the_cache_on_disk_serves_the_next_process_with_the_same_token(fake, tmp_path):
    fake.open_pull(REPO_NAME, 7, head_sha="a" * 40, files={"experiments/x.yaml": "name: x\n"})
    folder = tmp_path / "cache" / "github"
    with client(fake, cache=github.ResponseCache(folder)) as gh:
        gh.get_pull(7)
    with client(fake, cache=github.ResponseCache(folder)) as gh:  # the next run on this desk
        assert gh.get_pull(7)["number"] == 7
    with client(fake, USER_TOKEN, cache=github.ResponseCache(folder)) as gh:  # another token: its own ETags
        assert gh.get_pull(7)["number"] == 7
    assert [c.status for c in fake.calls("GET")] == [200, 304, 200]
    stored = "".join(p.read_text() for p in folder.rglob("*.json"))
    assert WRITE_TOKEN not in stored and USER_TOKEN not in stored and "/pulls/7" in stored


def test_the_default_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("AUTOMATION_HOME", str(tmp_path))
    assert github.default_cache_folder({}) == tmp_path / "cache" / "github"  # a desk
    assert github.default_cache_folder({"GITHUB_ACTIONS": "true"}) is None  # a fresh runner and token each job
    assert github.default_cache_folder({"GITHUB_ACTIONS": "true", "AUTOMATION_GITHUB_CACHE": "1"}) is not None
    assert github.default_cache_folder({"AUTOMATION_GITHUB_CACHE": "off"}) is None
    gh = github.GitHubClient.from_env({"GITHUB_TOKEN": "t", "GITHUB_REPOSITORY": REPO_NAME, "GITHUB_ACTIONS": "true"})
    assert gh.cache.folder is None
    gh.close()


def test_answers_at_a_commit_are_kept_for_good(fake, tmp_path):
    head = "a" * 40
    fake.open_pull(REPO_NAME, 7, head_sha=head, files={"experiments/x.yaml": "name: x\n"})
    cache = github.ResponseCache(tmp_path)
    with client(fake, cache=cache) as gh:
        assert gh.file_text("experiments/x.yaml", head) == "name: x\n"
        assert gh.file_text("experiments/gone.yaml", head) is None
        files = gh.list_pull_files(7, head)
        assert gh.file_text("experiments/x.yaml", head) == "name: x\n"
        assert gh.file_text("experiments/gone.yaml", head) is None
        assert gh.list_pull_files(7, head) == files
        assert gh.counts["cached"] == 3
    assert len(fake.calls("GET")) == 3
    with client(fake, cache=github.ResponseCache(tmp_path)) as gh:  # the next process, from the folder
        assert gh.list_pull_files(7, head) == files and gh.file_text("experiments/x.yaml", head) == "name: x\n"
    assert len(fake.calls("GET")) == 3
    # A stale head: GitHub answers for the new head, which is not kept under the old one.
    fake.push(REPO_NAME, 7, "b" * 40, {"experiments/y.yaml": "name: y\n"})
    with client(fake) as gh:
        stale = gh.list_pull_files(7, "c" * 40)
        assert len(stale) == 2 and len(gh.list_pull_files(7, "c" * 40)) == 2
    assert len(fake.calls("GET")) == 5
    with client(fake) as gh:  # a branch name is not a commit: never kept
        gh.file_text("experiments/x.yaml", "main")
        gh.file_text("experiments/x.yaml", "main")
    assert len(fake.calls("GET")) == 7


@pytest.fixture
def in_actions(monkeypatch):
    """A job's environment: GITHUB_ACTIONS=true, no bot login configured."""
    for name in ("AUTOMATION_COMMENT_AUTHOR", "AUTOMATION_BOT_LOGIN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GITHUB_ACTIONS", "true")


def test_comments_are_listed_once_per_process(fake, in_actions):
    fake.add_comment(REPO_NAME, 42, "a person's comment")
    with client(fake) as gh:
        assert len(gh.list_issue_comments(42)) == 1
        result = github.upsert_comment(gh, 42, f"{MARKER}\nfirst", MARKER)  # listed already: POST + one fresh list
        assert [c["body"] for c in gh.list_issue_comments(42)] == ["a person's comment", f"{MARKER}\nfirst"]
        github.upsert_comment(gh, 42, f"{MARKER}\nsecond", MARKER)  # from the kept list: one PATCH
        github.upsert_comment(gh, 42, f"{MARKER}\nsecond", MARKER)  # unchanged: nothing
        assert gh.list_issue_comments(42)[-1]["body"] == f"{MARKER}\nsecond"
        gh.delete_issue_comment(result.comment_id)
        assert [c["body"] for c in gh.list_issue_comments(42)] == ["a person's comment"]
        assert len(gh.list_issue_comments(42, fresh=True)) == 1  # read again: changed since, a 200
        assert len(gh.list_issue_comments(42, fresh=True)) == 1  # and again: a free 304
    lists = [c for c in fake.calls("GET") if c.path.endswith("/comments")]
    assert [c.status for c in lists] == [200, 200, 200, 304]
    assert [c.method for c in fake.requests if c.method != "GET"] == ["POST", "PATCH", "DELETE"]
    assert fake.billed() == 6 and not [c for c in fake.calls("GET") if c.path == "/user"]


def test_comments_of_many_pull_requests_in_one_listing(fake, in_actions):
    for number in (7, 8, 9):
        fake.open_pull(REPO_NAME, number, head_sha=f"{number}" * 40, files={})
    fake.add_comment(REPO_NAME, 7, f"{MARKER}\non 7", BOT)
    fake.add_comment(REPO_NAME, 9, "a person on 9")
    fake.add_comment(REPO_NAME, 9, f"{MARKER}\non 9", BOT)
    fake.add_comment(REPO_NAME, 3, "an old issue's comment")
    fake.add_comment("someone/else", 7, "another repository")
    with client(fake) as gh:
        pulls = gh.list_pulls()
        assert gh.prime_issue_comments(pulls) == [7, 8, 9]
        assert gh.prime_issue_comments(pulls) == []  # nothing left to prime
        assert [c["body"] for c in gh.list_issue_comments(7)] == [f"{MARKER}\non 7"]
        assert gh.list_issue_comments(8) == []
        assert [c["body"] for c in gh.list_issue_comments(9)] == ["a person on 9", f"{MARKER}\non 9"]
        assert github.upsert_comment(gh, 9, f"{MARKER}\non 9", MARKER).action == "unchanged"
    assert [c.path for c in fake.calls("GET")] == [f"/repos/{REPO_NAME}/pulls", f"/repos/{REPO_NAME}/issues/comments"]


def test_priming_gives_up_when_the_repository_list_is_longer_than_listing_each(fake):
    for number in (7, 8):
        fake.open_pull(REPO_NAME, number, head_sha=f"{number}" * 40, files={})
    for i in range(250):  # three pages of the repository's comments for two pull requests
        fake.add_comment(REPO_NAME, 100 + i % 5, f"chatter {i}")
    with client(fake) as gh:
        assert gh.prime_issue_comments(gh.list_pulls()) == []
        assert gh.list_issue_comments(7) == []  # listed on its own
    pages = [c for c in fake.calls("GET") if c.path.endswith("/issues/comments")]
    assert len(pages) == 2


def test_who_we_are_in_actions_costs_no_request(fake, monkeypatch, in_actions):
    with client(fake, USER_TOKEN) as gh:
        assert gh.viewer_login() == "github-actions[bot]"
    monkeypatch.setenv("AUTOMATION_BOT_LOGIN", "acme-ml-loop[bot]")  # a GitHub App's token
    with client(fake) as gh:
        assert gh.viewer_login() == "acme-ml-loop[bot]"
    assert fake.requests == []


def test_workflows_are_enabled_and_disabled_as_github_answers(fake):
    loop = fake.add_workflow(REPO_NAME, ".github/workflows/reconcile-tick.yml", "Reconcile tick")
    with client(fake, ACTIONS_TOKEN) as gh:
        assert gh.get_workflow("reconcile-tick.yml")["id"] == loop["id"]
        assert gh.workflow_state(loop["id"]) == "active"
        gh.disable_workflow(".github/workflows/reconcile-tick.yml")  # a path is cut to its file name
        assert gh.workflow_state("reconcile-tick.yml") == "disabled_manually"
        gh.enable_workflow("reconcile-tick.yml")
        gh.enable_workflow("reconcile-tick.yml")  # idempotent
        assert gh.workflow_state("reconcile-tick.yml") == "active"
        with pytest.raises(github.GitHubError) as missing:
            gh.enable_workflow("nope.yml")
        assert missing.value.status == 404
    puts = fake.calls("PUT")
    assert [c.status for c in puts] == [204, 204, 204, 404] and all(c.body is None for c in puts)
    with client(fake, WRITE_TOKEN) as gh:  # a job without `actions: write`: reads, but may not switch
        assert gh.workflow_state("reconcile-tick.yml") == "active"
        with pytest.raises(github.GitHubPermissionError, match="Resource not accessible by integration"):
            gh.disable_workflow("reconcile-tick.yml")
    with client(fake, USER_TOKEN) as gh:  # a person's token with the repo scope
        gh.disable_workflow("reconcile-tick.yml")
    assert fake.workflow(REPO_NAME, "reconcile-tick.yml")["state"] == "disabled_manually"
    assert len(fake.calls("PUT")) == 6  # the 403 was not retried


def test_a_spent_hourly_limit_is_a_rate_limited_403(fake):
    from tests.fake_github import Identity

    fake.tokens["ghs_small"] = Identity(BOT, can_write=True, installation=True, rate_limit=2)
    fake.open_pull(REPO_NAME, 7, head_sha="a" * 40, files={})
    sleeps = Sleeps()
    with client(fake, "ghs_small", sleep=sleeps, max_wait_s=60) as gh:
        gh.get_pull(7)
        gh.get_pull(7)  # a 304: free
        gh.list_pulls()
        assert gh.rate_limit["x-ratelimit-remaining"] == "0"
        with pytest.raises(github.GitHubError, match="rate limit exceeded"):
            gh.list_issue_comments(7)
    assert fake.billed("ghs_small") == 2 and sleeps == []
