"""Cloud calls that survive transient faults, and errors that say what went wrong in one sentence.

Retried: HTTP 429 and 5xx-unavailable answers (honouring Retry-After), dropped connections.
Not retried: quota and allow-list refusals, which no amount of waiting fixes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from automation.errors import BackendError

log = logging.getLogger(__name__)

T = TypeVar("T")
TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
QUOTA_MARKERS = ("quota", "outofquota", "quotaexceeded", "not enough cores", "insufficient capacity")
MAX_DELAY_S = 120.0


def _status(err: BaseException) -> int | None:
    return getattr(err, "status_code", None)


def is_quota_error(err: BaseException) -> bool:
    text = f"{getattr(getattr(err, 'error', None), 'code', '') or ''} {err}".lower()
    return any(marker in text for marker in QUOTA_MARKERS)


def is_transient(err: BaseException) -> bool:
    from azure.core.exceptions import ServiceRequestError, ServiceResponseError

    if is_quota_error(err):
        return False
    if isinstance(err, (ServiceRequestError, ServiceResponseError, ConnectionError, TimeoutError)):
        return True
    return _status(err) in TRANSIENT_STATUS


def retry_after(err: BaseException) -> float | None:
    """Seconds the service asked us to wait (Retry-After / retry-after-ms), if it said."""
    headers = getattr(getattr(err, "response", None), "headers", None) or {}
    lowered = {str(k).lower(): v for k, v in dict(headers).items()}
    try:
        if "retry-after-ms" in lowered:
            return float(lowered["retry-after-ms"]) / 1000
        if "retry-after" in lowered:
            return float(lowered["retry-after"])
    except (TypeError, ValueError):
        return None
    return None


def one_sentence(err: BaseException) -> str:
    """The first line of a cloud error, without the SDK's multi-line dump."""
    message = getattr(err, "message", None) or str(err) or type(err).__name__
    return " ".join(str(message).strip().splitlines()[0].split())


def call(what: str, fn: Callable[[], T], *, attempts: int = 5, base_delay: float = 2.0,
         sleep: Callable[[float], None] = time.sleep) -> T:
    """Run `fn`, retrying transient faults with exponential backoff; wrap the rest in BackendError.

    ResourceNotFoundError and ResourceExistsError pass through untouched: callers decide what
    "not found" and "exists" mean (usually success).
    """
    from azure.ai.ml.exceptions import MlException
    from azure.core.exceptions import AzureError, ResourceExistsError, ResourceNotFoundError

    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except (ResourceNotFoundError, ResourceExistsError):
            raise
        except MlException as err:  # the SDK's own validation: the request is wrong, not the weather
            raise BackendError(f"{what} failed: {one_sentence(err)}") from err
        except (AzureError, ConnectionError, TimeoutError) as err:
            if is_quota_error(err):
                raise BackendError(f"{what} refused for lack of quota: {one_sentence(err)} "
                                   "(request more quota or choose a smaller size; not retried)") from err
            if not is_transient(err) or attempt == attempts:
                suffix = f" after {attempt} attempts" if attempt > 1 else ""
                raise BackendError(f"{what} failed{suffix}: {one_sentence(err)}") from err
            delay = retry_after(err)
            delay = min(delay if delay is not None else base_delay * 2 ** (attempt - 1), MAX_DELAY_S)
            log.warning("%s: transient error (%s); retrying in %.0f s", what, one_sentence(err), delay)
            sleep(delay)
    raise AssertionError("unreachable")
