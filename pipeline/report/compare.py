"""``zsad compare RUN_A RUN_B``: two runs side by side on one self-contained HTML page.

Images are matched by ``image_id`` (sha1 of the URI), so the two runs must have scored the same
URIs. Sections: ``compare-runs`` (both runs' presets, models, counts), ``compare-metrics`` (per
category and metric: A, B and B - A, when both were evaluated), ``compare-scatter`` (score of A
against score of B for every image scored ok in both, and the rank correlation per category) and
``compare-rank-changes`` (the ``top`` images whose rank within their category moved most, with the
heatmaps of both runs, each on its run's own colour scale).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd

from pipeline.io import fs as fsio
from pipeline.report import html as H
from pipeline.report import render
from pipeline.report.report import METRIC_COLUMNS, colour_scale
from pipeline.report.runread import (
    ReportError,
    RunData,
    heat,
    mask_rows,
    open_run,
    predicted_mask,
    read_image,
    write_page,
)


@dataclass
class CompareResult:
    path: str
    bytes: int
    seconds: float
    common: int


def default_out(a: RunData, b: RunData) -> str:
    return fsio.normalise(f"compare-{a.run_id}-vs-{b.run_id}.html")


def common_images(a: RunData, b: RunData) -> pd.DataFrame:
    """image_id, uri, category, value_a, value_b, rank_a, rank_b, rank_change for images scored ok
    in both; ranks are percentiles within the category (0 = lowest score, 1 = highest)."""
    cols = ["image_id", "uri", "category", "value", "gt_label", "mask_uri"]
    left = a.scores[(a.scores["status"] == "ok") & a.scores["value"].notna()][cols]
    right = b.scores[(b.scores["status"] == "ok") & b.scores["value"].notna()][["image_id", "value"]]
    both = left.merge(right, on="image_id", suffixes=("_a", "_b"))
    for side in ("a", "b"):
        both[f"rank_{side}"] = both.groupby("category")[f"value_{side}"].rank(pct=True, method="average")
    both["rank_change"] = both["rank_b"] - both["rank_a"]
    return both


def build_compare(
    a_uri: str,
    b_uri: str,
    out: str | None = None,
    *,
    top: int = 8,
    storage=None,
    thumb: int = 160,
    log: Callable[[str], None] = print,
) -> CompareResult:
    t0 = time.monotonic()
    if top < 1:
        raise ReportError(f"--top {top}: must be at least 1")
    a, b = open_run(a_uri, storage), open_run(b_uri, storage)
    shared_any = len(set(a.scores["image_id"]) & set(b.scores["image_id"]))
    both = common_images(a, b)
    if both.empty:
        what = "share no images" if shared_any == 0 else f"share {shared_any} images, but none was scored ok in both"
        raise ReportError(f"{a.uri} and {b.uri} {what} (images are matched by URI): compare runs over the same input")
    out = fsio.normalise(out) if out else default_out(a, b)
    moved = both.reindex(both["rank_change"].abs().sort_values(ascending=False, kind="stable").index).head(top)
    ids = set(moved["image_id"])
    rows_a, rows_b = mask_rows(a, ids), mask_rows(b, ids)
    scale_a = colour_scale(a, rows_a) if a.has_maps else None
    scale_b = colour_scale(b, rows_b) if b.has_maps else None

    def body(fh) -> None:
        fh.write(H.page_start(f"zsad compare: {a.run_id} vs {b.run_id}"))
        if a.random_weights or b.random_weights:
            which = " and ".join(f"{side} ({r.run_id})" for side, r in (("A", a), ("B", b)) if r.random_weights)
            fh.write(H.random_banner(True, f"run {which}"))
        fh.write(f"<h1>A <code>{H.esc(a.run_id)}</code> vs B <code>{H.esc(b.run_id)}</code></h1>\n")
        fh.write(_runs(a, b, len(both)))
        fh.write(_metrics(a, b))
        fh.write(_scatter(a, b, both))
        fh.write(_moved(a, b, moved, rows_a, rows_b, scale_a, scale_b, thumb))
        fh.write(H.page_end(f"Comparison of runs {a.run_id} and {b.run_id}"))

    size = write_page(out, body, storage)
    seconds = time.monotonic() - t0
    log(f"compare: {out} ({size / 1e6:.2f} MB, {len(both)} images in both runs, {seconds:.1f} s)")
    return CompareResult(out, size, seconds, len(both))


def _runs(a: RunData, b: RunData, n_common: int) -> str:
    keys = [
        "preset",
        "status",
        "images",
        "ok",
        "failed",
        "random weights",
        "image score",
        "score_method",
        "pixel_method",
        "clip_model",
        "clip_weights",
        "prompt_set",
        "sam_model",
        "sam_weights",
        "input",
    ]

    def value(r: RunData, k: str):
        rec, counts, model = r.record, r.record.get("counts", {}), r.record.get("model", {})
        return {
            "preset": rec.get("spec", {}).get("name"),
            "status": rec.get("status"),
            "images": counts.get("images"),
            "ok": counts.get("ok"),
            "failed": counts.get("failed"),
            "random weights": r.random_weights,
            "image score": r.score_source,
            "input": rec.get("input"),
        }.get(k, model.get(k))

    rows = [(k, value(a, k), value(b, k)) for k in keys]
    return (
        '<section id="compare-runs"><h2>Runs</h2>'
        + H.table(["", "A", "B"], rows)
        + f'<p class="note">{n_common} images were scored ok in both runs (matched by URI).</p></section>\n'
    )


def _metrics(a: RunData, b: RunData) -> str:
    out = '<section id="compare-metrics"><h2>Metrics</h2>'
    missing = [side for side, r in (("A", a), ("B", b)) if r.metrics is None]
    if missing:
        return (
            out + f"<p>Not evaluated: run {' and '.join(missing)} has no metrics table (zsad evaluate).</p></section>\n"
        )
    ma, mb = a.metrics.set_index("category"), b.metrics.set_index("category")
    cats = [c for c in ma.index if c != "mean" and c in mb.index] + (
        ["mean"] if "mean" in ma.index and "mean" in mb.index else []
    )
    heads, rows = ["category"], []
    for name, _ in METRIC_COLUMNS:
        heads += [f"{name} A", "B", "B - A"]
    for cat in cats:
        row: list = [cat]
        for _, col in METRIC_COLUMNS:
            va, vb = _num(ma.at[cat, col]), _num(mb.at[cat, col])
            delta = vb - va if math.isfinite(va) and math.isfinite(vb) else math.nan
            sign = "good" if delta > 0 else "bad" if delta < 0 else ""
            row += [_pct(va), _pct(vb), H.Raw(f'<span class="{sign}">{_pct(delta, signed=True)}</span>')]
        rows.append(row)
    only = sorted(set(ma.index) ^ set(mb.index))
    note = (
        f'<p class="note">Percent. Only in one run: {H.esc(", ".join(only))}.</p>'
        if only
        else '<p class="note">Percent.</p>'
    )
    return out + H.table(heads, rows, numeric=range(1, len(heads))) + note + "</section>\n"


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _pct(v: float, signed: bool = False) -> str:
    if not math.isfinite(v):
        return "-"
    return f"{100 * v:+.1f}" if signed else f"{100 * v:.1f}"


def _scatter(a: RunData, b: RunData, both: pd.DataFrame) -> str:
    svg = render.scatter_svg(
        both["value_a"].to_numpy(),
        both["value_b"].to_numpy(),
        title="Image scores",
        xlabel=f"A ({a.score_source})",
        ylabel=f"B ({b.score_source})",
    )
    rows = []
    for cat, g in both.groupby("category", sort=True):
        rho = g["value_a"].rank().corr(g["value_b"].rank()) if len(g) > 1 else math.nan
        rows.append(
            (cat, len(g), float(rho) if rho is not None else math.nan, float(np.mean(np.abs(g["rank_change"]))))
        )
    return (
        '<section id="compare-scatter"><h2>Scores, A against B</h2><div class="plots">'
        + H.img(render.svg_data_uri(svg), "score scatter")
        + "</div>"
        + H.table(
            ["category", "images in both", "Spearman rank correlation", "mean |rank change|"], rows, numeric=(1, 2, 3)
        )
        + "</section>\n"
    )


def _moved(a: RunData, b: RunData, moved: pd.DataFrame, rows_a, rows_b, scale_a, scale_b, thumb: int) -> str:
    out = [
        f'<section id="compare-rank-changes"><h2>Largest rank changes ({len(moved)})</h2>',
        '<p class="note">Rank = percentile of the image\'s score within its category in each run. Heatmaps: A left, '
        "B right, each on its run's colour scale",
    ]
    for side, scale in (("A", scale_a), ("B", scale_b)):
        if scale is not None:
            out.append(f"; {side} [{scale.lo:.4g}, {scale.hi:.4g}]")
    out.append(".</p>")
    bars = [
        H.img(render.svg_data_uri(render.colourbar_svg(s, f"run {side} map value")), f"colour bar {side}")
        for side, s in (("A", scale_a), ("B", scale_b))
        if s is not None
    ]
    out.append('<div class="plots">' + "".join(bars) + "</div>")
    out.append('<div class="cards">')
    for r in moved.itertuples():
        rgb, why = read_image(r.uri, a.storage)
        size = render.fit_long_side(*(rgb.shape[:2] if rgb is not None else (thumb, thumb)), thumb)
        pics = [H.img(render.png_data_uri(render.resize_rgb(rgb, size)), "image")] if rgb is not None else []
        for run, rows, scale in ((a, rows_a, scale_a), (b, rows_b, scale_b)):
            row = rows.get(r.image_id)
            hm = heat(row) if row else None
            if hm is not None and scale is not None:
                pred, _ = predicted_mask(row)
                pics.append(
                    H.img(
                        render.png_data_uri(render.overlay(rgb, hm, scale, size, predicted=pred)),
                        f"heatmap {run.run_id}",
                    )
                )
        note = "" if rgb is not None else f'<div class="note">image not readable now ({H.esc(why)})</div>'
        out.append(
            f'<div class="card" data-image-id="{H.esc(r.image_id)}"><div class="pics">{"".join(pics)}</div>'
            f"<div><b>{H.esc(r.category)}</b>: rank {r.rank_a:.2f} -> {r.rank_b:.2f} "
            f'(score A {r.value_a:.4f}, B {r.value_b:.4f})</div><div class="uri">{H.esc(r.uri)}</div>{note}</div>'
        )
    out.append("</div></section>\n")
    return "".join(out)
