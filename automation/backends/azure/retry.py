"""Cloud calls that survive transient faults, and errors that say what went wrong in one sentence.

Retries happen once per layer. azure-core's RetryPolicy, configured where the clients are made
(`AZURE_CORE_RETRY`, passed to every MLClient by connection.py), retries each HTTP request: 408,
429, 500, 502, 503 and 504 answers on GET/PUT/DELETE, 500/503/504 on POST, any answer that carries
Retry-After (honoured), and connection and read failures on GET/PUT/DELETE. `call` below retries
only what azure-core does not:
- a 409 Conflict on a `begin_*` operation (`call(..., begin=True)`): the resource is busy with
  another operation ("operation in progress"), which passes; the SDK maps every 409 to
  ResourceExistsError, so "already exists" is decided by the caller, never here;
- a connection that could not be made (ServiceRequestError) after azure-core gave up, or on a POST,
  which azure-core never retries; the request did not reach the service, so it is safe to repeat;
- a 408/429/502 answer to a POST without Retry-After, which azure-core leaves alone;
- the plain-text error answers of a scoring endpoint's gateway (the SDK drops their status).
Not retried by anyone: quota and allow-list refusals, which no amount of waiting fixes.

Worst case for one `call`, from the configured values (plus any Retry-After the service asks for):
one HTTP request makes at most 4 tries (retry_total=3); a try that cannot connect ends after 30 s
(connection_timeout), one that connected but hears nothing after 300 s (read_timeout, azure-core's
default, kept above the longest scoring timeout, 180 s), and only one read timeout is retried
(retry_read=1); backoff between tries is 0, 2, 4 s (retry_backoff_factor=1, max 30 s). So a request
ends within 2 x 330 + 2 x 30 + 6 = 726 s (about 12 min) however the service or the network hangs
(read_timeout bounds each silence, not a server that trickles bytes). On top, `call`
makes at most 3 attempts at a connection failure (3 x (4 x 30 + 6) + 2 + 4 = 384 s) and at most 6
at a 409 of a busy resource (sleeping 15, 30, 60, 120, 120 s: 345 s of waiting). Waiting for a
long-running operation to finish (a deployment takes many minutes) is not a request and is not in
these sums; it is bounded apart, by `finished` (LRO_TIMEOUT_S, 40 min: under the 60-minute limit
of a workflow leg, so the leg still comments). Before, azure-core's defaults (10 tries, 300 s to connect) under
5 attempts of our own came to about 35 min per call.

"Not found" passes through untouched, in the types the installed SDK really raises (azure-ai-ml
1.35), which are not always azure.core's; so do the errors a caller names in `passthrough`:
- `models.get(name, label="latest")` and `components.get(name, label="latest")` resolve the label by
  listing versions; none found raises ValidationException with error_type RESOURCE_NOT_FOUND
  (azure/ai/ml/_utils/_asset_utils.py `_get_latest`). A lookup by version raises ResourceNotFoundError.
- `models.share` into a registry that holds the version raises ValidationException("A model with
  this name and version already exists in registry") (operations/_model_operations.py).
- A job submitted under a name that exists is refused with HttpResponseError (400 UserError), not
  ResourceExistsError: the service answers 400, which map_error does not map.
- `models.create_or_update` of a version that exists with another path raises the service's 400
  "(UserError) Asset paths cannot be updated." as HttpResponseError: operations/_model_operations.py
  means to raise AssetPathException for it but compares azure-core's formatted message for equality,
  which never holds (shown by the wire stand-in, tests/test_azure_contract.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from automation.errors import BackendError, TransientError

log = logging.getLogger(__name__)

T = TypeVar("T")
# azure-core's RetryPolicy and transport settings for every client (connection.py passes them to
# MLClient, which hands them to each service client's pipeline and to its scoring pipeline).
AZURE_CORE_RETRY: dict[str, Any] = {
    "retry_total": 3, "retry_connect": 3, "retry_read": 1, "retry_status": 3,
    "retry_backoff_factor": 1.0, "retry_backoff_max": 30,
    "connection_timeout": 30,  # read_timeout stays azure-core's 300 s: scoring may take 180 s
}
TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}  # what azure-core retries (RetryPolicyBase._RETRY_CODES)
CORE_RETRIED_METHODS = {"GET", "PUT", "DELETE", "HEAD", "OPTIONS", "TRACE"}  # its method allow-list
CORE_RETRIED_ON_POST = {500, 503, 504}
QUOTA_MARKERS = ("quota", "outofquota", "quotaexceeded", "not enough cores", "insufficient capacity")
ATTEMPTS, BASE_DELAY_S = 3, 2.0
CONFLICT_ATTEMPTS, CONFLICT_DELAY_S = 6, 15.0
MAX_DELAY_S = 120.0


def _status(err: BaseException) -> int | None:
    return getattr(err, "status_code", None)


def _headers(err: BaseException) -> dict[str, Any]:
    headers = getattr(getattr(err, "response", None), "headers", None) or {}
    return {str(k).lower(): v for k, v in dict(headers).items()}


def _request_method(err: BaseException) -> str | None:
    request = getattr(getattr(err, "response", None), "request", None)
    method = getattr(request, "method", None)
    return str(method).upper() if method else None


def is_quota_error(err: BaseException) -> bool:
    text = f"{getattr(getattr(err, 'error', None), 'code', '') or ''} {err}".lower()
    return any(marker in text for marker in QUOTA_MARKERS)


def retried_by_azure_core(err: BaseException) -> bool:
    """Whether azure-core's RetryPolicy already retried this answer before it reached us
    (azure/core/pipeline/policies/_retry.py: `is_retry`, `_is_method_retryable`)."""
    status = _status(err)
    if status is None or status < 400:
        return False
    if "retry-after" in _headers(err):
        return True
    method = _request_method(err)
    if method in ("POST", "PATCH"):
        return status in CORE_RETRIED_ON_POST
    return status in TRANSIENT_STATUS  # GET/PUT/DELETE, or a method we cannot tell: assume retried


def is_conflict(err: BaseException) -> bool:
    """A 409 answer: the SDK maps every 409 of an ARM operation to ResourceExistsError."""
    from azure.core.exceptions import ResourceExistsError

    return isinstance(err, ResourceExistsError) or _status(err) == 409


def is_transient(err: BaseException) -> bool:
    """A fault that `call` retries (see the module docstring); a 409 only where `call(begin=True)`."""
    from azure.core.exceptions import ServiceRequestError

    if is_quota_error(err):
        return False
    if isinstance(err, (ServiceRequestError, ConnectionError)):  # never reached the service
        return True
    status = _status(err)
    return status in TRANSIENT_STATUS and not retried_by_azure_core(err)


def is_weather(err: BaseException) -> bool:
    """A fault that may be gone later, whoever retried it already (azure-core or `call`): a
    connection that failed, 408/429/5xx, a plain-text answer from a gateway. The reconcile loop
    retries a leg that ended on one with backoff; quota, refusals and bad requests settle it."""
    from azure.core.exceptions import ServiceRequestError, ServiceResponseError

    if is_quota_error(err):
        return False
    if isinstance(err, (ServiceRequestError, ServiceResponseError, ConnectionError, TimeoutError)):
        return True
    return _status(err) in TRANSIENT_STATUS or is_plain_text_answer(err)


def retry_after(err: BaseException) -> float | None:
    """Seconds the service asked us to wait (Retry-After / retry-after-ms), if it said."""
    lowered = _headers(err)
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
    the 400 UserError a duplicate job name gets. Only the callers that create a named thing (job
    submit, model register, share) may read it so; on a `begin_*` a 409 means "busy"."""
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


