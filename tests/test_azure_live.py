"""Live checks against a real workspace. Skipped unless the Azure variables are set and
AUTOMATION_AZURE_LIVE=1: a read-only check, and (with AUTOMATION_AZURE_LIVE_FLOW=1, as it spends
GPU time) the pull-request lifecycle of tests/test_azure_wire.py step for step, against the real
services instead of the stand-in: the same CLI verbs as the workflow's azure legs, the pull request
on the fake GitHub (tests/fake_github.py), a small fine-tune (5 steps), the staging endpoint
deleted at the end whatever happens.

Run it once against a new workspace before the first pull request (README, "The Azure ML backend"):

    AUTOMATION_AZURE_LIVE=1 AUTOMATION_AZURE_LIVE_FLOW=1 AZURE_SUBSCRIPTION_ID=... AZURE_RESOURCE_GROUP=... \\
    AZURE_ML_WORKSPACE=... AZURE_ML_TEST_CLUSTER=gpu-a100 .venv/bin/python -m pytest -m azure tests/test_azure_live.py

At a desk the credential is `az login`'s (DefaultAzureCredential); in a workflow job with
`id-token: write`, the GitHub OIDC token.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml

from tests.fake_azure import experiment

LIVE = os.environ.get("AUTOMATION_AZURE_LIVE") == "1" and all(
    os.environ.get(v) for v in ("AZURE_SUBSCRIPTION_ID", "AZURE_RESOURCE_GROUP", "AZURE_ML_WORKSPACE"))
FLOW = LIVE and os.environ.get("AUTOMATION_AZURE_LIVE_FLOW") == "1"
TICK_S = float(os.environ.get("AUTOMATION_AZURE_LIVE_TICK_S", "120"))  # between scheduled ticks
FLOW_TIMEOUT_S = float(os.environ.get("AUTOMATION_AZURE_LIVE_TIMEOUT_S", str(3 * 3600)))

pytestmark = [
    pytest.mark.azure,
    pytest.mark.skipif(not LIVE, reason="live Azure test: set AZURE_SUBSCRIPTION_ID, AZURE_RESOURCE_GROUP, "
                       "AZURE_ML_WORKSPACE, AZURE_ML_TEST_CLUSTER and AUTOMATION_AZURE_LIVE=1"),
]


def test_live_validate_and_list():
    from automation.backends.azure.backend import AzureBackend

    backend = AzureBackend()
    cluster = os.environ.get("AZURE_ML_TEST_CLUSTER", "gpu-a100")
    size = os.environ.get("AZURE_ML_TEST_SIZE", "Standard_NC24ads_A100_v4")
    assert isinstance(backend.validate_compute(experiment(compute__cluster=cluster, compute__size=size)), list)
    assert isinstance(backend.list_endpoints({"managed_by": "gitops-finetune"}), list)


def live_experiment_text() -> str:
    """The wire test's experiment, made small: 5 steps, short sequences, 2 held-out prompts."""
    from tests.standin.world import experiment_text

    body = yaml.safe_load(experiment_text())
    body["compute"].update(cluster=os.environ.get("AZURE_ML_TEST_CLUSTER", "gpu-a100"),
                           size=os.environ.get("AZURE_ML_TEST_SIZE", "Standard_NC24ads_A100_v4"))
    body["training"].update(num_train_epochs=1, max_steps=5, max_seq_length=512)
    body.setdefault("deployment", {})["ttl_hours"] = 2
    body["evaluation"] = {"prompts": 2}
    return yaml.safe_dump(body, sort_keys=False)


@pytest.mark.skipif(not FLOW, reason="the live flow spends GPU time: set AUTOMATION_AZURE_LIVE_FLOW=1 as well")
def test_live_pull_request_lifecycle(tmp_path):
    """Opened -> submitted -> running ticks -> completed: registered, deployed, scored, evaluated,
    commented -> settled -> closed -> pruned, as in test_azure_wire.test_whole_pull_request_lifecycle."""
    from automation import naming
    from automation.backends.azure.backend import AzureBackend
    from tests.fake_github import FakeGitHub
    from tests.standin.world import EXPERIMENT_NAME, PATH, REPO_NAME, World, automation_bin

    class LiveWorld(World):
        def env(self, workdir: Path | None = None, environment: str = "staging", **extra: str) -> dict[str, str]:
            from tests.fake_github import WRITE_TOKEN  # the real services: no proxy, no stand-in CA

            workdir = workdir or self.home.parent
            return {**os.environ, "GITHUB_API_URL": self.github.url, "GITHUB_REPOSITORY": REPO_NAME,
                    "GITHUB_TOKEN": WRITE_TOKEN, "GITHUB_EVENT_NAME": "schedule", "GITHUB_RUN_ID": "4242",
                    "AUTOMATION_HOME": str(workdir / ".automation"), "HF_HUB_OFFLINE": "1", "NO_COLOR": "1",
                    **extra}

    sha = f"{int(time.time()):x}".ljust(40, "0")  # a new job name on every run
    staging = naming.staging_endpoint_name(REPO_NAME, 7, EXPERIMENT_NAME)
    backend = AzureBackend()
    home = tmp_path / "job" / ".automation"
    home.parent.mkdir(parents=True)
    started = time.monotonic()
    with FakeGitHub() as github:
        w = LiveWorld(azure=None, github=github, home=home, cli=automation_bin())  # type: ignore[arg-type]
        github.open_pull(REPO_NAME, 7, head_sha=sha, files={PATH: live_experiment_text()})
        try:
            def tick(expect: str) -> str:
                planned, matrix = w.plan()
                assert planned.returncode == 0, str(planned)
                if not matrix["include"]:
                    return "nothing planned"
                leg = w.reconcile()
                assert leg.returncode == 0 and f"#7 {EXPERIMENT_NAME}: {expect}" in leg.stdout, str(leg)
                return leg.stdout

            tick("submitted")
            seen = []
            while True:  # scheduled ticks until the job has completed and the leg is done
                assert time.monotonic() - started < FLOW_TIMEOUT_S, f"not done after {FLOW_TIMEOUT_S:.0f} s: {seen}"
                time.sleep(TICK_S)
                out = tick("")
                seen.append(out.strip().splitlines()[-1] if out.strip() else out)
                if ": done" in out:
                    break
                assert ": running" in out, out
            body = w.comment()
            assert "phase=done" in body and "**Registered**" in body and f"**Endpoint** `{staging}`" in body
            assert "### Evaluation" in body
            assert any(e.name == staging for e in backend.list_endpoints({"pr": "7"}))
            assert tick("") == "nothing planned"  # settled
            github.close_pull(REPO_NAME, 7)
            tick("")
            assert not any(e.name == staging for e in backend.list_endpoints({"pr": "7"}))
            assert tick("") == "nothing planned"
            print(f"live lifecycle: {time.monotonic() - started:.0f} s, {len(seen)} ticks after the submit")
        finally:  # an endpoint left running keeps billing; a job left running too
            backend.delete_endpoint(staging)
            for job in backend.list_jobs({"pr": "7", "sha": sha}):
                backend.cancel_job(job.name)
