"""Decode stage: ``uri`` -> RGB image plus a per-row status.

One row per input image. Each row's bytes are fetched with :func:`pipeline.io.fs.read_bytes` and
decoded with :func:`pipeline.io.images.decode_image`; any failure becomes that row's error columns and
the batch goes on (a bad input never stops a run).

Columns produced (all other input columns pass through unchanged):

=================  ==========  ===========================================================
column             dtype       value
=================  ==========  ===========================================================
``image``          object      ``(H, W, 3)`` uint8 RGB array (row, col, channel); failed
                               rows: ``np.zeros((0, 0, 3), np.uint8)``
``height``         int64       ``H`` (0 on failure: the scores table stores null)
``width``          int64       ``W`` (0 on failure: the scores table stores null)
``status``         object      ``"ok"`` or ``"error"``
``error_stage``    object      ``"decode"`` for rows that failed here, else None
``error_type``     object      see below, else None
``error_message``  object      what went wrong, else None
``decode_ms``      float64     milliseconds spent on the row (fetch + decode)
=================  ==========  ===========================================================

``error_type`` vocabulary: the decode types of :data:`pipeline.io.images.ERROR_TYPES`
(``EmptyFile``, ``UnidentifiedImage``, ``TruncatedImage``, ``CorruptImage``, ``DecompressionBomb``,
``UnsupportedMode``); for bytes that cannot be fetched (after ``retries.read`` retries of transient failures, see
:mod:`pipeline.io.retry`), the class name of the read error
(``FileNotFoundError``, ``PermissionError``, ``IsADirectoryError``, ``StorageError``...) with a
message naming the URI; for anything unforeseen, the exception's class name.

Rows whose input ``status`` is already ``"error"`` (failed in an earlier stage) are not fetched: they
keep their status and error columns (and any produced column they already carry); missing produced
columns get the failure defaults above and ``decode_ms`` 0 (nothing fetched).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.config import DecodeSpec, RetrySpec
from pipeline.io.fs import StorageOptions, read_bytes
from pipeline.io.images import DecodeError, decode_image
from pipeline.io.retry import retrying, stderr_log
from pipeline.stages.base import check_columns
from pipeline.stages.records import STATUS_COLUMNS, TENSOR, RowErrors, each_row, object_column


def _empty_image() -> np.ndarray:
    return np.zeros((0, 0, 3), np.uint8)


class DecodeStage:
    """Batch callable: fetch and decode every row's ``uri``. See the module docstring for columns."""

    name = "decode"
    timed = True  # decode_ms; run.json's decode_busy
    section = "decode"
    kind = "task"
    requires: tuple[str, ...] = ("uri",)
    types = {"image": TENSOR, "height": pa.int64(), "width": pa.int64(), **STATUS_COLUMNS, "decode_ms": pa.float64()}
    produces = tuple(types)
    drops: tuple[str, ...] = ()

    def __init__(self, cfg: DecodeSpec, storage: StorageOptions | None = None,
                 retries: RetrySpec | None = None) -> None:
        self.cfg = cfg
        self.storage = dict(storage) if storage else None
        self.retries = retries or RetrySpec()

    @classmethod
    def from_spec(cls, spec, storage: StorageOptions | None) -> "DecodeStage":
        return cls(spec.decode, storage, spec.retries)

    def setup(self) -> None:
        """Nothing to build: decoding needs no model."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = check_columns(self.name, batch, self.requires)
        uris = batch["uri"]
        errors = RowErrors(batch, n)
        image = object_column(batch["image"] if "image" in batch else [None] * n)
        height = np.array(batch["height"] if "height" in batch else np.zeros(n), dtype=np.int64)
        width = np.array(batch["width"] if "width" in batch else np.zeros(n), dtype=np.int64)
        decode_ms = np.array(batch["decode_ms"] if "decode_ms" in batch else np.zeros(n), dtype=np.float64)

        for i in range(n):
            if not errors.ok(i) and image[i] is None:  # failed in an earlier stage: not fetched
                image[i] = _empty_image()

        def decode(i: int) -> None:
            row = self._decode_row(str(uris[i]))
            if isinstance(row, np.ndarray):
                image[i] = row
                height[i], width[i] = row.shape[0], row.shape[1]
                errors.clear(i)
            else:
                image[i] = _empty_image()
                height[i] = width[i] = 0
                errors.fail(i, self.name, *row)

        each_row(errors.status, decode, ms=decode_ms)

        return {**batch, "image": image, "height": height, "width": width, **errors.columns(), "decode_ms": decode_ms}

    def _decode_row(self, uri: str) -> np.ndarray | tuple[str, str]:
        """The decoded image, or ``(error_type, error_message)``."""
        try:
            r = self.retries
            data = retrying(lambda: read_bytes(uri, self.storage), retries=r.read, backoff_s=r.backoff_s,
                            max_backoff_s=r.max_backoff_s, what=f"read {uri}", log=stderr_log)
        except Exception as exc:  # noqa: BLE001 - every read failure becomes a row
            message = str(exc) or type(exc).__name__
            if uri not in message:
                message = f"cannot read {uri}: {message}"
            attempts = getattr(exc, "zsad_attempts", 1)
            if attempts > 1:
                message += f" (after {attempts} attempts)"
            return type(exc).__name__, message
        try:
            return decode_image(data, self.cfg.max_pixels)
        except DecodeError as exc:
            return exc.error_type, exc.message
        except Exception as exc:  # noqa: BLE001 - decode_image should not raise others; be safe
            return type(exc).__name__, str(exc) or type(exc).__name__
