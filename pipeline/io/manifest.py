"""The input manifest: one row per input image, listed once on the driver and stored as the
``inputs`` table (``RUN/inputs.parquet``, contract ``schemas/inputs.yaml``).

It is a pandas DataFrame sorted by ``uri`` with exactly the columns of :data:`MANIFEST_COLUMNS`:

=========  ==============  ========  ===========================================================
column     dtype           nullable  meaning
=========  ==============  ========  ===========================================================
uri        object (str)    no        full URI: absolute local path or ``s3://bucket/key``
image_id   object (str)    no        first 16 hex chars of sha1(uri) (deterministic)
category   object (str)    no        category name (folder name, MVTec category, manifest value)
gt_label   Int64           yes       1 anomalous, 0 normal, <NA> unknown
mask_uri   object (str)    yes       ground-truth mask URI, ``None`` when there is none
size       Int64           yes       object size in bytes (<NA> when not listed, e.g. manifests)
mtime      Float64         yes       modification time, seconds since the epoch (<NA> if unknown)
etag       object (str)    yes       S3 ETag without quotes; ``None`` for local files/manifests
=========  ==============  ========  ===========================================================

:func:`manifest_frame` builds it from rows (the dataset layouts of :mod:`pipeline.io.layouts` list
into it), :func:`write_manifest` writes it as one contract-checked Parquet file and
:func:`read_manifest` reads it back.

A *user* manifest is an input of layout ``manifest``: a ``.csv`` / ``.parquet`` / ``.pq`` file with
columns ``uri``, ``category`` and optionally ``label`` (or ``gt_label``) and ``mask_uri``.
:func:`list_manifest` turns it into the input manifest: relative URIs are resolved against the
manifest's folder, labels are 0/1, booleans or words (good/normal/ok, anomalous/anomaly/bad/defect;
empty for unknown), ``DataSpec.category`` keeps only that category, and size/mtime/etag stay unknown
(objects are not stat'ed one by one). A written input manifest is itself a valid user manifest.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
from typing import Any

import pandas as pd

from pipeline.config import DataSpec
from pipeline.io.fs import (
    InputError,
    StorageError,
    StorageOptions,
    filesystem,
    is_remote,
    is_storage_exception,
    normalise,
    open_input,
    read_input_bytes,
)

__all__ = [
    "MANIFEST_COLUMNS",
    "MANIFEST_EXTENSIONS",
    "image_id_for",
    "is_manifest_uri",
    "list_manifest",
    "manifest_frame",
    "read_manifest",
    "write_manifest",
]

MANIFEST_COLUMNS: tuple[str, ...] = ("uri", "image_id", "category", "gt_label", "mask_uri", "size", "mtime", "etag",
                                     "list_error_type", "list_error_message")
MANIFEST_EXTENSIONS: tuple[str, ...] = (".csv", ".parquet", ".pq")

_LABEL_WORDS = {
    "0": 0,
    "good": 0,
    "normal": 0,
    "ok": 0,
    "false": 0,
    "1": 1,
    "anomalous": 1,
    "anomaly": 1,
    "bad": 1,
    "defect": 1,
    "true": 1,
}
_EMPTY_WORDS = {"", "nan", "none", "null", "na", "<na>"}


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


def image_id_for(uri: str) -> str:
    """The image id of a URI: the first 16 hex characters of sha1(uri)."""
    return hashlib.sha1(uri.encode("utf-8")).hexdigest()[:16]


def _text(name: str) -> str:
    """A name from the file system as table text: bytes that are not UTF-8 (decoded with
    ``surrogateescape``) are written as ``\\xNN``."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return os.fsencode(name).decode("utf-8", "backslashreplace")


