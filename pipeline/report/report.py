"""``zsad report RUN``: one self-contained HTML page of a finished run.

Sections (each an element with a fixed id, so tests and scripts can find them):

- ``random-weights-banner`` (only when the run used random weights), ``run`` (status, preset, models,
  counts, per-stage time, throughput), ``errors-by-type``, ``metrics`` (when evaluated),
  ``colour-scale``;
- per category ``category-<name>``: its metrics row, image ROC / PR curves and the pixel PRO curve
  (from ``curves.json``, written by ``zsad evaluate``), the score histogram (normal vs anomalous, or
  all images without labels) with the threshold marked, and two rows of examples: the ``top`` most
  anomalous images and ``top`` images nearest the threshold, each with the image, its heatmap
  overlay on the run's ONE colour scale, the outline of the run's mask (refined or thresholded) and
  of the ground truth, its score and URI;
- ``failed-inputs``: the errors table (first :data:`MAX_FAILED_ROWS` rows).

The threshold of a category is its image F1-max threshold when it has both labels, else the 95th
percentile of its scores (said on the page). Memory: the score columns of the run (a few numbers per
image) plus the pictures of one category; heatmaps are fetched only for the images shown.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd

from pipeline.io import fs as fsio
from pipeline.metrics import curves
from pipeline.metrics.state import ValueTable
from pipeline.ops.heatmap import decode_png16_levels
from pipeline.report import html as H
from pipeline.report import render
from pipeline.report.runread import (
    ReportError,
    RunData,
    errors,
    heat,
    mask_rows,
    open_run,
    predicted_mask,
    read_image,
    read_truth,
    write_page,
)

MAX_FAILED_ROWS = 500
#: palette size of the example pictures (8-bit indexed PNG): about half the bytes of 256 colours on
#: textured photographs, which keeps a 15-category report at a few MB (BENCHMARKS.md)
COLOURS = 64
#: points drawn per curve (a display aid; the areas printed on the plots are the exact metrics)
PLOT_POINTS = 300
MESSAGES_PER_TYPE = 3
UNLABELLED_QUANTILE = 0.95
METRIC_COLUMNS = [
    ("image AUROC", "image_auroc"),
    ("image AP", "image_ap"),
    ("image F1-max", "image_f1_max"),
    ("pixel AUROC", "pixel_auroc"),
    ("pixel AP", "pixel_ap"),
    ("pixel F1-max", "pixel_f1_max"),
    ("AUPRO", "pixel_aupro"),
    ("VAND", "vand_score"),
]


@dataclass
class ReportResult:
    path: str
    bytes: int
    seconds: float
    categories: int
    images_shown: int


def default_out(run_uri: str) -> str:
    return fsio.join(fsio.normalise(run_uri), "report.html")


def threshold_of(values: np.ndarray, labels: np.ndarray) -> tuple[float, str]:
    """(threshold, how it was chosen) for one category's image scores."""
    labelled = ~pd.isna(labels)
    lab = np.asarray(labels[labelled], dtype=float).astype(int) if labelled.any() else np.zeros(0, int)
    if labelled.any() and 0 < lab.sum() < len(lab):
        t = curves.f1_max_threshold(ValueTable.from_scores(values[labelled], lab))
        return t, "image F1-max threshold"
    if not len(values):
        return math.nan, "no scores"
    return float(np.quantile(values, UNLABELLED_QUANTILE)), f"{100 * UNLABELLED_QUANTILE:g}th percentile (no labels)"


