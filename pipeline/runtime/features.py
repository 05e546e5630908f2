"""Building banks and pools on the workers (ARCHITECTURE.md "passes over a whole category").

:func:`build` is what the few-shot bank pass and the mutual-scoring pool pass share: for the chosen
images of the categories that have no complete bank yet, one plan (decode tasks -> the bank stage's
actors, ``resources.clip_score``) in which the actors compute the features AND write them, one part
file per (batch, category), into ``RUN/<folder>/<category>/`` (:mod:`pipeline.io.banks`). What comes
back to the driver is metadata only (:data:`pipeline.stages.bank.RESULT_COLUMNS`: ids, status, the
part's name, bytes and sha256, the resolved precision). As soon as every chosen image of a category
is accounted for, the driver writes that category's manifest, making it complete; a driver killed
mid-pass leaves the complete categories for the resumed run, which rebuilds the others.

The driver's memory does not depend on the number of categories, the pool size or the feature size:
it holds one result batch of metadata at a time and, per category still open, the rows' metadata.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from pipeline.config import JobSpec
from pipeline.errors import ZsadError
from pipeline.io.banks import BankError, manifest_uri, read_manifest, write_manifest
from pipeline.io.fs import StorageOptions
from pipeline.io.manifest import manifest_frame
from pipeline.runtime.passes import CategoryPass, RunContext
from pipeline.runtime.rows import source_rows

Log = Callable[[str], None]


class FeatureError(ZsadError, RuntimeError):
    """A bank or pool that cannot be built (a reference image that fails, a precision the actors did
    not resolve as the driver expected)."""


@dataclass
class Built:
    """What the rows of one category brought so far: whether each image succeeded, its parts, its
    failures and the precisions the actors ran at."""

    ok: dict[str, bool] = field(default_factory=dict)
    parts: dict[str, dict[str, Any]] = field(default_factory=dict)
    failed: list[tuple[str, str]] = field(default_factory=list)
    precision: set[str] = field(default_factory=set)


def _na(value: Any) -> Any:
    return None if value is None or pd.isna(value) else value


def build(spec: JobSpec, wanted: pd.DataFrame, folder: str, run_dir: str, digests: dict[str, str], precision: str,
          storage: StorageOptions | None, session: dict[str, Any], log: Log,
          on_complete: Callable[[str, dict[str, Any], list[tuple[str, str]]], dict[str, Any] | None],
          dtype: str = "float32", plan_hook: Callable[[Any], None] | None = None) -> dict[str, int]:
    """Build the banks (``folder`` ``banks``) or pools (``pools``) of the categories of ``wanted``
    (chosen rows: category, shot, uri, image_id, ...) on the workers. For each category, once all
    its images are accounted for, ``on_complete(category, manifest, failed)`` is called with the
    manifest the images that succeeded make (in shot order) and the (uri, reason) of those that
    failed; it returns the manifest to write (possibly changed) or None to write none. Returns
    counts {images, failed, parts, bytes}. ``plan_hook`` sees every result batch (tests)."""
    from pipeline.runtime.executors import execute
    from pipeline.stages.bank import RESULT_COLUMNS, BankStage, BankTarget
    from pipeline.stages.base import PlannedStage
    from pipeline.stages.decode import DecodeStage

    wanted = wanted.sort_values(["category", "shot"], kind="stable")
    unique = wanted.drop_duplicates("image_id")
    rows = manifest_frame([{"uri": r.uri, "category": r.category, "gt_label": 0, "size": _na(r.size),
                            "mtime": _na(r.mtime), "etag": r.etag} for r in unique.itertuples()])
    target = BankTarget(run_dir=run_dir, folder=folder, digests=dict(digests), dtype=dtype)
    plan = [PlannedStage(DecodeStage.from_spec(spec, storage, on_cpu=True), spec.resources.decode),
            PlannedStage(BankStage.from_spec(spec, storage, target), spec.resources.clip_score)]
    expected = {str(c): set(g["image_id"]) for c, g in unique.groupby("category")}
    order = {str(c): list(g["image_id"]) for c, g in wanted.groupby("category")}  # shot order (repeats kept)
    open_: dict[str, Built] = {c: Built() for c in expected}
    counts = {"images": 0, "failed": 0, "parts": 0, "bytes": 0}
    for batch in execute(spec, plan, source_rows(rows), list(RESULT_COLUMNS), session, log):
        if plan_hook is not None:
            plan_hook(batch)
        for r in batch.to_pylist():
            cat = str(r["category"])
            b = open_[cat]
            if r["status"] != "ok":
                b.failed.append((r["uri"], f"{r['error_stage']} {r['error_type']}: {r['error_message']}"))
                counts["failed"] += 1
            else:
                b.parts.setdefault(r["bank_part"], {"name": r["bank_part"], "bytes": int(r["bank_part_bytes"]),
                                                    "sha256": r["bank_part_sha256"]})
                b.precision.add(str(r["bank_precision"]))
                counts["images"] += 1
            b.ok[r["image_id"]] = r["status"] == "ok"
            if set(b.ok) >= expected[cat]:
                _complete(cat, open_.pop(cat), order[cat], digests[cat], precision, run_dir, folder, storage,
                          on_complete, counts)
    if open_:
        raise FeatureError(f"the {folder} pass ended without results for {', '.join(sorted(open_))}")
    return counts


def _complete(cat: str, b: Built, order: list[str], digest: str, precision: str,
              run_dir: str, folder: str, storage: StorageOptions | None,
              on_complete: Callable[..., dict[str, Any] | None], counts: dict[str, int]) -> None:
    if b.precision - {precision}:
        raise FeatureError(
            f"the {folder} of {cat!r} was computed at {', '.join(sorted(b.precision))} but {precision} was expected "
            f"(clip.precision resolves differently on these workers, e.g. a GPU without bf16): set clip.precision to "
            f"what the workers run (fp32, fp16 or bf16)")
    ok_ids = [i for i in order if b.ok.get(i)]
    manifest = {"category": cat, "digest": digest, "precision": precision, "image_ids": ok_ids,
                "images": len(ok_ids), "parts": sorted(b.parts.values(), key=lambda p: p["name"])}
    final = on_complete(cat, manifest, b.failed)
    if final is not None:
        written = write_manifest(manifest_uri(run_dir, cat, folder), final, storage)
        counts["parts"] += len(final["parts"])
        counts["bytes"] += int(written["bytes"])


def stored(entries: dict[str, dict[str, Any]], storage: StorageOptions | None, what: str,
           error: type[Exception]) -> tuple[list[str], list[str]]:
    """(categories whose complete bank or pool is stored with the expected digest: reused, the
    others: to build). A stored one with another digest is ``error``."""
    reused, todo = [], []
    for cat, e in entries.items():
        try:
            meta = read_manifest(e["uri"], storage)
        except FileNotFoundError:
            todo.append(cat)
            continue
        except BankError as exc:
            raise error(str(exc)) from None
        if meta.get("digest") != e["digest"]:
            raise error(
                f"{what} {e['uri']} was built from another spec or other images "
                f"(digest {str(meta.get('digest', '?'))[:12]}... "
                f"!= {e['digest'][:12]}...; the model, the method, the precision ({meta.get('precision')} stored, "
                f"{e.get('precision')} now) or the images differ): start a new run (another --run-id)")
        e.update(bytes=int(meta.get("bytes", 0)), images=int(meta.get("images", len(meta.get("image_ids", [])))),
                 image_ids=list(meta.get("image_ids", [])), parts=len(meta.get("parts", [])))
        reused.append(cat)
    return reused, todo


def actor_precision(spec: JobSpec, ctx: Any) -> str:
    """The precision the CLIP actors resolve in this session (predicted in the driver)."""
    from pipeline.runtime.ray_plan import effective_gpus
    from pipeline.stages.bank import resolved_precision

    gpu = bool(effective_gpus(spec, ctx.session(), lambda m: None))
    return resolved_precision(spec, gpu)


class LoadTally:
    """Bank or pool loads per scoring actor, from the result batches (``scorer``, ``<what>_loads``)."""

    def __init__(self, column: str) -> None:
        self.column = column
        self.by_actor: dict[str, int] = {}

    def observe(self, batch) -> None:
        if "scorer" not in batch.column_names or self.column not in batch.column_names:
            return
        for actor, n in zip(batch.column("scorer").to_pylist(), batch.column(self.column).to_pylist()):
            if actor is not None and n is not None:
                self.by_actor[actor] = max(self.by_actor.get(actor, 0), int(n))


class FeaturePass(CategoryPass):
    """A pass that builds features on the workers before the plan (banks, pools): the chosen images
    (a Parquet file of the run folder, :attr:`chosen_file`), the stored entries per category, the
    build summary and the loads per scoring actor. Subclasses choose and build."""

    #: the run folder's file with the choice (references.parquet, pools.parquet)
    chosen_file = ""
    #: the scoring rows' column counting this actor's loads
    loads_column = ""

    def __init__(self, spec: JobSpec) -> None:
        super().__init__(spec)
        self.chosen = pd.DataFrame()
        self.entries: dict[str, dict[str, Any]] = {}
        self.summary: dict[str, Any] = {"built": [], "reused": []}
        self.loads = LoadTally(self.loads_column)
        self.result_columns = ("scorer", self.loads_column)
        self.run_dir = ""

    def plan_entries(self, resources: bool = False) -> list[dict[str, Any]]:
        """As the run's plan lists it (before the per-image stages): the bank stage, an actor pool with
        ``resources.clip_score``, over the decoded chosen images."""
        extra = self.spec.resources.clip_score.model_dump(exclude_none=True) if resources else {}
        return [{"stage": "bank", "kind": "actor", "pass": self.name, **extra}]

    def chosen_uri(self, run_dir: str) -> str:
        from pipeline.io import fs as fsio

        return fsio.join(run_dir, self.chosen_file)

    def save(self, ctx: RunContext) -> None:
        from pipeline.io.references import write_references

        write_references(self.chosen, self.chosen_uri(ctx.run_dir), ctx.storage)

    def restore(self, ctx: RunContext, plan: dict[str, Any]) -> None:
        from pipeline.io.references import read_references

        self.run_dir = ctx.run_dir
        self.chosen = read_references(self.chosen_uri(ctx.run_dir), ctx.storage)

    def observe(self, batch) -> None:
        self.loads.observe(batch)
