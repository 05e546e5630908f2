"""Stage input batches built in code, as Ray Data's "numpy" batch format hands them to a stage.

A batch is a ``dict[str, np.ndarray]`` of equal-length 1-D columns, one element per row. The
columns :func:`image_batch` builds follow what the decode stage produces (see
:mod:`pipeline.stages.decode`), so a batch is a valid input for every stage after it:

=================  ==========  ===========================================================
column             dtype       value
=================  ==========  ===========================================================
``uri``            object      ``"/x/{i}.png"`` (row ``i``)
``image_id``       object      ``"i{i}"``
``category``       object      one category name per row (default ``"widget"``)
``image``          object      ``(H, W, 3)`` uint8 RGB array (row, col, channel)
``height``         int64       ``H`` of the row's image; 0 for an empty (0, 0, 3) image,
                               as the decode stage writes for its failed rows
``width``          int64       ``W``; 0 likewise
``status``         object      ``"ok"`` or ``"error"``
``error_stage``    object      None for ok rows; failed rows: ``failure[0]`` (``"decode"``)
``error_type``     object      None for ok rows; failed rows: ``failure[1]`` (``"EmptyFile"``)
``error_message``  object      None for ok rows; failed rows: ``failure[2]``
                               (``"empty file (0 bytes)"``)
=================  ==========  ===========================================================

Nulls are ``None`` in object columns. Any keyword column replaces the default of the same name or
adds a column (e.g. ``anomaly_map=[...]`` or ``gt_label=[...]`` for the later stages); with
``images=None`` the ``image``/``height``/``width`` columns are left out (a batch for encode or
evaluate). Examples::

    image_batch(images, "pills")                               # decoded rows, all ok
    image_batch(images, ["a", "b"], status=["ok", "error"])    # row 1 failed in decode (EmptyFile)
    image_batch(None, status=["ok"], anomaly_map=[m], uri=["u0"])
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from pipeline.stages.records import object_column

#: The error columns ``(error_stage, error_type, error_message)`` of a failed row, as the decode
#: stage writes them for a zero-byte file.
DECODE_FAILURE = ("decode", "EmptyFile", "empty file (0 bytes)")

DEFAULT_CATEGORY = "widget"


def column(values: Iterable[Any] | np.ndarray) -> np.ndarray:
    """A batch column from ``values``: an ndarray is used as given; all-numeric values (bool, int,
    float; no None) become a typed array (``int64``, ``float64`` or ``bool``); anything else
    (str, bytes, None, arrays) becomes an :func:`object_column`."""
    if isinstance(values, np.ndarray):
        return values
    values = list(values)
    if values and all(isinstance(v, (numbers.Number, np.bool_)) and not isinstance(v, complex) for v in values):
        return np.asarray(values)
    return object_column(values)


def image_batch(
    images: Sequence[np.ndarray] | None,
    categories: str | Sequence[str] = DEFAULT_CATEGORY,
    status: Sequence[str] | None = None,
    *,
    failure: tuple[str, str, str] = DECODE_FAILURE,
    **extra_columns: Iterable[Any] | np.ndarray,
) -> dict[str, np.ndarray]:
    """A stage input batch with the columns in the module docstring.

    Args:
        images: one ``(H, W, 3)`` uint8 array per row (a failed decode gives ``(0, 0, 3)``); None for
            a batch past the stage that drops the image (no ``image``/``height``/``width`` columns;
            the row count then comes from ``status`` or the extra columns).
        categories: one category per row, or one name for every row.
        status: ``"ok"`` or ``"error"`` per row (default: all ``"ok"``).
        failure: ``(error_stage, error_type, error_message)`` written in every ``"error"`` row.
        **extra_columns: further columns, or replacements of the defaults above (through
            :func:`column`: lists of str/bytes/None/arrays become object columns, numbers typed ones).

    Raises:
        ValueError: the row count cannot be told, or the columns have different lengths.
    """
    if images is not None:
        n = len(images)
    elif status is not None:
        n = len(status)
    elif extra_columns:
        n = len(next(iter(extra_columns.values())))
    else:
        raise ValueError("image_batch: give images, status or a column to tell the number of rows")
    status = ["ok"] * n if status is None else list(status)
    if isinstance(categories, str):
        categories = [categories] * n
    failed = [s != "ok" for s in status]
    batch: dict[str, np.ndarray] = {
        "uri": object_column(f"/x/{i}.png" for i in range(n)),
        "image_id": object_column(f"i{i}" for i in range(n)),
        "category": object_column(categories),
    }
    if images is not None:
        batch["image"] = object_column(images)
        batch["height"] = column(int(im.shape[0]) for im in images)  # (0, 0, 3): 0, as decode gives
        batch["width"] = column(int(im.shape[1]) for im in images)
    batch["status"] = object_column(status)
    for k, name in enumerate(("error_stage", "error_type", "error_message")):
        batch[name] = object_column(failure[k] if bad else None for bad in failed)
    batch.update({name: column(values) for name, values in extra_columns.items()})
    lengths = {name: len(col) for name, col in batch.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"image_batch: columns of different lengths {lengths}")
    return batch
