"""The one-line reason of a failure that came back through Ray (issue 11, defect 4)."""

from pipeline.runtime.session import LOAD_ERRORS, failure, root_cause
from pipeline.runtime.watchdog import StallError


class SystemException(Exception):
    """Stands in for ray.data.exceptions.SystemException: raised empty, as the cause of the actor error."""


class ActorDiedError(Exception):
    """Its message carries the worker's traceback, as Ray's does."""


def test_the_workers_error_line_is_the_reason_not_the_empty_wrapper():
    text = (
        "The actor died because of an error raised in its creation task, ray::MapWorker(...).__init__()\n"
        'Traceback (most recent call last):\n  File "x.py", line 1, in <module>\n'
        "pipeline.models.clip.ModelLoadError: weights file /w/bad.pt could not be loaded safely (weights_only=True): "
        "invalid load key, '\\x8f'.\n"
    )
    try:
        try:
            raise SystemException()
        except SystemException as inner:
            raise ActorDiedError(text) from inner
    except ActorDiedError as exc:
        kind, line = failure(exc)
    assert kind == "ModelLoadError" and kind in LOAD_ERRORS
    assert line.startswith("weights file /w/bad.pt could not be loaded safely")


def test_a_plain_error_keeps_its_type_and_message():
    assert (
        root_cause(StallError("no result for 5 s (stall_timeout_s)"))
        == "StallError: no result for 5 s (stall_timeout_s)"
    )
    try:
        try:
            raise ValueError("inner problem")
        except ValueError as inner:
            raise RuntimeError("outer") from inner
    except RuntimeError as exc:
        assert root_cause(exc) == "ValueError: inner problem"
