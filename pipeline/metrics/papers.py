"""The numbers the papers and reference repositories publish, per preset and dataset, and a run's
metrics beside them (README "Reproducing the published numbers"; METHODS.md section 7, MUSC.md
section 6).

Values are percentages as published (the metrics table stores fractions). A published row names only
the metrics its source reports. :func:`beside` puts a run's ``mean`` row next to a published row with
the difference, for ``zsad evaluate --paper PRESET``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.errors import ZsadError

#: metrics table column -> the short name used in the papers' tables
METRICS = {"image_auroc": "I-AUROC", "image_f1_max": "I-F1max", "image_ap": "I-AP", "pixel_auroc": "P-AUROC",
           "pixel_f1_max": "P-F1max", "pixel_ap": "P-AP", "pixel_aupro": "PRO"}


@dataclass(frozen=True)
class Published:
    preset: str
    dataset: str  # mvtec or visa
    source: str
    values: dict[str, float]  # metrics column -> percent
    settings: str = ""  # what the evaluation must use to compare (e.g. the image score, AUPRO's limit)


def _row(preset: str, dataset: str, source: str, settings: str = "", **values: float) -> Published:
    return Published(preset, dataset, source, dict(values), settings)


_ZS = "METHODS.md section 7 (the papers' tables)"
PUBLISHED: tuple[Published, ...] = (
    _row("winclip", "visa", _ZS, image_f1_max=79.0, pixel_f1_max=14.8, pixel_auroc=79.6),
    _row("winclip", "mvtec", _ZS, pixel_auroc=85.1, pixel_f1_max=31.7),
    _row("aprilgan", "visa", _ZS, image_f1_max=78.7, pixel_f1_max=32.3, pixel_auroc=94.2),
    _row("aprilgan", "mvtec", _ZS, pixel_auroc=87.6, pixel_f1_max=43.3),
    _row("vvv", "visa", _ZS, image_f1_max=81.5, pixel_f1_max=24.2),
    _row("fade", "visa", _ZS, image_f1_max=78.6, pixel_f1_max=16.7, pixel_auroc=91.5),
    _row("fade", "mvtec", _ZS, pixel_auroc=89.6, pixel_f1_max=39.8),
    _row("clip_sam", "visa", _ZS, pixel_f1_max=36.5, pixel_auroc=94.8),
    _row("clip_sam", "mvtec", _ZS, pixel_auroc=89.5, pixel_f1_max=48.8),
    _row(
        "fade_fewshot", "visa", _ZS + ", 1-shot", "few_shot.k=1", image_f1_max=84.7, pixel_f1_max=42.3, pixel_auroc=97.5
    ),
    _row("fade_fewshot", "mvtec", _ZS + ", 1-shot", "few_shot.k=1", pixel_auroc=95.4, pixel_f1_max=54.6),
    _row(
        "musc",
        "mvtec",
        "MUSC.md 6.1 (MuSc's README, current code, per-category mean)",
        "--image-score rscin",
        image_auroc=97.77,
        image_f1_max=97.37,
        image_ap=99.07,
        pixel_auroc=97.11,
        pixel_f1_max=62.16,
        pixel_ap=62.26,
        pixel_aupro=93.45,
    ),
    _row(
        "musc",
        "visa",
        "MUSC.md 6.1 (MuSc's README, current code, per-category mean)",
        "--image-score rscin",
        image_auroc=92.57,
        image_f1_max=89.06,
        image_ap=93.31,
        pixel_auroc=98.71,
        pixel_f1_max=48.90,
        pixel_ap=45.38,
        pixel_aupro=92.43,
    ),
    _row(
        "musc_fast",
        "mvtec",
        "MUSC.md 6.2 (ViT-B-16-plus-240 at 240 px)",
        "--image-score rscin",
        image_auroc=94.77,
        image_f1_max=95.43,
        image_ap=97.60,
        pixel_auroc=96.26,
        pixel_f1_max=52.23,
        pixel_ap=50.27,
        pixel_aupro=87.70,
    ),
    _row(
        "musc_fast",
        "visa",
        "MUSC.md 6.2 (ViT-B-16-plus-240 at 240 px)",
        "--image-score rscin",
        image_auroc=82.62,
        image_f1_max=81.61,
        image_ap=85.05,
        pixel_auroc=96.11,
        pixel_f1_max=37.84,
        pixel_ap=33.43,
        pixel_aupro=72.37,
    ),
)

#: input layouts -> the dataset of the published rows
DATASETS = {"mvtec": "mvtec", "visa": "visa", "visa_1cls": "visa"}


class PaperError(ZsadError, ValueError):
    """No published row for the preset and dataset asked, or no ``mean`` row in the metrics."""

    exit_code = 2


def published(preset: str, dataset: str) -> Published:
    found = [p for p in PUBLISHED if p.preset == preset and p.dataset == dataset]
    if not found:
        have = sorted({f"{p.preset}/{p.dataset}" for p in PUBLISHED})
        raise PaperError(f"no published numbers for preset {preset!r} on {dataset!r}; known: {', '.join(have)}")
    return found[0]


def beside(metrics: list[dict[str, Any]], row: Published) -> list[dict[str, Any]]:
    """The run's ``mean`` metrics row beside ``row``: one entry per published metric, with ``run``
    (percent, None when the run has no value) and ``difference`` (run - published)."""
    mean = [m for m in metrics if m.get("category") == "mean"]
    if not mean:
        raise PaperError("the metrics table has no 'mean' row (evaluate the run first)")
    m = mean[0]
    out = []
    for column, value in row.values.items():
        got = m.get(column)
        run = None if got is None or got != got else 100.0 * float(got)  # NaN: no value
        out.append(
            {
                "metric": METRICS[column],
                "column": column,
                "published": value,
                "run": run,
                "difference": None if run is None else run - value,
            }
        )
    return out


def text(rows: list[dict[str, Any]], row: Published, random_weights: bool) -> str:
    """The comparison as a Markdown table, with its source and a warning for random weights."""
    lines = [
        f"published: {row.preset} on {row.dataset} ({row.source})"
        + (f"; evaluated with {row.settings}" if row.settings else ""),
        "| metric | published | this run | difference |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        run = "-" if r["run"] is None else f"{r['run']:.2f}"
        diff = "-" if r["difference"] is None else f"{r['difference']:+.2f}"
        lines.append(f"| {r['metric']} | {r['published']:.2f} | {run} | {diff} |")
    if random_weights:
        lines.append("WARNING: this run used random weights: its numbers are not a reproduction of anything")
    return "\n".join(lines)
