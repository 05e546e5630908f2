"""The stall watchdog: a run never hangs silently. :func:`watched` consumes the plan's results in a
background thread, says every ``notice_s`` that it is still waiting (models load, a batch of large
images takes minutes on a CPU), and raises :class:`StallError` when none arrives for
``stall_timeout_s``."""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Iterable, Iterator, TypeVar

from pipeline.errors import ZsadError

T = TypeVar("T")


class StallError(ZsadError, RuntimeError):
    """No result arrived within the configured stall timeout."""


def watched(results: Iterable[T], timeout_s: float | None, on_wait: Callable[[float], None] | None = None,
            notice_s: float = 60.0, join_s: float = 30.0) -> Iterator[T]:
    """Yield from the iterator ``results`` (consumed in a background thread). Every ``notice_s``
    seconds without an item, ``on_wait(seconds since the last item)``; with ``timeout_s``, raise
    :class:`StallError` when no item arrives for that long, instead of hanging.

    When the consumer stops early (its loop raised, or this generator is closed), the thread stops
    taking items and closes ``results``; the consumer waits up to ``join_s`` for it, so that a plan
    running in this process (the local executor) is not still inside a model when the process
    exits. A thread stuck in a call that never returns (a stall) is left behind (after 1 s)."""
    if not timeout_s and on_wait is None:
        yield from results
        return
    q: queue.Queue = queue.Queue(maxsize=4)
    end = object()
    stop = threading.Event()

    def pump() -> None:
        try:
            for item in results:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    break
            else:
                q.put(end)
        except BaseException as exc:  # handed to the consumer
            q.put(exc)
        finally:
            close = getattr(results, "close", None)
            if stop.is_set() and close is not None:
                close()

    thread = threading.Thread(target=pump, name="zsad-results", daemon=True)
    thread.start()
    last = time.monotonic()
    stalled = False
    try:
        while True:
            quiet = time.monotonic() - last
            wait = notice_s if on_wait is not None else timeout_s
            if timeout_s:
                wait = min(wait, max(timeout_s - quiet, 0.0))
            try:
                item = q.get(timeout=wait)
            except queue.Empty:
                quiet = time.monotonic() - last
                if timeout_s and quiet >= timeout_s - 1e-3:
                    stalled = True
                    raise StallError(
                        f"no result for {timeout_s:g} s (stall_timeout_s): a stage is stuck; the run was stopped"
                    ) from None
                if on_wait is not None:
                    on_wait(quiet)
                continue
            last = time.monotonic()
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=1.0 if stalled else join_s)
