"""The warm standby, for real: a server process that did its imports and becomes an endpoint when claimed."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from automation import cli
from automation.serving import process
from automation.serving.contract import score_request


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("AUTOMATION_HOME", str(tmp_path / "ws"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield tmp_path / "ws"
    for record in process.list_endpoints():
        process.stop_endpoint(record.name)
    process.stop_standby()


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return process._cmdline(pid) is None  # a zombie not yet reaped is gone too


def _warm(standby: process.StandbyRecord) -> None:
    """The standby has done its imports; if not, what there is to know about it."""
    if process.standby_warm(timeout_s=120):
        return
    log = Path(standby.log_file).read_text() if Path(standby.log_file).exists() else "(no log)"
    pytest.fail(f"standby pid {standby.pid} not warm; alive: {not _gone(standby.pid)}; "
                f"record: {process.get_standby()}; socket exists: {Path(standby.socket).exists()}; log:\n{log}")


def _answers(record: process.EndpointRecord) -> bool:
    reply = process.invoke(record, score_request([[{"role": "user", "content": "Hello"}]], {"max_new_tokens": 4}))
    return isinstance(reply.get("output"), str)


def test_a_claimed_standby_becomes_the_endpoint_and_the_next_one_starts(home, tiny_model_dir):
    standby = process.start_standby(idle_timeout_s=300, replenish=True)
    _warm(standby)
    assert process.start_standby().pid == standby.pid  # one per workspace: a live one is returned

    record = process.start_endpoint("warm", tiny_model_dir, tags={"pr": "1"}, ready_timeout_s=60)
    assert record.pid == standby.pid and record.standby_id == standby.standby_id
    assert _answers(record)
    again = process.get_endpoint("warm")
    assert again.alive and again.standby_id == standby.standby_id
    log = Path(record.log_file).read_text()
    assert "listening on 127.0.0.1" in log and "model loaded" in log  # its output moved to the endpoint's log
    assert "standby claimed" in Path(standby.log_file).read_text()

    following = process.get_standby()  # replenish: the next start is warm too
    assert following is not None and following.alive and following.pid != standby.pid

    assert process.stop_endpoint("warm") is True
    assert _gone(record.pid)
    assert process.stop_standby() is True
    assert _gone(following.pid) and not Path(following.socket).exists()
    assert process.get_standby() is None


def test_two_starts_at_once_claim_the_standby_once(home, tiny_model_dir):
    standby = process.start_standby(idle_timeout_s=300, replenish=False)
    _warm(standby)
    with ThreadPoolExecutor(2) as pool:
        starts = [pool.submit(process.start_endpoint, name, tiny_model_dir, tags={}, ready_timeout_s=120)
                  for name in ("first", "second")]
        records = [start.result() for start in starts]
    assert sorted(r.standby_id is None for r in records) == [False, True]  # one warm, one cold
    warm = next(r for r in records if r.standby_id)
    assert warm.pid == standby.pid
    assert all(_answers(r) and process.get_endpoint(r.name).alive for r in records)
    assert process.get_standby() is None


def test_a_standby_from_another_environment_refuses_and_the_endpoint_starts_cold(home, tiny_model_dir,
                                                                                  monkeypatch):
    standby = process.start_standby(idle_timeout_s=300, replenish=True)
    _warm(standby)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # read by torch at import: the standby's imports do not fit

    record = process.start_endpoint("cold", tiny_model_dir, tags={}, ready_timeout_s=120)
    assert record.pid != standby.pid and record.standby_id is None
    assert _answers(record)
    deadline = time.monotonic() + 10
    while not _gone(standby.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(standby.pid) and not Path(standby.socket).exists()
    assert "refused a claim" in Path(standby.log_file).read_text()
    assert process.get_standby() is None  # not replaced: it was never claimed


def test_an_unclaimed_standby_exits_after_its_idle_time_and_a_start_goes_cold(home, tiny_model_dir, capsys):
    assert cli.main(["endpoints", "warm", "--idle-minutes", "0.02", "--once"]) == 0  # 1 s
    out = capsys.readouterr().out
    assert "standby warm" in out and "not replaced once claimed" in out
    standby = process.get_standby()
    deadline = time.monotonic() + 30
    while not _gone(standby.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(standby.pid) and not Path(standby.socket).exists()
    assert "no claim within 1 s" in Path(standby.log_file).read_text()

    record = process.start_endpoint("after", tiny_model_dir, tags={}, ready_timeout_s=120)
    assert record.standby_id is None and _answers(record)
    assert process.get_standby() is None  # the stale record is gone
    assert cli.main(["endpoints", "warm", "--stop"]) == 0
    assert capsys.readouterr().out.strip() == "no standby"


def test_warm_refuses_a_non_positive_idle_time(home):
    assert cli.main(["endpoints", "warm", "--idle-minutes", "0"]) == 2
    assert process.get_standby() is None


def test_the_fingerprint_follows_what_the_imports_depend_on(monkeypatch, tmp_path):
    from automation.serving import standby

    monkeypatch.setenv("SOMETHING_TORCH_NEVER_READS", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # read by transformers at import
    environment = standby.import_environment()
    assert "SOMETHING_TORCH_NEVER_READS" not in environment and environment["HF_HOME"] == str(tmp_path)

    # What the standby's imports set is their output: a claimer whose imports set it alike differs in nothing.
    writes = {"TORCHINDUCTOR_CACHE_DIR": "/tmp/torchinductor_me"}
    launch = {"OMP_NUM_THREADS": "1"}
    assert standby.environment_differences(launch, {"OMP_NUM_THREADS": "1"}, writes) == []
    assert standby.environment_differences(launch, {"OMP_NUM_THREADS": "1", **writes}, writes) == []
    assert standby.environment_differences(launch, {"OMP_NUM_THREADS": "1", "TORCHINDUCTOR_CACHE_DIR": "/mine"},
                                           writes) == ["TORCHINDUCTOR_CACHE_DIR"]  # set by a person: an input
    assert standby.environment_differences(launch, {"OMP_NUM_THREADS": "2"}, writes) == ["OMP_NUM_THREADS"]
    assert standby.environment_differences(launch, {}, writes) == ["OMP_NUM_THREADS"]

    base = standby.code_fingerprint()
    assert standby.code_fingerprint() == base
    folder = tmp_path / "site-packages"
    folder.mkdir()
    monkeypatch.setattr(standby.site, "getsitepackages", lambda: [str(folder)])
    before = standby.code_fingerprint()
    (folder / "__pycache__").mkdir()  # a first import compiling a top-level module: nothing installed
    assert standby.code_fingerprint() == before
    (folder / "newpkg-1.0.dist-info").mkdir()  # a package installed
    assert standby.code_fingerprint() != before


def test_the_standby_a_run_warms_for_its_deploy_does_not_outlive_the_run_unclaimed(home):
    """`prepare_deploy` starts a standby; when the process ends without a deploy claiming it (a failed
    fine-tune), it is stopped. One a person started (`automation endpoints warm`) is left alone."""
    import subprocess
    import sys

    warm_up = ("from automation.backends.local.backend import LocalBackend; LocalBackend().prepare_deploy(None); "
               "from automation.serving import process; print(process.get_standby().pid)")
    started = subprocess.run([sys.executable, "-c", warm_up], check=True, timeout=120, capture_output=True, text=True)
    pid = int(started.stdout.split()[-1])
    deadline = time.monotonic() + 10
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(pid) and process.get_standby() is None

    mine = process.start_standby(idle_timeout_s=300, replenish=False)
    subprocess.run([sys.executable, "-c", warm_up], check=True, timeout=120)
    still = process.get_standby()
    assert still is not None and still.alive and still.standby_id == mine.standby_id
