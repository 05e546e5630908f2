"""The driver's few-shot passes (METHODS.md section 4; ARCHITECTURE.md "passes over a whole category").

1. :func:`choose` (before anything is written): list the reference images, choose ``few_shot.k``
   per category of the input with ``few_shot.seed``; categories without references stop the run
   (``few_shot.missing: error``) or are scored zero-shot (``zero_shot``). A resumed run reads its
   choice back from ``RUN/references.parquet``.
2. :func:`build_banks` (in the run's Ray session, before the images are scored): one Ray Data pass
   over the chosen images (decode tasks -> :class:`pipeline.stages.bank.BankStage` actors with the
   CLIP stage's resources), stacked per category in shot order into ``RUN/banks/<category>.safetensors``.
   A bank already there (a resumed run) is reused when its digest is the expected one, and is an
   error otherwise. The scoring actors then read the bank of each category they meet (cached).
3. :func:`rescore_transductive` (APRIL-GAN, after every image is scored): the per-category min-max
   of ``score_fewshot`` -> ``score_transductive`` = 0.5 * (score_language + normalised), written
   into the scores shards' ``score_transductive`` column. The streaming ``score`` stays per image.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import JobSpec
from pipeline.io import contracts
from pipeline.io import fs as fsio
from pipeline.io.banks import BankError, bank_uri, read_bank_metadata, write_bank
from pipeline.io.fs import InputError, StorageOptions
from pipeline.io.manifest import manifest_frame
from pipeline.io.references import (
    REFERENCE_FILE, choose_references, list_references, read_references, references_digest, write_references,
)
from pipeline.stages.bank import bank_digest, bank_settings

Log = Callable[[str], None]


class FewShotError(RuntimeError):
    """A few-shot run that cannot go on (no references, a bank that cannot be built or used)."""


def references_uri(run_dir: str) -> str:
    return fsio.join(run_dir, REFERENCE_FILE)


def choose(spec: JobSpec, manifest: pd.DataFrame, storage: StorageOptions | None, log: Log) -> tuple[pd.DataFrame, list[str], str]:
    """(chosen references, categories of the input without any, layout of the references).
    Raises :class:`FewShotError` with the reason (no reference URI, a listing error, too few
    images without replacement, categories without references with ``missing: error``)."""
    fs_spec = spec.few_shot
    if not fs_spec.reference:
        raise FewShotError("few-shot scoring needs reference images: give --reference URI (or few_shot.reference in the "
                           "job spec): a folder per category, an MVTec-like root (its train/good) or a manifest")
    categories = sorted(set(manifest["category"]))
    try:
        layout, candidates = list_references(fs_spec.reference, fs_spec.layout, storage, spec.data.extensions)
        chosen, missing = choose_references(candidates, categories, fs_spec.k, fs_spec.seed, fs_spec.with_replacement)
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


def plan_entries(spec: JobSpec, resources: bool = False) -> list[dict[str, Any]]:
    """The bank pass as the run's plan lists it (before the per-image stages): the bank stage, an
    actor pool with ``resources.clip_score``, over the decoded reference images."""
    if spec.few_shot is None:
        return []
    extra = spec.resources.clip_score.model_dump(exclude_none=True) if resources else {}
    return [{"stage": "bank", "kind": "actor", "pass": "references", **extra}]


def _bank_entries(spec: JobSpec, chosen: pd.DataFrame, run_dir: str) -> dict[str, dict[str, Any]]:

    digests = references_digest(chosen)
    out = {}
    for cat, rows in chosen.groupby("category", sort=True):
        k = int(len(rows))
        out[str(cat)] = {"uri": bank_uri(run_dir, str(cat)), "k": k, "reference_digest": digests[cat],
                         "digest": bank_digest(spec, digests[cat], k)}
    return out


def build_banks(spec: JobSpec, chosen: pd.DataFrame, run_dir: str, storage: StorageOptions | None,
                session: dict[str, Any], log: Log) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The banks of every category of ``chosen``: (category -> {uri, digest, k, reference_digest},
    a summary for run.json). Builds the missing ones in one Ray pass; reuses stored ones whose
    digest matches (a stored bank with another digest is a :class:`FewShotError`)."""
    entries = _bank_entries(spec, chosen, run_dir)
    reused, todo = [], []
    for cat, entry in entries.items():
        try:
            meta = read_bank_metadata(entry["uri"], storage)
        except FileNotFoundError:
            todo.append(cat)
            continue
        except BankError as exc:
            raise FewShotError(str(exc)) from None
        if meta.get("digest") != entry["digest"]:
            raise FewShotError(
                f"bank {entry['uri']} was built from another spec or other references (digest {meta.get('digest', '?')[:12]}... "
                f"!= {entry['digest'][:12]}...); start a new run (another --run-id) to build banks for this spec")
        entry["bytes"] = int(meta.get("bytes", 0))
        reused.append(cat)
    t0 = time.monotonic()
    images = 0
    if todo:
        wanted = chosen[chosen["category"].isin(todo)]
        features, images = _bank_pass(spec, wanted, storage, session, log)
        for cat in todo:
            rows = wanted[wanted["category"] == cat].sort_values("shot")
            parts = [features[i] for i in rows["image_id"]]
            keys = list(parts[0])
            tensors = {key: np.concatenate([p[key] for p in parts], axis=0) for key in keys}
            e = entries[cat]
            meta = {"category": cat, "method": spec.few_shot_method(), "k": e["k"], "digest": e["digest"],
                    "reference_digest": e["reference_digest"], "references": list(rows["uri"]),
                    "settings": bank_settings(spec)}
            try:
                e["bytes"] = write_bank(e["uri"], tensors, meta, storage)
            except Exception as exc:
                raise FewShotError(f"bank {e['uri']}: cannot be written: {exc}") from None
        log(f"few-shot: built {len(todo)} bank(s) from {images} reference images in {time.monotonic() - t0:.1f} s"
            + (f"; reused {len(reused)} stored" if reused else ""))
    elif reused:
        log(f"few-shot: reusing the {len(reused)} stored bank(s) under {fsio.join(run_dir, 'banks')}")
    for e in entries.values():
        e["built"] = e["uri"] in {entries[c]["uri"] for c in todo}
    summary = {"built": sorted(todo), "reused": sorted(reused), "reference_images": images,
               "seconds": round(time.monotonic() - t0, 3)}
    return entries, summary


