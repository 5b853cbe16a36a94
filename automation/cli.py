"""The `automation` command line: one verb per stage, explicit list, meaningful exit codes.

Exit codes: 0 ok, 1 the stage failed, 2 bad input (an invalid experiment file, a wrong flag).
Heavy libraries are imported inside the commands that need them, so `validate` starts fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from automation import __version__
from automation.errors import AutomationError, BackendError, ConfigError, ExperimentInvalid

log = logging.getLogger("automation")

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
SCHEMA_PATH = Path("experiments") / "experiment.schema.json"


def _out(text: str = "") -> None:
    print(text, flush=True)


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# validate


def cmd_validate(args: argparse.Namespace) -> int:
    from automation.validation import validate_files

    return validate_files(args.targets, args.set)


# ---------------------------------------------------------------------------------------------
# schema


def cmd_schema(args: argparse.Namespace) -> int:
    from automation.spec import json_schema

    text = json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
    if args.out == "-":
        sys.stdout.write(text)
    else:
        Path(args.out).write_text(text, encoding="utf-8")
        _out(f"wrote {args.out}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# data


def cmd_data(args: argparse.Namespace) -> int:
    from automation.chat_rows import ChatOptions
    from automation.data import prepare_data
    from automation.spec import load_experiment
    from automation.workspace import run_dir

    experiment = load_experiment(args.experiment, args.set)
    out_dir = Path(args.out) if args.out else run_dir(experiment.name) / "data"
    d = experiment.data
    result = prepare_data(
        dataset=d.dataset,
        sample_percent=d.sample_percent,
        required_splits={"train_split": d.train_split, "test_split": d.test_split, "sample_split": d.sample_split},
        sft_splits={d.train_split, d.test_split},
        out_dir=out_dir,
        search_from=_search_roots(args.experiment),
        drop_invalid=args.drop_invalid,
        chat=ChatOptions.of(d),
    )
    _print_data_stats(result)
    return EXIT_OK


def _search_roots(experiment_file: str) -> list[Path]:
    """Relative dataset folders are looked up from the current directory, then the repository root."""
    roots = [Path.cwd(), Path(experiment_file).resolve().parent.parent]
    return list(dict.fromkeys(roots))


def _print_data_stats(result) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"data: {result.source} -> {result.out_dir}" + (" (reused)" if result.reused else ""))
    for column in ("split", "format", "rows", "of", "dropped", "with system", "user turns (mean/max)",
                   "chars p50", "p90", "p99"):
        table.add_column(column, justify="left" if column in ("split", "format") else "right")
    for s in result.splits.values():
        table.add_row(s.split, s.format, str(s.rows), str(s.source_rows), str(s.dropped), str(s.system_rows),
                      f"{s.user_turns_mean:.2f}/{s.user_turns_max}", str(s.chars_p50), str(s.chars_p90), str(s.chars_p99))
    Console(width=120).print(table)


# ---------------------------------------------------------------------------------------------
# The stages of a run


def _open(args: argparse.Namespace):
    from automation.stages import open_run

    return open_run(args.experiment, overrides=args.set, record_path=args.record, pr=args.pr)


def cmd_stage(args: argparse.Namespace) -> int:
    from automation import stages

    run = _open(args)
    verb = args.command
    if verb == "finetune":
        stages.stage_finetune(run)
        ft = run.record.finetune
        _out(f"fine-tuned: job {ft.job_name}, eval loss {ft.base_eval_loss} -> {ft.eval_loss}, model {ft.model_uri}")
    elif verb == "register":
        stages.stage_register(run)
        reg = run.record.registration
        _out(f"registered: {reg.model_name} version {reg.version} (timestamp version {reg.timestamp_version})")
    elif verb == "deploy":
        stages.stage_deploy(run)
        _out(f"deployed: {run.record.deploy.endpoint_name} at {run.record.deploy.url}")
    elif verb == "score":
        stages.stage_score(run)
        score = run.record.score
        _out(f"scored in {score.latency_seconds:.2f} s (request: {score.request_file})\n{score.reply}")
    elif verb == "evaluate":
        ev = stages.stage_evaluate(run)
        if ev is None or "candidate" not in ev.models:
            _out("no held-out evaluation in this run (evaluation.prompts: 0, or the fine-tune did not run one)")
        else:
            from automation.report import evaluation_summary

            for line in evaluation_summary(ev):
                _out(line)
    elif verb == "report":
        path = stages.stage_report(run, Path(args.out) if args.out else None)
        _out(f"report: {path}")
    elif verb == "teardown":
        deleted = stages.stage_teardown(run)
        _out(f"deleted: {', '.join(deleted)}" if deleted else "nothing to delete (already gone)")
    elif verb == "promote":
        stages.stage_promote(run, override=args.override_policy)
        p = run.record.promote
        _out(f"promoted: version {p.model_version} serves {p.endpoint_name} at {p.url}"
             + ("" if p.policy_passed else f" (promotion policy overridden: {p.policy_override})"))
    elif verb == "rollback":
        stages.stage_rollback(run)
        p = run.record.promote
        _out(f"rolled back: {p.endpoint_name} serves {p.deployment_name} (version {p.model_version}) again; "
             f"{p.previous_deployment} is kept, without traffic")
    elif verb == "bundle":
        folder = stages.stage_bundle(run, Path(args.out) if args.out else None, with_weights=args.with_weights)
        _out(f"record for upload: {folder}")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    import time

    from automation import stages
    from automation.report import terminal_summary

    started = time.monotonic()
    run = _open(args)
    if args.dry_run:
        from automation.backends.azure.plan import plan_run

        plan = plan_run(run.experiment, repo=run.record.repo, pr=run.record.pr, sha=run.record.sha)
        plan_file = run.dir / "plan.yaml"
        plan_file.parent.mkdir(parents=True, exist_ok=True)
        plan_file.write_text(plan, encoding="utf-8")
        run.record.plan_file = str(plan_file)
        run.save()
        _out(plan)
        return EXIT_OK
    stages.run_all(run, keep_endpoint=args.keep_endpoint, drop_invalid=args.drop_invalid,
                   on_stage=lambda name: log.info("── %s", name))
    _out("")
    for line in terminal_summary(run.record, run.experiment, time.monotonic() - started):
        _out(line)
    _out(f"record:     {run.record_path}")
    if args.keep_endpoint and run.record.deploy:
        d = run.record.deploy
        _out(f"endpoint:   key in .automation/endpoints/{d.endpoint_name}.key; "
             f"stop it with `automation teardown {args.experiment}`")
    if run.experiment.backend == "local":
        _out(f"MLflow UI:  {_mlflow_ui_command()}")
    return EXIT_OK


def _mlflow_ui_command() -> str:
    """The UI command as it works here: the `mlflow` next to this Python (the venv's), which is not
    on PATH unless the venv is activated."""
    import shlex

    from automation.backends.local.backend import tracking_uri

    beside = Path(sys.executable).parent / "mlflow"
    program = shlex.quote(str(beside)) if beside.is_file() else "mlflow"
    return f"{program} ui --backend-store-uri {shlex.quote(tracking_uri())}  (then open http://127.0.0.1:5000)"


def cmd_preflight(args: argparse.Namespace) -> int:
    from automation import stages

    run = _open(args)
    run.experiment = stages.preflight_experiment(run.experiment, args.steps, args.stand_in)
    run._backend = None
    stages.stage_validate(run)
    stages.stage_data(run)
    stages.stage_finetune(run)
    ft = run.record.finetune
    _out(f"preflight ok: {args.steps} training step(s) on the local stand-in model, final loss {ft.train_loss:.4f}")
    return EXIT_OK


def cmd_endpoints(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from automation.backends import get_backend

    bad = [t for t in args.tag if "=" not in t]
    if bad:
        raise ConfigError(f"--tag {bad[0]!r}: expected KEY=VALUE, e.g. experiment=my-exp")
    backend = get_backend(args.backend)
    endpoints = backend.list_endpoints(dict(t.split("=", 1) for t in args.tag))
    if args.backend == "local":
        from automation.serving import process

        standby = process.get_standby()
        if standby is not None and standby.alive:
            _out(f"(warm standby: pid {standby.pid}, since {standby.created_at}; `automation endpoints warm --stop` "
                 "removes it)")
    if not endpoints:
        _out("no endpoints")
        return EXIT_OK
    now = datetime.now(UTC)
    for e in endpoints:
        try:
            age = now - datetime.strptime(e.created_at, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
            age_text = f"{age.total_seconds() / 3600:.1f} h"
        except ValueError:
            age_text = "?"
        tags = " ".join(f"{k}={v}" for k, v in sorted(e.tags.items()) if v)
        _out(f"{e.name}  {'live' if e.alive else 'dead'}  age {age_text}  {e.url}  {tags}")
    return EXIT_OK


def cmd_endpoints_warm(args: argparse.Namespace) -> int:
    from automation.serving import process

    if args.stop:
        _out("standby stopped" if process.stop_standby() else "no standby")
        return EXIT_OK
    if args.idle_minutes <= 0:
        raise ConfigError(f"--idle-minutes must be above 0, got {args.idle_minutes:g}")
    existing = process.get_standby()
    record = process.start_standby(idle_timeout_s=max(1, round(args.idle_minutes * 60)), replenish=not args.once)
    if not process.standby_warm():
        raise BackendError(f"the standby (pid {record.pid}) did not get warm; see {record.log_file}")
    already = existing is not None and existing.alive and existing.pid == record.pid
    _out(f"standby {'already ' if already else ''}warm: pid {record.pid}; the next local endpoint start claims it; "
         f"unclaimed it exits after {record.idle_timeout_s / 60:g} min"
         + ("" if record.replenish else "; not replaced once claimed"))
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# The parser


def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value of the experiment file, e.g. training.learning_rate=1e-5 "
                             "(repeatable; precedence: defaults < file < --set)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="automation", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"automation {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = commands.add_parser("validate", help="check experiment files (schema, parameters, names)")
    p.add_argument("targets", nargs="*", default=["experiments"], metavar="FILE_OR_DIR")
    _add_set(p)
    p.set_defaults(handler=cmd_validate)

    p = commands.add_parser("schema", help="write the JSON Schema of the experiment file")
    p.add_argument("--out", default=str(SCHEMA_PATH), help=f"file to write, - for stdout (default {SCHEMA_PATH})")
    p.set_defaults(handler=cmd_schema)

    p = commands.add_parser("data", help="sample, check and write every split as {split}.jsonl")
    p.add_argument("experiment")
    p.add_argument("--out", help="output folder (default: the workspace's runs/<experiment>/data)")
    p.add_argument("--drop-invalid", action="store_true", help="drop rows that break the chat schema instead of failing")
    _add_set(p)
    p.set_defaults(handler=cmd_data)

    def stage(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("experiment")
        sub.add_argument("--record", help="run record file (default: the workspace's runs/<experiment>/record.json)")
        sub.add_argument("--pr", type=int, help="pull request number (tags and endpoint names)")
        _add_set(sub)
        sub.set_defaults(handler=cmd_stage)
        return sub

    stage("finetune", "fine-tune (resumes an interrupted job; reuses a finished one)")
    stage("register", "register the fine-tuned model with a timestamp version")
    stage("deploy", "deploy the registered model to a staging endpoint")
    stage("score", "score a seeded sample of the sample split on the endpoint")
    stage("evaluate", "the held-out prompts on the staging endpoint and the production one (azure; local "
          "evaluates in finetune)")
    stage("report", "write the markdown report (and the job summary in GitHub Actions)").add_argument("--out")
    stage("teardown", "delete this experiment's staging endpoints (already gone is success)")
    p = stage("promote", "move the registered version to production (blue/green) when the promotion policy passes")
    p.add_argument("--override-policy", metavar="REASON",
                   help="promote although the experiment's promotion policy is not met; the reason is kept as the "
                        "promotion_override tag")
    stage("rollback", "move production's traffic back to the deployment the last promotion kept")
    p = stage("bundle", "one folder with the run's record, report, request and MLflow store, to upload as an artifact")
    p.add_argument("--out", help="folder to write (default: the workspace's runs/<experiment>/artifact)")
    p.add_argument("--with-weights", action="store_true", help="include the model weights (large)")

    p = stage("run", "every stage in order, on this machine")
    p.add_argument("--keep-endpoint", action="store_true", help="leave the staging endpoint running")
    p.add_argument("--drop-invalid", action="store_true", help="drop rows that break the chat schema")
    p.add_argument("--dry-run", action="store_true",
                   help="print every operation the run would make, with its payload, as YAML; no network")
    p.set_defaults(handler=cmd_run)

    p = stage("preflight", "data + a few training steps of an experiment on the local stand-in model")
    p.add_argument("--steps", type=int, default=5, help="training steps (default 5)")
    p.add_argument("--stand-in", metavar="MODEL_DIR", help="local model folder to train instead of SmolLM2-135M-Instruct")
    p.set_defaults(handler=cmd_preflight)

    p = commands.add_parser("endpoints", help="endpoints: list, warm")
    endpoints = p.add_subparsers(dest="endpoints_command", required=True)
    p = endpoints.add_parser("list", help="live endpoints with age and tags")
    p.add_argument("--backend", default="local")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="only endpoints with this tag")
    p.set_defaults(handler=cmd_endpoints)
    p = endpoints.add_parser("warm", help="local: keep a warm standby server (imports done), so that the next "
                                          "endpoint starts in about a second; --stop removes it")
    p.add_argument("--idle-minutes", type=float, default=30.0, help="the standby exits if unclaimed this long")
    p.add_argument("--once", action="store_true", help="do not start the next standby after a claim")
    p.add_argument("--stop", action="store_true", help="stop the standby instead")
    p.set_defaults(handler=cmd_endpoints_warm)

    from automation.backends.azure import catalog  # models: the registry's fine-tunable chat models

    catalog.add_commands(commands)

    from automation import gitops  # changed, comment, cleanup, sweep: the GitHub side

    gitops.add_commands(commands)
    from automation import (
        loop,  # reconcile: the event-driven PR flow, one step per run, never waiting
    )

    loop.add_command(commands)
    from automation import (
        release,  # the production job: promote a merge, retry, override, roll back
    )

    release.add_command(commands)
    from automation import doctor  # doctor: the fork's setup checked, read-only, each fix printed

    doctor.add_command(commands)
    return parser



def export_workflow_variables(env=None) -> list[str]:
    """A workflow passes its configuration variables as one JSON object, `AUTOMATION_VARS: ${{
    toJSON(vars) }}` (the repository's, overridden by the job's environment's): the AZURE_* ones become
    environment variables here, unless already set. Returns the names exported."""
    import os

    env = os.environ if env is None else env
    text = env.get("AUTOMATION_VARS", "").strip()
    if not text:
        return []
    try:
        values = json.loads(text)
    except ValueError:
        raise ConfigError("AUTOMATION_VARS is not JSON: pass `${{ toJSON(vars) }}`") from None
    exported = []
    for name, value in (values.items() if isinstance(values, dict) else []):
        if isinstance(name, str) and name.startswith("AZURE_") and isinstance(value, str) and not env.get(name):
            env[name] = value
            exported.append(name)
    return exported


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from automation.quiet import configure_logging

    configure_logging(args.verbose)  # labelled lines; the libraries' progress bars and chatter off unless -v
    try:
        export_workflow_variables()
        return args.handler(args)
    except ExperimentInvalid as err:
        for issue in err.issues:
            _err(f"error: {issue}")
        return EXIT_BAD_INPUT
    except AutomationError as err:
        _err(f"error: {err}")
        return err.exit_code
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


def run_cli() -> None:
    raise SystemExit(main())
