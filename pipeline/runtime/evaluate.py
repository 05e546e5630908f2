"""`zsad evaluate`: a distributed pass over a run's masks table joined with ground truth.

One Ray task per ``masks`` part file reads it in small batches, turns each image into per-level
statistics (:class:`pipeline.metrics.state.LevelStats`, exact for the stored 16-bit maps) and returns
one partial state per category; the driver merges them by addition, so no machine holds more than
one category's 65536-level histograms whatever the pixel count. Image-level metrics come from the
``scores`` table (a few numbers per image) on the driver.
"""

from __future__ import annotations

import math
import posixpath
from typing import Any, Callable

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import ray

from pipeline.config import DataSpec
from pipeline.errors import ZsadError
from pipeline.io import fs as fsio
from pipeline.io.layouts import InputError, list_inputs
from pipeline.io.sinks import TableWriter, read_folder, read_json, write_json
from pipeline.metrics import curves
from pipeline.metrics.state import LevelStats, ValueTable
from pipeline.runtime.session import ray_session
from pipeline.stages.evaluate import EvaluateStage, stats_from_row

MASK_COLUMNS = ["image_id", "category", "status", "map_png"]
METRIC_NAMES = (
    "image_auroc",
    "image_ap",
    "image_f1_max",
    "pixel_auroc",
    "pixel_ap",
    "pixel_f1_max",
    "pixel_aupro",
    "vand_score",
)


class EvaluationError(ZsadError, RuntimeError):
    """An evaluation that cannot run; the message names the run or the ground truth."""

    exit_code = 2


def _evaluate_parts(batch: dict, gt: dict[str, tuple], eval_size, storage) -> dict:
    """Ray task body: evaluate whole masks part files; one output row per (part, category)."""
    stage = EvaluateStage(eval_size, storage)
    merged: dict[str, LevelStats] = {}
    problems: dict[str, list[str]] = {}
    for uri in batch["path"]:
        fs, path = fsio.filesystem(str(uri), storage)
        with fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            for rb in pf.iter_batches(batch_size=32, columns=MASK_COLUMNS):
                cols = {c: rb.column(c).to_numpy(zero_copy_only=False) for c in MASK_COLUMNS}
                ids = cols["image_id"]
                cols["gt_label"] = np.array([gt.get(i, (None, None))[0] for i in ids], dtype=object)
                cols["mask_uri"] = np.array([gt.get(i, (None, None))[1] for i in ids], dtype=object)
                out = stage(cols)
                for j, cat in enumerate(out["category"]):
                    st = stats_from_row(out["neg"][j], out["pos"][j], out["pro"][j], out["n_regions"][j])
                    merged[cat] = merged[cat].merge(st) if cat in merged else st
                    if out["problems"][j]:
                        problems.setdefault(cat, []).extend(out["problems"][j].split("\n"))
    cats = sorted(merged)
    return {
        "category": np.array(cats, dtype=object),
        "neg": np.array([merged[c].neg.tobytes() for c in cats], dtype=object),
        "pos": np.array([merged[c].pos.tobytes() for c in cats], dtype=object),
        "pro": np.array([merged[c].pro.tobytes() for c in cats], dtype=object),
        "n_regions": np.array([merged[c].n_regions for c in cats], dtype=np.int64),
        "problems": np.array(["\n".join(problems.get(c, [])) for c in cats], dtype=object),
    }


def ground_truth(run_dir: str, storage, gt_uri: str | None, layout: str | None) -> pd.DataFrame:
    """image_id, gt_label, mask_uri for the run's images: from the run's own input manifest, or
    from another listing (joined by URI) when ``gt_uri`` is given."""
    inputs = (
        pd.read_parquet(fsio.join(run_dir, "inputs.parquet"), storage_options=storage or None)
        if fsio.is_remote(run_dir)
        else pd.read_parquet(fsio.join(run_dir, "inputs.parquet"))
    )
    if gt_uri is None:
        return inputs[["image_id", "uri", "gt_label", "mask_uri"]]
    try:
        _, gt = list_inputs(gt_uri, DataSpec(layout=layout or "auto"), storage)
    except InputError as exc:
        raise EvaluationError(f"ground truth: {exc}") from None
    joined = inputs[["image_id", "uri"]].merge(gt[["uri", "gt_label", "mask_uri"]], on="uri", how="left")
    if joined["gt_label"].notna().sum() == 0:
        raise EvaluationError(f"ground truth {gt_uri}: none of its images matches the run's inputs (joined by URI)")
    return joined


