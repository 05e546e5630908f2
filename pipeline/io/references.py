"""Few-shot reference images: the normal images per category that a few-shot method compares the
images it scores with (``few_shot.reference``, ``--reference``).

:func:`list_references` lists every candidate reference image under a URI into the input-manifest
format (:func:`pipeline.io.manifest.manifest_frame`); :func:`choose_references` chooses ``k`` of them
per category, deterministically from a seed; :func:`references_digest` fingerprints the choice per
category (e.g. to key a memory bank); :func:`write_references` / :func:`read_references` store it as
``RUN/references.parquet``.

Layouts (:data:`REFERENCE_LAYOUTS`):

- ``folder``: one sub-folder per category (``ROOT/<category>/.../<image>``); the category is the
  first sub-folder under the root, or the root's own name for files directly in it. Every file whose
  extension is in ``extensions`` (case-insensitive) is a candidate; hidden files and folders are
  skipped. Labels are unknown (<NA>).
- ``mvtec`` / ``visa_1cls`` / ``mpdd``: an MVTec-like root (``ROOT/<category>/train/good/<image>``) or
  a single category folder (``ROOT/train/good/<image>``): the train split's normal images only (label
  0). A full dataset tree (with ``test/`` and ``ground_truth/`` too) is fine; a category without
  ``train/good/`` has no candidates.
- ``btad``: the same with ``train/ok/``.
- ``visa``: the raw VisA tree: the ``split == train`` rows of ``ROOT/split_csv/1cls.csv`` (which must
  all be labelled normal).
- ``manifest``: a ``.csv`` / ``.parquet`` / ``.pq`` file with columns ``uri``, ``category`` and
  optionally ``label`` (or ``gt_label``), read by :func:`pipeline.io.manifest.list_manifest`; a row
  labelled anomalous is an error naming the row. Labels are kept (0, or <NA> where empty).
- ``auto``: :func:`_detect_references`.

Errors are :class:`~pipeline.io.fs.InputError` naming the reference URI (``reference URI: ...``).

The chosen frame (:data:`REFERENCE_COLUMNS`) has one row per (category, shot):

=========  ==============  ==============================================================
column     dtype           meaning
=========  ==============  ==============================================================
category   object (str)    category of the images it is a reference for
shot       int64           0..k-1: the order in which it was drawn
uri        object (str)    the reference image (the same one may repeat with replacement)
image_id   object (str)    :func:`pipeline.io.manifest.image_id_for` of ``uri``
etag       object (str)    ETag as listed (``None`` for local files)
size       Int64           size in bytes as listed (<NA> when unknown, e.g. manifests)
mtime      Float64         modification time as listed (<NA> when unknown)
=========  ==============  ==============================================================
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import zlib
from typing import Any, Iterable

import numpy as np
import pandas as pd

from pipeline.config import DataSpec
from pipeline.io.atomic import file_target
from pipeline.io.fs import InputError, StorageOptions, filesystem, is_remote
from pipeline.io.layouts import (
    _BTAD_NORMAL,
    _NORMAL_DEFECT,
    _VISA_CSV,
    _list_folder,
    _list_mvtec,
    _list_visa,
)
from pipeline.io.listing import list_tree, skipped_counts
from pipeline.io.manifest import is_manifest_uri, list_manifest

__all__ = [
    "REFERENCE_COLUMNS",
    "REFERENCE_FILE",
    "REFERENCE_LAYOUTS",
    "choose_references",
    "list_references",
    "read_references",
    "references_digest",
    "write_references",
]

REFERENCE_LAYOUTS: tuple[str, ...] = ("auto", "folder", "mvtec", "visa", "visa_1cls", "mpdd", "btad", "manifest")
REFERENCE_COLUMNS: tuple[str, ...] = ("category", "shot", "uri", "image_id", "etag", "size", "mtime")
#: File name of the chosen references inside a run folder.
REFERENCE_FILE = "references.parquet"

_DATASET_NAMES = {"mvtec": "MVTec AD", "visa_1cls": "VisA 1cls", "mpdd": "MPDD", "btad": "BTAD"}


# --------------------------------------------------------------------------------------------
# Listing
# --------------------------------------------------------------------------------------------


def _as_reference_error(exc: InputError) -> InputError:
    """An InputError raised by the input listers, reworded for a reference URI."""
    text = str(exc)
    if text.startswith("input "):
        text = "reference " + text[len("input ") :]
    elif text.startswith("manifest "):
        text = "reference " + text
    return InputError(text)


def _train_normal_shape(files: Iterable[str], normal: str) -> bool:
    """True when ``train/<normal>/`` holds a file, at the root or in a (not hidden) sub-folder."""
    for rel in files:
        parts = rel.split("/")
        if len(parts) == 3 and parts[0] == "train" and parts[1] == normal:
            return True
        if len(parts) == 4 and parts[1] == "train" and parts[2] == normal and not parts[0].startswith("."):
            return True
    return False


def _detect_references(files: Iterable[str]) -> str:
    """The reference layout of a folder from the relative paths of its files: ``visa`` when it has
    ``split_csv/1cls.csv``; ``mvtec`` when it (or a sub-folder) has ``train/good/``; ``btad`` when it
    (or a sub-folder) has ``train/ok/``; else ``folder``."""
    files = list(files)
    if _VISA_CSV in files:
        return "visa"
    if _train_normal_shape(files, _NORMAL_DEFECT):
        return "mvtec"
    if _train_normal_shape(files, _BTAD_NORMAL):
        return "btad"
    return "folder"


def list_references(
    uri: str,
    layout: str = "auto",
    storage: StorageOptions | None = None,
    extensions: tuple[str, ...] = DataSpec().extensions,
) -> tuple[str, pd.DataFrame]:
    """Every candidate normal reference image under ``uri`` (see the module docstring). Returns
    (layout used, frame in the input-manifest format of :func:`pipeline.io.manifest.manifest_frame`,
    sorted by uri; ``gt_label`` 0 for dataset trees, <NA> for folders and unlabelled manifest rows).

    ``storage`` are resolved storage options (:func:`pipeline.io.fs.storage_options`). Raises
    :class:`InputError` ("reference URI: ...") when the layout is unknown, the location is missing or
    unreachable, holds no reference images, or a reference is labelled anomalous."""
    if layout not in REFERENCE_LAYOUTS:
        raise InputError(f"reference {uri}: unknown layout {layout!r} (known: {', '.join(REFERENCE_LAYOUTS)})")
    try:
        if layout == "manifest" or (layout == "auto" and is_manifest_uri(uri)):
            return "manifest", list_manifest(uri, DataSpec(layout="manifest"), storage, normal_only=True)
        tree = list_tree(uri, storage)
        if layout == "auto":
            layout = _detect_references(tree.files)
        data = DataSpec(layout=layout, extensions=tuple(extensions))
        if layout == "folder":
            df = _list_folder(uri, data, tree)
        elif layout == "visa":
            df = _list_visa(uri, data, tree, split="train")
        else:
            normal = _BTAD_NORMAL if layout == "btad" else _NORMAL_DEFECT
            df = _list_mvtec(uri, data, tree, normal=normal, name=_DATASET_NAMES[layout], split="train")
    except InputError as exc:
        raise _as_reference_error(exc) from exc
    df.attrs["skipped"] = skipped_counts(tree, data, set(df["uri"]))
    return layout, df


# --------------------------------------------------------------------------------------------
# Choice
# --------------------------------------------------------------------------------------------


def _rng(seed: int, category: str) -> np.random.Generator:
    """The generator of one category's choice: seeded from (seed, crc32 of the category's UTF-8), so
    a category's choice does not depend on the other categories."""
    return np.random.default_rng([seed % 2**64, zlib.crc32(category.encode("utf-8", "surrogateescape"))])


