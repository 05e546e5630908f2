"""Mutual scoring's passes (MuSc; MUSC.md; ARCHITECTURE.md "passes over a whole category";
:mod:`pipeline.runtime.passes`).

:class:`PoolsPass` (before the plan):

1. :func:`choose` (before anything is written): per category of the input, the pool: the
   ``mutual.pool_size + 1`` images with the smallest sha256 of (``mutual.seed``, URI), the whole
   category when it is smaller. Deterministic, independent of the listing order; written to
   ``RUN/pools.parquet`` (read back on resume).
2. :meth:`PoolsPass.run` (in the run's session, before the images are scored): the categories
   without a complete pool go through one plan on the workers (:mod:`pipeline.runtime.features`):
   decode tasks -> the bank stage's actors, which build the mutual scoring stage, compute the pool
   features and write them as part files under ``RUN/pools/<category>/`` (``mutual.pool_dtype``).
   The driver writes each category's manifest (pool order, image ids, parts, digest, the resolved
   precision) as soon as the category's images are all accounted for. A pool image that fails
   (decode) is left out of its pool and fails again, as a row, when the images are scored. A
   complete pool (a resumed run) is reused when its digest is the expected one; another digest is
   an error. The scoring input is grouped by category, so an actor maps each pool once.

:class:`RscinPass` (after every image is scored): RsCIN per category on the workers
(:mod:`pipeline.runtime.rescore`), from the raw scores and the image embeddings (the
``embeddings`` table), written into the scores shards' ``score_rscin`` column, and into ``score``
with ``mutual.score: rscin``. Its windows follow the input's layout unless ``mutual.k_list`` is set.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any, Callable

import pandas as pd

from pipeline.config import JobSpec
from pipeline.io import fs as fsio
from pipeline.io.banks import manifest_uri
from pipeline.io.references import REFERENCE_COLUMNS, references_digest
from pipeline.runtime import rescore
from pipeline.runtime.features import FeatureError, FeaturePass, actor_precision, build, stored
from pipeline.runtime.passes import PassError, RunContext
from pipeline.runtime.rescore import rscin_scores  # noqa: F401 - the function the pass computes, by name
from pipeline.stages.bank import bank_digest, bank_settings
from pipeline.stages.mutual_score import MIN_POOL

Log = Callable[[str], None]
POOL_FILE = "pools.parquet"


class MutualError(PassError):
    """A mutual-scoring pass that cannot go on (a pool that cannot be built, stored or used)."""


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


class PoolsPass(FeaturePass):
    """MuSc's pools, built on the workers before the plan."""

    name = "pools"
    section = "mutual"
    chosen_file = POOL_FILE
    loads_column = "pool_loads"

    @classmethod
    def applies(cls, spec: JobSpec) -> bool:
        return spec.mutual is not None

    def choose(self, ctx: RunContext) -> None:
        self.run_dir = ctx.run_dir
        self.chosen = choose(self.spec, ctx.manifest)

    def dry_run(self, ctx: RunContext) -> dict[str, Any]:
        pools = choose(self.spec, ctx.manifest).groupby("category").size()
        return {"mutual": {"pool_size": self.spec.mutual.pool_size, "transductive": True,
                           "pool_images_by_category": {str(k): int(v) for k, v in pools.items()},
                           "too_small": sorted(str(k) for k, v in pools.items() if v < MIN_POOL),
                           "k_list": list(self.spec.mutual.windows(ctx.layout))}}

    def run(self, ctx: RunContext) -> None:
        self.entries, self.summary = build_pools(self.spec, self.chosen, ctx.category_sizes(), ctx,
                                                 actor_precision(self.spec, ctx))

    def stage_inputs(self) -> dict[str, Any]:
        return {"pools": self.entries}

    def record(self) -> dict[str, Any]:
        m = self.spec.mutual
        return {"method": "MuSc mutual scoring", "transductive": True,
                "note": "every score depends on the other images of its category (pool, RsCIN)",
                "pool_size": m.pool_size, "seed": m.seed, "interval": m.interval, "rscin": m.rscin,
                "score": m.score, "pool_dtype": m.pool_dtype, "max_pool_bytes": m.max_pool_bytes,
                "pools_file": self.chosen_uri(self.run_dir),
                "pools": {c: {k: e.get(k) for k in ("uri", "images", "category_images", "digest", "precision", "bytes",
                                                    "parts", "built")}
                          for c, e in self.entries.items()},
                **{f"pools_{k}": v for k, v in self.summary.items()},
                "pool_loads_by_actor": dict(self.loads.by_actor)}


