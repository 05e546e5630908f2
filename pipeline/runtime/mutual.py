"""The driver's passes of mutual scoring (MuSc; MUSC.md; ARCHITECTURE.md "passes over a whole category").

1. :func:`choose` (before anything is written): per category of the input, the pool: the
   ``mutual.pool_size + 1`` images with the smallest sha256 of (``mutual.seed``, URI), the whole
   category when it is smaller. Deterministic, independent of the listing order; written to
   ``RUN/pools.parquet`` (read back on resume).
2. :func:`build_pools` (in the run's Ray session, before the images are scored): one Ray Data pass
   over the pool images (decode tasks -> the bank stage's actors, which build the mutual scoring
   stage and ask it for the pool features), stacked per category in pool order into
   ``RUN/pools/<category>.safetensors`` with the pool's image ids. A pool image that fails (decode)
   is left out of its pool and fails again, as a row, when the images are scored. A stored pool
   (a resumed run) is reused when its digest is the expected one; another digest is an error.
3. :func:`rescore_rscin` (after every image is scored): RsCIN per category from the raw scores and
   the image embeddings (the ``embeddings`` table), written into the scores shards'
   ``score_rscin`` column, and into ``score`` with ``mutual.score: rscin``.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any, Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import JobSpec
from pipeline.io import contracts
from pipeline.io import fs as fsio
from pipeline.io.banks import BankError, bank_uri, read_bank_metadata, write_bank
from pipeline.io.fs import StorageOptions
from pipeline.io.references import REFERENCE_COLUMNS, read_references, references_digest, write_references
from pipeline.stages.bank import bank_digest, bank_settings

Log = Callable[[str], None]
POOL_FILE = "pools.parquet"
MIN_POOL = 5


class MutualError(RuntimeError):
    """A mutual-scoring pass that cannot go on (a pool that cannot be built, stored or used)."""


def pools_uri(run_dir: str) -> str:
    return fsio.join(run_dir, POOL_FILE)


def pool_uri(run_dir: str, category: str) -> str:
    return bank_uri(run_dir, category, "pools")


def pool_rank(seed: int, uri: str) -> str:
    """The key images are ranked by for the pool: sha256 of the seed and the URI (hex)."""
    return hashlib.sha256(f"{seed}\0{uri}".encode()).hexdigest()


def choose(spec: JobSpec, manifest: pd.DataFrame) -> pd.DataFrame:
    """The pool of every category of ``manifest`` (rows the listing could not address left out):
    columns as the few-shot references (``shot`` = the image's place in its pool)."""
    m = spec.mutual
    usable = manifest[manifest["list_error_type"].isna()] if "list_error_type" in manifest else manifest
    rows = []
    for cat, group in usable.groupby("category", sort=True):
        ranked = sorted(group.to_dict("records"), key=lambda r: pool_rank(m.seed, r["uri"]))[: m.pool_size + 1]
        for shot, r in enumerate(ranked):
            rows.append({"category": str(cat), "shot": shot, "uri": r["uri"], "image_id": r["image_id"],
                         "etag": r.get("etag"), "size": r.get("size"), "mtime": r.get("mtime")})
    frame = pd.DataFrame(rows, columns=list(REFERENCE_COLUMNS))
    frame["size"] = frame["size"].astype("Int64")
    frame["mtime"] = frame["mtime"].astype("Float64")
    return frame


def write_chosen(chosen: pd.DataFrame, run_dir: str, storage: StorageOptions | None) -> None:
    write_references(chosen, pools_uri(run_dir), storage)


def read_chosen(run_dir: str, storage: StorageOptions | None) -> pd.DataFrame:
    return read_references(pools_uri(run_dir), storage)


def plan_entries(spec: JobSpec) -> list[dict[str, Any]]:
    """The pool pass as the run's plan lists it (before the per-image stages)."""
    return [{"stage": "bank", "kind": "actor", "pass": "pools"}] if spec.mutual is not None else []


def build_pools(spec: JobSpec, chosen: pd.DataFrame, category_sizes: dict[str, int], run_dir: str,
                storage: StorageOptions | None, session: dict[str, Any], log: Log) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The pools of every category of ``chosen``: (category -> {uri, digest, images, image_ids,
    category_images, built}, a summary for run.json)."""
    from pipeline.runtime.fewshot import _bank_pass

    digests = references_digest(chosen)
    entries: dict[str, dict[str, Any]] = {}
    todo, reused = [], []
    for cat, rows in chosen.groupby("category", sort=True):
        cat = str(cat)
        e = {"uri": pool_uri(run_dir, cat), "digest": bank_digest(spec, digests[cat], int(len(rows))),
             "category_images": int(category_sizes.get(cat, len(rows))), "built": False}
        entries[cat] = e
        try:
            meta = read_bank_metadata(e["uri"], storage)
        except FileNotFoundError:
            todo.append(cat)
            continue
        except BankError as exc:
            raise MutualError(str(exc)) from None
        if meta.get("digest") != e["digest"]:
            raise MutualError(f"pool {e['uri']} was built from another spec or other images (digest "
                              f"{meta.get('digest', '?')[:12]}... != {e['digest'][:12]}...); start a new run (another --run-id)")
        e.update(images=int(meta["images"]), image_ids=json.loads(meta["image_ids"]), bytes=int(meta.get("bytes", 0)))
        reused.append(cat)
    t0 = time.monotonic()
    failed: list[tuple[str, str]] = []
    n_images = 0
    if todo:
        wanted = chosen[chosen["category"].isin(todo)]
        features, n_images = _bank_pass(spec, wanted, storage, session, log, failed=failed)
        for cat in todo:
            e = entries[cat]
            rows = wanted[wanted["category"] == cat].sort_values("shot")
            ok = [r for r in rows.itertuples() if r.image_id in features]
            e.update(images=len(ok), image_ids=[r.image_id for r in ok], built=True)
            if len(ok) < MIN_POOL:
                log(f"mutual: category {cat!r} has {len(ok)} usable pool images, fewer than {MIN_POOL}: its images "
                    "fail with PoolTooSmall")
                continue
            keys = list(features[ok[0].image_id])
            tensors = {k: np.concatenate([features[r.image_id][k] for r in ok], axis=0) for k in keys}
            meta = {"category": cat, "method": "mutual", "digest": e["digest"], "images": len(ok),
                    "image_ids": [r.image_id for r in ok], "uris": [r.uri for r in ok], "settings": bank_settings(spec)}
            try:
                e["bytes"] = write_bank(e["uri"], tensors, meta, storage)
            except Exception as exc:
                raise MutualError(f"pool {e['uri']}: cannot be written: {exc}") from None
        for uri, why in failed[:5]:
            log(f"mutual: pool image {uri} left out of its pool: {why}")
        log(f"mutual: built {len(todo)} pool(s) from {n_images} images in {time.monotonic() - t0:.1f} s"
            + (f"; {len(failed)} pool images failed and were left out" if failed else "")
            + (f"; reused {len(reused)} stored" if reused else ""))
    elif reused:
        log(f"mutual: reusing the {len(reused)} stored pool(s) under {fsio.join(run_dir, 'pools')}")
    summary = {"built": sorted(todo), "reused": sorted(reused), "pool_images": n_images,
               "failed_pool_images": len(failed), "seconds": round(time.monotonic() - t0, 3)}
    return entries, summary


def record(spec: JobSpec, run_dir: str, entries: dict[str, dict[str, Any]], summary: dict[str, Any],
           rscin: dict[str, Any] | None) -> dict[str, Any]:
    """run.json's ``mutual`` section."""
    m = spec.mutual
    return {"method": "MuSc mutual scoring", "transductive": True,
            "note": "every score depends on the other images of its category (pool, RsCIN)",
            "pool_size": m.pool_size, "seed": m.seed, "interval": m.interval, "rscin": m.rscin, "k_list": list(m.k_list),
            "score": m.score, "pools_file": pools_uri(run_dir),
            "pools": {c: {k: e.get(k) for k in ("uri", "images", "category_images", "digest", "bytes", "built")}
                      for c, e in entries.items()},
            **{f"pools_{k}": v for k, v in summary.items()},
            "rscin_pass": rscin}


def _read(files: list[str], columns: list[str] | None, storage: StorageOptions | None) -> list[pa.Table]:
    tables = []
    for uri in files:
        fs, path = fsio.filesystem(uri, storage)
        with fs.open(path, "rb") as fh:
            tables.append(pq.read_table(fh, columns=columns))
    return tables


def rscin_scores(frame: pd.DataFrame, embeddings: dict[str, np.ndarray], k_list: tuple[int, ...]) -> dict[str, float]:
    """{image_id: RsCIN score} for the scored rows of ``frame`` (image_id, category, score_mutual),
    per category, from their embeddings (image_id -> (E,))."""
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


def rescore_rscin(spec: JobSpec, score_files: list[str], embedding_files: list[str], storage: StorageOptions | None,
                  log: Log) -> dict[str, Any]:
    """Fill ``score_rscin`` (and ``score`` with ``mutual.score: rscin``) in every scores shard file
    (each rewritten whole). Returns run.json's summary of the pass."""
    t0 = time.monotonic()
    embeddings: dict[str, np.ndarray] = {}
    for t in _read(embedding_files, ["image_id", "image_embedding"], storage):
        for iid, vec in zip(t.column("image_id").to_pylist(), t.column("image_embedding").to_numpy(zero_copy_only=False)):
            embeddings[iid] = np.asarray(vec, dtype=np.float32)  # as stored; 3 KB per ViT-L image
    tables = _read(score_files, None, storage)
    frame = pd.concat([t.select(["image_id", "category", "score_mutual"]).to_pandas() for t in tables], ignore_index=True)
    values = rscin_scores(frame, embeddings, spec.mutual.k_list)
    contract = contracts.load("scores")
    use = spec.mutual.score == "rscin"
    from pipeline.runtime.fewshot import _replace

    for uri, table in zip(score_files, tables):
        ids = table.column("image_id").to_pylist()
        new = pa.array([values.get(i) for i in ids], pa.float64())
        table = table.set_column(table.schema.get_field_index("score_rscin"), contract.schema.field("score_rscin"), new)
        if use:
            old = table.column("score").to_pylist()
            score = pa.array([values[i] if i in values else (None if v is None else v) for i, v in zip(ids, old)], pa.float64())
            table = table.set_column(table.schema.get_field_index("score"), contract.schema.field("score"), score)
        _replace(uri, table.replace_schema_metadata(contract.schema.metadata), storage)
    categories = int(frame.loc[frame["image_id"].isin(values.keys()), "category"].nunique())
    log(f"mutual: RsCIN (k_list {list(spec.mutual.k_list)}) written for {len(values)} images in {categories} categories"
        + ("; score = score_rscin" if use else ""))
    return {"images": len(values), "categories": categories, "k_list": list(spec.mutual.k_list),
            "score_is_rscin": use, "seconds": round(time.monotonic() - t0, 3)}