def select(cat: pd.DataFrame, top: int, threshold: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the ``top`` highest-scored images, the ``top`` others nearest ``threshold``) of a category."""
    ok = cat[(cat["status"] == "ok") & np.isfinite(cat["value"].to_numpy(dtype=float))]
    high = ok.sort_values(["value", "uri"], ascending=[False, True], kind="stable").head(top)
    rest = ok.drop(high.index)
    if not math.isfinite(threshold) or rest.empty:
        return high, rest.head(0)
    near = rest.assign(_d=(rest["value"] - threshold).abs()).sort_values(["_d", "uri"], kind="stable").head(top)
    return high, near.drop(columns="_d").sort_values("value", ascending=False, kind="stable")


def colour_scale(
    run: RunData, rows: dict[str, dict[str, Any]], how: str = "auto", cmap: str = "jet"
) -> render.ColourScale:
    """The page's ONE colour scale: ``stored`` = the maps' stored range (run.json map_range);
    ``LO,HI`` = given; ``auto`` = the 0.5th to 99.9th percentile of all pixels of the shown maps
    (within the stored range), so the colours use the range the run's maps actually take."""
    lo, hi = run.map_range
    if how == "stored":
        return render.ColourScale(lo, hi, cmap, "the maps' stored range")
    if how != "auto":
        try:
            a, b = (float(v) for v in how.split(","))
        except ValueError:
            raise ReportError(f"map range {how!r}: use auto, stored or LO,HI (two numbers)") from None
        try:
            return render.ColourScale(a, b, cmap, "given")
        except ValueError as exc:
            raise ReportError(f"map range {how!r}: {exc}") from None
    counts = np.zeros(65536, np.int64)
    for row in rows.values():
        if row.get("map_png") is not None:
            counts += np.bincount(decode_png16_levels(row["map_png"]).ravel(), minlength=65536)
    total = counts.sum()
    if total == 0:
        return render.ColourScale(lo, hi, cmap, "the maps' stored range")
    cum = np.cumsum(counts)
    q_lo = int(np.searchsorted(cum, 0.005 * total))
    q_hi = int(np.searchsorted(cum, 0.999 * total))
    a, b = lo + q_lo / 65535 * (hi - lo), lo + q_hi / 65535 * (hi - lo)
    if b - a < 1e-9 * (hi - lo) + 1e-12:  # flat maps: widen around the value
        pad = max(1e-3 * (hi - lo), 1e-6)
        a, b = max(lo, a - pad), min(hi, b + pad)
    return render.ColourScale(a, b, cmap, "0.5th-99.9th percentile of the shown maps' pixels")


def build_report(
    run_uri: str,
    out: str | None = None,
    *,
    top: int = 6,
    storage=None,
    map_range: str = "auto",
    thumb: int = 160,
    log: Callable[[str], None] = print,
) -> ReportResult:
    """Write the report of the run at ``run_uri`` to ``out`` (default ``RUN/report.html``)."""
    t0 = time.monotonic()
    if top < 1:
        raise ReportError(f"--top {top}: must be at least 1")
    run = open_run(run_uri, storage)
    out = fsio.normalise(out) if out else default_out(run.uri)
    picks: dict[str, tuple[pd.DataFrame, pd.DataFrame, float, str]] = {}
    for cat, frame in _categories(run.scores):
        ok = frame[(frame["status"] == "ok") & np.isfinite(frame["value"].to_numpy(dtype=float))]
        t, how = threshold_of(ok["value"].to_numpy(dtype=float), ok["gt_label"].to_numpy(dtype=object))
        high, near = select(frame, top, t)
        picks[cat] = (high, near, t, how)
    shown = {i for high, near, _, _ in picks.values() for i in (*high["image_id"], *near["image_id"])}
    rows = mask_rows(run, shown)  # the heatmaps of the shown images only (compressed PNG bytes)
    scale = colour_scale(run, rows, map_range) if run.has_maps else None
    errs = errors(run)

    def body(fh) -> None:
        fh.write(H.page_start(f"zsad report: {run.run_id}"))
        fh.write(H.random_banner(run.random_weights))
        fh.write(f"<h1>zsad run <code>{H.esc(run.run_id)}</code></h1>\n")
        fh.write(_run_section(run))
        fh.write(_errors_by_type(errs))
        fh.write(_metrics_section(run))
        if scale is not None:
            fh.write(
                f'<section id="colour-scale" data-lo="{scale.lo!r}" data-hi="{scale.hi!r}" data-cmap="{scale.cmap}">'
                "<h2>Heatmap colours</h2>"
                f"{H.img(render.svg_data_uri(render.colourbar_svg(scale)), 'colour bar')}"
                f'<p class="note">One colour scale for every heatmap on this page: [{scale.lo:.4g}, {scale.hi:.4g}] '
                f"({H.esc(scale.how)}); the maps are stored on [{run.map_range[0]:g}, {run.map_range[1]:g}]. "
                'Outlines: <span style="color:#00b5b5">cyan</span> = the run\'s mask, '
                '<span style="color:#00a000">green</span> = ground truth.</p></section>\n'
            )
        for cat, (high, near, t, how) in picks.items():
            fh.write(
                _category_section(
                    run, cat, run.scores[run.scores["category"] == cat], high, near, t, how, rows, scale, thumb
                )
            )
            fh.flush()
        fh.write(_failed_inputs(errs))
        fh.write(H.page_end(f"Report of run {run.run_id}"))

    size = write_page(out, body, storage)
    seconds = time.monotonic() - t0
    log(f"report: {out} ({size / 1e6:.2f} MB, {len(picks)} categories, {len(shown)} images shown, {seconds:.1f} s)")
    return ReportResult(out, size, seconds, len(picks), len(shown))


