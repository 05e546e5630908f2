"""One recursive listing of an input folder, and the manifest rows of its files.

A dataset layout (:mod:`pipeline.io.layouts`) reads an input from ONE listing: :func:`list_tree`
makes it, with one recursive ``find(detail=True)`` call (one paginated ListObjectsV2 on S3, which
also yields size, mtime and ETag) or, for a local folder, a walk that follows symbolic links
(fsspec's ``find`` drops them). :func:`manifest_row` turns a listed file into an input-manifest row;
:func:`skipped_counts` says what of the listing a manifest left out, and why.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
from typing import Any, Iterable, NamedTuple

from pipeline.config import DataSpec
from pipeline.io.fs import (
    InputError,
    StorageOptions,
    bucket_name,
    is_remote,
    is_storage_exception,
    open_input,
    path_uri,
    storage_failure,
    unstrip,
)
from pipeline.io.manifest import MANIFEST_EXTENSIONS

__all__ = ["Tree", "child_uri", "extensions_text", "file_stat", "has_extension", "is_hidden", "list_tree",
           "manifest_row", "root_name", "skipped_counts", "walk_local"]


class Tree(NamedTuple):
    """One recursive listing of an input folder: the filesystem, the root path inside it and
    ``files``, {path relative to the root (posix): fsspec info} of every file below it (a link
    that cannot be followed is a file whose info carries ``list_error``: (type, message));
    ``skipped``: what the listing itself left out, by reason."""

    fs: Any
    root: str
    files: dict[str, dict[str, Any]]
    skipped: dict[str, int] = {}


def walk_local(root: str) -> tuple[dict[str, dict[str, Any]], dict[str, int]]:
    """Every file under the local folder ``root``, following symbolic links to files and folders.

    A folder reached twice (a link back to an ancestor, or two links to one folder) is walked once
    and counted as ``link_loop_folder``; a link that points nowhere is a file with ``list_error``
    ``BrokenLink``, one that loops (``ELOOP``) ``LinkLoop``."""
    files: dict[str, dict[str, Any]] = {}
    skipped: dict[str, int] = {}
    seen: set[tuple[int, int]] = set()

    def link_error(path: str, exc: OSError) -> tuple[str, str]:
        target = os.readlink(path)
        if exc.errno == errno.ELOOP:
            return "LinkLoop", f"{path_uri(path)}: symbolic link loop (-> {target})"
        return "BrokenLink", f"{path_uri(path)}: symbolic link to {target}, which does not exist"

    def walk(folder: str, prefix: str) -> None:
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:
            skipped["link_loop_folder"] = skipped.get("link_loop_folder", 0) + 1
            return
        seen.add((st.st_dev, st.st_ino))
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            rel = prefix + entry.name
            try:
                info = os.stat(entry.path)  # follows links
            except OSError as exc:
                if not entry.is_symlink():
                    raise
                files[rel] = {"type": "file", "list_error": link_error(entry.path, exc)}
                continue
            if stat.S_ISDIR(info.st_mode):
                walk(entry.path, rel + "/")
            elif stat.S_ISREG(info.st_mode):
                files[rel] = {"type": "file", "size": info.st_size, "mtime": info.st_mtime}

    walk(root, "")
    return files, skipped


def list_tree(uri: str, storage: StorageOptions | None) -> Tree:
    """One recursive listing of every file under uri.

    Raises InputError when the location does not exist, is a single file, or cannot be reached."""
    fs, root = open_input(uri, storage)
    root = root.rstrip("/") or root
    if not is_remote(uri) and os.path.isdir(root):  # local: follow links (fsspec's find drops them)
        try:
            files, skipped = walk_local(root)
        except OSError as exc:
            raise InputError(f"input {uri}: cannot be listed: {exc}") from exc
        return Tree(fs, root, files, skipped)
    try:
        found = fs.find(root, detail=True)
    except Exception as exc:  # botocore/aiohttp errors are not OSErrors
        if not is_storage_exception(exc):
            raise
        raise storage_failure(uri, fs, root, exc) from exc
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
            if not is_storage_exception(exc):
                raise
            raise storage_failure(uri, fs, root, exc) from exc
        if not present:
            if is_remote(uri) and "/" in root:
                try:
                    fs.ls(bucket_name(root))
                except FileNotFoundError:
                    raise InputError(f"input {uri}: bucket {bucket_name(root)!r} does not exist") from None
                except Exception:  # reachability already proven by the find above
                    pass
            raise InputError(f"input {uri}: no such file, folder or prefix")
    return Tree(fs, root, out)


def is_hidden(parts: Iterable[str]) -> bool:
    return any(p.startswith(".") for p in parts)


def has_extension(name: str, extensions: tuple[str, ...]) -> bool:
    lower = name.lower()
    return any(lower.endswith(ext.lower() if ext.startswith(".") else "." + ext.lower()) for ext in extensions)


def extensions_text(extensions: tuple[str, ...]) -> str:
    return ", ".join(extensions) if extensions else "(no extensions configured)"


def file_stat(info: dict[str, Any]) -> tuple[int | None, float | None, str | None]:
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


def manifest_row(fs: Any, root: str, rel: str, info: dict[str, Any], category: str, label: int | None,
                 mask_uri: str | None) -> dict[str, Any]:
    """One manifest row for the listed file ``rel`` under ``root``."""
    size, mtime, etag = file_stat(info)
    error_type, message = info.get("list_error") or (None, None)
    return {"uri": child_uri(fs, root, rel), "category": category, "gt_label": label, "mask_uri": mask_uri,
            "size": size, "mtime": mtime, "etag": etag, "list_error_type": error_type, "list_error_message": message}


def child_uri(fs: Any, root: str, rel: str) -> str:
    return unstrip(fs, f"{root.rstrip('/')}/{rel}")


def root_name(root: str) -> str:
    return posixpath.basename(root.rstrip("/")) or root.strip("/")


def skipped_counts(tree: Tree, data: DataSpec, listed: set[str]) -> dict[str, int]:
    """Files of the listing that are not in the manifest, by reason: ``hidden`` (a name starting
    with '.'), ``extension`` (not in ``data.extensions``), ``outside_layout`` (not an image of the
    layout's test split: masks, train images...), plus what the listing left out itself."""
    counts = dict(tree.skipped)
    for rel in tree.files:
        if child_uri(tree.fs, tree.root, rel) in listed:
            continue
        parts = rel.split("/")
        if is_hidden(parts):
            reason = "hidden"
        elif not has_extension(parts[-1], data.extensions):
            reason = "extension"
        else:
            reason = "outside_layout"
        counts[reason] = counts.get(reason, 0) + 1
    return counts
