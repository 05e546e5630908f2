"""Few-shot memory banks and mutual-scoring pools on storage: part files and a manifest per category.

A category's bank (``RUN/banks/<category>/``) or pool (``RUN/pools/<category>/``) is built by the
actors that compute its features (:class:`pipeline.stages.bank.BankStage`), never by the driver:

- **Part files** ``part-<hash>.safetensors``: one per (batch, category) an actor computed, written
  atomically (a local file under a temporary name, then renamed; an object in one PUT). The
  tensors are the images' features stacked on axis 0 in the part's image order (float32, or float16
  for pools with ``mutual.pool_dtype: float16``); the safetensors header holds zsad's metadata:
  ``zsad.format`` (``bank-part/1``), ``category``, ``digest`` (what the bank is built from, see
  :func:`pipeline.stages.bank.bank_digest`), ``image_ids`` and ``offsets`` (per tensor, the first
  row of each image and the end), and ``precision`` (what the actor's forward pass resolved).
- **The manifest** ``manifest.json``, written by the driver from the actors' metadata (ids, byte
  counts, sha256s) once every image of the category is accounted for. It names the parts, the
  images in bank order (shot order; pool order), the digest and the precision. A category is
  complete exactly when its manifest exists: a resumed run reuses complete categories and rebuilds
  the others (left-over parts of an interrupted build are deleted when the manifest is written).

Readers (:class:`StoredBank`) never read a part into a bytes string: a local part is memory-mapped
(``numpy.memmap`` on the tensor's byte range, found in the header); a part on s3:// is downloaded
once per node into the node cache (``<weights cache>/run-parts/``, sha256 checked) and mapped there.
A part whose size or header disagrees with the manifest (truncated, or a file of another bank) is a
:class:`BankError` naming the file. Rows are read per image range (:meth:`StoredBank.rows`), so a
pool larger than ``mutual.max_pool_bytes`` can be streamed in chunks.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from typing import Any
from urllib.parse import quote

import numpy as np

from pipeline.errors import ZsadError
from pipeline.io import fs as fsio
from pipeline.io.atomic import local_target, write_atomic
from pipeline.io.fs import StorageOptions

PART_FORMAT = "bank-part/1"
MANIFEST_FORMAT = "bank-manifest/1"
MANIFEST = "manifest.json"
DTYPES = {"float32": np.float32, "float16": np.float16}
_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16}


class BankError(ZsadError, ValueError):
    """A bank or pool that cannot be used: missing, unreadable, truncated, or built from something else."""


def category_dir(run_dir: str, category: str, folder: str = "banks") -> str:
    """The folder of ``category``'s bank (the name is URL-quoted, so any category is one folder);
    mutual scoring's pools live under ``pools``."""
    return fsio.join(run_dir, folder, quote(category, safe=""))


def manifest_uri(run_dir: str, category: str, folder: str = "banks") -> str:
    return fsio.join(category_dir(run_dir, category, folder), MANIFEST)


def part_name(digest: str, image_ids: list[str]) -> str:
    """A part's file name: the same images of the same bank give the same name (a rerun batch
    overwrites its own part), other images another."""
    h = hashlib.sha256(json.dumps([digest, list(image_ids)]).encode()).hexdigest()[:20]
    return f"part-{h}.safetensors"


# --------------------------------------------------------------------------------------------
# writing (actors: parts; driver: manifests)
# --------------------------------------------------------------------------------------------


def encode_part(features: list[dict[str, np.ndarray]], image_ids: list[str], metadata: dict[str, Any],
                dtype: str = "float32") -> bytes:
    """Per image its features {key: (rows, ...)} -> the bytes of one part file: each key's rows
    stacked on axis 0 in the given order, ``offsets`` recording where each image starts."""
    from safetensors.numpy import save

    if not features or len(features) != len(image_ids):
        raise ValueError("a part needs one feature dict per image id")
    keys = sorted(features[0])
    tensors, offsets = {}, {}
    for key in keys:
        arrays = [np.asarray(f[key]) for f in features]
        tensors[key] = np.ascontiguousarray(np.concatenate(arrays, axis=0), dtype=DTYPES[dtype])
        offsets[key] = np.cumsum([0] + [a.shape[0] for a in arrays]).tolist()
    meta = {"zsad.format": PART_FORMAT, "image_ids": json.dumps(list(image_ids)), "offsets": json.dumps(offsets),
            "dtype": dtype, **{k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}}
    return save(tensors, metadata=meta)


