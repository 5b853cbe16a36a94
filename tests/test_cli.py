"""The CLI: exit codes, messages without tracebacks, annotations, and a light `validate`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from automation.cli import main
from tests.conftest import LOCAL_EXPERIMENT, REPO, write_experiment


def test_validate_ok_and_invalid_exit_codes(tmp_path, capsys):
    good = write_experiment(tmp_path / "ok", LOCAL_EXPERIMENT)
    assert main(["validate", str(good)]) == 0
    assert f"ok: {good}" in capsys.readouterr().out
    bad = write_experiment(tmp_path / "bad", dict(LOCAL_EXPERIMENT, training={"learning_rate": -1}))
    assert main(["validate", str(good), str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"error: training.learning_rate at {bad}:" in err
    assert "1 of 2 experiment file(s) invalid" in err


def test_validate_reports_every_file_in_a_folder(tmp_path, capsys):
    write_experiment(tmp_path, "name: one\nname: two\n", name="one")
    write_experiment(tmp_path, "- not a mapping\n", name="two")
    write_experiment(tmp_path, LOCAL_EXPERIMENT)
    (tmp_path / "notes.txt").write_text("ignored")
    assert main(["validate", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert "duplicate key" in captured.err and "expected a mapping" in captured.err
    assert "ok:" in captured.out and "2 of 3" in captured.err


def test_validate_with_nothing_to_validate_is_bad_input(tmp_path, capsys):
    assert main(["validate", str(tmp_path)]) == 2
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_validate_prints_annotations_in_github_actions(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    bad = write_experiment(tmp_path, dict(LOCAL_EXPERIMENT, training={"num_train_epochs": 0}))
    assert main(["validate", str(bad)]) == 2
    out = capsys.readouterr().out
    line = bad.read_text().splitlines().index("  num_train_epochs: 0") + 1
    assert f"::error file={bad},line={line},title=invalid experiment::training.num_train_epochs: " in out


def test_validate_lists_every_problem_in_the_job_summary(tmp_path, capsys, monkeypatch):
    """GitHub shows 10 error annotations per step; the job summary has all of them and says so."""
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    training = {f"bogus_{i:02d}": 1 for i in range(12)}
    bad = write_experiment(tmp_path, dict(LOCAL_EXPERIMENT, training=training))
    assert main(["validate", str(bad)]) == 2
    out = capsys.readouterr().out
    assert out.count("::error ") == 12
    text = summary.read_text()
    assert "12 problem(s)" in text and "only the first 10 of these 12" in text
    assert all(f"`training.bogus_{i:02d}`" in text for i in range(12))


def test_validate_summary_when_all_is_well(tmp_path, monkeypatch, capsys):
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    assert main(["validate", str(REPO / "experiments")]) == 0
    assert "experiment file(s) valid" in summary.read_text()


def test_set_override_from_the_cli(tmp_path, capsys):
    good = write_experiment(tmp_path, LOCAL_EXPERIMENT)
    assert main(["validate", str(good), "--set", "training.learning_rate=0"]) == 2
    assert "greater than 0" in capsys.readouterr().err


def test_schema_command_writes_the_committed_schema(tmp_path):
    out = tmp_path / "schema.json"
    assert main(["schema", "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == json.loads((REPO / "experiments" / "experiment.schema.json").read_text())


def test_data_command(chat_dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the dataset path in the experiment is relative: data/chat
    exp = write_experiment(tmp_path / "experiments", LOCAL_EXPERIMENT)
    assert main(["data", str(exp), "--out", "out"]) == 0
    assert "train_sft" in capsys.readouterr().out
    assert (tmp_path / "out" / "test_gen.jsonl").exists()
    assert main(["data", str(exp), "--out", "out"]) == 0
    assert "(reused)" in capsys.readouterr().out


def test_data_command_bad_rows_exit_1_and_drop_invalid(tmp_path, capsys, monkeypatch, chat_dataset):
    monkeypatch.chdir(tmp_path)
    with (chat_dataset / "train_sft.jsonl").open("a") as handle:
        handle.write('{"prompt": "x"}\n')
    exp = write_experiment(tmp_path / "experiments", LOCAL_EXPERIMENT)
    assert main(["data", str(exp), "--out", "out"]) == 1
    assert "train_sft row 40" in capsys.readouterr().err
    assert main(["data", str(exp), "--out", "out", "--drop-invalid"]) == 0


def test_data_command_default_output_in_the_workspace(chat_dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTOMATION_HOME", str(tmp_path / "ws"))
    exp = write_experiment(tmp_path / "experiments", LOCAL_EXPERIMENT)
    assert main(["data", str(exp)]) == 0
    assert (tmp_path / "ws" / "runs" / "tiny-local" / "data" / "train_sft.jsonl").exists()


def test_unknown_command_is_bad_input():
    with pytest.raises(SystemExit) as caught:
        main(["frobnicate"])
    assert caught.value.code == 2


def run_module(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "automation", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_python_dash_m_works_like_the_console_script(tmp_path):
    result = run_module("validate", "experiments")
    assert result.returncode == 0, result.stderr
    assert "ok: experiments/phi3-mini-ultrachat.yaml" in result.stdout
    bad = write_experiment(tmp_path, "name: [\n", name="broken")
    result = run_module("validate", str(bad))
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_validate_imports_no_heavy_library():
    code = (
        "import sys\n"
        "from automation.cli import main\n"
        "code = main(['validate', 'experiments'])\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'torch', 'transformers', 'mlflow', 'datasets', 'azure', 'trl', 'peft', 'pandas', 'pyarrow'})\n"
        "print(code, heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().endswith("0 []"), result.stdout + result.stderr


def test_endpoints_list_bad_tag_is_bad_input(workspace, capsys):
    assert main(["endpoints", "list", "--tag", "no-equals-sign"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
    assert main(["endpoints", "list", "--backend", "gcp"]) == 2
    assert "valid backends: local" in capsys.readouterr().err


def test_run_dry_run_prints_the_plan_without_network(workspace, capsys):
    assert main(["run", str(REPO / "experiments" / "phi3-mini-ultrachat.yaml"), "--dry-run", "--pr", "7"]) == 0
    plan = capsys.readouterr().out
    for expected in ("chat_completion_pipeline", "force_rerun: true", "continue_on_step_failure: false",
                     "Phi-3-mini-4k-instruct-ultrachat-bs1-cosine-ds2-lora-save_limit-1-seqlen2048",
                     "auth_mode: key", "request_timeout_ms: 90000", "version: 0.0.82"):
        assert expected in plan, expected
    assert not (workspace / "runs" / "phi3-mini-ultrachat" / "data").exists(), "a plan runs nothing"


def test_dry_run_plan_goes_into_the_report(workspace, capsys):
    exp = str(REPO / "experiments" / "phi3-mini-ultrachat.yaml")
    assert main(["run", exp, "--dry-run"]) == 0
    assert main(["report", exp]) == 0
    report = (workspace / "runs" / "phi3-mini-ultrachat" / "report.md").read_text()
    assert "Plan: every operation the run makes (dry run)" in report and "chat_completion_pipeline" in report


def test_the_azure_sdks_request_logs_stay_out_of_the_job_log():
    """azure-core logs each request and answer with its headers at INFO; the CLI shows only its
    warnings (the wire stand-in counted ~530 such lines in one submitting tick)."""
    import logging

    from automation.quiet import configure_logging

    root, level = logging.getLogger(), logging.getLogger().level
    handlers = list(root.handlers)
    try:
        configure_logging(False)
        assert logging.getLogger("azure.core.pipeline.policies.http_logging_policy").getEffectiveLevel() \
            == logging.WARNING
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def test_a_workflows_variables_arrive_as_one_json_object():
    """`AUTOMATION_VARS: ${{ toJSON(vars) }}`: the AZURE_* ones are exported, what is set wins, bad
    JSON is a clear error."""
    import pytest

    from automation.cli import export_workflow_variables
    from automation.errors import ConfigError

    env = {"AUTOMATION_VARS": '{"AZURE_ML_WORKSPACE": "ws-prod", "AZURE_CLIENT_ID": "x", "OTHER": "y"}',
           "AZURE_CLIENT_ID": "set-by-the-step"}
    assert export_workflow_variables(env) == ["AZURE_ML_WORKSPACE"]
    assert env["AZURE_ML_WORKSPACE"] == "ws-prod" and env["AZURE_CLIENT_ID"] == "set-by-the-step" and "OTHER" not in env
    assert export_workflow_variables({}) == []
    with pytest.raises(ConfigError, match="not JSON"):
        export_workflow_variables({"AUTOMATION_VARS": "{oops"})