#: --image-score -> the scores column it reads: the run's streaming score, the max of its map, or
#: the transductive few-shot score (APRIL-GAN: written once every image of a category is scored)
IMAGE_SCORE_SOURCES = {
    "method": "score",
    "max_map": "max_pixel_score",
    "transductive": "score_transductive",
    "mutual": "score_mutual",
    "rscin": "score_rscin",
}


def _image_table(scores: pd.DataFrame, source: str) -> ValueTable:
    col = IMAGE_SCORE_SOURCES[source]
    s = scores[col].to_numpy(dtype=float)
    keep = np.isfinite(s)
    return ValueTable.from_scores(s[keep], scores["gt_label"].to_numpy()[keep].astype(int))


def _part_rows(
    parts: list[str],
    lookup: dict[str, tuple],
    eval_size,
    storage,
    executor: str,
    address: str | None,
    log: Callable[[str], None],
):
    """The rows of :func:`_evaluate_parts` over every masks part file: Ray tasks, or in this process."""
    from pipeline.runtime.executors import check

    check(executor, address)
    kwargs = {"gt": lookup, "eval_size": eval_size, "storage": storage}
    if executor == "local":
        for p in parts:
            out = _evaluate_parts({"path": np.array([p], dtype=object)}, **kwargs)
            for j in range(len(out["category"])):
                yield {k: v[j] for k, v in out.items()}
        return
    with ray_session(address, log):
        ds = ray.data.from_items([{"path": p} for p in parts], override_num_blocks=max(1, len(parts)))
        ds = ds.map_batches(_evaluate_parts, batch_size=1, batch_format="numpy", fn_kwargs=kwargs, num_cpus=1)
        yield from ds.iter_rows()