def _categories(scores: pd.DataFrame):
    for cat in sorted(scores["category"].dropna().unique()):
        yield str(cat), scores[scores["category"] == cat]


def _run_section(run: RunData) -> str:
    r = run.record
    counts = r.get("counts", {})
    wall = float(r.get("wall_seconds") or 0.0)
    n = int(counts.get("images") or 0)
    spec = r.get("spec", {})
    status = str(r.get("status"))
    pairs: list[tuple[str, Any]] = [
        (
            "status",
            H.Raw(
                f'<span class="{"good" if status == "succeeded" else "bad"}">{H.esc(status)}</span>'
                + (f" - {H.esc(r['reason'])}" if r.get("reason") else "")
            ),
        ),
        ("preset", spec.get("name")),
        ("input", r.get("input")),
        ("layout", r.get("layout")),
        ("output", r.get("output")),
        ("started / ended", f"{r.get('started')} / {r.get('ended')}"),
        (
            "images",
            f"{n} listed: {counts.get('ok')} ok, {counts.get('failed')} failed, "
            f"{counts.get('missing', 0)} without a result",
        ),
        ("wall time", f"{wall:.1f} s" + (f"  ({n / wall:.2f} images/s)" if wall > 0 and n else "")),
        ("random weights", "YES - not a result" if run.random_weights else "no"),
        ("image score shown", f"{run.score_source} (scores column {_column(run.score_source)})"),
    ]
    for k, v in (r.get("model") or {}).items():
        if v is not None:
            pairs.append((k, v))
    if r.get("few_shot"):
        fsr = r["few_shot"]
        pairs.append(("few-shot", f"{fsr.get('method')} k={fsr.get('k')}, references {fsr.get('reference')}"))
    stage = r.get("stage_seconds") or {}
    stage_rows = []
    for key, secs in stage.items():
        if secs is None:
            continue
        name = key.removesuffix("_busy").removesuffix("_wall")
        kind = "busy (summed over workers)" if key.endswith("_busy") else "wall"
        rate = f"{n / secs:.2f}" if key.endswith("_busy") and secs > 0 and n else "-"
        stage_rows.append((name, kind, float(secs), rate))
    out = '<section id="run"><h2>Run</h2><div class="row"><div>' + H.kv_table(pairs) + "</div>"
    if stage_rows:
        out += (
            "<div><h3>Time per stage</h3>"
            + H.table(["stage", "time", "seconds", "images per busy second"], stage_rows, numeric=(2, 3))
            + "</div>"
        )
    return out + "</div></section>\n"


def _column(source: str) -> str:
    from pipeline.report.runread import SCORE_SOURCES

    return SCORE_SOURCES[source]


def _errors_by_type(errs: pd.DataFrame) -> str:
    out = '<section id="errors-by-type"><h2>Errors by type</h2>'
    if errs.empty:
        return out + "<p>No input failed.</p></section>\n"
    rows = []
    for (stage, kind), g in errs.groupby(["stage", "error_type"], dropna=False, sort=True):
        msgs = "<br>".join(
            f"<code>{H.esc(u)}</code>: {H.esc(m)}"
            for u, m in zip(g["uri"].head(MESSAGES_PER_TYPE), g["message"].head(MESSAGES_PER_TYPE))
        )
        rows.append((stage, kind, len(g), H.Raw(msgs)))
    rows.sort(key=lambda r: -r[2])
    return (
        out
        + H.table(["stage", "error type", "images", f"first {MESSAGES_PER_TYPE} messages"], rows, numeric=(2,))
        + "</section>\n"
    )


