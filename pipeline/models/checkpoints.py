"""Checkpoint files -> state dicts -> modules, for every model zsad loads (CLIP, SAM, CLIPSeg).

Reading (:func:`read_state_dict`) is CPU-first and never runs arbitrary code: a ``.safetensors``
file is read with safetensors, anything else with ``torch.load(weights_only=True)``. A checkpoint
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


def read_state_dict(path: str, *, what: str, error: type[Exception], mmap: bool = False) -> dict[str, torch.Tensor]:
    """Read the checkpoint at ``path`` on the CPU: a dict of tensors (wrapper and ``module.`` prefixes removed).

    ``what`` names the file in messages (e.g. ``"SAM checkpoint"``). Raises ``error`` when the file
    does not exist, is a directory, cannot be read safely (corrupt, truncated, a pickle with
    non-tensor objects) or does not hold a non-empty dict of tensors. ``mmap``: map the tensors'
    bytes instead of reading them (a cheap full check of the file's structure, e.g. on the driver
    before a run; files in torch's legacy format are read whole).
    """
    label = f"{what} {path}"
    if os.path.isdir(path):
        raise error(f"{label} is a directory, not a file")
    if not os.path.isfile(path):
        raise error(f"{label} does not exist")
    safetensors = str(path).endswith(".safetensors")
    try:
        if safetensors:
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = _torch_load(path, mmap)
    except Exception as exc:  # pickle/zip/header errors: a corrupt, truncated or non-tensor checkpoint
        how = "safetensors" if safetensors else "weights_only=True"
        raise error(f"{label} could not be loaded safely ({how}): {exc}") from exc
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
            parts = [f"{name} keys {_first(keys, 5, True)}" for name, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
            problem = "; ".join(parts)
        else:
            problem = f"missing {_first(missing, 5, False)}, unexpected {_first(unexpected, 5, False)}"
        raise error(f"{source} does not fit {model}: {problem}")
    sep = ": " if counted else " "
    shapes = [f"{k}{sep}{tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if state_dict[k].shape != v.shape]
    if shapes:
        which = "shape mismatch (checkpoint vs model)" if counted else "shape mismatch"
        raise error(f"{source} does not fit {model}: {which} {_first(shapes, 3, counted)}")
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise error(f"{source} does not fit {model}: {exc}") from exc