def _chosen_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(
        {
            "category": pd.Series([r["category"] for r in rows], dtype=object),
            "shot": pd.Series([r["shot"] for r in rows], dtype="int64"),
            "uri": pd.Series([r["uri"] for r in rows], dtype=object),
            "image_id": pd.Series([r["image_id"] for r in rows], dtype=object),
            "etag": pd.Series([r["etag"] for r in rows], dtype=object),
            "size": pd.Series([r["size"] for r in rows], dtype="Int64"),
            "mtime": pd.Series([r["mtime"] for r in rows], dtype="Float64"),
        },
        columns=list(REFERENCE_COLUMNS),
    )
    return df.sort_values(["category", "shot"], kind="stable").reset_index(drop=True)


def _value(value: Any) -> Any:
    return None if value is None or value is pd.NA or (isinstance(value, float) and value != value) else value


def torch_randint_draws(seed: int) -> Any:
    """A function ``draw(n, k)`` giving what ``torch.randint(0, n, (k,))`` gives after
    ``torch.manual_seed(seed)``, call after call, without torch: torch's CPU generator is the
    32-bit Mersenne Twister seeded by ``init_genrand(seed)`` (numpy's ``RandomState(seed)`` is the
    same generator, seeded the same way), and its ``randint`` for a range below 2^32 is one raw
    32-bit draw modulo the range per value."""
    state = np.random.RandomState(int(seed))

    def draw(n: int, k: int) -> np.ndarray:
        return state.randint(0, 2**32, size=k, dtype=np.uint64) % np.uint64(n)

    return draw