def _metrics_section(run: RunData) -> str:
    out = '<section id="metrics"><h2>Metrics</h2>'
    if run.metrics is None:
        why = (
            "the run has labelled images but was not evaluated: run zsad evaluate"
            if run.record.get("labelled_images")
            else "no ground truth: the input carries no labels"
        )
        return out + f"<p>No metrics ({H.esc(why)}).</p></section>\n"
    m = run.metrics
    s = m.iloc[0]
    rows = [
        (r.category, int(r.n_images), int(r.n_anomalous), *[_pct(getattr(r, c)) for _, c in METRIC_COLUMNS])
        for r in m.itertuples()
    ]
    note = (
        f"Percent. Image score: {H.esc(s.get('image_score_source'))}; AUPRO {H.esc(s.get('aupro_mode'))} @ "
        f"{H.esc(s.get('aupro_limit'))}; eval size {H.esc(s.get('eval_size'))}."
    )
    return (
        out
        + H.table(
            ["category", "images", "anomalous", *[h for h, _ in METRIC_COLUMNS]],
            rows,
            numeric=range(1, 3 + len(METRIC_COLUMNS)),
        )
        + f'<p class="note">{note}</p></section>\n'
    )


def _pct(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * float(v):.1f}"


def _category_section(
    run: RunData,
    cat: str,
    frame: pd.DataFrame,
    high: pd.DataFrame,
    near: pd.DataFrame,
    t: float,
    how: str,
    rows: dict[str, dict[str, Any]],
    scale: render.ColourScale | None,
    thumb: int,
) -> str:
    anchor = "category-" + "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in cat)
    ok = frame[(frame["status"] == "ok") & np.isfinite(frame["value"].to_numpy(dtype=float))]
    n_fail = int((frame["status"] != "ok").sum())
    out = [
        f'<section class="category" id="{H.esc(anchor)}" data-category="{H.esc(cat)}"><h2>{H.esc(cat)}</h2>',
        f'<p class="note">{len(frame)} images, {len(ok)} scored, {n_fail} failed.</p>',
    ]
    if run.metrics is not None:
        m = run.metrics[run.metrics["category"] == cat]
        if len(m):
            r = m.iloc[0]
            out.append(
                H.table(
                    [h for h, _ in METRIC_COLUMNS],
                    [[_pct(r[c]) for _, c in METRIC_COLUMNS]],
                    numeric=range(len(METRIC_COLUMNS)),
                )
            )
    plots = []
    values = ok["value"].to_numpy(dtype=float)
    labels = ok["gt_label"].to_numpy(dtype=object)
    labelled = ~pd.isna(labels)
    lab = labels[labelled].astype(float).astype(int) if labelled.any() else np.zeros(0, int)
    if labelled.any() and 0 < lab.sum() < len(lab):
        table = ValueTable.from_scores(values[labelled], lab)
        fx, fy = curves.thin(*curves.roc_points(table), PLOT_POINTS)
        plots.append(
            (
                "image ROC",
                render.curve_svg(
                    fx,
                    fy,
                    title="Image ROC",
                    xlabel="false positive rate",
                    ylabel="true positive rate",
                    diagonal=True,
                    note=f"AUROC {curves.auroc(table):.3f}",
                ),
            )
        )
        rx, py = curves.thin(*curves.pr_points(table), PLOT_POINTS)
        plots.append(
            (
                "image PR",
                render.curve_svg(
                    np.concatenate([[0.0], rx]),
                    np.concatenate([[py[0]], py]),
                    title="Image precision-recall",
                    xlabel="recall",
                    ylabel="precision",
                    note=f"AP {curves.average_precision(table):.3f}",
                ),
            )
        )
        groups = {"normal": values[labelled][lab == 0], "anomalous": values[labelled][lab == 1]}
    else:
        groups = {"all images": values}
    pixel = run.curves.get(cat, {})
    if "pixel_pro" in pixel:
        limit = 0.3
        if run.metrics is not None and "aupro_limit" in run.metrics:
            limit = float(run.metrics["aupro_limit"].iloc[0])
        pro = pixel["pixel_pro"]
        plots.append(
            (
                "pixel PRO",
                render.curve_svg(
                    np.array(pro["x"]),
                    np.array(pro["y"]),
                    title="Pixel PRO curve",
                    xlabel=f"false positive rate (AUPRO integrates up to {limit:g})",
                    ylabel="per-region overlap",
                ),
            )
        )
    plots.append(
        ("score histogram", render.histogram_svg(groups, threshold=t, threshold_label=how, title="Image scores"))
    )
    out.append(
        '<div class="plots">'
        + "".join(H.img(render.svg_data_uri(svg), alt, title=alt) for alt, svg in plots)
        + "</div>"
    )
    out.append(f'<p class="note">Threshold {t:.4g} ({H.esc(how)}).</p>' if math.isfinite(t) else "")
    for title, picked, cls in (
        (f"Most anomalous ({len(high)})", high, "examples-top"),
        (f"Nearest the threshold ({len(near)})", near, "examples-threshold"),
    ):
        out.append(f'<h3>{H.esc(title)}</h3><div class="cards {cls}">')
        for r in picked.itertuples():
            out.append(_card(run, r, rows.get(r.image_id), scale, thumb))
        out.append("</div>")
        if picked.empty:
            out.append('<p class="note">none</p>')
    out.append("</section>\n")
    return "".join(out)


