"""Checkpoint files -> state dicts -> modules, for every model zsad loads (CLIP, SAM, CLIPSeg).

Reading (:func:`read_checkpoint`, the one reader of a checkpoint file; :func:`read_state_dict` on top of
it) is CPU-first and never runs arbitrary code: a safetensors file (by its ``.safetensors`` name or its
header) is read with safetensors, anything else with ``torch.load(weights_only=True)``. A checkpoint
may wrap its tensors as ``{"model": ...}`` or ``{"state_dict": ...}`` and prefix every key with
``module.`` (DataParallel); both are removed.

Loading (:func:`load_strict`) is strict: every key of the module must be in the checkpoint, every
key of the checkpoint must be in the module, and every shape must match. Otherwise the caller's
error type is raised with a message naming the file, the model and the first offending keys.

Paths are local files (URIs are fetched and hash-checked first by :mod:`pipeline.io.weights`).
"""

from __future__ import annotations

import os

import torch

_WRAPPERS = ("model", "state_dict")


def _first(items: list[str], n: int, counted: bool) -> str:
    if counted:
        return f"{items[:n]}{' ...' if len(items) > n else ''} ({len(items)} in all)"
    return f"{items[:n]}{'...' if len(items) > n else ''}"


def _torch_load(path: str, mmap: bool):
    if mmap:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap can only be used with files saved with" not in str(exc):
                raise
    return torch.load(path, map_location="cpu", weights_only=True)


def _is_safetensors(path: str) -> bool:
    """A safetensors file starts with an 8-byte little-endian header length and a JSON header."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n <= os.path.getsize(path) - 8


def read_checkpoint(path: str, *, what: str, error: type[Exception],
                    mmap: bool = False) -> tuple[object, dict[str, str] | None]:
    """The content of the checkpoint file at ``path``, read on the CPU without running code: (the object,
    the safetensors header's metadata; ``None`` for a torch file). A file is safetensors when its name
    ends in ``.safetensors`` or its first bytes are a safetensors header.

    ``what`` names the file in messages (e.g. ``"SAM checkpoint"``). Raises ``error`` when the file
    does not exist, is a directory or cannot be read safely (corrupt, truncated, a pickle with
    non-tensor objects). ``mmap``: map a torch file's tensors instead of reading them (files in
    torch's legacy format are read whole)."""
    path = os.fspath(path)
    label = f"{what} {path}"
    if os.path.isdir(path):
        raise error(f"{label} is a directory, not a file")
    if not os.path.isfile(path):
        raise error(f"{label} does not exist")
    safetensors = path.endswith(".safetensors") or _is_safetensors(path)
    try:
        if safetensors:
            from safetensors import safe_open

            with safe_open(path, framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        return _torch_load(path, mmap), None
    except Exception as exc:  # pickle/zip/header errors: a corrupt, truncated or non-tensor checkpoint
        how = "safetensors" if safetensors else "weights_only=True"
        raise error(f"{label} could not be loaded safely ({how}): {exc}") from exc


def read_state_dict(path: str, *, what: str, error: type[Exception], mmap: bool = False) -> dict[str, torch.Tensor]:
    """Read the checkpoint at ``path`` on the CPU (:func:`read_checkpoint`): a dict of tensors (wrapper
    and ``module.`` prefixes removed). Raises ``error`` as :func:`read_checkpoint` does, and when the
    file does not hold a non-empty dict of tensors.
    """
    label = f"{what} {path}"
    obj, _ = read_checkpoint(path, what=what, error=error, mmap=mmap)
    for wrapper in _WRAPPERS:
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not obj:
        got = "an empty dict" if isinstance(obj, dict) else type(obj).__name__
        raise error(f"{label} is not a state dict (got {got})")
    bad = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise error(f"{label} is not a state dict of tensors: non-tensor entries {_first(bad, 5, counted=True)}")
    sd = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def load_strict(
    module: torch.nn.Module,
    state_dict: dict[str, torch.Tensor],
    *,
    source: str,
    model: str,
    error: type[Exception],
    counted: bool = False,
) -> None:
    """Load ``state_dict`` into ``module``; every key and every shape must match.

    Raises ``error("{source} does not fit {model}: ...")`` naming the first missing and unexpected
    keys, or else the first mis-shaped ones (checkpoint shape vs model shape). ``counted`` selects
    SAM's wording (``missing keys [...] (N in all); unexpected keys [...]``, ``key: (shape) vs
    (shape)``) over the compact one (``missing [...], unexpected [...]``, ``key (shape) vs (shape)``).
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if missing or unexpected:
        if counted:
            parts = [
                f"{name} keys {_first(keys, 5, True)}"
                for name, keys in (("missing", missing), ("unexpected", unexpected))
                if keys
            ]
            problem = "; ".join(parts)
        else:
            problem = f"missing {_first(missing, 5, False)}, unexpected {_first(unexpected, 5, False)}"
        raise error(f"{source} does not fit {model}: {problem}")
    sep = ": " if counted else " "
    shapes = [
        f"{k}{sep}{tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if state_dict[k].shape != v.shape
    ]
    if shapes:
        which = "shape mismatch (checkpoint vs model)" if counted else "shape mismatch"
        raise error(f"{source} does not fit {model}: {which} {_first(shapes, 3, counted)}")
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise error(f"{source} does not fit {model}: {exc}") from exc
