"""What Ray workers run: the wrappers of the plan's stages (tasks and actors).

Kept apart from :mod:`pipeline.runtime.ray_plan` on purpose: a worker unpickles these classes by
reference to THIS module, so it imports only numpy, pyarrow and Ray plus the stage it runs. CPU
tasks (decode, tiling, aggregate, encode) then never load torch or open_clip; only the model
actors do.

Each wrapper takes an Arrow block, gives the stage the numpy view of it
(:mod:`pipeline.stages.records`), and turns the stage's output back into an Arrow block typed by
the stage's declaration: text stays text with real nulls, records stay ``list<struct>``, so the
next stage and the driver see exactly what the stage meant.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
from ray.data.block import BlockAccessor

from pipeline.stages.records import TENSOR, codec_for


def _is_tensor(arrow_type: pa.DataType) -> bool:
    return isinstance(arrow_type, pa.ExtensionType)


def to_numpy(block: pa.Table) -> dict[str, np.ndarray]:
    """An Arrow block -> the stage view: Ray's numpy conversion, then records as int64 tables."""
    batch = BlockAccessor.for_block(block).to_batch_format("numpy")
    for field in block.schema:
        codec = codec_for(field.type)
        if codec is not None:
            batch[field.name] = codec.from_arrow(batch[field.name])
    return batch


def to_arrow(out: Mapping[str, Any], types: Mapping[str, Any], block: pa.Table, view: Mapping[str, Any],
             stage: str) -> pa.Table:
    """The stage's output -> an Arrow block. A column passed through unchanged (the same array as
    in ``view``) keeps its Arrow column from ``block``; the others are built with the type the
    stage declared (``types``) or, for a changed input column, the input's type. An undeclared new
    column is an error naming the stage."""
    arrays: dict[str, Any] = {}
    tensors: dict[str, Any] = {}
    for name, values in out.items():
        if name in view and values is view[name] and name in block.column_names:
            arrays[name] = block.column(name)
            continue
        arrow_type = types.get(name)
        if arrow_type is None and name in block.column_names:
            arrow_type = TENSOR if _is_tensor(block.schema.field(name).type) else block.schema.field(name).type
        if arrow_type is None:
            raise TypeError(f"stage {stage!r} produced column {name!r} that it does not declare")
        if isinstance(arrow_type, str):  # TENSOR, the one type that is not an Arrow type
            tensors[name] = values
            arrays[name] = None
            continue
        codec = codec_for(arrow_type)
        if codec is not None:
            arrays[name] = codec.to_arrow(values)
        else:
            listed = list(values) if isinstance(values, np.ndarray) and values.dtype == object else values
            arrays[name] = pa.array(listed, type=arrow_type, from_pandas=True)
    if tensors:
        converted = BlockAccessor.batch_to_block(tensors)
        for name in tensors:
            arrays[name] = converted.column(name)
    return pa.table(arrays)


class _Wrapped:
    """Numpy view in, typed Arrow out, around one stage's ``__call__``."""

    stage: Any

    def __call__(self, block: pa.Table) -> pa.Table:
        view = to_numpy(block)
        out = self.stage(dict(view))
        return to_arrow(out, self.stage.types, block, view, self.stage.name)


class TaskStage(_Wrapped):
    """A stateless stage run as Ray tasks (the stage object travels with the task)."""

    def __init__(self, stage: Any) -> None:
        self.stage = stage


class ActorStage(_Wrapped):
    """Actor wrapper: sets the stage up (builds its models) once per actor."""

    def __init__(self, stage: Any, inputs: Mapping[str, Any] | None = None, use_gpu: bool | None = None) -> None:
        """``inputs``: the planned stage's inputs (:class:`pipeline.stages.base.PlannedStage`);
        ``use_gpu``: whether this actor's stage runs on its GPU (the executor's decision), set on
        the worker's own copy of the stage."""
        t0 = time.perf_counter()
        self.stage = stage
        if use_gpu is not None:
            stage.use_gpu = use_gpu
        if inputs:
            stage.setup(inputs)
        else:
            stage.setup()
        print(f"[zsad] {stage.name} actor ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