def _card(run: RunData, r, row: dict[str, Any] | None, scale: render.ColourScale | None, thumb: int) -> str:
    rgb, why = read_image(r.uri, run.storage)
    h, w = (
        rgb.shape[:2]
        if rgb is not None
        else (int(r.height), int(r.width))
        if _known(r.height, r.width)
        else (thumb, thumb)
    )
    size = render.fit_long_side(h, w, thumb)
    pics = []
    if rgb is not None:  # the plain image smaller than the overlay: it is there to recognise the part
        small = render.fit_long_side(h, w, round(thumb * 0.8))
        pics.append(H.img(render.png_data_uri(render.resize_rgb(rgb, small), COLOURS), "image", cls="thumb"))
    hm = heat(row) if row else None
    notes = []
    if hm is not None and scale is not None:
        pred, what = predicted_mask(row)
        truth = read_truth(getattr(r, "mask_uri", None), run.storage)
        pics.append(
            H.img(
                render.png_data_uri(render.overlay(rgb, hm, scale, size, predicted=pred, truth=truth), COLOURS),
                "heatmap overlay",
                cls="overlay",
            )
        )
        if what:
            notes.append(what)
        if truth is not None:
            notes.append("ground truth outlined")
    elif run.has_maps:
        notes.append("no heatmap stored")
    if rgb is None:
        notes.append(f"image not readable now ({why})")
    label = {0: "normal", 1: "anomalous"}.get(int(r.gt_label), "") if _known(r.gt_label) else "unlabelled"
    return (
        f'<div class="card" data-image-id="{H.esc(r.image_id)}"><div class="pics">{"".join(pics)}</div>'
        f"<div><b>score {float(r.value):.4f}</b> - {H.esc(label)}</div>"
        f'<div class="uri">{H.esc(r.uri)}</div>'
        + (f'<div class="note">{H.esc("; ".join(notes))}</div>' if notes else "")
        + "</div>"
    )


def _known(*values: Any) -> bool:
    return all(v is not None and not (isinstance(v, float) and math.isnan(v)) for v in values)


def _failed_inputs(errs: pd.DataFrame) -> str:
    out = '<section id="failed-inputs"><h2>Failed inputs</h2>'
    if errs.empty:
        return out + "<p>None.</p></section>\n"
    shown = errs.sort_values(["category", "uri"], kind="stable").head(MAX_FAILED_ROWS)
    rows = [(r.uri, r.category, r.stage, r.error_type, r.message) for r in shown.itertuples()]
    more = (
        f'<p class="note">{len(errs) - MAX_FAILED_ROWS} more in the errors table (RUN/errors/).</p>'
        if len(errs) > MAX_FAILED_ROWS
        else ""
    )
    return out + H.table(["uri", "category", "stage", "error type", "message"], rows) + more + "</section>\n"
