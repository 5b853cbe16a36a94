"""The workspace folder: caches, MLflow store, endpoint records and run outputs.

`.automation/` under the current directory by default; `AUTOMATION_HOME` moves it.
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("AUTOMATION_HOME") or ".automation").resolve()


def run_dir(experiment: str) -> Path:
    return home() / "runs" / experiment
