"""Decode stage: ``uri`` -> RGB image plus a per-row status.

One row per input image. Each row's bytes are fetched with :func:`pipeline.io.fs.read_bytes` and
decoded with :func:`pipeline.io.images.decode_working` (at full size unless ``decode.resolution:
working``); any failure becomes that row's error columns and the batch goes on (a bad input never
stops a run).

Columns produced (all other input columns pass through unchanged):

=================  ==========  ===========================================================
column             dtype       value
=================  ==========  ===========================================================
``image``          object      ``(H, W, 3)`` uint8 RGB array (row, col, channel); failed
                               rows: ``np.zeros((0, 0, 3), np.uint8)``. With
                               ``decode.resolution: working``, at the working size
                               (:func:`working_size`), at most ``(H, W)``
``height``         int64       ``H``, the original height (0 on failure: the scores table
                               stores null)
``width``          int64       ``W``, the original width (0 on failure)
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

import time

import numpy as np
import pyarrow as pa

from pipeline.config import DecodeSpec, RetrySpec
from pipeline.io.fs import StorageOptions, read_bytes
from pipeline.io.images import DecodeError, WorkingSize, decode_working, probe
from pipeline.io.retry import retrying, stderr_log
from pipeline.stages.base import check_columns
from pipeline.stages.records import STATUS_COLUMNS, TENSOR, RowErrors, each_row, object_column

#: the long side of SAM's input (segment-anything's ResizeLongestSide)
SAM_LONG_SIDE = 1024
#: CLIPSeg's input side (transformers' CLIPSegProcessor)
CLIPSEG_SIDE = 352


def model_input_sizes(spec) -> list[int]:
    """The square input sizes the scoring stage squashes a whole image to: ``clip.image_size`` or the
    model's native size, FADE's ``pixel.scales``, the adapters' or mutual scoring's
    ``pixel.image_size``, CLIPSeg's 352 px."""
    from pipeline.models import registry

    g = registry.vision(spec.clip.model)
    pixel = spec.pixel
    sizes = {spec.clip.image_size or (g.image_size if g is not None else 0), *getattr(pixel, "scales", ()),
             getattr(pixel, "image_size", 0) or 0}
    if pixel.kind == "clipseg":
        sizes.add(CLIPSEG_SIDE)
    return sorted(s for s in sizes if s > 0)


def working_size(spec) -> WorkingSize | None:
    """What the plan of ``spec`` needs of each image with ``decode.resolution: working``; None when it
    decodes at the full size (``exact``, or a scorer whose input size is unknown). Every need of the
    plan's stages together:

    - the short side holds the largest of :func:`model_input_sizes` (each squashes the whole image,
      or a whole-image tile, to that square);
    - SAM (a ``sam_dis`` foreground, sam_refine): the long side holds SAM's 1024-px input; the
      foreground's mask, boxes and areas and sam_refine's mask and prompts are stored in the
      original's pixels. A dichotomous model (``foreground.dis_model``) squashes the image to
      ``foreground.dis_input_size``: the short side holds that too. The classical map needs no size;
    - tiling: tiles are planned in the original's pixels and each crop is squashed to the model
      inputs, so the smallest tile (``tiling.min_tile`` original pixels) must keep
      ``min(min_tile, largest input)`` pixels: a scale of at least ``min(1, largest input / min_tile)``
      of the original (not a fixed size). With ``vvv``'s own values (352-px tiles, inputs up to 448
      px) that is 1: ``vvv`` decodes at the full size in either mode, and only a larger ``min_tile``
      (or smaller inputs) lets it decode smaller."""
    if spec.decode.resolution != "working":
        return None
    sizes = model_input_sizes(spec)
    if not sizes:
        return None
    short, largest = sizes[-1], sizes[-1]
    fg = spec.foreground
    if fg is not None and fg.kind == "sam_dis" and fg.dis_model is not None:
        short = max(short, fg.dis_input_size)
    # SAM squashes the long side to 1024 px; its masks are brought back to the original size
    long = SAM_LONG_SIDE if spec.uses_sam() else 0
    scale = min(1.0, largest / spec.tiling.min_tile) if spec.tiling is not None else 0.0
    return WorkingSize(short=short, long=long, scale=scale)


#: The columns a decode makes (the decode stage, or DeviceDecodeStage in the model actor)
DECODED: dict[str, object] = {"image": TENSOR, "height": pa.int64(), "width": pa.int64(), **STATUS_COLUMNS,
                              "decode_ms": pa.float64()}


def _empty_image() -> np.ndarray:
    return np.zeros((0, 0, 3), np.uint8)