def write_part(folder_uri: str, features: list[dict[str, np.ndarray]], image_ids: list[str], metadata: dict[str, Any],
               storage: StorageOptions | None = None, dtype: str = "float32") -> dict[str, Any]:
    """Write one part into ``folder_uri``: returns its ``name``, ``bytes`` and ``sha256``."""
    data = encode_part(features, image_ids, {**metadata}, dtype)
    name = part_name(str(metadata.get("digest", "")), image_ids)
    write_atomic(fsio.join(folder_uri, name), data, storage)
    return {"name": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_manifest(uri: str, manifest: dict[str, Any], storage: StorageOptions | None = None,
                   clean: bool = True) -> dict[str, Any]:
    """Write a category's manifest (``parts``: [{name, bytes, sha256}], ``image_ids`` in bank order,
    ``digest``, ``precision``, ...) LAST, making the category complete; then delete the parts of
    its folder the manifest does not name (left by an interrupted build). Returns what was written."""
    data = {"zsad.format": MANIFEST_FORMAT, **manifest,
            "bytes": int(sum(int(p["bytes"]) for p in manifest["parts"]))}
    write_atomic(uri, json.dumps(data, indent=1, sort_keys=True).encode(), storage)
    if clean:
        named = {p["name"] for p in manifest["parts"]}
        fs, path = fsio.filesystem(uri, storage)
        try:
            for found in fs.ls(posixpath.dirname(path), detail=False):
                base = posixpath.basename(found)
                if base.startswith("part-") and base not in named:
                    fs.rm(found)
        except (OSError, FileNotFoundError):  # cleaning is a courtesy; the manifest is what counts
            pass
    return data


def read_manifest(uri: str, storage: StorageOptions | None = None) -> dict[str, Any]:
    """A category's manifest. Raises FileNotFoundError when there is none (the category is not
    complete) and :class:`BankError` when the file is not a zsad manifest."""
    try:
        raw = fsio.read_bytes(uri, storage)
    except FileNotFoundError:
        raise FileNotFoundError(uri) from None
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise BankError(f"bank manifest {uri}: not JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("zsad.format") != MANIFEST_FORMAT:
        got = data.get("zsad.format") if isinstance(data, dict) else None
        raise BankError(f"bank manifest {uri}: not a zsad bank manifest (format {got!r}, expected {MANIFEST_FORMAT!r})")
    return data


# --------------------------------------------------------------------------------------------
# reading (scoring actors)
# --------------------------------------------------------------------------------------------


def _header(path: str, size: int, what: str) -> tuple[dict[str, Any], int]:
    """(safetensors header, offset of the data) of a local file, checked against its size."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= size - 8:
            raise BankError(f"bank part {what}: not a safetensors file, or truncated ({size} bytes)")
        try:
            header = json.loads(fh.read(n))
        except ValueError as exc:
            raise BankError(f"bank part {what}: unreadable header ({exc})") from None
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise BankError(f"bank part {what}: truncated or padded: {size} bytes, its header describes {8 + n + end}")
    return header, 8 + n


def node_copy(uri: str, sha256: str, size: int, storage: StorageOptions | None, cache: str | None) -> str:
    """A local path for a part: the file itself, or (s3://) this node's cached copy, downloaded once
    (sha256 checked, written under a temporary name and renamed, so actors of one node share it)."""
    if not fsio.is_remote(uri):
        return fsio.filesystem(uri, storage)[1]
    from pipeline.io.weights import cache_dir

    folder = os.path.join(cache_dir(cache), "run-parts")
    path = os.path.join(folder, f"{sha256}.safetensors")
    if os.path.exists(path) and os.path.getsize(path) == size:
        return path
    fs, remote = fsio.filesystem(uri, storage)
    h = hashlib.sha256()
    try:
        with local_target(path) as tmp, open(tmp, "wb") as out, fs.open(remote, "rb") as src:
            while chunk := src.read(8 << 20):
                h.update(chunk)
                out.write(chunk)
            if h.hexdigest() != sha256:
                raise BankError(f"bank part {uri}: its content is not what the manifest names (sha256 "
                                f"{h.hexdigest()[:12]}... != {sha256[:12]}...): the file was replaced or truncated")
    except FileNotFoundError:
        raise BankError(f"bank part {uri}: no such file (the manifest names it)") from None
    return path


class StoredBank:
    """A complete bank or pool, opened from its manifest: digest checked, parts mapped (not read).

    ``image_ids`` are in bank order; :meth:`rows` gives one tensor's rows of an image range as one
    array (one copy, from the mapped parts); :attr:`image_bytes` is what one image's rows of the
    given keys take, for chunk sizes."""

    def __init__(self, uri: str, expected_digest: str | None, storage: StorageOptions | None = None,
                 cache: str | None = None) -> None:
        self.uri = uri
        try:
            self.manifest = read_manifest(uri, storage)
        except FileNotFoundError:
            raise BankError(f"bank {uri}: no such manifest (the bank was not built)") from None
        m = self.manifest
        if expected_digest is not None and m.get("digest") != expected_digest:
            raise BankError(
                f"bank {uri}: built for something else (digest {str(m.get('digest', '?'))[:12]}..., "
                f"this run's spec and images give {expected_digest[:12]}...): "
                "the model, the method, the precision or the images changed. "
                "Start a new run (another --run-id) to build it for the new spec"
            )
        self.image_ids: list[str] = list(m["image_ids"])
        self.precision: str | None = m.get("precision")
        self.nbytes = int(m.get("bytes", 0))
        folder = uri.rsplit("/", 1)[0]
        self._where: dict[str, tuple[int, int]] = {}  # image id -> (part, index in part)
        self._parts: list[dict[str, Any]] = []
        for p in m["parts"]:
            part_uri = fsio.join(folder, p["name"])
            try:
                path = node_copy(part_uri, p["sha256"], int(p["bytes"]), storage, cache)
                size = os.path.getsize(path)
            except FileNotFoundError:
                raise BankError(f"bank part {part_uri}: no such file (the manifest {uri} names it)") from None
            if size != int(p["bytes"]):
                raise BankError(
                    f"bank part {part_uri}: {size} bytes, the manifest says {p['bytes']}: truncated or replaced"
                )
            header, start = _header(path, size, part_uri)
            meta = header.get("__metadata__") or {}
            if meta.get("zsad.format") != PART_FORMAT:
                raise BankError(
                    f"bank part {part_uri}: not a zsad bank part (format {meta.get('zsad.format')!r}, "
                    f"expected {PART_FORMAT!r})"
                )
            if meta.get("digest") != m.get("digest") or meta.get("category") != m.get("category"):
                raise BankError(
                    f"bank part {part_uri}: belongs to another bank (category {meta.get('category')!r}, digest "
                    f"{str(meta.get('digest'))[:12]}...; the manifest: {m.get('category')!r}, "
                    f"{str(m.get('digest'))[:12]}...)"
                )
            ids = json.loads(meta["image_ids"])
            self._parts.append(
                {
                    "uri": part_uri,
                    "path": path,
                    "start": start,
                    "header": header,
                    "offsets": json.loads(meta["offsets"]),
                    "maps": {},
                }
            )
            for j, iid in enumerate(ids):
                self._where[iid] = (len(self._parts) - 1, j)
        missing = [i for i in self.image_ids if i not in self._where]
        if missing:
            raise BankError(f"bank {uri}: its parts lack {len(missing)} of its images (e.g. {missing[0]})")
        self.keys = sorted(k for k in self._parts[0]["header"] if k != "__metadata__") if self._parts else []

    def _map(self, part: dict[str, Any], key: str) -> np.ndarray:
        arr = part["maps"].get(key)
        if arr is None:
            info = part["header"].get(key)
            if info is None:
                raise BankError(f"bank part {part['uri']}: has no tensor {key!r}")
            b, e = (int(v) for v in info["data_offsets"])
            dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                raise BankError(
                    f"bank part {part['uri']}: tensor {key!r} has dtype {info['dtype']}, expected F32 or F16"
                )
            shape = tuple(int(s) for s in info["shape"])
            arr = (
                np.memmap(part["path"], dtype=dtype, mode="r", offset=part["start"] + b, shape=shape)
                if e > b
                else np.zeros(shape, dtype)
            )
            part["maps"][key] = arr
        return arr

    def row_shape(self, key: str) -> tuple[int, ...]:
        """The shape of one row of ``key`` (e.g. (patches, width) for a pool's ``layer<l>``)."""
        if not self._parts:
            return ()
        return tuple(int(s) for s in self._parts[0]["header"][key]["shape"][1:])

    def image_bytes(self, keys: list[str] | None = None) -> int:
        """Bytes of one image's rows of ``keys`` (all keys by default), from the first part."""
        if not self._parts:
            return 0
        part = self._parts[0]
        total = 0
        for key in keys or self.keys:
            arr = self._map(part, key)
            rows = part["offsets"][key][1] - part["offsets"][key][0]
            total += rows * (arr.nbytes // max(arr.shape[0], 1))
        return total

    def rows(self, key: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """The rows of ``key`` of the images ``[start, stop)`` in bank order, as one array (the stored dtype)."""
        ids = self.image_ids[start:stop]
        pieces: list[np.ndarray] = []
        run: tuple[int, int, int] | None = None  # (part, first index, last index + 1): consecutive images, one slice

        def flush() -> None:
            if run is not None:
                part = self._parts[run[0]]
                off = part["offsets"][key]
                pieces.append(self._map(part, key)[off[run[1]] : off[run[2]]])

        for iid in ids:
            p, j = self._where[iid]
            if run is not None and run[0] == p and run[2] == j:
                run = (p, run[1], j + 1)
            else:
                flush()
                run = (p, j, j + 1)
        flush()
        if not pieces:
            return np.zeros((0,), np.float32)
        return np.concatenate(pieces, axis=0) if len(pieces) > 1 else np.array(pieces[0])

    def load(self, keys: list[str] | None = None) -> dict[str, np.ndarray]:
        """Every image's rows of ``keys`` (all by default): {key: array} in bank order."""
        return {k: self.rows(k) for k in (keys or self.keys)}
