"""The in-flight row: column types, the one codec for typed records, and per-row error fields.

A stage sees a batch as Ray Data's "numpy" format gives it: a ``dict[str, np.ndarray]`` of
equal-length columns. Between stages (and back to the driver) the same columns travel as Arrow
with the types the stages declare in ``produces``; :mod:`pipeline.runtime.udf` converts with the
functions here, so every stage agrees on one representation:

- text, bytes and integers that may be missing: object columns with ``None`` (Arrow null);
- floats: ``float64`` with NaN for "no value" (Arrow null);
- images and maps: object columns of numpy arrays (:data:`TENSOR`: Ray's tensor extension);
- records: the foreground components and the tile boxes travel as Arrow ``list<struct>`` columns
  (:data:`COMPONENTS`, :data:`TILES`) and a stage sees them as int64 tables, one row per record,
  with the columns of :data:`COMPONENT_FIELDS` / :data:`TILE_FIELDS`. :class:`RecordCodec` is the
  only code that knows the layout.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

#: Marker type of a column holding one numpy array per row (images, float maps).
TENSOR = "tensor"

#: The Arrow type of each in-flight column: an Arrow type, :data:`TENSOR`, or a record type.
ColumnType = Any


def object_column(values: Iterable[Any]) -> np.ndarray:
    """A 1-D object array holding ``values`` as they are (numpy would otherwise stack equal-shape
    arrays into one multi-dimensional array): ``object_column([a, b])[0] is a``."""
    values = list(values)
    col = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        col[i] = value
    return col


@dataclass(frozen=True)
class RecordCodec:
    """One record column: per row, a variable number of records with integer fields.

    Stage view: an int64 array ``(R, sum of widths)`` (``None`` for a row without a value).
    Arrow view: ``list<struct<...>>``; a field of width 1 is an int64, a wider one a
    ``list<int64>`` of that many values (a box)."""

    fields: tuple[tuple[str, int], ...]

    @property
    def width(self) -> int:
        return sum(w for _, w in self.fields)

    @property
    def arrow_type(self) -> pa.DataType:
        return pa.list_(pa.struct([(name, pa.int64() if w == 1 else pa.list_(pa.int64())) for name, w in self.fields]))

    @property
    def columns(self) -> tuple[str, ...]:
        """The name of every column of the stage view (``box`` of width 4 -> box0..box3)."""
        return tuple(n if w == 1 else f"{n}{k}" for n, w in self.fields for k in range(w))

    def table(self, value: Any) -> np.ndarray:
        """A stage-view table from a sequence of rows (or an empty one)."""
        return np.asarray(value if value is not None else [], dtype=np.int64).reshape(-1, self.width)

    def _record(self, row: list[int]) -> dict[str, Any]:
        """One stage-view row -> one record (dict of fields)."""
        out, k = {}, 0
        for name, w in self.fields:
            out[name] = row[k] if w == 1 else row[k : k + w]
            k += w
        return out

    def _row(self, record: Mapping[str, Any]) -> list[int]:
        """One record -> one stage-view row."""
        return [int(x) for name, w in self.fields for x in ([record[name]] if w == 1 else record[name])]

    def to_arrow(self, values: Sequence[Any]) -> pa.Array:
        """Stage-view tables (one per row, or None) -> the Arrow column."""
        rows = [None if v is None else [self._record(r) for r in self.table(v).tolist()] for v in values]
        return pa.array(rows, type=self.arrow_type)

    def from_arrow(self, values: Sequence[Any]) -> np.ndarray:
        """What Ray's numpy conversion gives for the Arrow column (per row an array of dicts, or
        None) -> an object column of stage-view tables (None stays None)."""
        return object_column(None if v is None else self.table([self._row(r) for r in v]) for v in values)


#: Foreground components: id, box (x0, y0, x1, y1; x1/y1 exclusive), area, SAM parts.
COMPONENT_CODEC = RecordCodec((("id", 1), ("box", 4), ("area", 1), ("n_parts", 1)))
COMPONENT_FIELDS = COMPONENT_CODEC.columns  # id, box0..box3, area, n_parts
COMPONENTS = COMPONENT_CODEC.arrow_type
#: Tiles: the component the tile is centred on (-1: whole image) and its box.
TILE_CODEC = RecordCodec((("component_id", 1), ("x0", 1), ("y0", 1), ("x1", 1), ("y1", 1)))
TILE_FIELDS = TILE_CODEC.columns
TILES = TILE_CODEC.arrow_type

RECORD_CODECS: tuple[RecordCodec, ...] = (COMPONENT_CODEC, TILE_CODEC)


def codec_for(arrow_type: Any) -> RecordCodec | None:
    """The record codec of an Arrow type, or None when the type is not a record column."""
    for codec in RECORD_CODECS:
        if isinstance(arrow_type, pa.DataType) and arrow_type.equals(codec.arrow_type):
            return codec
    return None


# --------------------------------------------------------------------------------------------
# Per-row status and errors
# --------------------------------------------------------------------------------------------

STATUS_COLUMNS: dict[str, ColumnType] = {
    "status": pa.string(),
    "error_stage": pa.string(),
    "error_type": pa.string(),
    "error_message": pa.string(),
}


class RowErrors:
    """The status and error columns of one batch, as every stage updates them.

    ``RowErrors(batch, n)`` copies ``status`` (default ``"ok"``) and the three error columns
    (default None) from the batch; :meth:`fail` marks one row; :meth:`columns` returns them to
    put into the stage's output."""

    def __init__(self, batch: Mapping[str, Any], n: int) -> None:
        def start(name: str, fill: Any) -> np.ndarray:
            return object_column(list(batch[name]) if name in batch else [fill] * n)

        self.status = start("status", "ok")
        self.stage = start("error_stage", None)
        self.type = start("error_type", None)
        self.message = start("error_message", None)

    def ok(self, i: int) -> bool:
        return self.status[i] == "ok"

    def fail(self, i: int, stage: str, error_type: str, message: str) -> None:
        self.status[i], self.stage[i], self.type[i], self.message[i] = "error", stage, error_type, message

    def fail_with(self, i: int, stage: str, exc: BaseException, what: str) -> None:
        """Mark row ``i`` failed by ``exc``: type = the exception's class, message ``"{what}: {exc}"``."""
        self.fail(i, stage, type(exc).__name__, f"{what}: {exc}")

    def clear(self, i: int) -> None:
        self.status[i], self.stage[i], self.type[i], self.message[i] = "ok", None, None, None

    def columns(self) -> dict[str, np.ndarray]:
        return {"status": self.status, "error_stage": self.stage, "error_type": self.type,
                "error_message": self.message}