class DecodeStage:
    """Batch callable: fetch and decode every row's ``uri``. See the module docstring for columns.

    ``ship_bytes`` (``decode.device: model``): fetch and read the header only
    (:func:`pipeline.io.images.probe`), and pass the encoded bytes on as ``image_bytes`` (binary;
    None for a failed row) instead of ``image``: :class:`DeviceDecodeStage` decodes them in the
    model actor."""

    name = "decode"
    timed = True  # decode_ms; run.json's decode_busy
    section = "decode"
    kind = "task"
    requires: tuple[str, ...] = ("uri",)
    drops: tuple[str, ...] = ()

    def __init__(self, cfg: DecodeSpec, storage: StorageOptions | None = None,
                 retries: RetrySpec | None = None, working: WorkingSize | None = None, *,
                 ship_bytes: bool = False) -> None:
        self.cfg = cfg
        self.storage = dict(storage) if storage else None
        self.retries = retries or RetrySpec()
        self.working = working
        self.ship_bytes = ship_bytes

    @classmethod
    def from_spec(cls, spec, storage: StorageOptions | None, *, on_cpu: bool = False) -> "DecodeStage":
        """The decode stage of ``spec``'s plan; ``on_cpu``: decoding on the CPU whatever
        ``decode.device`` says (the passes before the plan, training)."""
        return cls(spec.decode, storage, spec.retries, working_size(spec),
                   ship_bytes=spec.decode.device == "model" and not on_cpu)

    @property
    def types(self) -> dict[str, object]:
        pixels = {"image_bytes": pa.binary()} if self.ship_bytes else {"image": TENSOR}
        return {**pixels, **{k: v for k, v in DECODED.items() if k != "image"}}

    @property
    def produces(self) -> tuple[str, ...]:
        return tuple(self.types)

    def setup(self) -> None:
        """Nothing to build: decoding needs no model."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = check_columns(self.name, batch, self.requires)
        uris = batch["uri"]
        errors = RowErrors(batch, n)
        column = "image_bytes" if self.ship_bytes else "image"
        failed = (lambda: None) if self.ship_bytes else _empty_image
        image = object_column(batch[column] if column in batch else [None] * n)
        height = np.array(batch["height"] if "height" in batch else np.zeros(n), dtype=np.int64)
        width = np.array(batch["width"] if "width" in batch else np.zeros(n), dtype=np.int64)
        decode_ms = np.array(batch["decode_ms"] if "decode_ms" in batch else np.zeros(n), dtype=np.float64)

        for i in range(n):
            if not errors.ok(i) and image[i] is None:  # failed in an earlier stage: not fetched
                image[i] = failed()

        def decode(i: int) -> None:
            row = self._decode_row(str(uris[i]))
            if isinstance(row[0], (np.ndarray, bytes)):
                image[i] = row[0]
                height[i], width[i] = row[1]
                errors.clear(i)
            else:
                image[i] = failed()
                height[i] = width[i] = 0
                errors.fail(i, self.name, *row)

        each_row(errors.status, decode, ms=decode_ms)

        return {**batch, column: image, "height": height, "width": width, **errors.columns(), "decode_ms": decode_ms}

    def _decode_row(self, uri: str) -> tuple[np.ndarray | bytes, tuple[int, int]] | tuple[str, str]:
        """(the decoded image, or with ``ship_bytes`` the file's bytes, and its original (height,
        width)), or ``(error_type, error_message)``."""
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
            if self.ship_bytes:
                head = probe(data, self.cfg.max_pixels)
                return bytes(data), (head.height, head.width)
            return decode_working(data, self.cfg.max_pixels, self.working)
        except DecodeError as exc:
            return exc.error_type, exc.message
        except Exception as exc:  # noqa: BLE001 - decode_working should not raise others; be safe
            return type(exc).__name__, str(exc) or type(exc).__name__


class DeviceDecodeStage:
    """The decode of ``decode.device: model``, run first in the model actor after the decode stage
    (:func:`pipeline.stages.plan.decode_in_model`): the ``image_bytes`` the decode stage fetched ->
    ``image`` (as the decode stage would have made it, at the working size), by
    :class:`pipeline.models.device_decode.DeviceDecoder` on the actor's device. A row whose bytes
    do not decode fails here with the decode stage's error types (``error_stage = decode``,
    ``height``/``width`` 0); ``decode_ms`` gains the row's share of the batch's decode time."""

    name = "device_decode"
    section = "decode"
    kind = "actor"
    requires = ("image_bytes", "height", "width", "decode_ms", *STATUS_COLUMNS)
    types = DECODED
    produces = tuple(types)
    drops = ("image_bytes",)

    def __init__(self, cfg: DecodeSpec, working: WorkingSize | None = None, use_gpu: bool = False) -> None:
        self.cfg = cfg
        self.working = working
        self.use_gpu = use_gpu
        self.decoder = None

    @classmethod
    def from_spec(cls, spec, storage: StorageOptions | None = None) -> "DeviceDecodeStage | None":
        return cls(spec.decode, working_size(spec)) if spec.decode.device == "model" else None

    def setup(self) -> None:
        if self.decoder is not None:
            return
        import torch

        from pipeline.models.device_decode import DeviceDecoder

        gpu = self.use_gpu and torch.cuda.is_available()
        self.decoder = DeviceDecoder(torch.device("cuda") if gpu else torch.device("cpu"), self.cfg.max_pixels,
                                     self.working)
        if not gpu:
            stderr_log("decode.device: model on an actor without a GPU: its JPEGs are decoded on this actor's CPU")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = check_columns(self.name, batch, self.requires)
        self.setup()
        errors = RowErrors(batch, n)
        image = object_column([_empty_image() for _ in range(n)])
        height = np.array(batch["height"], dtype=np.int64)
        width = np.array(batch["width"], dtype=np.int64)
        decode_ms = np.array(batch["decode_ms"], dtype=np.float64)
        todo = [i for i in range(n) if errors.ok(i)]
        if todo:
            refused = self.decoder.refused
            t0 = time.perf_counter()
            decoded = self.decoder.decode([batch["image_bytes"][i] for i in todo])
            share = (time.perf_counter() - t0) * 1000.0 / len(todo)
            for i, result in zip(todo, decoded):
                decode_ms[i] += share
                if isinstance(result, DecodeError):
                    errors.fail(i, DecodeStage.name, result.error_type, result.message)
                    height[i] = width[i] = 0
                else:
                    image[i] = result
            if self.decoder.refused > refused:
                stderr_log(f"decode.device: model: the device decoder refused {self.decoder.refused - refused} "
                           f"JPEG(s) of this batch ({self.decoder.last_refusal}); Pillow decoded them on the CPU")
        out = {k: v for k, v in batch.items() if k != "image_bytes"}
        return {**out, "image": image, "height": height, "width": width, **errors.columns(), "decode_ms": decode_ms}
