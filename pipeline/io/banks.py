"""Few-shot memory banks on storage: ``RUN/banks/<category>.safetensors``.

One file per category: the bank's feature tensors (float32, {key: (M, D)}; keys per method in
:mod:`pipeline.models.fewshot`) and, in the safetensors header, zsad's metadata: ``zsad.format``
(``bank/1``), ``category``, ``method``, ``k``, ``digest`` (what the bank was built from: the model,
the method's settings and the reference images, see :func:`pipeline.stages.bank.bank_digest``)
and ``spec`` (the same, readable JSON). A bank is read back only when its digest is the one the
run expects: a bank built with another model, method or references is an error, never silently
used. Works on local paths and s3:// alike (whole-object writes).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import numpy as np

from pipeline.io import fs as fsio
from pipeline.io.fs import StorageOptions

FORMAT = "bank/1"


class BankError(ValueError):
    """A bank file that cannot be used: missing, unreadable, or built from something else."""


def bank_uri(run_dir: str, category: str, folder: str = "banks") -> str:
    """Where the bank of ``category`` lives (the name is URL-quoted, so any category is one file);
    mutual scoring's pools live in the folder ``pools``."""
    return fsio.join(run_dir, folder, quote(category, safe="") + ".safetensors")


def encode_bank(tensors: dict[str, np.ndarray], metadata: dict[str, Any]) -> bytes:
    """Tensors and metadata -> the bytes of a bank file."""
    from safetensors.numpy import save

    meta = {"zsad.format": FORMAT, **{k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}}
    return save({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, metadata=meta)


def write_bank(uri: str, tensors: dict[str, np.ndarray], metadata: dict[str, Any], storage: StorageOptions | None = None) -> int:
    """Write one bank file; returns its size in bytes."""
    data = encode_bank(tensors, metadata)
    fsio.write_bytes(uri, data, storage)
    return len(data)


def decode_bank(data: bytes, what: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The bytes of a bank file -> (tensors, metadata). Raises :class:`BankError` naming ``what``."""
    from safetensors.numpy import load

    try:
        tensors = load(data)
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + header_len]).get("__metadata__", {}) or {}
    except Exception as exc:  # noqa: BLE001 - any parse failure is an unusable file
        raise BankError(f"bank {what}: not a readable bank file ({type(exc).__name__}: {exc})") from None
    if meta.get("zsad.format") != FORMAT:
        raise BankError(f"bank {what}: not a zsad bank file (format {meta.get('zsad.format')!r}, expected {FORMAT!r})")
    return tensors, meta


def read_bank(uri: str, expected_digest: str | None, storage: StorageOptions | None = None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a bank file; when ``expected_digest`` is given, a bank whose digest differs is a
    :class:`BankError` (it was built with another model, method, setting or references)."""
    try:
        data = fsio.read_bytes(uri, storage)
    except FileNotFoundError:
        raise BankError(f"bank {uri}: no such file") from None
    tensors, meta = decode_bank(data, uri)
    if expected_digest is not None and meta.get("digest") != expected_digest:
        raise BankError(
            f"bank {uri}: built for something else (digest {meta.get('digest', '?')[:12]}..., this run's spec and "
            f"references give {expected_digest[:12]}...): the model, the few-shot method or the references changed. "
            "Start a new run (another --run-id) to build banks for the new spec")
    return tensors, meta


def read_bank_metadata(uri: str, storage: StorageOptions | None = None) -> dict[str, str]:
    """The metadata of a bank file from its header alone (the tensors are not read), with
    ``bytes``: the file's size. Raises FileNotFoundError when there is no such file and
    :class:`BankError` when it is not a bank file."""
    fs, path = fsio.filesystem(uri, storage)
    try:
        with fs.open(path, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < n < 100_000_000:
                raise BankError(f"bank {uri}: not a safetensors file")
            header = json.loads(fh.read(n))
        size = fs.size(path)
    except FileNotFoundError:
        raise FileNotFoundError(uri) from None
    except (ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, BankError):
            raise
        raise BankError(f"bank {uri}: unreadable header ({exc})") from None
    meta = header.get("__metadata__") or {}
    if meta.get("zsad.format") != FORMAT:
        raise BankError(f"bank {uri}: not a zsad bank file (format {meta.get('zsad.format')!r}, expected {FORMAT!r})")
    return {**meta, "bytes": str(size)}
