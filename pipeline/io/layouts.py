"""Dataset layouts -> the input manifest.

The driver lists an input URI once and turns it into the *input manifest*: a pandas DataFrame with
one row per image, sorted by ``uri``, with exactly the columns of :data:`MANIFEST_COLUMNS`:

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

Layouts (``DataSpec.layout``):

- ``folder``: every file under the URI whose extension is in ``DataSpec.extensions``
  (case-insensitive); hidden files and folders (names starting with '.') are skipped. The category
  is ``DataSpec.category`` if set, else the first sub-folder under the root, or the root's own name
  for files directly in it. Labels are unknown.
- ``mvtec``: an MVTec AD root (``ROOT/<category>/test/<defect>/<image>``) or a single category
  folder (``ROOT/test/<defect>/<image>``). Only the test split is listed; ``good`` is normal (0),
  every other defect folder anomalous (1). Masks are matched against one listing of
  ``ground_truth/<defect>/``: ``<stem>_mask.png`` (MVTec), else ``<stem>.png`` (VisA "1cls").
  ``DataSpec.category`` restricts the listing to that category.
- ``visa_1cls`` / ``mpdd``: MVTec-like trees, listed exactly like ``mvtec`` (the reorganised VisA
  "1cls" tree has ``test/{good,bad}`` and ``ground_truth/bad/<stem>.png``).
- ``btad``: ``ROOT/<category>/test/{ok,ko}/<image>`` (or a single category folder). ``ok`` is normal
  (0), ``ko`` anomalous (1); masks from ``ground_truth/ko/``: ``<stem>_mask.png``, ``<stem>.png``, or
  the same stem with another extension (e.g. ``.bmp``).
- ``visa``: the raw VisA tree (``ROOT/<object>/Data/Images/{Normal,Anomaly}/*.JPG``,
  ``ROOT/<object>/Data/Masks/Anomaly/*.png``) driven by ``ROOT/split_csv/1cls.csv`` (header
  ``object,split,label,image,mask``; image/mask relative to ROOT). Only ``split == test`` rows are
  listed; category = object; label ``normal`` -> 0, ``anomaly`` -> 1. An anomalous row without a mask,
  an unknown label, or an image/mask missing from the listing is an error naming the CSV row.
- ``manifest``: a ``.csv`` / ``.parquet`` / ``.pq`` file with columns ``uri``, ``category`` and
  optionally ``label`` (or ``gt_label``) and ``mask_uri``. Relative URIs are resolved against the
  manifest's folder. ``DataSpec.category`` keeps only that category. size/mtime/etag stay unknown
  (objects are not stat'ed one by one).
- ``auto``: :func:`detect_layout`.

Folder, MVTec-like and VisA inputs are listed with ONE recursive ``find(detail=True)`` call (one paginated
ListObjectsV2 on S3), which also yields size, mtime and ETag.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
from typing import Any, Iterable

import pandas as pd

from pipeline.config import DataSpec
from pipeline.io.fs import StorageError, StorageOptions, filesystem, is_remote, normalise, unstrip

__all__ = [
    "InputError",
    "MANIFEST_COLUMNS",
    "MANIFEST_EXTENSIONS",
    "detect_layout",
    "image_id_for",
    "list_inputs",
    "manifest_arrow_schema",
    "write_manifest",
]

MANIFEST_COLUMNS: tuple[str, ...] = ("uri", "image_id", "category", "gt_label", "mask_uri", "size", "mtime", "etag")
MANIFEST_EXTENSIONS: tuple[str, ...] = (".csv", ".parquet", ".pq")

_NORMAL_DEFECT = "good"
_BTAD_NORMAL = "ok"
_BTAD_ANOMALOUS = "ko"
_MVTEC_LIKE = ("mvtec", "visa_1cls", "mpdd")
_VISA_CSV = "split_csv/1cls.csv"
_VISA_COLUMNS = ("object", "split", "label", "image", "mask")
_VISA_LABELS = {"normal": 0, "anomaly": 1}
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


class InputError(ValueError):
    """An input that cannot be listed; the message names the URI and what is wrong with it."""


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def image_id_for(uri: str) -> str:
    """The image id of a URI: the first 16 hex characters of sha1(uri)."""
    return hashlib.sha1(uri.encode("utf-8")).hexdigest()[:16]


def _open(uri: str, storage: StorageOptions | None):
    try:
        fs, path = filesystem(uri, storage)
    except StorageError as exc:
        raise InputError(f"input {uri}: {exc}") from exc
    if is_remote(uri) and not path.strip("/"):
        raise InputError(f"input {uri}: no bucket given (expected scheme://bucket/prefix)")
    return fs, path


def _endpoint(fs: Any) -> str:
    endpoint = getattr(fs, "endpoint_url", None)
    if not endpoint:
        endpoint = (getattr(fs, "client_kwargs", None) or {}).get("endpoint_url")
    return endpoint or "the default AWS endpoint"


def _bucket(path: str) -> str:
    return path.split("/", 1)[0]


def _storage_failure(uri: str, fs: Any, path: str, exc: BaseException) -> InputError:
    """Translate a filesystem/botocore exception into an InputError with a message a user can act on."""
    text = str(exc) or type(exc).__name__
    name = type(exc).__name__
    remote = is_remote(uri)
    if isinstance(exc, FileNotFoundError):
        if remote and ("bucket does not exist" in text.lower() or "NoSuchBucket" in text):
            return InputError(f"input {uri}: bucket {_bucket(path)!r} does not exist")
        return InputError(f"input {uri}: no such file, folder or prefix")
    if isinstance(exc, PermissionError):
        return InputError(f"input {uri}: access denied ({text})")
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return InputError(
            f"input {uri}: no S3 credentials (set storage.access_key_id/secret_access_key, "
            f"AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or storage.anon: true) ({text})"
        )
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError") or isinstance(
        exc, (ConnectionError, TimeoutError)
    ):
        return InputError(f"input {uri}: cannot reach endpoint {_endpoint(fs)} ({text})")
    if isinstance(exc, NotADirectoryError):
        return InputError(f"input {uri}: not a folder ({text})")
    return InputError(f"input {uri}: cannot list ({name}: {text})")


def _is_storage_exception(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return True
    module = type(exc).__module__ or ""
    return module.startswith(("botocore", "aiobotocore", "aiohttp", "s3fs", "urllib3"))


def _listing(uri: str, storage: StorageOptions | None) -> tuple[Any, str, dict[str, dict[str, Any]]]:
    """One recursive listing: (fs, root path, {relative posix path: info}) of every file under uri.

    Raises InputError when the location does not exist, is a single file, or cannot be reached."""
    fs, root = _open(uri, storage)
    root = root.rstrip("/") or root
    try:
        found = fs.find(root, detail=True)
    except Exception as exc:  # botocore/aiohttp errors are not OSErrors
        if not _is_storage_exception(exc):
            raise
        raise _storage_failure(uri, fs, root, exc) from exc
    out: dict[str, dict[str, Any]] = {}
    for name, info in found.items():
        if info.get("type", "file") != "file" or name.endswith("/"):
            continue
        if name == root:
            raise InputError(
                f"input {uri}: is a single file; give a folder, or a manifest ending in "
                f"{'/'.join(MANIFEST_EXTENSIONS)}"
            )
        prefix = root.rstrip("/") + "/"
        if not name.startswith(prefix):
            continue
        out[name[len(prefix) :]] = info
    if not out:
        try:
            present = fs.isdir(root)
        except Exception as exc:
            if not _is_storage_exception(exc):
                raise
            raise _storage_failure(uri, fs, root, exc) from exc
        if not present:
            if is_remote(uri) and "/" in root:
                try:
                    fs.ls(_bucket(root))
                except FileNotFoundError:
                    raise InputError(f"input {uri}: bucket {_bucket(root)!r} does not exist") from None
                except Exception:  # reachability already proven by the find above
                    pass
            raise InputError(f"input {uri}: no such file, folder or prefix")
    return fs, root, out


def _hidden(parts: Iterable[str]) -> bool:
    return any(p.startswith(".") for p in parts)


def _has_extension(name: str, extensions: tuple[str, ...]) -> bool:
    lower = name.lower()
    return any(lower.endswith(ext.lower() if ext.startswith(".") else "." + ext.lower()) for ext in extensions)


def _ext_text(extensions: tuple[str, ...]) -> str:
    return ", ".join(extensions) if extensions else "(no extensions configured)"


def _stat(fs: Any, info: dict[str, Any]) -> tuple[int | None, float | None, str | None]:
    size = info.get("size")
    if size is None:
        size = info.get("Size")
    mtime: float | None = None
    raw = info.get("mtime")
    if raw is None:
        raw = info.get("LastModified") or info.get("last_modified")
    if raw is not None:
        if hasattr(raw, "timestamp"):
            mtime = float(raw.timestamp())
        else:
            try:
                mtime = float(raw)
            except (TypeError, ValueError):
                mtime = None
    etag = info.get("ETag") or info.get("etag")
    if etag is not None:
        etag = str(etag).strip('"') or None
    return (int(size) if size is not None else None), mtime, etag


def _row(fs: Any, root: str, rel: str, info: dict[str, Any], category: str, label: int | None, mask_uri: str | None) -> dict[str, Any]:
    """One manifest row for the listed file ``rel`` under ``root``."""
    size, mtime, etag = _stat(fs, info)
    return {"uri": _child_uri(fs, root, rel), "category": category, "gt_label": label, "mask_uri": mask_uri,
            "size": size, "mtime": mtime, "etag": etag}


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows -> manifest with the exact column contract, sorted by uri."""
    df = pd.DataFrame(
        {
            "uri": pd.Series([r["uri"] for r in rows], dtype=object),
            "image_id": pd.Series([image_id_for(r["uri"]) for r in rows], dtype=object),
            "category": pd.Series([r["category"] for r in rows], dtype=object),
            "gt_label": pd.Series([r.get("gt_label") for r in rows], dtype="Int64"),
            "mask_uri": pd.Series([r.get("mask_uri") for r in rows], dtype=object),
            "size": pd.Series([r.get("size") for r in rows], dtype="Int64"),
            "mtime": pd.Series([r.get("mtime") for r in rows], dtype="Float64"),
            "etag": pd.Series([r.get("etag") for r in rows], dtype=object),
        },
        columns=list(MANIFEST_COLUMNS),
    )
    return df.sort_values("uri", kind="stable").reset_index(drop=True)


