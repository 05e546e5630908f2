"""Dataset layouts -> the input manifest.

The driver lists an input URI once and turns it into the *input manifest* (one row per image, sorted
by ``uri``; columns and dtypes in :mod:`pipeline.io.manifest`). Each layout has a lister, registered
by name in :data:`LISTERS`; :func:`list_inputs` picks the one ``DataSpec.layout`` names (or the one
:func:`detect_layout` finds for ``auto``).

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
  optionally ``label`` (or ``gt_label``) and ``mask_uri``, listed by
  :func:`pipeline.io.manifest.list_manifest`.
- ``auto``: :func:`detect_layout`.

The MVTec-like and VisA listers take a ``split`` keyword (default ``test``); the few-shot reference
images (:mod:`pipeline.io.references`) are the ``train`` split's normal images.

Folder, MVTec-like and VisA inputs are read from ONE recursive listing of the input
(:func:`pipeline.io.listing.list_tree`: one paginated ListObjectsV2 on S3, which also yields size,
mtime and ETag).
"""

from __future__ import annotations

import io
import posixpath
from functools import partial
from typing import Any, Callable, Iterable

import pandas as pd

from pipeline.config import DataSpec
from pipeline.io.fs import InputError, StorageOptions, read_input_bytes
from pipeline.io.listing import (
    Tree,
    child_uri,
    extensions_text,
    has_extension,
    is_hidden,
    list_tree,
    manifest_row,
    root_name,
    skipped_counts,
)
from pipeline.io.manifest import is_manifest_uri, list_manifest, manifest_frame

__all__ = ["InputError", "LAYOUTS", "LISTERS", "detect_layout", "list_inputs"]

_NORMAL_DEFECT = "good"
_BTAD_NORMAL = "ok"
_BTAD_ANOMALOUS = "ko"
_VISA_CSV = "split_csv/1cls.csv"
_VISA_COLUMNS = ("object", "split", "label", "image", "mask")
_VISA_LABELS = {"normal": 0, "anomaly": 1}


# --------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------


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


def _detect(files: Iterable[str]) -> str:
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
    if is_manifest_uri(uri):
        return "manifest"
    return _detect(list_tree(uri, storage).files)


# --------------------------------------------------------------------------------------------
# Folder
# --------------------------------------------------------------------------------------------