def evaluate_run(
    run_dir: str,
    *,
    storage=None,
    gt_uri: str | None = None,
    layout: str | None = None,
    eval_size: str | int = "stored",
    image_score: str = "auto",
    aupro_limit: float = 0.3,
    pro_mode: str = "mvtec",
    address: str | None = None,
    log: Callable[[str], None] = print,
    executor: str = "ray",
) -> pd.DataFrame:
    """Evaluate the run at ``run_dir``; writes ``metrics/`` and ``metrics.md`` there and returns the table.
    ``executor``: ``ray`` (one Ray task per masks part file; a local Ray, the cluster at ``address``,
    or the Ray this process already runs) or ``local`` (the same task body, part by part, here)."""
    run_dir = fsio.normalise(run_dir)
    try:
        record = read_json(fsio.join(run_dir, "run.json"), storage)
    except FileNotFoundError:
        raise EvaluationError(f"{run_dir}: no run.json (not a finished zsad run)") from None
    if image_score == "auto":  # APRIL-GAN few-shot's published image score is the transductive one
        image_score = "transductive" if (record.get("few_shot") or {}).get("method") == "april_gan" else "method"
    if image_score not in IMAGE_SCORE_SOURCES:
        raise EvaluationError(f"image score source {image_score!r}: use {', '.join(IMAGE_SCORE_SOURCES)}")
    if pro_mode not in ("mvtec", "fixed_grid_200"):
        raise EvaluationError(f"AUPRO mode {pro_mode!r}: use mvtec or fixed_grid_200")
    gt = ground_truth(run_dir, storage, gt_uri, layout)
    gt = gt[gt["gt_label"].notna()]
    if gt.empty:
        raise EvaluationError(f"{run_dir}: no image has a ground-truth label (give --ground-truth and --layout)")
    extra = [IMAGE_SCORE_SOURCES[image_score]] if image_score in ("transductive", "mutual", "rscin") else []
    scores = read_folder(
        fsio.join(run_dir, "scores"), storage, ["image_id", "category", "status", "score", "max_pixel_score", *extra]
    )
    scores = (
        scores[scores["status"] == "ok"].drop(columns=["status"]).merge(gt[["image_id", "gt_label"]], on="image_id")
    )
    if image_score == "max_map" and scores["max_pixel_score"].isna().all():
        raise EvaluationError(f"{run_dir}: image score source max_map needs pixel maps; this run has none")
    if image_score == "transductive" and scores["score_transductive"].isna().all():
        raise EvaluationError(
            f"{run_dir}: image score source transductive needs score_transductive, which only APRIL-GAN "
            "few-shot runs write (once every image is scored); this run has none"
        )
    if image_score in ("mutual", "rscin") and scores[IMAGE_SCORE_SOURCES[image_score]].isna().all():
        raise EvaluationError(
            f"{run_dir}: image score source {image_score} needs {IMAGE_SCORE_SOURCES[image_score]}, which "
            "only mutual-scoring runs write (score_rscin with mutual.rscin, once every image is scored)"
        )

    pixel_stats: dict[str, LevelStats] = {}
    problems: dict[str, list[str]] = {}
    has_maps = record.get("model", {}).get("pixel_method", "none") != "none"
    if has_maps:
        fs, path = fsio.filesystem(fsio.join(run_dir, "masks"), storage)
        parts = [fsio.unstrip(fs, p) for p in sorted(fs.glob(posixpath.join(path, "*.parquet")))]
        lookup = {
            r.image_id: (int(r.gt_label), r.mask_uri if isinstance(r.mask_uri, str) else None) for r in gt.itertuples()
        }
        for row in _part_rows(parts, lookup, eval_size, storage, executor, address, log):
            st = stats_from_row(row["neg"], row["pos"], row["pro"], row["n_regions"])
            cat = row["category"]
            pixel_stats[cat] = pixel_stats[cat].merge(st) if cat in pixel_stats else st
            if row["problems"]:
                problems.setdefault(cat, []).extend(row["problems"].split("\n"))
    for cat, items in problems.items():
        log(
            f"evaluate: {len(items)} anomalous image(s) of {cat} without a usable mask, "
            f"left out of the pixel metrics: {items[:3]}"
        )

    rows = []
    plot_curves: dict[str, dict[str, dict[str, list[float]]]] = {}
    for cat in sorted(scores["category"].unique()):
        sc = scores[scores["category"] == cat]
        it = _image_table(sc, image_score)
        row: dict[str, Any] = {
            "category": cat,
            "n_images": len(sc),
            "n_anomalous": int((sc["gt_label"] == 1).sum()),
            "n_missing_masks": len(problems.get(cat, [])),
            "image_auroc": curves.auroc(it),
            "image_ap": curves.average_precision(it),
            "image_f1_max": curves.f1_max(it),
        }
        st = pixel_stats.get(cat)
        if st is not None:
            pt = st.table(*record.get("map_range", (0.0, 1.0)))  # the maps' stored range (run.json)
            row.update(
                n_pixels=int(st.neg.sum() + st.pos.sum()),
                n_regions=st.n_regions,
                pixel_auroc=curves.auroc(pt),
                pixel_ap=curves.average_precision(pt),
                pixel_f1_max=curves.f1_max(pt),
                pixel_aupro=curves.aupro(pt, aupro_limit)
                if pro_mode == "mvtec"
                else curves.aupro_fixed_grid_200(pt, aupro_limit),
            )
            plot_curves[cat] = _pixel_curves(pt)
        else:
            row.update(
                n_pixels=0,
                n_regions=0,
                pixel_auroc=math.nan,
                pixel_ap=math.nan,
                pixel_f1_max=math.nan,
                pixel_aupro=math.nan,
            )
        row["vand_score"] = curves.vand(row["image_f1_max"], row["pixel_f1_max"])
        rows.append(row)
    table = pd.DataFrame(rows)
    mean = {"category": "mean"}
    for c in ("n_images", "n_anomalous", "n_missing_masks", "n_pixels", "n_regions"):
        mean[c] = int(table[c].sum())
    for c in METRIC_NAMES:
        vals = table[c].to_numpy(dtype=float)
        mean[c] = float(np.mean(vals)) if len(vals) and np.isfinite(vals).all() else math.nan
    table = pd.concat([table, pd.DataFrame([mean])], ignore_index=True)
    settings = {
        "run_id": record["run_id"],
        "eval_size": str(eval_size),
        "binarisation": "mask != 0, resized nearest-neighbour to the map",
        "image_score_source": image_score,
        "aupro_mode": pro_mode,
        "aupro_limit": float(aupro_limit),
        "ap_definition": "step sum over distinct thresholds (scikit-learn average_precision_score)",
        "connectivity": 8,
        "random_weights": bool(record.get("random_weights", False)),
    }
    for k, v in settings.items():
        table[k] = v
    cols = {
        k: [None if isinstance(v, float) and math.isnan(v) else v for v in table[k].tolist()] for k in table.columns
    }
    writer = TableWriter(fsio.join(run_dir, "metrics"), "metrics", storage)
    writer.clear()
    writer.write(cols)
    writer.close()
    fs, path = fsio.filesystem(fsio.join(run_dir, "metrics.md"), storage)
    with fs.open(path, "w") as fh:
        fh.write(markdown(table, settings))
    write_json(fsio.join(run_dir, CURVES_FILE), {"settings": settings, "categories": plot_curves}, storage)
    return table