def _child_uri(fs: Any, root: str, rel: str) -> str:
    return unstrip(fs, f"{root.rstrip('/')}/{rel}")


def _root_name(fs: Any, root: str) -> str:
    return posixpath.basename(root.rstrip("/")) or root.strip("/")


# --------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------


def _is_manifest_uri(uri: str) -> bool:
    return uri.lower().rstrip("/").endswith(MANIFEST_EXTENSIONS)


def _mvtec_shape(files: Iterable[str]) -> tuple[bool, set[str]]:
    """(root is itself a category folder, category folders below the root) from relative paths.

    A category folder is one with ``test/good/<file>``."""
    single = False
    categories: set[str] = set()
    for rel in files:
        parts = rel.split("/")
        if len(parts) == 3 and parts[0] == "test" and parts[1] == _NORMAL_DEFECT:
            single = True
        elif len(parts) == 4 and parts[1] == "test" and parts[2] == _NORMAL_DEFECT and not parts[0].startswith("."):
            categories.add(parts[0])
    return single, categories


def _btad_shape(files: Iterable[str]) -> bool:
    """True when some ``test/`` folder (at the root or one level down) holds ``ok/`` or ``ko/`` files."""
    for rel in files:
        parts = rel.split("/")
        if len(parts) in (3, 4) and parts[-3] == "test" and parts[-2] in (_BTAD_NORMAL, _BTAD_ANOMALOUS):
            if len(parts) == 3 or not parts[0].startswith("."):
                return True
    return False


