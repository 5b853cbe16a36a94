"""The workspace folder: caches, MLflow store, endpoint records and run outputs.

`.automation/` under the current directory by default; `AUTOMATION_HOME` moves it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("AUTOMATION_HOME") or ".automation").resolve()


def run_dir(experiment: str) -> Path:
    return home() / "runs" / experiment


def write_text_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """Write a small file so readers see the old or the new content, never half of it: a unique
    temporary file beside it, then a rename. The parent folder is created when missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
