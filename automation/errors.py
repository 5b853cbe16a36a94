"""One exception root for the project; the CLI maps each kind to an exit code."""

from __future__ import annotations

from dataclasses import dataclass


class AutomationError(Exception):
    """Root of every error this project raises on purpose."""

    exit_code = 1


class ConfigError(AutomationError):
    """The user's input is wrong: an experiment file, a flag, a data set. Exit code 2."""

    exit_code = 2


class DataError(AutomationError):
    """The data set does not fit the chat schema or cannot be read."""

    exit_code = 1


class BackendError(AutomationError):
    """A backend operation failed (training, registry, endpoint, cloud call)."""

    exit_code = 1


class TransientError(BackendError):
    """A call the service may answer differently later: throttling, a 5xx, a busy resource, an
    operation still running. The reconcile loop retries it with backoff; everything else settles."""


class AuthenticationError(AutomationError):
    """No credential could be obtained (e.g. GitHub's OIDC token service kept failing). Exit code 1:
    the stage failed; the experiment is not at fault."""

    exit_code = 1


@dataclass(frozen=True)
class Issue:
    """One problem found in an experiment file, located as precisely as we can."""

    file: str
    line: int | None
    path: str  # dotted path in the document, "" for the document itself
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{self.path} at {where}: {self.message}" if self.path else f"{where}: {self.message}"


class ExperimentInvalid(ConfigError):
    """An experiment file failed validation; carries every issue found, not just the first."""

    def __init__(self, issues: list[Issue]):
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))

    def __reduce__(self):
        # Rebuilt from its issues when unpickled (e.g. raised in a worker process): the default
        # would pass the joined message to __init__ as if it were the list of issues.
        return type(self), (self.issues,), self.__dict__