LRO_TIMEOUT_S = 40 * 60


def finished(poller, what: str, timeout_s: float = LRO_TIMEOUT_S):
    """The result of a long-running operation (an LROPoller), waited for at most `timeout_s`; an
    operation still running then is a BackendError that says so: the next tick (or a rerun) finds
    the resource where the operation left it, since every step finds before it creates."""
    poller.wait(timeout_s)
    if not poller.done():
        raise TransientError(f"{what} still running after {timeout_s / 60:.0f} min (status "
                           f"{poller.status()}); the next run picks it up where it is")
    return poller.result()


def call(what: str, fn: Callable[[], T], *, attempts: int = ATTEMPTS, base_delay: float = BASE_DELAY_S,
         sleep: Callable[[float], None] = time.sleep, begin: bool = False, wait: bool = True,
         passthrough: Callable[[BaseException], bool] = is_not_found) -> T:
    """Run `fn`, retrying what azure-core did not (see the module docstring) with exponential
    backoff; wrap the rest in BackendError.

    `begin`: `fn` starts a long-running operation (a `begin_*`) and returns its poller, so a 409
    means the resource is busy with another operation: retried up to CONFLICT_ATTEMPTS times. The
    operation's result is waited for, at most LRO_TIMEOUT_S (`finished`), unless `wait` is false
    (then the poller is returned). Errors for which `passthrough` holds (by default "not found")
    are raised untouched: the caller decides what they mean.
    """
    from azure.ai.ml.exceptions import MlException
    from azure.core.exceptions import AzureError

    attempt = 0
    while True:
        attempt += 1
        try:
            result = fn()
            return finished(result, what) if begin and wait else result
        except (AzureError, ConnectionError, TimeoutError) as err:
            if passthrough(err):
                raise
            busy = begin and is_conflict(err)
            if isinstance(err, MlException) and not is_plain_text_answer(err):
                # the SDK's own validation: the request is wrong, not the weather
                raise BackendError(f"{what} failed: {one_sentence(err)}") from err
            if is_quota_error(err):
                raise BackendError(f"{what} refused for lack of quota: {one_sentence(err)} "
                                   "(request more quota or choose a smaller size; not retried)") from err
            limit = CONFLICT_ATTEMPTS if busy else attempts
            if not (busy or is_transient(err) or is_plain_text_answer(err)) or attempt >= limit:
                suffix = f" after {attempt} attempts" if attempt > 1 else ""
                if busy:
                    suffix += " (the resource stayed busy with another operation)"
                error = TransientError if busy or is_weather(err) else BackendError  # the loop retries the first
                raise error(f"{what} failed{suffix}: {one_sentence(err)}") from err
            delay = retry_after(err)
            first = CONFLICT_DELAY_S if busy else base_delay
            delay = min(delay if delay is not None else first * 2 ** (attempt - 1), MAX_DELAY_S)
            log.warning("%s: %s (%s); retrying in %.0f s", what, "busy" if busy else "transient error",
                        one_sentence(err), delay)
            sleep(delay)
