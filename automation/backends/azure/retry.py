"""Cloud calls that survive transient faults, and errors that say what went wrong in one sentence.

Retried: HTTP 429 and 5xx-unavailable answers (honouring Retry-After), dropped connections, and
the plain-text error answers of a scoring endpoint's gateway (502/503/504 arrive as text, not JSON).
Not retried: quota and allow-list refusals, which no amount of waiting fixes.

"Not found" and "already exists" pass through untouched, in the types the installed SDK really
raises (azure-ai-ml 1.35), which are not always azure.core's:
- `models.get(name, label="latest")` and `components.get(name, label="latest")` resolve the label by
  listing versions; none found raises ValidationException with error_type RESOURCE_NOT_FOUND
  (azure/ai/ml/_utils/_asset_utils.py `_get_latest`). A lookup by version raises ResourceNotFoundError.
- `models.share` into a registry that holds the version raises ValidationException("A model with
  this name and version already exists in registry") (operations/_model_operations.py).
- A job submitted under a name that exists is refused with HttpResponseError (400 UserError), not
  ResourceExistsError: the service answers 400, which map_error does not map.
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


def is_not_found(err: BaseException) -> bool:
    """Not found, as the SDK says it: ResourceNotFoundError, or ValidationException(RESOURCE_NOT_FOUND)."""
    from azure.ai.ml.exceptions import ValidationErrorType, ValidationException
    from azure.core.exceptions import ResourceNotFoundError

    if isinstance(err, ResourceNotFoundError):
        return True
    return isinstance(err, ValidationException) and err.error_type == ValidationErrorType.RESOURCE_NOT_FOUND


def is_already_exists(err: BaseException) -> bool:
    """A name or version that exists: ResourceExistsError (409), the share's ValidationException, or
    the 400 UserError a duplicate job name gets."""
    from azure.ai.ml.exceptions import ValidationException
    from azure.core.exceptions import HttpResponseError, ResourceExistsError

    if isinstance(err, ResourceExistsError):
        return True
    if isinstance(err, (ValidationException, HttpResponseError)) and _status(err) in (None, 400, 409):
        return "already exists" in str(getattr(err, "message", None) or err).lower()
    return False


def is_plain_text_answer(err: BaseException) -> bool:
    """An error answer whose body is not JSON. The SDK's `validate_response` (azure/ai/ml/_utils/
    _endpoint_utils.py) turns it into a bare MlException from the JSON ValueError and drops the
    status: what a scoring endpoint's gateway sends for 502/503/504. With the status gone, a text
    that reads as a refusal (unauthorized, forbidden, not found, quota) is not taken for one."""
    from azure.ai.ml.exceptions import MlException

    if not isinstance(err, MlException) or not isinstance(err.__cause__, ValueError):
        return False
    text = str(getattr(err, "message", None) or err).lower()
    return not any(word in text for word in ("unauthorized", "forbidden", "not found", "quota"))


def call(what: str, fn: Callable[[], T], *, attempts: int = 5, base_delay: float = 2.0,
         sleep: Callable[[float], None] = time.sleep) -> T:
    """Run `fn`, retrying transient faults with exponential backoff; wrap the rest in BackendError.

    "Not found" and "already exists" (see `is_not_found`, `is_already_exists`) pass through
    untouched: callers decide what they mean (usually success).
    """
    from azure.ai.ml.exceptions import MlException
    from azure.core.exceptions import AzureError

    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except (AzureError, ConnectionError, TimeoutError) as err:
            if is_not_found(err) or is_already_exists(err):
                raise
            if isinstance(err, MlException) and not is_plain_text_answer(err):
                # the SDK's own validation: the request is wrong, not the weather
                raise BackendError(f"{what} failed: {one_sentence(err)}") from err
            if is_quota_error(err):
                raise BackendError(f"{what} refused for lack of quota: {one_sentence(err)} "
                                   "(request more quota or choose a smaller size; not retried)") from err
            if not (is_transient(err) or is_plain_text_answer(err)) or attempt == attempts:
                suffix = f" after {attempt} attempts" if attempt > 1 else ""
                raise BackendError(f"{what} failed{suffix}: {one_sentence(err)}") from err
            delay = retry_after(err)
            delay = min(delay if delay is not None else base_delay * 2 ** (attempt - 1), MAX_DELAY_S)
            log.warning("%s: transient error (%s); retrying in %.0f s", what, one_sentence(err), delay)
            sleep(delay)
    raise AssertionError("unreachable")
