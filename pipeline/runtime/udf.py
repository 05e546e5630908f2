"""What Ray workers run: the stage wrappers of the plan (tasks and actors).

Kept apart from :mod:`pipeline.runtime.ray_plan` on purpose: a worker unpickles these functions by
reference to THIS module, so it imports only numpy plus the stage it runs. CPU tasks (decode,
tiling, aggregate, encode) then never load torch or open_clip; only the model actors do.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable

import numpy as np

# Text columns that are None on most rows. Ray infers a block's Arrow type from its values, so a
# block whose values are all None would get a non-string type and fail to merge with the others;
# between stages they carry "" for "no value" (the driver turns it back into null).
_SPARSE_TEXT = ("error_stage", "error_type", "error_message", "mask_rle")


def _dense_text(batch: dict) -> dict:
    for name in _SPARSE_TEXT:
        if name in batch:
            col = np.empty(len(batch[name]), dtype=object)
            col[:] = ["" if v is None else str(v) for v in batch[name]]
            batch[name] = col
    return batch


def _sparse_text(batch: dict) -> dict:
    for name in _SPARSE_TEXT:
        if name in batch:
            col = np.empty(len(batch[name]), dtype=object)
            col[:] = [None if v is None or v == "" else v for v in batch[name]]
            batch[name] = col
    return batch


class _ActorStage:
    """Actor wrapper: builds the stage (and its models) once per actor."""

    def __init__(self, factory: Callable[[], Any]) -> None:
        t0 = time.perf_counter()
        self.stage = factory()
        self.stage.setup()
        name = getattr(self.stage, "name", type(self.stage).__name__)
        print(f"[zsad] {name} actor ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)

    def __call__(self, batch: dict) -> dict:
        return _dense_text(self.stage(_sparse_text(dict(batch))))


def _task(stage: Any) -> Callable[[dict], dict]:
    def run(batch: dict) -> dict:
        return _dense_text(stage(_sparse_text(dict(batch))))

    return run