#: the pixel curves of the last evaluation, for plots (``zsad report``), beside ``metrics/``
CURVES_FILE = "curves.json"


def _pixel_curves(table: ValueTable, max_points: int = 400) -> dict[str, dict[str, list[float]]]:
    """The category's pixel ROC and PRO curves (all of FPR 0..1), thinned to about ``max_points``
    points each for plotting; the metrics come from the full curves, never from these."""
    out = {}
    pro = curves.pro_curve(table) if table.n_regions and table.neg.sum() else (np.zeros(0), np.zeros(0))
    for name, (x, y) in (("pixel_roc", curves.roc_points(table)), ("pixel_pro", pro)):
        if len(x) and np.isfinite(y).all():
            x, y = curves.thin(x, y, max_points)
            out[name] = {"x": [round(float(v), 6) for v in x], "y": [round(float(v), 6) for v in y]}
    return out


def markdown(table: pd.DataFrame, settings: dict[str, Any]) -> str:
    """A per-category table shaped like the papers' (percent, one decimal)."""
    heads = [
        "category",
        "image AUROC",
        "image AP",
        "image F1-max",
        "pixel AUROC",
        "pixel AP",
        "pixel F1-max",
        "AUPRO",
        "VAND",
    ]
    lines = []
    if settings["random_weights"]:
        lines.append("**Random model weights: these numbers are NOT anomaly-detection results.**\n")
    lines.append(
        f"Run `{settings['run_id']}`; eval size {settings['eval_size']}; "
        f"image score: {settings['image_score_source']}; "
        f"AUPRO {settings['aupro_mode']} @ {settings['aupro_limit']:g}; AP: step; "
        f"{settings['connectivity']}-connected regions.\n"
    )
    lines.append("| " + " | ".join(heads) + " |")
    lines.append("|" + "---|" * len(heads))
    for r in table.itertuples():
        vals = [r.category] + [
            ("-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}")
            for v in (
                r.image_auroc,
                r.image_ap,
                r.image_f1_max,
                r.pixel_auroc,
                r.pixel_ap,
                r.pixel_f1_max,
                r.pixel_aupro,
                r.vand_score,
            )
        ]
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"
