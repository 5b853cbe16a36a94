"""The workflows: pinned actions, least privilege, and clean actionlint and zizmor reports."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.yml"))
PINNED = re.compile(r"^[\w.-]+/[\w./-]+@[0-9a-f]{40}$")


def tool(name: str) -> str:
    found = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(found).exists():
        pytest.fail(f"{name} is not installed; it comes with the dev extra (make setup)")
    return found


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_there_are_workflows():
    assert WORKFLOWS


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_actions_are_pinned_to_full_shas(path):
    text = path.read_text()
    for line in re.findall(r"uses:\s*(\S+)(.*)", text):
        ref, comment = line
        assert PINNED.match(ref), f"{path.name}: {ref} is not pinned to a full commit SHA"
        assert re.search(r"#\s*v\d", comment), f"{path.name}: {ref} needs a version comment"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_least_privilege(path):
    workflow = load(path)
    assert workflow.get("permissions") == {}, f"{path.name}: top-level permissions must be {{}}"
    triggers = workflow.get(True, workflow.get("on"))  # PyYAML reads the key `on` as True
    assert "pull_request_target" not in triggers and "workflow_run" not in triggers
    for name, job in workflow["jobs"].items():
        for step in job.get("steps", []):
            if str(step.get("uses", "")).startswith("actions/checkout@"):
                assert step.get("with", {}).get("persist-credentials") is False, f"{path.name}:{name}"


def test_actionlint_is_clean():
    result = subprocess.run([tool("actionlint"), "-oneline"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_zizmor_is_clean():
    result = subprocess.run([tool("zizmor"), "--offline", "--format", "plain", ".github/workflows"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