def each_row(status: Sequence[Any], work: Callable[[int], Any], *, ms: np.ndarray | None = None,
             errors: RowErrors | None = None, stage: str = "", what: str | Callable[[int], str] = "",
             on_error: Callable[[int], Any] | None = None, skip: Callable[[int], bool] | None = None) -> None:
    """The per-row loop of a stage: ``work(i)`` for each row whose ``status`` is ok (rows that failed
    in an earlier stage pass through untouched) and that ``skip`` does not leave out.

    With ``ms``, each row's time in milliseconds (a row that fails too). With ``errors``, an
    exception of one row fails that row (``error_stage = stage``, message ``"{what}: {exc}"``; ``what``
    may be a function of the row),
    ``on_error(i)`` then resets what the row had, and the batch goes on; without, it is raised."""
    for i in range(len(status)):
        if status[i] != "ok" or (skip is not None and skip(i)):
            continue
        t0 = time.perf_counter()
        if errors is None:
            work(i)
        else:
            try:
                work(i)
            except Exception as exc:  # noqa: BLE001 - one bad row must not sink the batch
                errors.fail_with(i, stage, exc, what(i) if callable(what) else what)
                if on_error is not None:
                    on_error(i)
        if ms is not None:
            ms[i] = (time.perf_counter() - t0) * 1000.0


class WorkingImage(np.ndarray):
    """An image decoded below its original size (``decode.resolution: working``): the pixels at the
    working size, and ``original``, the (height, width) the image has; the maps are stored at the
    size the original gives (:func:`image_hw`)."""

    original: tuple[int, int]


def with_original(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """``image``, marked with its original size when that differs from its array's."""
    if image.ndim < 2 or (image.shape[0], image.shape[1]) == (height, width) or height <= 0 or width <= 0:
        return image
    view = image.view(WorkingImage)
    view.original = (int(height), int(width))
    return view


def image_at(batch: Mapping[str, Any], i: int) -> np.ndarray:
    """Row ``i``'s image, marked with its original size (the ``height``/``width`` columns the decode
    stage writes) when it was decoded at a working size (:func:`with_original`)."""
    image = np.asarray(batch["image"][i])
    if "height" in batch and "width" in batch:
        return with_original(image, int(batch["height"][i]), int(batch["width"][i]))
    return image


def image_hw(image: np.ndarray) -> tuple[int, int]:
    """The (height, width) an image's outputs are stored for: its original size (decoded at a working
    size, :func:`with_original`), else its array's."""
    original = getattr(image, "original", None)
    return original if original is not None else (image.shape[0], image.shape[1])


def working_box(image: np.ndarray, box: Sequence[int]) -> tuple[int, int, int, int]:
    """A box ``(x0, y0, x1, y1)`` (x1/y1 exclusive) in the original image's pixels (tiles, foreground
    components) -> the box covering the same region in ``image``'s pixels, for an image decoded at a
    working size (:func:`with_original`): the start scaled and floored, the end scaled and ceiled,
    clipped to the image, at least one pixel wide and high. The box as given for an image at its
    original size."""
    h, w = image.shape[:2]
    oh, ow = image_hw(image)
    x0, y0, x1, y1 = (int(v) for v in box)
    if (oh, ow) == (h, w):
        return x0, y0, x1, y1

    def span(start: int, end: int, n: int, original: int) -> tuple[int, int]:
        lo = min(max(start * n // original, 0), n - 1)  # exact integer floor and ceil
        return lo, min(max(-(-end * n // original), lo + 1), n)

    (x0, x1), (y0, y1) = span(x0, x1, w, ow), span(y0, y1, h, oh)
    return x0, y0, x1, y1
