"""Incremental runs (``skip_scored``): which input files earlier runs under an output root already
scored ok, by file version ``(uri, size, etag or else mtime)``."""

from __future__ import annotations

import posixpath

import pandas as pd
import pyarrow.parquet as pq

from pipeline.io import fs as fsio
from pipeline.io.manifest import read_manifest


def file_key(row) -> tuple:
    """Identity of an input file version: (uri, size, etag or else mtime)."""
    version = row.etag if isinstance(row.etag, str) and row.etag else (None if pd.isna(row.mtime) else float(row.mtime))
    return (row.uri, None if pd.isna(row.size) else int(row.size), version)


def scored_keys(root: str, storage, exclude: str | None = None) -> set[tuple]:
    """(uri, size, etag|mtime) of every image scored ok by the runs under ``root`` (finished or
    interrupted: only shards with a done marker have score files)."""
    fs, path = fsio.filesystem(fsio.normalise(root), storage)
    keys: set[tuple] = set()
    try:
        plans = fs.glob(posixpath.join(path, "*", "_plan.json"))
    except FileNotFoundError:
        return keys
    for plan in plans:
        run = posixpath.dirname(plan)
        if exclude and fsio.normalise(fsio.unstrip(fs, run)) == fsio.normalise(exclude):
            continue
        try:
            inputs = read_manifest(fsio.unstrip(fs, posixpath.join(run, "inputs.parquet")), storage)
        except FileNotFoundError:
            continue
        ok: set[str] = set()
        for f in fs.glob(posixpath.join(run, "scores", "*.parquet")):
            with fs.open(f, "rb") as fh:
                t = pq.read_table(fh, columns=["image_id", "status"]).to_pandas()
            ok.update(t.loc[t["status"] == "ok", "image_id"])
        keys.update(file_key(r) for r in inputs.itertuples() if r.image_id in ok)
    return keys


def unscored(manifest: pd.DataFrame, root: str, storage, exclude: str | None = None) -> pd.DataFrame:
    """The rows of ``manifest`` that no run under ``root`` (but ``exclude``) scored ok."""
    scored = scored_keys(root, storage, exclude=exclude)
    keep = [file_key(r) not in scored for r in manifest.itertuples()]
    return manifest[keep].reset_index(drop=True)
