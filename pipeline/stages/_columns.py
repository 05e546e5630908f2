"""Column checks shared by every stage.

A batch is a ``dict[str, np.ndarray]`` of equal-length columns (Ray Data's "numpy" batch format).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def check_columns(stage_name: str, batch: Mapping[str, Any], required: tuple[str, ...]) -> int:
    """Check that ``batch`` has every ``required`` column and that all its columns have one length.

    Returns:
        The number of rows (0 for a batch with no columns).

    Raises:
        ValueError: naming the stage and the missing columns (and the columns present), or the
            length of every column when they differ.
        TypeError: ``batch`` is not a mapping of columns.
    """
    if not isinstance(batch, Mapping):
        raise TypeError(f"stage {stage_name!r}: a batch must be a dict of columns, got {type(batch).__name__}")
    missing = [name for name in required if name not in batch]
    if missing:
        raise ValueError(
            f"stage {stage_name!r} requires column(s) {', '.join(map(repr, missing))}, missing from the "
            f"input batch (it has: {', '.join(map(repr, batch)) or 'no columns'})"
        )
    lengths: dict[str, int] = {}
    for name, column in batch.items():
        try:
            lengths[name] = len(column)
        except TypeError:
            raise ValueError(
                f"stage {stage_name!r}: column {name!r} is not a sequence ({type(column).__name__})"
            ) from None
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{name}={n}" for name, n in lengths.items())
        raise ValueError(f"stage {stage_name!r}: input columns have different lengths ({detail})")
    return next(iter(lengths.values()), 0)
