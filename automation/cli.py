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
from automation.errors import AutomationError, ExperimentInvalid

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
    from automation.github import annotation, in_actions
    from automation.spec import find_experiment_files, load_experiment

    files = find_experiment_files(args.targets)
    if not files:
        _err(f"no experiment files (*.yaml, *.yml) found in: {' '.join(args.targets)}")
        return EXIT_BAD_INPUT
    invalid = 0
    for file in files:
        try:
            experiment = load_experiment(file, args.set)
        except ExperimentInvalid as err:
            invalid += 1
            for issue in err.issues:
                _err(f"error: {issue}")
                if in_actions():
                    _out(annotation("error", f"{issue.path}: {issue.message}" if issue.path else issue.message,
                                    file=issue.file, line=issue.line, title="invalid experiment"))
            continue
        _out(f"ok: {file} ({experiment.backend}, model {experiment.model.name}, data {experiment.data.dataset})")
    if invalid:
        _err(f"{invalid} of {len(files)} experiment file(s) invalid")
        return EXIT_BAD_INPUT
    return EXIT_OK


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
    for column in ("split", "rows", "of", "dropped", "user turns (mean/max)", "chars p50", "p90", "p99"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for s in result.splits.values():
        table.add_row(s.split, str(s.rows), str(s.source_rows), str(s.dropped),
                      f"{s.user_turns_mean:.2f}/{s.user_turns_max}", str(s.chars_p50), str(s.chars_p90), str(s.chars_p99))
    Console(width=120).print(table)


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
    return parser



def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
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
