"""The warm standby as a person uses it: `automation endpoints warm`, then `automation deploy`, each in
a fresh process started from a clean shell's environment, on the tiny model.

The other standby tests (test_serving_standby.py) start and claim from the test process, which has
imported torch; a person's `automation deploy` has not. The server's imports set
TORCHINDUCTOR_CACHE_DIR (torch._inductor, which transformers pulls in), so a claim that compared what
the imports left in os.environ was refused on every real claim while those tests passed (issue 25).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from automation.cli import main
from automation.record import RunRecord
from automation.serving import process
from automation.serving.contract import score_request
from tests.conftest import REPO, TINY_EXPERIMENT, write_experiment

# `automation deploy`, run as the console script runs it, saying whether torch was imported.
DEPLOY = ("import sys; from automation.cli import main; code = main(sys.argv[1:]); "
          "print('torch imported:', 'torch' in sys.modules); sys.exit(code)")


# The same, after the imports the server does (as `automation run` has done them, fine-tuning,
# before it deploys), saying which variables they set.
IMPORTS_FIRST = ("import os; before = dict(os.environ); from automation.serving.standby import preload; preload(); "
                 "print('imports set:', sorted(k for k in os.environ if before.get(k) != os.environ[k])); ")


def shell_environment(workspace: Path) -> dict[str, str]:
    """What a person's shell passes: nothing a test process or its imports set, and our settings
    (PYTHONPATH: the code under test, whichever checkout the venv has installed)."""
    kept = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "USER") if k in os.environ}
    return {**kept, "AUTOMATION_HOME": str(workspace), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO)}


def automation(args: list[str], env: dict[str, str], cwd: Path, *, code: str | None = None) -> str:
    command = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "automation", *args]
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def registered(tiny_model_dir, tmp_path_factory):
    """A workspace with the tiny experiment fine-tuned and registered, once for the module (in this
    process: only the deploy matters here). Yields (experiment file, workspace, working folder)."""
    folder = tmp_path_factory.mktemp("cli")
    body = json.loads(json.dumps(TINY_EXPERIMENT))
    body["model"]["path"] = str(tiny_model_dir)
    experiment = write_experiment(folder / "experiments", body)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AUTOMATION_HOME", str(folder / "ws"))
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.chdir(folder)
        assert main(["finetune", str(experiment)]) == 0
        assert main(["register", str(experiment)]) == 0
        yield experiment, folder / "ws", folder


@pytest.fixture
def cli(registered):
    """The experiment, the workspace and the working folder; whatever a test leaves running is stopped."""
    yield registered
    for endpoint in process.list_endpoints():
        process.stop_endpoint(endpoint.name)
    process.stop_standby()


def test_warm_then_deploy_from_the_cli_claims_the_standby(cli):
    registered, workspace, tmp_path = cli
    env = shell_environment(workspace)
    warm = automation(["endpoints", "warm", "--once", "--idle-minutes", "10"], env, tmp_path)
    assert "standby warm" in warm
    standby = process.get_standby()
    assert standby is not None and standby.alive

    deployed = automation(["deploy", str(registered)], env, tmp_path, code=DEPLOY)
    assert "torch imported: False" in deployed  # the claimer is a fresh process, as a person's is

    record = RunRecord.load(workspace / "runs" / "tiny-local" / "record.json")
    endpoint = process.get_endpoint(record.deploy.endpoint_name)
    standby_log = Path(standby.log_file).read_text()
    assert endpoint.standby_id == standby.standby_id and endpoint.pid == standby.pid, (
        f"the deploy started cold; the standby's log:\n{standby_log}")
    assert "standby claimed" in standby_log
    reply = process.invoke(endpoint, score_request([[{"role": "user", "content": "Hello"}]], {"max_new_tokens": 4}))
    assert isinstance(reply["output"], str)
    assert process.get_standby() is None  # --once: not replaced

    automation(["teardown", str(registered)], env, tmp_path)
    assert process.get_endpoint(record.deploy.endpoint_name) is None


def test_a_claimer_that_imported_torch_claims_too_and_the_next_standby_fits_a_fresh_one(cli):
    """As `automation run` deploys: torch is imported in that process (the fine-tune) before the
    claim. The standby it starts next must not inherit what torch set, or a person's next deploy,
    which has not imported torch, would not fit it."""
    registered, workspace, tmp_path = cli
    env = shell_environment(workspace)
    automation(["endpoints", "warm", "--idle-minutes", "10"], env, tmp_path)  # replaced after each claim
    first = process.get_standby()

    deployed = automation(["deploy", str(registered)], env, tmp_path, code=IMPORTS_FIRST + DEPLOY)
    assert "torch imported: True" in deployed and "imports set: []" not in deployed  # they set some (torch's inductor)
    name = RunRecord.load(workspace / "runs" / "tiny-local" / "record.json").deploy.endpoint_name
    assert process.get_endpoint(name).standby_id == first.standby_id, Path(first.log_file).read_text()
    automation(["teardown", str(registered)], env, tmp_path)

    following = process.get_standby()  # started by that deploy's process
    assert following is not None and following.standby_id != first.standby_id
    automation(["deploy", str(registered)], env, tmp_path, code=DEPLOY)
    assert process.get_endpoint(name).standby_id == following.standby_id, Path(following.log_file).read_text()


def test_a_deploy_from_another_environment_starts_cold_and_says_why(cli):
    registered, workspace, tmp_path = cli
    env = shell_environment(workspace)
    automation(["endpoints", "warm", "--once", "--idle-minutes", "10"], env, tmp_path)
    standby = process.get_standby()

    deployed = automation(["deploy", str(registered)], {**env, "OMP_NUM_THREADS": "2"}, tmp_path, code=DEPLOY)
    record = RunRecord.load(workspace / "runs" / "tiny-local" / "record.json")
    endpoint = process.get_endpoint(record.deploy.endpoint_name)
    assert endpoint.alive and endpoint.standby_id is None and endpoint.pid != standby.pid
    # The claimer's log and the standby's name what differs (the names only, never the values).
    assert "the environment differs from this standby's in OMP_NUM_THREADS" in deployed
    assert "refused a claim (the environment differs from this standby's in OMP_NUM_THREADS" in \
        Path(standby.log_file).read_text()