def _detect(uri: str, files: Iterable[str]) -> str:
    files = list(files)
    if _VISA_CSV in files:
        return "visa"
    single, categories = _mvtec_shape(files)
    if single or categories:
        return "mvtec"
    return "btad" if _btad_shape(files) else "folder"


def detect_layout(uri: str, storage: StorageOptions | None = None) -> str:
    """``manifest`` for a URI ending in .csv/.parquet/.pq; ``visa`` for a folder with
    ``split_csv/1cls.csv``; ``mvtec`` for a folder with ``test/good/`` (a category folder) or whose
    sub-folders have one (an MVTec root); ``btad`` for one whose test folders hold ``ok/``/``ko/``;
    else ``folder``.

    Raises InputError when the folder does not exist or cannot be reached."""
    if _is_manifest_uri(uri):
        return "manifest"
    _, _, files = _listing(uri, storage)
    return _detect(uri, files)


# --------------------------------------------------------------------------------------------
# Folder
# --------------------------------------------------------------------------------------------


def _list_folder(uri: str, data: DataSpec, fs: Any, root: str, files: dict[str, dict[str, Any]]) -> pd.DataFrame:
    root_name = _root_name(fs, root)
    rows = []
    for rel, info in files.items():
        parts = rel.split("/")
        if _hidden(parts) or not _has_extension(parts[-1], data.extensions):
            continue
        category = data.category or (parts[0] if len(parts) > 1 else root_name)
        rows.append(_row(fs, root, rel, info, category, None, None))
    if not rows:
        raise InputError(
            f"input {uri}: no images found (looked for files ending in {_ext_text(data.extensions)}, "
            "case-insensitive; hidden files and folders skipped)"
        )
    return _frame(rows)