def _list_folder(uri: str, data: DataSpec, tree: Tree) -> pd.DataFrame:
    fs, root, files = tree.fs, tree.root, tree.files
    own_name = root_name(root)
    rows = []
    for rel, info in files.items():
        parts = rel.split("/")
        if is_hidden(parts) or not has_extension(parts[-1], data.extensions):
            continue
        category = data.category or (parts[0] if len(parts) > 1 else own_name)
        rows.append(manifest_row(fs, root, rel, info, category, None, None))
    if not rows:
        raise InputError(
            f"input {uri}: no images found (looked for files ending in {extensions_text(data.extensions)}, "
            "case-insensitive; hidden files and folders skipped)"
        )
    return manifest_frame(rows)


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
    tree: Tree,
    *,
    normal: str = _NORMAL_DEFECT,
    any_mask_extension: bool = False,
    name: str = "MVTec AD",
    split: str = "test",
) -> pd.DataFrame:
    """An MVTec-like tree: ``normal`` is the defect folder of normal images; masks may have any
    extension when ``any_mask_extension`` (BTAD); ``name`` names the dataset in errors.

    ``split``: the split folder listed (``test``). Any other split (``train``: the few-shot
    reference images) lists only its ``normal`` folder, label 0, without masks; a category folder
    without that split is left out."""
    fs, root, files = tree.fs, tree.root, tree.files
    test = split == "test"
    shape = f"{split}/<defect>/<image>" if test else f"{split}/{normal}/<image>"
    # Category folder -> {relative path inside it: info}
    has_split_here = any(rel.startswith(f"{split}/") for rel in files)
    by_category: dict[str, dict[str, dict[str, Any]]] = {}
    if has_split_here:
        category = root_name(root)
        by_category[category] = dict(files)
        prefixes = {category: ""}
    else:
        prefixes = {}
        for rel in files:
            parts = rel.split("/", 1)
            if len(parts) == 2 and not parts[0].startswith(".") and parts[1].startswith(f"{split}/"):
                by_category.setdefault(parts[0], {})
                prefixes[parts[0]] = parts[0] + "/"
        for rel, info in files.items():
            head, _, tail = rel.partition("/")
            if head in by_category and tail:
                by_category[head][tail] = info
    if not by_category:
        raise InputError(
            f"input {uri}: does not look like {'an' if name.startswith('MVTec') else 'a'} {name} tree "
            f"(expected ROOT/<category>/{shape} or ROOT/{shape}; found no {split}/ folder)"
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
            if len(parts) != 3 or parts[0] != split or is_hidden(parts) or (not test and parts[1] != normal):
                continue
            if not has_extension(parts[2], data.extensions):
                continue
            defect, filename = parts[1], parts[2]
            label = 0 if defect == normal else 1
            mask_uri = None
            if label == 1:
                found = _find_mask(masks, defect, filename, any_mask_extension)
                if found is not None:
                    mask_uri = child_uri(fs, root, prefix + found)
            rows.append(manifest_row(fs, root, prefix + rel, info, category, label, mask_uri))
    if not rows:
        raise InputError(
            f"input {uri}: no {split} images found in the {name} tree (looked for {shape} with "
            f"extensions {extensions_text(data.extensions)}, case-insensitive)"
        )
    return manifest_frame(rows)


# --------------------------------------------------------------------------------------------
# VisA (raw tree + split_csv/1cls.csv)
# --------------------------------------------------------------------------------------------


def _clean_rel(value: str) -> str:
    rel = posixpath.normpath(value.strip().replace("\\", "/"))
    return rel[2:] if rel.startswith("./") else rel


def _list_visa(uri: str, data: DataSpec, tree: Tree, *, split: str = "test") -> pd.DataFrame:
    """The raw VisA tree: the rows of ``split_csv/1cls.csv`` whose split is ``split`` (``test``;
    ``train``: the few-shot reference images, which must all be labelled normal)."""
    fs, root, files = tree.fs, tree.root, tree.files
    csv_uri = child_uri(fs, root, _VISA_CSV)
    if _VISA_CSV not in files:
        raise InputError(f"input {uri}: not a raw VisA tree: {csv_uri} is missing")
    raw = read_input_bytes(fs, f"{root.rstrip('/')}/{_VISA_CSV}", csv_uri)
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
        if str(record["split"]).strip().lower() != split:
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
        if label == 1 and split != "test":
            raise InputError(
                f"VisA split {csv_uri}: {where(i)}: {split} image {record['image']!r} is labelled anomaly "
                f"(the {split} split must hold normal images only)"
            )
        if not str(record["image"]).strip():
            raise InputError(f"VisA split {csv_uri}: {where(i)}: empty image path")
        image = _clean_rel(str(record["image"]))
        if image not in files:
            raise InputError(f"VisA split {csv_uri}: {where(i)}: image {child_uri(fs, root, image)} not found")
        mask_text = str(record["mask"]).strip()
        mask_uri = None
        if mask_text:
            mask = _clean_rel(mask_text)
            if mask not in files:
                raise InputError(f"VisA split {csv_uri}: {where(i)}: mask {child_uri(fs, root, mask)} not found")
            mask_uri = child_uri(fs, root, mask)
        elif label == 1:
            raise InputError(
                f"VisA split {csv_uri}: {where(i)}: anomalous image {image} has no mask listed "
                "(the mask column is empty)"
            )
        if image in seen:
            raise InputError(
                f"VisA split {csv_uri}: {where(i)}: duplicate image {image} (first at {where(seen[image])})"
            )
        seen[image] = i
        rows.append(manifest_row(fs, root, image, files[image], category, label, mask_uri))
    if data.category is not None and data.category not in available:
        raise InputError(
            f"input {uri}: category {data.category!r} not found in {csv_uri}; "
            f"available: {', '.join(sorted(available)) or 'none'}"
        )
    if not rows:
        raise InputError(f"input {uri}: no {split} rows in {csv_uri}")
    return manifest_frame(rows)


# --------------------------------------------------------------------------------------------
# Registry and entry points
# --------------------------------------------------------------------------------------------

#: (uri, data spec, storage options, the input's listing when auto-detection already made it) -> input manifest.
Lister = Callable[[str, DataSpec, StorageOptions | None, Tree | None], pd.DataFrame]


def _from_tree(read_tree: Callable[[str, DataSpec, Tree], pd.DataFrame]) -> Lister:
    """The lister of a layout read from one recursive listing of the input folder (made here unless
    auto-detection already made it)."""

    def lister(uri: str, data: DataSpec, storage: StorageOptions | None, tree: Tree | None) -> pd.DataFrame:
        tree = tree or list_tree(uri, storage)
        df = read_tree(uri, data, tree)
        df.attrs["skipped"] = skipped_counts(tree, data, set(df["uri"]))
        return df

    return lister


def _manifest_file(uri: str, data: DataSpec, storage: StorageOptions | None, tree: Tree | None) -> pd.DataFrame:
    """The lister of layout ``manifest``: the input is one file, there is no listing to reuse."""
    return list_manifest(uri, data, storage)


#: Layout name -> lister (``DataSpec.layout``; ``auto`` is :func:`detect_layout`).
LISTERS: dict[str, Lister] = {
    "folder": _from_tree(_list_folder),
    "mvtec": _from_tree(_list_mvtec),
    "manifest": _manifest_file,
    "visa": _from_tree(_list_visa),
    "visa_1cls": _from_tree(_list_mvtec),
    "mpdd": _from_tree(_list_mvtec),
    "btad": _from_tree(partial(_list_mvtec, normal=_BTAD_NORMAL, any_mask_extension=True, name="BTAD")),
}
#: Every layout name an input may be given with: ``auto`` and the registered ones.
LAYOUTS: tuple[str, ...] = ("auto", *LISTERS)


def list_inputs(uri: str, data: DataSpec, storage: StorageOptions | None = None) -> tuple[str, pd.DataFrame]:
    """List ``uri`` into the input manifest. Returns (layout used, manifest).

    ``storage`` are resolved storage options (:func:`pipeline.io.fs.storage_options`). Raises
    :class:`InputError` naming the URI when the location is missing or unreachable, holds no images,
    is not a valid instance of the requested layout, or the layout is unknown."""
    layout = data.layout
    tree = None
    if layout == "auto":
        if is_manifest_uri(uri):
            layout = "manifest"
        else:
            tree = list_tree(uri, storage)
            layout = _detect(tree.files)
    lister = LISTERS.get(layout)
    if lister is None:
        raise InputError(f"input {uri}: unknown layout {layout!r} (known: {', '.join(LAYOUTS)})")
    df = lister(uri, data, storage, tree)
    if data.categories is not None:
        available = set(df["category"])
        unknown = [c for c in data.categories if c not in available]
        if unknown:
            raise InputError(
                f"input {uri}: categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(map(repr, unknown))} "
                f"not found; available: {', '.join(sorted(available))}"
            )
        attrs = df.attrs
        df = df[df["category"].isin(data.categories)].reset_index(drop=True)
        df.attrs = attrs
    if data.max_images is not None:
        df = df.head(data.max_images).reset_index(drop=True)
    return layout, df
