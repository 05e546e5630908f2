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
``height``         int64       ``H`` (0 on failure)
``width``          int64       ``W`` (0 on failure)
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
columns get the failure defaults above and ``decode_ms`` 0.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from pipeline.config import DecodeSpec, RetrySpec
from pipeline.io.fs import StorageOptions, read_bytes
from pipeline.io.images import DecodeError, decode_image
from pipeline.io.retry import retrying, stderr_log
from pipeline.stages._columns import check_columns


def _empty_image() -> np.ndarray:
    return np.zeros((0, 0, 3), np.uint8)


class DecodeStage:
    """Batch callable: fetch and decode every row's ``uri``. See the module docstring for columns."""

    name = "decode"
    requires: tuple[str, ...] = ("uri",)
    produces: tuple[str, ...] = (
        "image",
        "height",
        "width",
        "status",
        "error_stage",
        "error_type",
        "error_message",
        "decode_ms",
    )

    def __init__(self, cfg: DecodeSpec, storage: StorageOptions | None = None, retries: RetrySpec | None = None) -> None:
        self.cfg = cfg
        self.storage = dict(storage) if storage else None
        self.retries = retries or RetrySpec()

    def setup(self) -> None:
        """Nothing to build: decoding needs no model."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = check_columns(self.name, batch, self.requires)
        uris = batch["uri"]
        prior_status = batch.get("status")

        image = _start(batch, "image", n, object, None)
        height = _start(batch, "height", n, np.int64, 0)
        width = _start(batch, "width", n, np.int64, 0)
        status = _start(batch, "status", n, object, "ok")
        error_stage = _start(batch, "error_stage", n, object, None)
        error_type = _start(batch, "error_type", n, object, None)
        error_message = _start(batch, "error_message", n, object, None)
        decode_ms = _start(batch, "decode_ms", n, np.float64, 0.0)

        for i in range(n):
            if prior_status is not None and prior_status[i] == "error":
                status[i] = "error"
                if image[i] is None:
                    image[i] = _empty_image()
                continue
            started = time.perf_counter()
            row = self._decode_row(str(uris[i]))
            decode_ms[i] = (time.perf_counter() - started) * 1000.0
            if isinstance(row, np.ndarray):
                image[i] = row
                height[i], width[i] = row.shape[0], row.shape[1]
                status[i] = "ok"
                error_stage[i] = error_type[i] = error_message[i] = None
            else:
                image[i] = _empty_image()
                height[i] = width[i] = 0
                status[i] = "error"
                error_stage[i] = self.name
                error_type[i], error_message[i] = row

        out = dict(batch)
        out.update(
            image=image,
            height=height,
            width=width,
            status=status,
            error_stage=error_stage,
            error_type=error_type,
            error_message=error_message,
            decode_ms=decode_ms,
        )
        return out

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


def _start(batch: dict[str, Any], name: str, n: int, dtype: Any, fill: Any) -> np.ndarray:
    """A new output column: a copy of the input column when there is one (so rows that are not
    decoded keep their values), else ``fill``."""
    column = np.full(n, fill, dtype=dtype)
    if name in batch:
        source = batch[name]
        for i in range(n):
            column[i] = source[i]
    return column
