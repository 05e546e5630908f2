"""Mixed precision and device hygiene for the model stages (pure torch).

A model section's ``precision`` is ``auto`` (fp32 on a CPU, bf16 on a GPU that supports it, else
fp32), ``fp32``, ``bf16`` or ``fp16``. The weights stay in fp32; the forward passes run under
``torch.autocast`` (:func:`autocast`), so matrix products and convolutions run in the low
precision while reductions and normalisations keep fp32 where autocast's own lists say so. What
zsad compares or stores is computed in fp32 outside autocast: text embeddings, the cosine
similarities and softmax logits, the maps' resizes and fusions.

A stage enters :func:`active` (its device and resolved precision) around its work; the functions
that run a model's forward pass are marked :func:`forward_pass`: only they run under autocast, and
their tensor results come back as fp32, so the code after them (similarities, softmax, nearest
neighbours, resizes) runs in fp32 without having to know. fp16 asked on a CPU worker (a GPU job
that fell back to CPU) runs fp32: CPU autocast's fp16 is partial and slow. bf16 autocast runs on a
CPU too, which is how the tests measure the deviation of bf16 from fp32 without a GPU.

Out of memory: :func:`is_out_of_memory` recognises an accelerator's out-of-memory error (CUDA's
``torch.OutOfMemoryError``, and the allocator's messages of other back-ends), :func:`free_cache`
returns cached blocks to the device, and :func:`split_on_oom` runs a batch function on halves of
a batch that did not fit, down to one item; an item that does not fit alone is reported as an
:class:`OutOfMemory` error for its row.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import threading
from typing import Any, Callable, Sequence, TypeVar

import torch

from pipeline.errors import ZsadError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

T = TypeVar("T")


class OutOfMemory(ZsadError, RuntimeError):
    """One row's work did not fit in the accelerator's memory, even alone (error_type ``OutOfMemory``)."""


def resolve(precision: str, device: torch.device | str) -> str:
    """The precision that runs on ``device``: ``auto`` becomes fp32 on a CPU and bf16 on a GPU that
    supports it (else fp32); fp16 on a CPU becomes fp32."""
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r} ({', '.join(PRECISIONS)})")
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if precision == "fp16" and device.type == "cpu":
        return "fp32"
    return precision


def autocast(device: torch.device | str, precision: str):
    """A context manager running the forward passes in ``precision`` on ``device`` (``fp32``: no
    autocast at all, so fp32 results are bit for bit what they were without it)."""
    device = torch.device(device)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


_current = threading.local()


@contextlib.contextmanager
def active(device: torch.device | str, precision: str):
    """Within this block, :func:`forward_pass` functions run in ``precision`` on ``device`` (already
    resolved: fp32, bf16 or fp16)."""
    before = getattr(_current, "setting", None)
    _current.setting = (torch.device(device), precision)
    try:
        yield
    finally:
        _current.setting = before


def current() -> tuple[torch.device, str] | None:
    """The (device, precision) of the enclosing :func:`active` block, or None."""
    return getattr(_current, "setting", None)


def _as_fp32(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() and value.dtype != torch.float32 else value
    if isinstance(value, tuple):
        return tuple(_as_fp32(v) for v in value)
    if isinstance(value, list):
        return [_as_fp32(v) for v in value]
    if isinstance(value, dict):
        return {k: _as_fp32(v) for k, v in value.items()}
    return value


def forward_pass(fn):
    """Mark a model forward pass: inside an :func:`active` block with a low precision it runs under
    autocast and its floating tensor results (also inside tuples, lists and dicts) come back fp32.
    Outside such a block (fp32, or no block) it runs as written."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        setting = current()
        if setting is None or setting[1] == "fp32" or torch.is_autocast_enabled(setting[0].type):
            return fn(*args, **kwargs)  # fp32, or already inside an outer forward pass's autocast
        with autocast(*setting):
            out = fn(*args, **kwargs)
        return _as_fp32(out)

    return run


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` on ``device``; from the host to a GPU through pinned memory, without blocking
    (the copy overlaps the work queued before it)."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for an accelerator (or injected) out-of-memory error."""
    if isinstance(exc, (OutOfMemory, torch.OutOfMemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text.lower() and ("CUDA" in text or "HIP" in text
                                                                                   or "MPS" in text or "XPU" in text))


def free_cache() -> None:
    """Return the memory cached by the allocator to the device after an out-of-memory error."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def alone(stage: str, exc: BaseException) -> OutOfMemory:
    """The row error of an image that ran out of accelerator memory even alone (``exc``: the last error)."""
    detail = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
    return OutOfMemory(f"stage {stage}: out of accelerator memory for this image alone ({detail})")


def split_on_oom(fn: Callable[[Sequence[int]], T], rows: Sequence[int], stage: str,
                 on_split: Callable[[int, int], None] | None = None) -> list[tuple[list[int], T | BaseException]]:
    """Run ``fn(rows)``; when it runs out of memory, free the cache and run it on each half, down to
    one row. Returns ``(rows, result)`` pairs covering ``rows`` in order; a single row that still
    runs out of memory gets an :class:`OutOfMemory` error naming the stage instead of a result.
    Other errors propagate. ``on_split(size, half)`` is told of every split."""
    out: list[tuple[list[int], T | BaseException]] = []
    pending = [list(rows)]
    while pending:
        part = pending.pop(0)
        try:
            out.append((part, fn(part)))
            continue
        except Exception as exc:  # noqa: BLE001 - only out-of-memory errors are handled here
            if not is_out_of_memory(exc):
                raise
            error = exc
        free_cache()
        if len(part) == 1:
            out.append((part, alone(stage, error)))
            continue
        half = (len(part) + 1) // 2
        if on_split is not None:
            on_split(len(part), half)
        pending[:0] = [part[:half], part[half:]]
    return out


# -------------------------------------------------------------------------------------- fault injection
# Tests cannot run out of GPU memory on a CPU machine. ``ZSAD_INJECT_OOM`` (read by the model stages'
# actors, which inherit the driver's environment) makes a stage raise torch.OutOfMemoryError as a GPU
# would: ``STAGE:PIXELS[,STAGE:PIXELS]`` fails any call of that stage whose images hold more than PIXELS
# pixels together (so a large batch fails, its halves may fit, and an image larger than PIXELS never fits).
INJECT_ENV = "ZSAD_INJECT_OOM"


def injected_budget(stage: str) -> int | None:
    """The pixel budget ``ZSAD_INJECT_OOM`` sets for ``stage`` (None: nothing injected)."""
    text = os.environ.get(INJECT_ENV, "").strip()
    if not text:
        return None
    budgets = {}
    for item in text.split(","):
        name, sep, pixels = item.partition(":")
        if not sep or not pixels.strip().isdigit():
            raise ValueError(f"{INJECT_ENV}={text!r}: {item.strip()!r} is not STAGE:PIXELS")
        budgets[name.strip()] = int(pixels)
    return budgets.get(stage)


def check_injected(stage: str, shapes: Sequence[tuple[int, ...]]) -> None:
    """Raise torch.OutOfMemoryError when the images of ``shapes`` exceed ``stage``'s injected budget."""
    budget = injected_budget(stage)
    if budget is None:
        return
    pixels = sum(int(s[0]) * int(s[1]) for s in shapes)
    if pixels > budget:
        raise torch.OutOfMemoryError(f"CUDA out of memory (injected by {INJECT_ENV}: {pixels} pixels > {budget} "
                                     f"in stage {stage})")