def manifest_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows (dicts with ``uri``, ``category`` and optionally ``gt_label``, ``mask_uri``, ``size``,
    ``mtime``, ``etag``) -> the input manifest with the exact column contract, sorted by uri."""
    df = pd.DataFrame(
        {
            "uri": pd.Series([r["uri"] for r in rows], dtype=object),
            "image_id": pd.Series([image_id_for(r["uri"]) for r in rows], dtype=object),
            "category": pd.Series([_text(r["category"]) for r in rows], dtype=object),
            "gt_label": pd.Series([r.get("gt_label") for r in rows], dtype="Int64"),
            "mask_uri": pd.Series([r.get("mask_uri") for r in rows], dtype=object),
            "size": pd.Series([r.get("size") for r in rows], dtype="Int64"),
            "mtime": pd.Series([r.get("mtime") for r in rows], dtype="Float64"),
            "etag": pd.Series([r.get("etag") for r in rows], dtype=object),
            "list_error_type": pd.Series([r.get("list_error_type") for r in rows], dtype=object),
            "list_error_message": pd.Series([r.get("list_error_message") for r in rows], dtype=object),
        },
        columns=list(MANIFEST_COLUMNS),
    )
    return df.sort_values("uri", kind="stable").reset_index(drop=True)


def write_manifest(df: pd.DataFrame, uri: str, storage: StorageOptions | None = None) -> None:
    """Write an input manifest as one contract-checked Parquet file at ``uri`` (local or s3://...)."""
    from pipeline.io.sinks import write_table

    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"cannot write manifest {uri}: missing column(s) {', '.join(missing)}")
    try:
        write_table(uri, df, "inputs", storage)
    except Exception as exc:
        if not is_storage_exception(exc) or isinstance(exc, StorageError):
            raise
        raise StorageError(f"{uri}: cannot write manifest ({type(exc).__name__}: {exc})") from exc


def read_manifest(uri: str, storage: StorageOptions | None = None) -> pd.DataFrame:
    """Read an input manifest written by :func:`write_manifest` (e.g. ``RUN/inputs.parquet``) back
    into a DataFrame; ``gt_label`` comes back as nullable ``Int64``."""
    import pyarrow.parquet as pq

    fs, path = filesystem(uri, storage)
    with fs.open(path, "rb") as fh:
        df = pq.read_table(fh).to_pandas()
    df["gt_label"] = df["gt_label"].astype("Int64")
    for column in ("list_error_type", "list_error_message"):  # added in version 2 of the contract
        if column not in df.columns:
            df[column] = pd.Series([None] * len(df), dtype=object)
    return df


# --------------------------------------------------------------------------------------------
# User manifests (layout ``manifest``)
# --------------------------------------------------------------------------------------------


def is_manifest_uri(uri: str) -> bool:
    """True for a URI naming a user manifest file (ending in .csv / .parquet / .pq)."""
    return uri.lower().rstrip("/").endswith(MANIFEST_EXTENSIONS)


def _is_empty(value: Any) -> bool:
    if value is None or value is pd.NA:
        return True
    if isinstance(value, float) and value != value:
        return True
    if isinstance(value, str) and value.strip().lower() in _EMPTY_WORDS:
        return True
    return False


def _parse_label(value: Any) -> int | None:
    """0/1 ints, booleans, or label words -> 0/1; empty/NaN -> None. Raises ValueError otherwise."""
    if _is_empty(value):
        return None
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return int(bool(value))
    if isinstance(value, (int, float)) or hasattr(value, "dtype"):
        number = float(value)
        if number in (0.0, 1.0):
            return int(number)
        raise ValueError(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _LABEL_WORDS:
            return _LABEL_WORDS[word]
        try:
            number = float(word)
        except ValueError:
            raise ValueError(value) from None
        if number in (0.0, 1.0):
            return int(number)
    raise ValueError(value)


def _resolve(value: str, base: str) -> str:
    """A manifest entry -> full URI; relative entries are resolved against the manifest's folder."""
    value = value.strip()
    if is_remote(value) or value.startswith("file://") or os.path.isabs(value):
        return normalise(value)
    if is_remote(base):
        scheme, rest = base.split("://", 1)
        bucket, _, key = rest.partition("/")
        joined = posixpath.normpath(posixpath.join("/" + key, value)).lstrip("/")
        return f"{scheme}://{bucket}/{joined}" if joined else f"{scheme}://{bucket}"
    return os.path.normpath(os.path.join(base, value))


def _read_table(uri: str, storage: StorageOptions | None) -> pd.DataFrame:
    fs, path = open_input(uri, storage)
    raw = read_input_bytes(fs, path, uri)
    try:
        if uri.lower().rstrip("/").endswith(".csv"):
            return pd.read_csv(io.BytesIO(raw), dtype=str, keep_default_na=False)
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(raw)).to_pandas()
    except Exception as exc:
        raise InputError(f"input {uri}: cannot parse the manifest ({type(exc).__name__}: {exc})") from exc


