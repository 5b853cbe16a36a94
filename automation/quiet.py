"""Library noise off for the CLI, so a run's terminal shows the project's own labelled progress.

Set before the libraries are imported (they read these once): Hugging Face progress bars (the
trainer's own is replaced by one log line per logging step), MLflow's artifact download bar and
its INFO chatter (database migrations), transformers' advisory messages and tokenizers' fork
warning. Each is a default: a variable already set in the environment wins, and `-v` skips this.
"""

from __future__ import annotations

import logging
import os
import warnings

ENVIRONMENT = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' shard writing/loading bars read this one
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",  # tokenizing and packing the datasets
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # "Downloading artifacts" while logging a local model
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # MLflow sets its logger's level on import: database migrations
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TOKENIZERS_PARALLELISM": "false",  # else a warning when the endpoint process forks
    "TQDM_DISABLE": "1",  # plain tqdm bars (GGUF de-quantizing): the project logs a line before and after
}
# "azure": azure-core logs every request and answer with its headers at INFO (about 530 lines for one
# submitting tick, found by the wire stand-in); its warnings and errors still show.
QUIET_LOGGERS = ("mlflow", "alembic", "httpx", "httpcore", "urllib3", "datasets", "transformers", "azure")


# Deprecations raised inside the libraries by their own calls to each other, not by this project.
LIBRARY_WARNINGS = (r"`is_gradient_checkpointing` is deprecated",)


def quiet_libraries() -> None:
    for key, value in ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    for message in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


class TerminalFormatter(logging.Formatter):
    """`12:03:04 training: step 5/24 · loss 2.61`: the time and the message, which names its step;
    warnings and errors say so."""

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        return f"{self.formatTime(record, '%H:%M:%S')} {level}{super().format(record)}"


def configure_logging(verbose: bool) -> None:
    """The CLI's logging on stderr: labelled lines; with `verbose`, debug level, logger names and the
    libraries' own output."""
    import sys

    handler = logging.StreamHandler(sys.stderr)
    if verbose:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(TerminalFormatter("%(message)s"))
        quiet_libraries()
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
