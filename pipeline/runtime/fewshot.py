"""Few-shot passes (METHODS.md section 4; ARCHITECTURE.md "passes over a whole category";
:mod:`pipeline.runtime.passes`).

:class:`BanksPass` (before the plan):

1. :func:`choose` (before anything is written): list the reference images, choose ``few_shot.k``
   per category of the input with ``few_shot.seed``; categories without references stop the run
   (``few_shot.missing: error``) or are scored zero-shot (``zero_shot``). Written to
   ``RUN/references.parquet``; a resumed run reads its choice back.
2. :meth:`BanksPass.run` (in the run's session, before the images are scored): the categories
   without a complete bank go through one plan on the workers (:mod:`pipeline.runtime.features`):
   decode tasks -> :class:`pipeline.stages.bank.BankStage` actors with the CLIP stage's resources,
   which write the features as part files under ``RUN/banks/<category>/``; the driver writes each
   category's manifest from the metadata the actors return. A complete bank (a resumed run) is
   reused when its digest is the expected one, and is an error otherwise. The scoring actors then
   map the bank of each category they meet (cached).

:class:`TransductivePass` (APRIL-GAN, after every image is scored): per category, on the workers
(:mod:`pipeline.runtime.rescore`), the min-max of ``score_fewshot`` -> ``score_transductive`` =
0.5 * (score_language + normalised), written into the scores shards' ``score_transductive``
column. The streaming ``score`` stays per image.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pandas as pd

from pipeline.config import JobSpec
from pipeline.io import fs as fsio
from pipeline.io.banks import manifest_uri
from pipeline.io.fs import InputError, StorageOptions
from pipeline.io.references import (
    REFERENCE_FILE,
    choose_references,
    list_references,
    references_digest,
)
from pipeline.runtime import rescore
from pipeline.runtime.features import FeatureError, FeaturePass, actor_precision, build, stored
from pipeline.runtime.passes import PassError, RunContext
from pipeline.runtime.rescore import transductive_scores  # noqa: F401 - the function the pass computes, by name
from pipeline.stages.bank import bank_digest, bank_settings

Log = Callable[[str], None]


class FewShotError(PassError):
    """A few-shot run that cannot go on (no references, a bank that cannot be built or used)."""


def choose(spec: JobSpec, manifest: pd.DataFrame, storage: StorageOptions | None,
           log: Log) -> tuple[pd.DataFrame, list[str], str]:
    """(chosen references, categories of the input without any, layout of the references).
    Raises :class:`FewShotError` with the reason (no reference URI, a listing error, too few
    images without replacement, categories without references with ``missing: error``)."""
    fs_spec = spec.few_shot
    if not fs_spec.reference:
        raise FewShotError("few-shot scoring needs reference images: give --reference URI "
                           "(or few_shot.reference in the "
                           "job spec): a folder per category, an MVTec-like root (its train/good) or a manifest")
    categories = sorted(set(manifest["category"]))
    try:
        layout, candidates = list_references(fs_spec.reference, fs_spec.layout, storage, spec.data.extensions)
        chosen, missing = choose_references(candidates, categories, fs_spec.k, fs_spec.seed, fs_spec.with_replacement,
                                            fs_spec.sampler)
    except InputError as exc:
        raise FewShotError(str(exc)) from None
    if missing:
        have = sorted(set(candidates["category"]))
        text = (f"no reference images for categor{'y' if len(missing) == 1 else 'ies'} {', '.join(map(repr, missing))} "
                f"under {fs_spec.reference} ({layout} layout; it has: {', '.join(have) or 'none'})")
        if fs_spec.missing == "error":
            raise FewShotError(f"{text}. Add references for them, or set few_shot.missing: zero_shot to score them "
                               "zero-shot")
        log(f"few-shot: {text}: scoring them zero-shot (few_shot.missing: zero_shot; their rows have few_shot_k 0)")
    return chosen, missing, layout


def bank_entries(spec: JobSpec, chosen: pd.DataFrame, run_dir: str, precision: str) -> dict[str, dict[str, Any]]:
    """Per category of ``chosen``: where its bank's manifest is, k, the references' digest and the
    bank's digest (with the precision the actors resolve)."""
    digests = references_digest(chosen)
    out = {}
    for cat, rows in chosen.groupby("category", sort=True):
        k = int(len(rows))
        out[str(cat)] = {"uri": manifest_uri(run_dir, str(cat), "banks"), "k": k, "reference_digest": digests[cat],
                         "digest": bank_digest(spec, digests[cat], k, precision), "precision": precision}
    return out


