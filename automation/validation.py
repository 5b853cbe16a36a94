"""`automation validate`: experiment files checked without network or heavy imports, each problem
an annotation on the diff (in Actions) and a row of the job summary. `changed --validate` runs the
same in the checks workflow's one job."""

from __future__ import annotations

import sys
from pathlib import Path

from automation.errors import ExperimentInvalid

EXIT_OK, EXIT_BAD_INPUT = 0, 2


def _out(text: str = "") -> None:
    print(text, flush=True)


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


ANNOTATIONS_SHOWN = 10  # GitHub shows at most 10 error annotations per step on the diff


def validate_files(targets: list[str], overrides: list[str] | None = None) -> int:
    """0 when every experiment file under `targets` is valid, 2 otherwise (each problem printed)."""
    from automation.github import annotation, append_step_summary, in_actions
    from automation.spec import find_experiment_files, load_experiment

    files = find_experiment_files(targets)
    if not files:
        _err(f"no experiment files (*.yaml, *.yml) found in: {' '.join(targets)}")
        return EXIT_BAD_INPUT
    problems, invalid = [], 0
    for file in files:
        try:
            experiment = load_experiment(file, overrides)
        except ExperimentInvalid as err:
            invalid += 1
            for issue in err.issues:
                problems.append(issue)
                _err(f"error: {issue}")
                if in_actions():
                    _out(annotation("error", f"{issue.path}: {issue.message}" if issue.path else issue.message,
                                    file=issue.file, line=issue.line, title="invalid experiment"))
            continue
        _out(f"ok: {file} ({experiment.backend}, model {experiment.model.name}, data {experiment.data.dataset})")
    if in_actions():
        append_step_summary(validation_summary(files, problems))
    if invalid:
        _err(f"{invalid} of {len(files)} experiment file(s) invalid")
        return EXIT_BAD_INPUT
    return EXIT_OK


def validation_summary(files: list[Path], problems: list) -> str:
    """Every problem, for the job summary: the diff shows only the first ANNOTATIONS_SHOWN."""
    if not problems:
        return f"### Validation\n\n{len(files)} experiment file(s) valid.\n"

    def cell(text: object) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = [f"### Validation: {len(problems)} problem(s)", ""]
    if len(problems) > ANNOTATIONS_SHOWN:
        lines += [f"GitHub shows only the first {ANNOTATIONS_SHOWN} of these {len(problems)} problems as "
                  "annotations on the diff; all of them are listed here.", ""]
    lines += ["| file | line | field | problem |", "|---|---|---|---|"]
    lines += [f"| `{cell(p.file or '')}` | {p.line or ''} | `{cell(p.path or '')}` | {cell(p.message)} |"
              for p in problems]
    return "\n".join(lines) + "\n"