def _bank_pass(spec: JobSpec, wanted: pd.DataFrame, storage: StorageOptions | None, session: dict[str, Any],
               log: Log, failed: list[tuple[str, str]] | None = None) -> tuple[dict[str, dict[str, np.ndarray]], int]:
    """Decode + bank features of each distinct chosen image: image_id -> its features. An image that
    fails is a :class:`FewShotError`, or, when ``failed`` is given, is left out and listed there
    as (uri, reason)."""
    from pipeline.runtime.executors import execute
    from pipeline.runtime.run import source_rows
    from pipeline.stages.bank import BankStage, unpack_features
    from pipeline.stages.decode import DecodeStage
    from pipeline.stages.plan import PlannedStage

    unique = wanted.drop_duplicates("image_id")
    rows = manifest_frame([{"uri": r.uri, "category": r.category, "gt_label": 0, "size": _na(r.size), "mtime": _na(r.mtime),
                            "etag": r.etag} for r in unique.itertuples()])
    plan = [PlannedStage(DecodeStage.from_spec(spec, storage), spec.resources.decode),
            PlannedStage(BankStage.from_spec(spec, storage), spec.resources.clip_score)]
    columns = ["image_id", "uri", "status", "error_stage", "error_type", "error_message", "bank_features"]
    features: dict[str, dict[str, np.ndarray]] = {}
    for batch in execute(spec, plan, source_rows(rows), columns, session, log):
        for r in batch.to_pylist():
            if r["status"] != "ok" and failed is not None:
                failed.append((r["uri"], f"{r['error_stage']} {r['error_type']}: {r['error_message']}"))
                continue
            if r["status"] != "ok":
                raise FewShotError(f"reference image {r['uri']} failed in stage {r['error_stage']} "
                                   f"({r['error_type']}: {r['error_message']}); fix or remove it, or choose another seed")
            features[r["image_id"]] = unpack_features(r["bank_features"])
    return features, len(features)


def _na(value: Any) -> Any:
    return None if value is None or pd.isna(value) else value


def record(spec: JobSpec, run_dir: str, layout: str | None, missing: list[str], entries: dict[str, dict[str, Any]],
           summary: dict[str, Any]) -> dict[str, Any]:
    """run.json's ``few_shot`` section."""
    f = spec.few_shot
    return {"method": spec.few_shot_method(), "k": f.k, "seed": f.seed, "with_replacement": f.with_replacement,
            "reference": f.reference, "reference_layout": layout, "references": references_uri(run_dir),
            "missing": f.missing, "categories_without_references": missing,
            "banks": {c: {k: e.get(k) for k in ("uri", "k", "digest", "reference_digest", "bytes", "built")}
                      for c, e in entries.items()},
            **{f"banks_{k}": v for k, v in summary.items()}}


def write_chosen(chosen: pd.DataFrame, run_dir: str, storage: StorageOptions | None) -> None:
    write_references(chosen, references_uri(run_dir), storage)


def read_chosen(run_dir: str, storage: StorageOptions | None) -> pd.DataFrame:
    return read_references(references_uri(run_dir), storage)


# --------------------------------------------------------------------------------------------
# APRIL-GAN's transductive image score
# --------------------------------------------------------------------------------------------


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


def rescore_transductive(files: list[str], storage: StorageOptions | None, log: Log) -> int:
    """Fill ``score_transductive`` in every scores shard file (rewritten whole; locally through a
    temporary file and a rename). Returns the rows given a value."""
    if not files:
        return 0
    tables = []
    for uri in files:
        fs, path = fsio.filesystem(uri, storage)
        with fs.open(path, "rb") as fh:
            tables.append(pq.read_table(fh))
    frame = pd.concat([t.select(["image_id", "category", "score_language", "score_fewshot"]).to_pandas() for t in tables],
                      ignore_index=True)
    values = dict(zip(frame["image_id"], transductive_scores(frame)))
    contract = contracts.load("scores")
    filled = 0
    for uri, table in zip(files, tables):
        new = pa.array([None if np.isnan(values[i]) else float(values[i]) for i in table.column("image_id").to_pylist()],
                       pa.float64())
        filled += len(new) - new.null_count
        table = table.set_column(table.schema.get_field_index("score_transductive"),
                                 contract.schema.field("score_transductive"), new)
        _replace(uri, table.replace_schema_metadata(contract.schema.metadata), storage)
    log(f"few-shot: score_transductive (APRIL-GAN's per-category min-max) written for {filled} images")
    return filled


def _replace(uri: str, table: pa.Table, storage: StorageOptions | None) -> None:
    fs, path = fsio.filesystem(uri, storage)
    if fsio.is_remote(uri):  # an object is replaced whole by one PUT
        with fs.open(path, "wb") as fh:
            pq.write_table(table, fh)
        return
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".rescore-", suffix=".parquet")
    os.close(fd)
    pq.write_table(table, tmp)
    os.replace(tmp, path)