class BanksPass(FeaturePass):
    """Few-shot memory banks, built on the workers before the plan."""

    name = "references"
    section = "few_shot"
    chosen_file = REFERENCE_FILE
    loads_column = "bank_loads"

    def __init__(self, spec: JobSpec) -> None:
        super().__init__(spec)
        self.missing: list[str] = []
        self.layout: str | None = None

    @classmethod
    def applies(cls, spec: JobSpec) -> bool:
        return spec.few_shot is not None

    def choose(self, ctx: RunContext) -> None:
        self.run_dir = ctx.run_dir
        try:
            self.chosen, self.missing, self.layout = choose(self.spec, ctx.manifest, ctx.storage, ctx.log)
        except FewShotError as exc:
            raise PassError(str(exc), exit_code=2) from None

    def plan_record(self) -> dict[str, Any]:
        return {"few_shot": {"layout": self.layout, "missing": self.missing}}

    def restore(self, ctx: RunContext, plan: dict[str, Any]) -> None:
        super().restore(ctx, plan)
        self.missing, self.layout = list(plan["few_shot"]["missing"]), plan["few_shot"]["layout"]

    def dry_run(self, ctx: RunContext) -> dict[str, Any]:
        self.choose(ctx)
        return {"few_shot": {"method": self.spec.few_shot_method(), "k": self.spec.few_shot.k,
                             "reference": self.spec.few_shot.reference, "reference_layout": self.layout,
                             "references_by_category": {str(k): int(v) for k, v in
                                                        self.chosen.groupby("category").size().items()},
                             "categories_without_references": self.missing}}

    def run(self, ctx: RunContext) -> None:
        self.entries, self.summary = build_banks(self.spec, self.chosen, ctx, actor_precision(self.spec, ctx))

    def stage_inputs(self) -> dict[str, Any]:
        return {"banks": self.entries}

    def record(self) -> dict[str, Any]:
        return record(self.spec, self.chosen_uri(self.run_dir), self.layout, self.missing, self.entries, self.summary,
                      self.loads.by_actor)


def build_banks(spec: JobSpec, chosen: pd.DataFrame, ctx: RunContext,
                precision: str) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The banks of every category of ``chosen``: (category -> {uri, digest, k, reference_digest,
    bytes, built}, a summary for run.json). Builds the missing ones on the workers; reuses stored
    ones whose digest matches (a stored bank with another digest is a :class:`FewShotError`)."""
    entries = bank_entries(spec, chosen, ctx.run_dir, precision)
    reused, todo = stored(entries, ctx.storage, "bank", FewShotError)
    t0 = time.monotonic()
    counts = {"images": 0}
    if todo:
        def complete(cat: str, manifest: dict[str, Any], failed: list[tuple[str, str]]) -> dict[str, Any]:
            if failed:
                uri, why = failed[0]
                raise FewShotError(f"reference image {uri} failed ({why}); fix or remove it, or choose another seed")
            e = entries[cat]
            rows = chosen[chosen["category"] == cat].sort_values("shot")
            manifest.update(method=spec.few_shot_method(), k=e["k"], reference_digest=e["reference_digest"],
                            references=list(rows["uri"]), settings=bank_settings(spec, precision))
            e.update(bytes=int(sum(p["bytes"] for p in manifest["parts"])), parts=len(manifest["parts"]))
            return manifest

        wanted = chosen[chosen["category"].isin(todo)]
        try:
            counts = build(spec, wanted, "banks", ctx.run_dir, {c: entries[c]["digest"] for c in todo}, precision,
                           ctx.storage, ctx.session(), ctx.log, complete)
        except FeatureError as exc:
            raise FewShotError(str(exc)) from None
        ctx.log(f"few-shot: built {len(todo)} bank(s) from {counts['images']} reference images on the workers in "
                f"{time.monotonic() - t0:.1f} s" + (f"; reused {len(reused)} stored" if reused else ""))
    elif reused:
        ctx.log(f"few-shot: reusing the {len(reused)} stored bank(s) under {fsio.join(ctx.run_dir, 'banks')}")
    for cat, e in entries.items():
        e["built"] = cat in todo
    summary = {"built": sorted(todo), "reused": sorted(reused), "reference_images": counts["images"],
               "seconds": round(time.monotonic() - t0, 3)}
    return entries, summary


def record(spec: JobSpec, references: str, layout: str | None, missing: list[str], entries: dict[str, dict[str, Any]],
           summary: dict[str, Any], loads: dict[str, int] | None = None) -> dict[str, Any]:
    """run.json's ``few_shot`` section."""
    f = spec.few_shot
    return {"method": spec.few_shot_method(), "k": f.k, "seed": f.seed, "with_replacement": f.with_replacement,
            "reference": f.reference, "reference_layout": layout, "references": references,
            "missing": f.missing, "categories_without_references": missing,
            "banks": {c: {k: e.get(k) for k in ("uri", "k", "digest", "reference_digest", "precision", "bytes", "parts",
                                                "built")}
                      for c, e in entries.items()},
            **{f"banks_{k}": v for k, v in summary.items()},
            "bank_loads_by_actor": dict(loads or {})}


class TransductivePass(rescore.RescorePass):
    """APRIL-GAN's transductive image score, after the plan, on the workers."""

    name = "transductive"
    section = "few_shot"

    @classmethod
    def applies(cls, spec: JobSpec) -> bool:
        return spec.few_shot_method() == "april_gan"

    def run(self, ctx: RunContext) -> None:
        self.summary = rescore.run(rescore.Rescore("transductive", "score_transductive"), ctx.category_sizes(),
                                   ctx.files("scores"), [], ctx.run_dir, ctx.storage, ctx.session(), ctx.log)
        ctx.log(f"few-shot: score_transductive (APRIL-GAN's per-category min-max) written for {self.summary['images']} "
                f"images ({len(self.summary['categories_computed'])} categories computed, "
                f"{len(self.summary['categories_reused'])} reused)")

    def record(self) -> dict[str, Any]:
        return {"transductive_pass": self.summary}