def list_manifest(
    uri: str, data: DataSpec, storage: StorageOptions | None = None, *, normal_only: bool = False
) -> pd.DataFrame:
    """The user manifest at ``uri`` -> the input manifest (see the module docstring).

    Raises :class:`InputError` naming the file (and the row: 1-based, plus the line for CSV) for a
    missing file or column, an empty uri or category, an invalid label, a duplicate uri, an unknown
    ``data.category`` or a manifest without rows; with ``normal_only`` (the few-shot reference
    images), also for a row labelled anomalous."""
    if not is_manifest_uri(uri):
        raise InputError(f"input {uri}: a manifest must be a file ending in {', '.join(MANIFEST_EXTENSIONS)}")
    table = _read_table(uri, storage)
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in ("uri", "category") if c not in table.columns]
    if missing:
        raise InputError(
            f"manifest {uri}: missing required column(s) {', '.join(missing)} "
            f"(has: {', '.join(table.columns) or 'no columns'})"
        )
    label_col = "label" if "label" in table.columns else ("gt_label" if "gt_label" in table.columns else None)
    full = normalise(uri)
    base = posixpath.dirname(full) if is_remote(full) else os.path.dirname(full)
    csv = full.lower().endswith(".csv")

    def where(i: int) -> str:
        return f"row {i + 1}" + (f" (line {i + 2})" if csv else "")

    rows = []
    seen: dict[str, int] = {}
    for i, record in enumerate(table.to_dict("records")):
        raw_uri = record["uri"]
        if _is_empty(raw_uri):
            raise InputError(f"manifest {uri}: {where(i)}: empty uri")
        category = record["category"]
        if _is_empty(category):
            raise InputError(f"manifest {uri}: {where(i)}: empty category")
        label = None
        if label_col is not None:
            try:
                label = _parse_label(record[label_col])
            except ValueError:
                raise InputError(
                    f"manifest {uri}: {where(i)}: invalid {label_col} {record[label_col]!r} (expected 0/1, "
                    "true/false, good/normal/ok or anomalous/anomaly/bad/defect, or empty for unknown)"
                ) from None
            if normal_only and label == 1:
                raise InputError(
                    f"manifest {uri}: {where(i)}: {record['uri']!r} is labelled anomalous ({label_col} "
                    f"{record[label_col]!r}); reference images must be normal (0/good/normal/ok, or empty)"
                )
        mask = record.get("mask_uri")
        full_uri = _resolve(str(raw_uri), base)
        if full_uri in seen:
            raise InputError(f"manifest {uri}: {where(i)}: duplicate uri {full_uri} (first at {where(seen[full_uri])})")
        seen[full_uri] = i
        rows.append(
            {
                "uri": full_uri,
                "category": str(category).strip(),
                "gt_label": label,
                "mask_uri": None if _is_empty(mask) else _resolve(str(mask), base),
            }
        )
    if data.category is not None:
        available = sorted({r["category"] for r in rows})
        rows = [r for r in rows if r["category"] == data.category]
        if not rows and available:
            raise InputError(
                f"manifest {uri}: category {data.category!r} not found; available: {', '.join(available)}"
            )
    if not rows:
        raise InputError(f"manifest {uri}: no images found (the manifest has no rows)")
    return manifest_frame(rows)