# --------------------------------------------------------------------------------------------
# MVTec
# --------------------------------------------------------------------------------------------


def _find_mask(masks: set[str], defect: str, filename: str, any_extension: bool) -> str | None:
    """The ground-truth mask (relative path) of test/<defect>/<filename>, or None."""
    stem = posixpath.splitext(filename)[0]
    for candidate in (f"ground_truth/{defect}/{stem}_mask.png", f"ground_truth/{defect}/{stem}.png"):
        if candidate in masks:
            return candidate
    if any_extension:
        folder = f"ground_truth/{defect}/"
        for rel in sorted(masks):
            if rel.startswith(folder) and "/" not in rel[len(folder) :]:
                mask_stem = posixpath.splitext(rel[len(folder) :])[0]
                if mask_stem in (stem, f"{stem}_mask"):
                    return rel
    return None


def _list_mvtec(
    uri: str,
    data: DataSpec,
    fs: Any,
    root: str,
    files: dict[str, dict[str, Any]],
    *,
    normal: str = _NORMAL_DEFECT,
    any_mask_extension: bool = False,
    name: str = "MVTec AD",
) -> pd.DataFrame:
    # Category folder -> {relative path inside it: info}
    has_test_here = any(rel.startswith("test/") for rel in files)
    by_category: dict[str, dict[str, dict[str, Any]]] = {}
    if has_test_here:
        name = _root_name(fs, root)
        by_category[name] = dict(files)
        prefixes = {name: ""}
    else:
        prefixes = {}
        for rel in files:
            parts = rel.split("/", 1)
            if len(parts) == 2 and not parts[0].startswith(".") and parts[1].startswith("test/"):
                by_category.setdefault(parts[0], {})
                prefixes[parts[0]] = parts[0] + "/"
        for rel, info in files.items():
            head, _, tail = rel.partition("/")
            if head in by_category and tail:
                by_category[head][tail] = info
    if not by_category:
        raise InputError(
            f"input {uri}: does not look like {'an' if name.startswith('MVTec') else 'a'} {name} tree (expected ROOT/<category>/test/<defect>/<image> "
            "or ROOT/test/<defect>/<image>; found no test/ folder)"
        )
    if data.category is not None:
        if data.category not in by_category:
            raise InputError(
                f"input {uri}: category {data.category!r} not found; available: {', '.join(sorted(by_category))}"
            )
        by_category = {data.category: by_category[data.category]}

    rows = []
    for category, entries in sorted(by_category.items()):
        prefix = prefixes[category]
        masks = {rel for rel in entries if rel.startswith("ground_truth/")}
        for rel, info in entries.items():
            parts = rel.split("/")
            if len(parts) != 3 or parts[0] != "test" or _hidden(parts):
                continue
            if not _has_extension(parts[2], data.extensions):
                continue
            defect, filename = parts[1], parts[2]
            label = 0 if defect == normal else 1
            mask_uri = None
            if label == 1:
                found = _find_mask(masks, defect, filename, any_mask_extension)
                if found is not None:
                    mask_uri = _child_uri(fs, root, prefix + found)
            rows.append(_row(fs, root, prefix + rel, info, category, label, mask_uri))
    if not rows:
        raise InputError(
            f"input {uri}: no test images found in the {name} tree (looked for test/<defect>/<image> with "
            f"extensions {_ext_text(data.extensions)}, case-insensitive)"
        )
    return _frame(rows)