def torch_shuffle_order(seed: int, n: int) -> list[int]:
    """The order in which a ``torch.utils.data.DataLoader(shuffle=True)`` over ``n`` items yields
    them when its iterator is created right after ``torch.manual_seed(seed)`` (FADE's reference
    draw): creating the iterator takes one int64 from the global generator (the workers' base seed),
    the ``RandomSampler`` takes the next one as the seed of its own generator, and the order is
    ``torch.randperm(n)`` under that generator."""
    import torch

    start = torch.Generator().manual_seed(int(seed))
    torch.empty((), dtype=torch.int64).random_(generator=start)  # the iterator's base seed
    sampler_seed = int(torch.empty((), dtype=torch.int64).random_(generator=start).item())
    return torch.randperm(n, generator=torch.Generator().manual_seed(sampler_seed)).tolist()


def choose_references(
    candidates: pd.DataFrame, categories: list[str], k: int, seed: int, with_replacement: bool = False,
    sampler: str = "numpy",
) -> tuple[pd.DataFrame, list[str]]:
    """Choose ``k`` references per category of ``categories`` (the categories of the images to score)
    among ``candidates`` (a frame of :func:`list_references`).

    A category's candidates are sorted by uri first, so its choice depends only on the set of files,
    ``seed`` and the category's name (not on the other categories). Without replacement, ``k``
    distinct images are drawn (a category with fewer candidates is an error); with replacement
    (APRIL-GAN's sampler), ``k`` uniform draws, duplicates allowed. Candidates listed with an error
    (``list_error_type``, e.g. a broken link) and categories not in ``categories`` are ignored.

    ``sampler`` ``torch_randint`` (with replacement): one stream for the run, as ``torch.randint``
    after ``torch.manual_seed(seed)``, drawn for the categories in alphabetical order
    (:func:`torch_randint_draws`; APRIL-GAN's draw). ``torch_shuffle`` (without replacement): per
    category, the first ``k`` of what a shuffling torch DataLoader yields after
    ``torch.manual_seed(seed)`` (:func:`torch_shuffle_order`; FADE's draw).

    Returns (chosen frame with the columns :data:`REFERENCE_COLUMNS`, sorted by category then shot;
    the categories of ``categories`` without any candidate, in their given order)."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    usable = candidates
    if "list_error_type" in usable.columns:
        usable = usable[usable["list_error_type"].isna()]
    by_category = {c: group for c, group in usable.groupby("category", sort=False)}
    rows: list[dict[str, Any]] = []
    missing: list[str] = []
    torch_draw = torch_randint_draws(seed) if sampler == "torch_randint" else None
    order = sorted(dict.fromkeys(categories)) if torch_draw is not None else list(dict.fromkeys(categories))
    for category in order:
        group = by_category.get(category)
        if group is None or len(group) == 0:
            missing.append(category)
            continue
        group = group.drop_duplicates("uri").sort_values("uri", kind="stable")
        n = len(group)
        if k == 0:
            continue
        rng = _rng(seed, category)
        if torch_draw is not None:
            picks = torch_draw(n, k)
        elif with_replacement:
            picks = rng.integers(0, n, size=k)
        else:
            if n < k:
                raise InputError(
                    f"reference: category {category!r} has {n} candidate reference image{'s' if n != 1 else ''}, "
                    f"fewer than few_shot.k = {k}; set few_shot.with_replacement: true, or a smaller few_shot.k"
                )
            picks = (
                torch_shuffle_order(seed, n)[:k] if sampler == "torch_shuffle" else rng.choice(n, size=k, replace=False)
            )
        records = group.to_dict("records")
        for shot, index in enumerate(picks):
            record = records[int(index)]
            rows.append(
                {
                    "category": category,
                    "shot": shot,
                    "uri": record["uri"],
                    "image_id": record["image_id"],
                    "etag": _value(record.get("etag")),
                    "size": _value(record.get("size")),
                    "mtime": _value(record.get("mtime")),
                }
            )
    missing = [c for c in dict.fromkeys(categories) if c in set(missing)]  # in their given order
    return _chosen_frame(rows), missing


def references_digest(chosen: pd.DataFrame) -> dict[str, str]:
    """{category: sha256 hex of its chosen (shot, uri, etag) rows, in shot order}. Stable; it changes
    when a chosen file or its ETag changes. A row without an ETag (local files) also hashes its size
    and mtime, so a replaced local file changes it too."""
    out: dict[str, str] = {}
    for category, group in chosen.groupby("category", sort=True):
        h = hashlib.sha256()
        for record in group.sort_values("shot", kind="stable").to_dict("records"):
            etag = _value(record["etag"])
            key: list[Any] = [int(record["shot"]), record["uri"], etag]
            if etag is None:
                size, mtime = _value(record["size"]), _value(record["mtime"])
                key += [None if size is None else int(size), None if mtime is None else float(mtime)]
            h.update(json.dumps(key, ensure_ascii=True).encode("ascii") + b"\n")
        out[str(category)] = h.hexdigest()
    return out


# --------------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------------


def _file_uri(uri: str) -> str:
    """``uri`` itself when it names a .parquet file, else :data:`REFERENCE_FILE` inside it."""
    if uri.lower().rstrip("/").endswith(".parquet"):
        return uri
    return posixpath.join(uri.rstrip("/"), REFERENCE_FILE) if is_remote(uri) else os.path.join(uri, REFERENCE_FILE)


def write_references(chosen: pd.DataFrame, uri: str, storage: StorageOptions | None = None) -> None:
    """Write the chosen references as one Parquet file: ``uri`` itself when it ends in ``.parquet``
    (e.g. ``RUN/references.parquet``), else :data:`REFERENCE_FILE` inside the folder ``uri``. Local
    writes are atomic (temp file + rename); object storage gets a single PUT."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    missing = [c for c in REFERENCE_COLUMNS if c not in chosen.columns]
    if missing:
        raise ValueError(f"cannot write references {uri}: missing column(s) {', '.join(missing)}")
    frame = _chosen_frame(
        [{c: _value(v) for c, v in r.items()} for r in chosen[list(REFERENCE_COLUMNS)].to_dict("records")]
    )
    table = pa.Table.from_pandas(frame, preserve_index=False)
    with file_target(_file_uri(uri), storage) as tmp:
        pq.write_table(table, tmp)


def read_references(uri: str, storage: StorageOptions | None = None) -> pd.DataFrame:
    """Read references written by :func:`write_references` (``uri`` as there) back into the chosen
    frame, with the same columns and dtypes."""
    import pyarrow.parquet as pq

    fs, path = filesystem(_file_uri(uri), storage)
    with fs.open(path, "rb") as fh:
        df = pq.read_table(fh).to_pandas()
    out = pd.DataFrame(
        {
            "category": df["category"].astype(object),
            "shot": df["shot"].astype("int64"),
            "uri": df["uri"].astype(object),
            "image_id": df["image_id"].astype(object),
            "etag": df["etag"].astype(object).where(df["etag"].notna(), None),
            "size": df["size"].astype("Int64"),
            "mtime": df["mtime"].astype("Float64"),
        },
        columns=list(REFERENCE_COLUMNS),
    )
    return out.reset_index(drop=True)
