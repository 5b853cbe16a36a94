"""A GitHub job's world for the wire tests and the benchmark: the Azure stand-in (service.py) seeded
as the reference flow's workspace and `azureml` registry (production's workspace and registry start
empty), the fake GitHub API with `production` set up as a gate, and the `automation` CLI run as a
subprocess with the env an `azure` leg of loop.yml (or the promote job of promote.yml) has."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.conftest import REPO
from tests.fake_azure import COMPONENT_SPEC, CURRENT_MODELS, EXPERIMENT, model_spec
from tests.fake_github import OIDC_REQUEST_TOKEN, PROMOTE_TOKEN, WRITE_TOKEN, FakeGitHub
from tests.standin.service import StandIn

REPO_NAME = "acme-ml/chat-finetune"
EXPERIMENT_NAME = "phi3-ultrachat"
PATH = f"experiments/{EXPERIMENT_NAME}.yaml"
A100 = "Standard_NC24ads_A100_v4"
# Compute/listVmSizes entries (shape of examples/Compute/... ListVMSizesResult in azure-rest-api-specs)
VM_SIZES = [
    {"name": "Standard_NC24rs_v3", "family": "standardNCSv3Family", "vCPUs": 24, "gpus": 4, "osVhdSizeMB": 1047552,
     "maxResourceVolumeMB": 2948096, "memoryGB": 448, "lowPriorityCapable": True, "premiumIO": True,
     "supportedComputeTypes": ["AmlCompute", "ComputeInstance"]},
    {"name": A100, "family": "standardNCADSA100v4Family", "vCPUs": 24, "gpus": 1, "osVhdSizeMB": 1047552,
     "maxResourceVolumeMB": 65536, "memoryGB": 220, "lowPriorityCapable": True, "premiumIO": True,
     "supportedComputeTypes": ["AmlCompute", "ComputeInstance"]},
    {"name": "Standard_D4s_v3", "family": "standardDSv3Family", "vCPUs": 4, "gpus": 0, "osVhdSizeMB": 1047552,
     "maxResourceVolumeMB": 32768, "memoryGB": 16, "lowPriorityCapable": True, "premiumIO": True,
     "supportedComputeTypes": ["AmlCompute", "ComputeInstance"]},
]


def automation_bin() -> Path:
    """The CLI of the venv an `azure` leg installs (`make setup-azure`), when tests/job_venvs.py can
    make one; this repository's .venv otherwise."""
    try:
        from tests.job_venvs import job_venv
    except ImportError:
        return REPO / ".venv" / "bin" / "automation"
    return job_venv("azure") / "bin" / "automation"


def experiment_text(promotion: dict | None = None, **training) -> str:
    body = copy.deepcopy(EXPERIMENT)
    if promotion is not None:
        body["promotion"] = {**(body.get("promotion") or {}), **promotion}
    body["name"] = EXPERIMENT_NAME
    body["data"] = {"dataset": str(REPO / "data" / "ultrachat-sample"), "sample_percent": 100}
    body["training"].update(training)
    body.setdefault("evaluation", {})["prompts"] = 2
    return yaml.safe_dump(body, sort_keys=False)


def seed_reference_flow(azure: StandIn) -> None:
    """The workspace and registry of the reference flow: an A100 cluster, the VM sizes, the
    registry's models (Azure/azureml-assets) and the chat_completion_pipeline component."""
    from azure.ai.ml import load_component

    azure.add_cluster("gpu-a100", A100)
    azure.vm_sizes = copy.deepcopy(VM_SIZES)
    for name, version, when in CURRENT_MODELS:
        azure.publish_model(model_spec(name, version, when))
    component = load_component(COMPONENT_SPEC)
    azure.publish_component(component._to_rest_object().as_dict(), component.name, component.version)


@dataclass
class Result:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def __str__(self) -> str:
        return (f"$ {' '.join(self.argv)} -> {self.returncode} in {self.seconds:.1f} s\n"
                f"--- stdout\n{self.stdout[-4000:]}\n--- stderr\n{self.stderr[-6000:]}")


