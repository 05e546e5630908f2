"""Retries of transient failures: reads from object storage and model-weight fetches.

A failure is *transient* when trying again later can succeed: a dropped or refused connection, a
timeout, throttling, or an HTTP 429/5xx answer. Everything else (a missing object, access denied,
a corrupt file, a checksum mismatch) is permanent and is never retried: retrying it only delays the
error row or the failed run.

Object stores and HTTP clients raise many different classes for the same situations (botocore,
aiohttp, s3fs, the standard library), so the test looks at the whole cause chain: standard classes,
an HTTP status attribute, botocore's error code, and a small set of well-known class names.
"""

from __future__ import annotations

import errno
import sys
import time
from typing import Callable, TypeVar

T = TypeVar("T")

TRANSIENT_HTTP_STATUS = frozenset({408, 429, 500, 502, 503, 504})
TRANSIENT_ERRNOS = frozenset(
    {errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EPIPE, errno.EAGAIN,
     errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN}
)
# botocore / AWS error codes that mean "try again"
TRANSIENT_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed", "InternalError",
     "ServiceUnavailable", "RequestLimitExceeded", "TooManyRequests", "503", "500"}
)
# class names of client-library errors that mean a lost or timed-out connection
TRANSIENT_NAMES = frozenset(
    {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
     "ClientConnectionError", "ClientConnectorError", "ServerDisconnectedError", "ClientPayloadError",
     "ServerTimeoutError", "IncompleteRead", "ProtocolError", "ResponseStreamingError"}
)


def stderr_log(message: str) -> None:
    """Retry notices from inside Ray workers: stderr reaches the driver's log."""
    print(f"[zsad] {message}", file=sys.stderr, flush=True)


def _causes(exc: BaseException):
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or (None if cur.__suppress_context__ else cur.__context__)


def _one_transient(exc: BaseException) -> bool:
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
        return True
    status = getattr(exc, "status", None) or getattr(exc, "status_code", None)
    if isinstance(status, int) and status in TRANSIENT_HTTP_STATUS:
        return True
    response = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        code = str(response.get("Error", {}).get("Code", ""))
        http = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in TRANSIENT_CODES or http in TRANSIENT_HTTP_STATUS:
            return True
    return any(cls.__name__ in TRANSIENT_NAMES for cls in type(exc).__mro__)


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` or anything in its cause chain is a transient failure (see module doc).

    A permanent error on the outside (e.g. ``FileNotFoundError``) wins over its causes."""
    first = True
    for cause in _causes(exc):
        if first and isinstance(cause, (FileNotFoundError, PermissionError)):
            return False
        first = False
        if _one_transient(cause):
            return True
    return False


def backoff_delays(retries: int, backoff_s: float, max_backoff_s: float) -> list[float]:
    """Waits before each retry: ``backoff_s``, doubling, capped at ``max_backoff_s``."""
    return [min(backoff_s * (2**i), max_backoff_s) for i in range(retries)]


def retrying(
    fn: Callable[[], T],
    *,
    retries: int,
    backoff_s: float = 1.0,
    max_backoff_s: float = 30.0,
    what: str = "operation",
    log: Callable[[str], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``fn``; on a transient failure wait and call again, at most ``retries`` more times.

    A permanent failure, or the last transient one, is raised unchanged, with a note of the
    attempts made (``exc.zsad_attempts``)."""
    delays = backoff_delays(retries, backoff_s, max_backoff_s)
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as exc:
            if attempt > len(delays) or not is_transient(exc):
                try:
                    exc.zsad_attempts = attempt  # type: ignore[attr-defined]
                except AttributeError:
                    pass
                raise
            delay = delays[attempt - 1]
            if log is not None:
                log(
                    f"{what}: transient failure ({type(exc).__name__}: {exc}); "
                    f"retry {attempt}/{len(delays)} in {delay:g} s"
                )
            sleep(delay)
