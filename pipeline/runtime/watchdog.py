"""The stall watchdog: a run never hangs silently. :func:`watched` consumes the plan's results in a
background thread and raises :class:`StallError` when none arrives for ``stall_timeout_s``."""

from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


class StallError(RuntimeError):
    """No result arrived within the configured stall timeout."""


def watched(results: Iterable[T], timeout_s: float | None) -> Iterator[T]:
    """Yield from the iterator ``results`` (consumed in a background thread); raise
    :class:`StallError` when no item arrives for ``timeout_s`` seconds, instead of hanging."""
    if not timeout_s:
        yield from results
        return
    q: queue.Queue = queue.Queue(maxsize=4)
    end = object()

    def pump() -> None:
        try:
            for item in results:
                q.put(item)
            q.put(end)
        except BaseException as exc:  # handed to the consumer
            q.put(exc)

    threading.Thread(target=pump, name="zsad-results", daemon=True).start()
    while True:
        try:
            item = q.get(timeout=timeout_s)
        except queue.Empty:
            raise StallError(
                f"no result for {timeout_s:g} s (stall_timeout_s): a stage is stuck; the run was stopped"
            ) from None
        if item is end:
            return
        if isinstance(item, BaseException):
            raise item
        yield item
