"""The x-ms-examples of azure-rest-api-specs kept in tests/fixtures/arm/ (their source path and
commit in each file). The stand-in is held to the spec's schemas by schemas.py; the contract test
passes these examples through schemas.py unchanged, as a check of the extracted definitions."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "arm"


@cache
def example(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())["body"]