# --------------------------------------------------------------------------------------------
# VisA (raw tree + split_csv/1cls.csv)
# --------------------------------------------------------------------------------------------


def _clean_rel(value: str) -> str:
    rel = posixpath.normpath(value.strip().replace("\\", "/"))
    return rel[2:] if rel.startswith("./") else rel


def _list_visa(uri: str, data: DataSpec, fs: Any, root: str, files: dict[str, dict[str, Any]]) -> pd.DataFrame:
    csv_uri = _child_uri(fs, root, _VISA_CSV)
    if _VISA_CSV not in files:
        raise InputError(f"input {uri}: not a raw VisA tree: {csv_uri} is missing")
    raw = _read_raw(fs, f"{root.rstrip('/')}/{_VISA_CSV}", csv_uri, failure_path=root)
    try:
        table = pd.read_csv(io.BytesIO(raw), dtype=str, keep_default_na=False)
    except Exception as exc:
        raise InputError(f"VisA split {csv_uri}: cannot parse ({type(exc).__name__}: {exc})") from exc
    table.columns = [str(c).strip().lower() for c in table.columns]
    missing = [c for c in _VISA_COLUMNS if c not in table.columns]
    if missing:
        raise InputError(
            f"VisA split {csv_uri}: missing column(s) {', '.join(missing)} "
            f"(expected header {','.join(_VISA_COLUMNS)}; has: {', '.join(table.columns) or 'no columns'})"
        )

    def where(i: int) -> str:
        return f"row {i + 1} (line {i + 2})"

    rows = []
    seen: dict[str, int] = {}
    available: set[str] = set()
    for i, record in enumerate(table.to_dict("records")):
        if str(record["split"]).strip().lower() != "test":
            continue
        category = str(record["object"]).strip()
        if not category:
            raise InputError(f"VisA split {csv_uri}: {where(i)}: empty object")
        available.add(category)
        if data.category is not None and category != data.category:
            continue
        label_text = str(record["label"]).strip().lower()
        if label_text not in _VISA_LABELS:
            raise InputError(
                f"VisA split {csv_uri}: {where(i)}: unknown label {record['label']!r} (expected normal or anomaly)"
            )
        label = _VISA_LABELS[label_text]
        if not str(record["image"]).strip():
            raise InputError(f"VisA split {csv_uri}: {where(i)}: empty image path")
        image = _clean_rel(str(record["image"]))
        if image not in files:
            raise InputError(f"VisA split {csv_uri}: {where(i)}: image {_child_uri(fs, root, image)} not found")
        mask_text = str(record["mask"]).strip()
        mask_uri = None
        if mask_text:
            mask = _clean_rel(mask_text)
            if mask not in files:
                raise InputError(f"VisA split {csv_uri}: {where(i)}: mask {_child_uri(fs, root, mask)} not found")
            mask_uri = _child_uri(fs, root, mask)
        elif label == 1:
            raise InputError(
                f"VisA split {csv_uri}: {where(i)}: anomalous image {image} has no mask listed "
                "(the mask column is empty)"
            )
        if image in seen:
            raise InputError(f"VisA split {csv_uri}: {where(i)}: duplicate image {image} (first at {where(seen[image])})")
        seen[image] = i
        rows.append(_row(fs, root, image, files[image], category, label, mask_uri))
    if data.category is not None and data.category not in available:
        raise InputError(
            f"input {uri}: category {data.category!r} not found in {csv_uri}; "
            f"available: {', '.join(sorted(available)) or 'none'}"
        )
    if not rows:
        raise InputError(f"input {uri}: no test rows in {csv_uri}")
    return _frame(rows)


