"""Re-scoring passes after the streaming plan, on the workers: RsCIN (MuSc) and APRIL-GAN's
transductive image score (ARCHITECTURE.md "passes over a whole category").

Both need every image of a category scored, and both are computed where the data is, never in the
driver:

1. **Per-category tasks** (:func:`category_values`): one Ray task per category (RsCIN: per query
   chunk of ``mutual.rscin_chunk`` rows of a larger category) reads that category's rows of the
   scores shards (and, for RsCIN, of the embeddings shards; Parquet filters on ``category``),
   computes the values (:func:`pipeline.models.mutual.rscin`, exact k-NN against the whole
   category; :func:`transductive_scores`) and writes them to a side table,
   ``RUN/rescore/<pass>/<category>/chunk-<first row>.parquet`` (image_id, value), atomically, with
   the digest of its inputs in the file's metadata. A side table whose digest matches (a resumed
   run) is reused, not recomputed.
2. **Per-shard tasks** (:func:`rewrite_shard`): each scores shard reads the side tables of the
   categories it holds and is rewritten whole (locally a temporary file renamed over it; on an
   object store one PUT) with the column filled (``score_rscin`` / ``score_transductive``; with
   ``mutual.score: rscin`` also ``score``). Rewriting twice gives the same file.

The driver schedules the tasks (:func:`pipeline.runtime.executors.run_tasks`) and adds up what they
return: counts, never values.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io import contracts
from pipeline.io import fs as fsio
from pipeline.io.fs import StorageOptions
from pipeline.runtime.passes import CategoryPass

Log = Callable[[str], None]


@dataclass(frozen=True)
class Rescore:
    """One re-scoring: its name (folder under ``RUN/rescore/``), the scores column it fills, whether
    ``score`` takes the value too, and its parameters (RsCIN: ``k_list``)."""

    name: str
    column: str
    also_score: bool = False
    k_list: tuple[int, ...] = ()
    chunk: int = 0  # RsCIN: query rows per task (0: the whole category in one task)


def side_uri(run_dir: str, name: str, category: str, first: int) -> str:
    return fsio.join(run_dir, "rescore", name, quote(category, safe=""), f"chunk-{first:09d}.parquet")


def transductive_scores(scores: pd.DataFrame) -> pd.Series:
    """0.5 * (score_language + per-category min-max of score_fewshot over the category's scored
    images, normal and anomalous alike), as APRIL-GAN's evaluation computes its few-shot image
    score. A category whose images all share one score_fewshot gets normalised values of 0
    (the reference would divide by zero). Rows without score_fewshot stay null."""
    out = pd.Series(np.nan, index=scores.index)
    ok = scores["score_fewshot"].notna()
    for _, idx in scores[ok].groupby("category").groups.items():
        v = scores.loc[idx, "score_fewshot"].astype(float)
        span = v.max() - v.min()
        norm = (v - v.min()) / span if span > 0 else v * 0.0
        out.loc[idx] = 0.5 * (scores.loc[idx, "score_language"].astype(float) + norm)
    return out


def rscin_scores(frame: pd.DataFrame, embeddings: dict[str, np.ndarray], k_list: tuple[int, ...]) -> dict[str, float]:
    """{image_id: RsCIN score} for the scored rows of ``frame`` (image_id, category, score_mutual),
    per category, from their embeddings (image_id -> (E,)): the whole computation in one process
    (the per-category tasks compute the same, category by category)."""
    import torch

    from pipeline.models.mutual import rscin

    out: dict[str, float] = {}
    ok = frame[frame["score_mutual"].notna() & frame["image_id"].isin(embeddings.keys())]
    for _, group in ok.groupby("category", sort=True):
        ids = list(group["image_id"])
        e = torch.from_numpy(np.stack([embeddings[i] for i in ids]).astype(np.float64))
        s = torch.tensor(group["score_mutual"].to_numpy(np.float64))
        out.update(zip(ids, rscin(s, e, k_list).tolist()))
    return out


def _read_category(files: list[str], columns: list[str], category: str, storage: StorageOptions | None) -> pd.DataFrame:
    frames = []
    for uri in files:
        fs, path = fsio.filesystem(uri, storage)
        with fs.open(path, "rb") as fh:
            t = pq.read_table(fh, columns=columns, filters=[("category", "=", category)])
        if t.num_rows:
            frames.append(t.to_pandas())
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in columns})
    return pd.concat(frames, ignore_index=True)


def _read_embeddings(files: list[str], category: str, storage: StorageOptions | None) -> tuple[list[str], np.ndarray]:
    """(image ids, float32 (N, E) matrix) of ``category``'s rows of the embeddings shards, read as
    Arrow (the list column flattened, no Python object per value)."""
    ids: list[str] = []
    blocks: list[np.ndarray] = []
    for uri in files:
        fs, path = fsio.filesystem(uri, storage)
        with fs.open(path, "rb") as fh:
            t = pq.read_table(fh, columns=["image_id", "image_embedding"], filters=[("category", "=", category)])
        if not t.num_rows:
            continue
        col = t.column("image_embedding").combine_chunks()
        values = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        blocks.append(values.reshape(t.num_rows, -1))
        ids += t.column("image_id").to_pylist()
    if not blocks:
        return [], np.zeros((0, 1), np.float32)
    return ids, np.concatenate(blocks) if len(blocks) > 1 else blocks[0]


def _write_table(uri: str, table: pa.Table, storage: StorageOptions | None) -> None:
    """A whole Parquet file, atomically (local: temporary name + rename; object store: one PUT)."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    from pipeline.io.atomic import write_atomic

    write_atomic(uri, buf.getvalue(), storage)