@dataclass
class World:
    """`home` is the folder under which each job gets its fresh runner's folder."""

    azure: StandIn
    github: FakeGitHub
    home: Path
    cli: Path

    runs: int = 0

    def workdir(self) -> Path:
        """A fresh runner's working folder for the next job: nothing a previous job left behind."""
        self.runs += 1
        folder = self.home.parent / f"runner-{self.runs}"
        folder.mkdir(parents=True)
        return folder

    def env(self, workdir: Path | None = None, environment: str = "staging", **extra: str) -> dict[str, str]:
        """An `azure` leg's step: the job's variables, GITHUB_* at the fake GitHub, the stand-in's proxy;
        `environment="production"`: the promote job's identity."""
        workdir = workdir or self.home.parent
        keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR", "PYTHONHASHSEED")}
        return {**keep, **self.azure.env(environment), "GITHUB_ACTIONS": "true", "CI": "true",
                "GITHUB_API_URL": self.github.url, "GITHUB_REPOSITORY": REPO_NAME, "GITHUB_TOKEN": WRITE_TOKEN,
                "GITHUB_EVENT_NAME": "schedule", "GITHUB_RUN_ID": "4242", "HF_HUB_OFFLINE": "1",
                "AUTOMATION_HOME": str(workdir / ".automation"), "NO_COLOR": "1",
                "GITHUB_STEP_SUMMARY": str(workdir / "summary.md"), **extra}

    def run(self, *args: str, timeout: float = 300, environment: str = "staging", **extra: str) -> Result:
        """One workflow job's step, on a fresh runner (its own working folder and AUTOMATION_HOME)."""
        argv = [str(self.cli), *args]
        workdir = self.workdir()
        start = time.monotonic()
        done = subprocess.run(argv, env=self.env(workdir, environment, **extra), cwd=workdir, capture_output=True,
                              text=True, timeout=timeout)
        return Result(argv, done.returncode, done.stdout, done.stderr, time.monotonic() - start)

    def reconcile(self, pr: int = 7, **extra: str) -> Result:
        """An `azure` leg: `automation reconcile --backend azure --pr N --experiment X`."""
        return self.run("reconcile", "--backend", "azure", "--pr", str(pr), "--experiment", EXPERIMENT_NAME, **extra)

    def release(self, *args: str, after: str | None = None, inputs: dict[str, str] | None = None,
                environment: str = "production", ref: str = "refs/heads/main", **extra: str) -> Result:
        """The promote job of promote.yml: `automation release` in the `production` environment (its
        identity and variables: production's workspace and resource group, the registry, where
        staging is), from the default branch, with the push event of a merge (`after`: the merge
        commit) or a dispatch's `inputs`; its GITHUB_TOKEN may read the environment's protection.
        `environment="staging"`: the same step with the pull-request identity's variables (a
        workflow edited in a pull request)."""
        event = {"inputs": inputs} if inputs is not None else {"ref": ref, "after": after or "",
                                                               "repository": {"full_name": REPO_NAME}}
        path = self.home.parent / f"event-{self.runs + 1}.json"
        path.write_text(json.dumps(event))
        return self.run("release", "--backend", "azure", *args, environment=environment,
                        GITHUB_EVENT_NAME="workflow_dispatch" if inputs is not None else "push",
                        GITHUB_EVENT_PATH=str(path), GITHUB_REF=ref, GITHUB_TOKEN=PROMOTE_TOKEN,
                        GITHUB_SHA=after or "", **extra)

    def plan(self, **extra: str) -> tuple[Result, dict]:
        """The `azure-plan` job: `automation reconcile --plan --backend azure`, its $GITHUB_OUTPUT read back."""
        from tests.fake_github import parse_file_commands

        output = self.home.parent / f"github_output-{self.runs + 1}"
        output.write_text("")
        result = self.run("reconcile", "--plan", "--backend", "azure", GITHUB_OUTPUT=str(output), **extra)
        values = parse_file_commands(output.read_text())
        return result, json.loads(values.get("azure") or '{"include": []}')

    def comment(self, pr: int = 7) -> str:
        comments = self.github.issue_comments(REPO_NAME, pr)
        assert len(comments) == 1, [c["body"][:200] for c in comments]
        return comments[0]["body"]


@contextmanager
def world(tmp_path: Path) -> Iterator[World]:
    github = FakeGitHub()
    github.tokens.pop(OIDC_REQUEST_TOKEN, None)  # the ID token service is the stand-in's, not this API's
    with StandIn(tmp_path / "standin") as azure, github:
        seed_reference_flow(azure)
        from tests.fork_setup import production_gate

        production_gate(github, REPO_NAME)  # the promote job's gate: reviewers, main only, no bypass
        home = tmp_path / "job" / ".automation"
        home.parent.mkdir(parents=True)
        yield World(azure, github, home, automation_bin())
