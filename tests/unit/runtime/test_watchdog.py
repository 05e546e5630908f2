"""The stall watchdog: results pass through; a quiet plan is reported while it is waited for, and
stopped after stall_timeout_s."""

import time

import pytest

from pipeline.runtime.watchdog import StallError, watched


def _slow(items, pause):
    for item in items:
        time.sleep(pause)
        yield item


def test_items_pass_through_and_quiet_spells_are_reported():
    notices = []
    got = list(watched(_slow([1, 2], 0.35), timeout_s=10, on_wait=notices.append, notice_s=0.1))
    assert got == [1, 2]
    assert len(notices) >= 4 and all(0.05 < q < 0.5 for q in notices)  # about 3 per item, each since the last item


def test_a_plan_quiet_past_the_timeout_is_stopped_after_its_notices():
    notices = []
    with pytest.raises(StallError, match="no result for 0.5 s"):
        list(watched(_slow([1], 5.0), timeout_s=0.5, on_wait=notices.append, notice_s=0.2))
    assert len(notices) == 2  # at 0.2 and 0.4 s; then the timeout


def test_an_error_of_the_plan_reaches_the_consumer():
    def broken():
        yield 1
        raise ValueError("stage failed")

    with pytest.raises(ValueError, match="stage failed"):
        list(watched(broken(), timeout_s=5, on_wait=lambda q: None))


def test_a_consumer_that_stops_early_stops_the_producer_and_waits_for_it():
    """The local executor runs the plan in the watchdog's thread: when the run stops taking results
    (a sink failed), the thread must stop after its current item and close the plan, not keep
    scoring while the process exits."""
    produced, closed = [], []

    def plan():
        try:
            for i in range(100):
                time.sleep(0.05)
                produced.append(i)
                yield i
        finally:
            closed.append(True)

    stream = watched(plan(), timeout_s=10, on_wait=lambda q: None, notice_s=5)
    with pytest.raises(RuntimeError, match="sink failed"):
        for item in stream:
            if item == 2:
                stream.close()  # as the run's ``closing`` does when its loop body raises
                raise RuntimeError("sink failed")
    assert closed == [True]  # the plan was closed, in the thread, before close() returned
    count = len(produced)
    time.sleep(0.3)
    assert len(produced) == count and count <= 2 + 1 + 4 + 1  # nothing after the stop: item 2, the queue, one in hand