# --------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------


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


def _read_raw(fs: Any, path: str, uri: str, failure_path: str | None = None) -> bytes:
    """Whole file as bytes; storage failures become an InputError naming ``uri``."""
    try:
        with fs.open(path, "rb") as fh:
            return fh.read()
    except Exception as exc:
        if not _is_storage_exception(exc):
            raise
        raise _storage_failure(uri, fs, failure_path or path, exc) from exc


def _read_table(uri: str, storage: StorageOptions | None) -> pd.DataFrame:
    fs, path = _open(uri, storage)
    raw = _read_raw(fs, path, uri)
    try:
        if uri.lower().rstrip("/").endswith(".csv"):
            return pd.read_csv(io.BytesIO(raw), dtype=str, keep_default_na=False)
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(raw)).to_pandas()
    except Exception as exc:
        raise InputError(f"input {uri}: cannot parse the manifest ({type(exc).__name__}: {exc})") from exc


def _list_manifest(uri: str, data: DataSpec, storage: StorageOptions | None) -> pd.DataFrame:
    if not _is_manifest_uri(uri):
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
    return _frame(rows)


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def list_inputs(uri: str, data: DataSpec, storage: StorageOptions | None = None) -> tuple[str, pd.DataFrame]:
    """List ``uri`` into the input manifest. Returns (layout used, manifest).

    ``storage`` are resolved storage options (:func:`pipeline.io.fs.storage_options`). Raises
    :class:`InputError` naming the URI when the location is missing or unreachable, holds no images,
    or is not a valid instance of the requested layout."""
    layout = data.layout
    if layout == "manifest" or (layout == "auto" and _is_manifest_uri(uri)):
        df = _list_manifest(uri, data, storage)
        layout = "manifest"
    else:
        fs, root, files = _listing(uri, storage)
        if layout == "auto":
            layout = _detect(uri, files)
        if layout in _MVTEC_LIKE:
            df = _list_mvtec(uri, data, fs, root, files)
        elif layout == "btad":
            df = _list_mvtec(
                uri, data, fs, root, files, normal=_BTAD_NORMAL, any_mask_extension=True, name="BTAD"
            )
        elif layout == "visa":
            df = _list_visa(uri, data, fs, root, files)
        elif layout == "folder":
            df = _list_folder(uri, data, fs, root, files)
        else:  # pragma: no cover - DataSpec validates the literal
            raise InputError(f"input {uri}: unknown layout {layout!r}")
    if data.max_images is not None:
        df = df.head(data.max_images).reset_index(drop=True)
    return layout, df


def manifest_arrow_schema():
    """The Arrow schema of the input manifest: the ``inputs`` table contract (schemas/inputs.yaml)."""
    from pipeline.io import contracts

    return contracts.load("inputs").schema


def write_manifest(df: pd.DataFrame, uri: str, storage: StorageOptions | None = None) -> None:
    """Write an input manifest as one contract-checked Parquet file at ``uri`` (local or s3://...)."""
    from pipeline.io.sinks import write_table

    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"cannot write manifest {uri}: missing column(s) {', '.join(missing)}")
    try:
        write_table(uri, df, "inputs", storage)
    except Exception as exc:
        if not _is_storage_exception(exc) or isinstance(exc, StorageError):
            raise
        raise StorageError(f"{uri}: cannot write manifest ({type(exc).__name__}: {exc})") from exc