def build_pools(spec: JobSpec, chosen: pd.DataFrame, category_sizes: dict[str, int], ctx: RunContext,
                precision: str) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The pools of every category of ``chosen``: (category -> {uri, digest, images, image_ids,
    category_images, bytes, built}, a summary for run.json). Builds the missing ones on the workers."""
    digests = references_digest(chosen)
    entries: dict[str, dict[str, Any]] = {}
    for cat, rows in chosen.groupby("category", sort=True):
        cat = str(cat)
        entries[cat] = {"uri": manifest_uri(ctx.run_dir, cat, "pools"), "precision": precision,
                        "digest": bank_digest(spec, digests[cat], int(len(rows)), precision),
                        "category_images": int(category_sizes.get(cat, len(rows))), "built": False}
    reused, todo = stored(entries, ctx.storage, "pool", MutualError)
    t0 = time.monotonic()
    failed: list[tuple[str, str]] = []
    counts = {"images": 0, "bytes": 0}
    if todo:
        def complete(cat: str, manifest: dict[str, Any], bad: list[tuple[str, str]]) -> dict[str, Any] | None:
            e = entries[cat]
            failed.extend(bad)
            e.update(images=manifest["images"], image_ids=list(manifest["image_ids"]), built=True)
            if manifest["images"] < MIN_POOL:
                ctx.log(f"mutual: category {cat!r} has {manifest['images']} usable pool images, fewer than {MIN_POOL}: "
                        "its images fail with PoolTooSmall")
                return None
            rows = chosen[chosen["category"] == cat].set_index("image_id")
            manifest.update(method="mutual", uris=[str(rows.loc[i, "uri"]) for i in manifest["image_ids"]],
                            settings=bank_settings(spec, precision), dtype=spec.mutual.pool_dtype)
            e.update(bytes=int(sum(p["bytes"] for p in manifest["parts"])), parts=len(manifest["parts"]))
            return manifest

        wanted = chosen[chosen["category"].isin(todo)]
        try:
            counts = build(spec, wanted, "pools", ctx.run_dir, {c: entries[c]["digest"] for c in todo}, precision,
                           ctx.storage, ctx.session(), ctx.log, complete, dtype=spec.mutual.pool_dtype)
        except FeatureError as exc:
            raise MutualError(str(exc)) from None
        for uri, why in failed[:5]:
            ctx.log(f"mutual: pool image {uri} left out of its pool: {why}")
        ctx.log(f"mutual: built {len(todo)} pool(s) from {counts['images']} images on the workers in "
                f"{time.monotonic() - t0:.1f} s ({counts['bytes'] / 1e6:.1f} MB of part files)"
                + (f"; {len(failed)} pool images failed and were left out" if failed else "")
                + (f"; reused {len(reused)} stored" if reused else ""))
    elif reused:
        ctx.log(f"mutual: reusing the {len(reused)} stored pool(s) under {fsio.join(ctx.run_dir, 'pools')}")
    summary = {"built": sorted(todo), "reused": sorted(reused), "pool_images": counts["images"],
               "failed_pool_images": len(failed), "seconds": round(time.monotonic() - t0, 3)}
    return entries, summary


class RscinPass(rescore.RescorePass):
    """MuSc's RsCIN, after the plan, on the workers."""

    name = "rscin"
    section = "mutual"

    def __init__(self, spec: JobSpec) -> None:
        super().__init__(spec)
        self.k_list: tuple[int, ...] = ()

    @classmethod
    def applies(cls, spec: JobSpec) -> bool:
        return spec.mutual is not None and spec.mutual.rscin

    def run(self, ctx: RunContext) -> None:
        m = self.spec.mutual
        self.k_list = m.windows(ctx.layout)
        job = rescore.Rescore("rscin", "score_rscin", also_score=m.score == "rscin", k_list=self.k_list,
                              chunk=m.rscin_chunk)
        self.summary = {**rescore.run(job, ctx.category_sizes(), ctx.files("scores"), ctx.files("embeddings"),
                                      ctx.run_dir, ctx.storage, ctx.session(), ctx.log),
                        "k_list": list(self.k_list),
                        "k_list_from": "mutual.k_list" if m.k_list else f"layout {ctx.layout}",
                        "score_is_rscin": m.score == "rscin"}
        s = self.summary
        ctx.log(f"mutual: RsCIN (k_list {list(self.k_list)}) written for {s['images']} images in "
                f"{len(s['categories_computed']) + len(s['categories_reused'])} categories "
                f"({len(s['categories_reused'])} reused)" + ("; score = score_rscin" if m.score == "rscin" else ""))

    def record(self) -> dict[str, Any]:
        return {"rscin_pass": self.summary, "k_list": list(self.k_list) if self.summary else None}