def _stored_digest(uri: str, storage: StorageOptions | None) -> str | None:
    try:
        fs, path = fsio.filesystem(uri, storage)
        with fs.open(path, "rb") as fh:
            meta = pq.read_schema(fh).metadata or {}
    except (FileNotFoundError, OSError, pa.ArrowInvalid):
        return None
    return meta.get(b"zsad.digest", b"").decode() or None


def category_values(rescore: Rescore, category: str, first: int, last: int, score_files: list[str],
                    embedding_files: list[str], run_dir: str, storage: StorageOptions | None) -> dict[str, Any]:
    """One task: the values of ``category``'s scored rows ``[first, last)`` (rows sorted by image id)
    -> its side table. Returns {category, first, rows, reused, seconds}."""
    import time

    t0 = time.monotonic()
    uri = side_uri(run_dir, rescore.name, category, first)
    if rescore.name == "rscin":
        frame = _read_category(score_files, ["image_id", "category", "score_mutual"], category, storage)
        ids_e, matrix = _read_embeddings(embedding_files, category, storage)
        at = {iid: j for j, iid in enumerate(ids_e)}
        frame = frame[frame["score_mutual"].notna() & frame["image_id"].isin(at)]
        frame = frame.sort_values("image_id", kind="stable").reset_index(drop=True)
        e = matrix[[at[i] for i in frame["image_id"]]] if len(frame) else np.zeros((0, 1), np.float32)
        s = frame["score_mutual"].to_numpy(np.float64).copy()
        h = hashlib.sha256(repr((rescore, first, last)).encode())
        h.update("\0".join(frame["image_id"]).encode())
        h.update(s.tobytes())
        h.update(np.ascontiguousarray(e).tobytes())
    else:
        frame = _read_category(score_files, ["image_id", "category", "score_language", "score_fewshot"], category,
                               storage)
        frame = frame.sort_values("image_id", kind="stable").reset_index(drop=True)
        h = hashlib.sha256(repr((rescore, first, last)).encode())
        h.update("\0".join(frame["image_id"]).encode())
        h.update(frame[["score_language", "score_fewshot"]].to_numpy(np.float64).tobytes())
    digest = h.hexdigest()
    if _stored_digest(uri, storage) == digest:
        return {"category": category, "first": first, "rows": None, "reused": True, "seconds": time.monotonic() - t0}
    stop = min(last, len(frame))
    if rescore.name == "rscin":
        ids = list(frame["image_id"][first:stop])
        if ids:
            import torch

            from pipeline.models.mutual import rscin

            block = max(1, (256 << 20) // (8 * max(len(frame), 1)))  # query rows per similarity block: <= 256 MB
            values = rscin(torch.from_numpy(s), torch.from_numpy(e.astype(np.float64)), rescore.k_list, chunk=block,
                           rows=(first, stop)).numpy()
        else:
            values = np.zeros(0)
    else:
        part = frame.iloc[first:stop]
        v = transductive_scores(frame)[first:stop]
        keep = v.notna().to_numpy()
        ids, values = list(part["image_id"][keep]), v.to_numpy(np.float64)[keep]
    table = pa.table({"image_id": pa.array(ids, pa.string()), "value": pa.array(values, pa.float64())})
    _write_table(uri, table.replace_schema_metadata({"zsad.digest": digest, "zsad.category": category}), storage)
    return {"category": category, "first": first, "rows": len(ids), "reused": False, "seconds": time.monotonic() - t0}


def rewrite_shard(rescore: Rescore, score_uri: str, sides: dict[str, list[str]],
                  storage: StorageOptions | None) -> dict[str, Any]:
    """One task: fill ``rescore.column`` (and ``score`` when ``also_score``) of one scores shard from
    the side tables of the categories it holds (``sides``: category -> side table URIs). Returns
    {shard, rows, filled}."""
    fs, path = fsio.filesystem(score_uri, storage)
    with fs.open(path, "rb") as fh:
        table = pq.read_table(fh)
    values: dict[str, float] = {}
    for cat in set(table.column("category").to_pylist()):
        for uri in sides.get(cat, []):
            sfs, spath = fsio.filesystem(uri, storage)
            with sfs.open(spath, "rb") as fh:
                side = pq.read_table(fh)
            values.update(zip(side.column("image_id").to_pylist(), side.column("value").to_pylist()))
    contract = contracts.load("scores")
    ids = table.column("image_id").to_pylist()
    new = pa.array([values.get(i) for i in ids], pa.float64())
    table = table.set_column(table.schema.get_field_index(rescore.column), contract.schema.field(rescore.column), new)
    if rescore.also_score:
        old = table.column("score").to_pylist()
        score = pa.array([values[i] if i in values else v for i, v in zip(ids, old)], pa.float64())
        table = table.set_column(table.schema.get_field_index("score"), contract.schema.field("score"), score)
    _write_table(score_uri, table.replace_schema_metadata(contract.schema.metadata), storage)
    return {"shard": score_uri, "rows": len(ids), "filled": len(new) - new.null_count}


def run(rescore: Rescore, category_sizes: dict[str, int], score_files: list[str], embedding_files: list[str],
        run_dir: str, storage: StorageOptions | None, session: dict[str, Any], log: Log) -> dict[str, Any]:
    """The whole pass: the per-category tasks, then the per-shard tasks. ``category_sizes``: images
    per category (from the input manifest; an upper bound of the scored rows). Returns run.json's
    summary: tasks, categories computed and reused, rows filled, seconds."""
    import time

    from pipeline.runtime.executors import run_tasks

    t0 = time.monotonic()
    calls, sides = [], {}
    for cat, n in sorted(category_sizes.items()):
        step = rescore.chunk if rescore.chunk and n > rescore.chunk else max(n, 1)
        firsts = list(range(0, max(n, 1), step))
        sides[cat] = [side_uri(run_dir, rescore.name, cat, f) for f in firsts]
        calls += [{"rescore": rescore, "category": cat, "first": f, "last": f + step, "score_files": score_files,
                   "embedding_files": embedding_files, "run_dir": run_dir, "storage": storage} for f in firsts]
    results = run_tasks(category_values, calls, session, log, f"{rescore.name} (per category)")
    reused = sorted({r["category"] for r in results if r["reused"]})
    computed = sorted({r["category"] for r in results if not r["reused"]})
    shards = run_tasks(rewrite_shard, [{"rescore": rescore, "score_uri": u, "sides": sides, "storage": storage}
                                       for u in score_files], session, log, f"{rescore.name} (per shard)")
    filled = sum(r["filled"] for r in shards)
    return {"tasks": len(calls), "shard_tasks": len(shards), "categories_computed": computed,
            "categories_reused": reused, "images": filled, "seconds": round(time.monotonic() - t0, 3)}


class RescorePass(CategoryPass):
    """A re-scoring pass after the plan (RsCIN, the transductive score): runs as tasks, lists itself
    in the plan as ``rescore``, records the summary of :func:`run` (None when it did not run)."""

    when = "after"

    def __init__(self, spec) -> None:
        super().__init__(spec)
        self.summary: dict[str, Any] | None = None

    def plan_entries(self, resources: bool = False) -> list[dict[str, Any]]:
        return [{"stage": "rescore", "kind": "task", "pass": self.name}]
