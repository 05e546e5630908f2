"""Pictures for the report, the comparison page and the map export (numpy + Pillow + matplotlib).

- :class:`ColourScale`: ONE value range and colour map for every heatmap of a page, so that a colour
  means the same value on every image (with :func:`colourbar_svg` as its legend).
- :func:`overlay`: an image with its heatmap blended in and mask outlines drawn on it, at any size.
- :func:`png_data_uri` / :func:`svg_data_uri`: self-contained ``data:`` URIs for ``<img src=...>``.
- Plots (curves, histograms, scatter) as small SVGs with matplotlib's Agg backend; text stays text
  (``svg.fonttype: none``), which keeps each plot to a few kB.

Nothing here reads files or knows about runs: arrays in, bytes and strings out.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass

import matplotlib
import numpy as np
from PIL import Image
from scipy import ndimage

matplotlib.use("Agg")  # no display, no GUI toolkit: this module is imported on servers and workers
import matplotlib.pyplot as plt  # noqa: E402

#: outline colours (RGB): the run's predicted mask (refined or thresholded) and the ground truth
PREDICTED_RGB = (0, 255, 255)
TRUTH_RGB = (0, 255, 0)
_STYLE = {"svg.fonttype": "none", "font.size": 8, "axes.titlesize": 9, "figure.dpi": 100,
          "svg.hashsalt": "zsad"}  # a fixed salt: the same figure gives the same SVG ids


@dataclass(frozen=True)
class ColourScale:
    """Values ``lo`` .. ``hi`` mapped linearly onto the colour map ``cmap`` (clipped outside)."""

    lo: float
    hi: float
    cmap: str = "jet"
    how: str = ""  # how the range was chosen, said under the colour bar

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lo) and math.isfinite(self.hi)) or not self.hi > self.lo:
            raise ValueError(f"colour scale [{self.lo}, {self.hi}]: needs finite bounds with hi > lo")

    def rgb(self, values: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 colours of a 2-D map."""
        t = np.clip((np.asarray(values, dtype=np.float64) - self.lo) / (self.hi - self.lo), 0.0, 1.0)
        lut = (matplotlib.colormaps[self.cmap](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)
        return lut[np.round(t * 255).astype(np.int64)]


def fit_long_side(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(H, W) with the longer side ``long_side`` (never upscaled past the source), aspect kept."""
    scale = min(1.0, long_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_rgb(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Area-averaged (downscale) resize of an (H, W, 3) uint8 image to ``size = (H, W)``."""
    if rgb.shape[:2] == tuple(size):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((size[1], size[0]), Image.Resampling.BOX if
                                                  size[0] <= rgb.shape[0] else Image.Resampling.BILINEAR))


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a binary mask to ``size = (H, W)``."""
    mask = np.asarray(mask, dtype=bool)
    if mask.shape == tuple(size):
        return mask
    rows = np.minimum((np.arange(size[0]) + 0.5) * mask.shape[0] / size[0], mask.shape[0] - 1).astype(np.int64)
    cols = np.minimum((np.arange(size[1]) + 0.5) * mask.shape[1] / size[1], mask.shape[1] - 1).astype(np.int64)
    return mask[rows][:, cols]


def outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """The boundary pixels of a binary mask (pixels of the mask with a neighbour outside it)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask
    inner = ndimage.binary_erosion(mask, structure=np.ones((3, 3), bool), iterations=width, border_value=0)
    return mask & ~inner


def overlay(rgb: np.ndarray | None, heat: np.ndarray, scale: ColourScale, size: tuple[int, int], *,
            alpha: float = 0.5, predicted: np.ndarray | None = None, truth: np.ndarray | None = None) -> np.ndarray:
    """(H, W, 3) uint8 at ``size``: the heatmap (bilinear to ``size``) coloured on ``scale`` and
    blended with ``alpha`` over the image (the heatmap alone when ``rgb`` is None), then the outlines
    of the predicted mask (cyan) and of the ground truth (green), each resized nearest to ``size``."""
    from pipeline.ops.heatmap import resize_map

    colours = scale.rgb(resize_map(heat, size)).astype(np.float64)
    if rgb is not None:
        base = resize_rgb(rgb, size).astype(np.float64)
        colours = (1.0 - alpha) * base + alpha * colours
    out = np.clip(colours.round(), 0, 255).astype(np.uint8)
    width = max(1, round(max(size) / 200))
    for mask, colour in ((truth, TRUTH_RGB), (predicted, PREDICTED_RGB)):
        if mask is not None:
            out[outline(resize_mask(mask, size), width)] = colour
    return out


def png_bytes(rgb: np.ndarray, colours: int | None = 256) -> bytes:
    """PNG of an (H, W, 3) or (H, W) uint8 array; with ``colours`` an adaptive palette of that many
    colours (8-bit indexed PNG, about a third of the size of a true-colour one for photographs)."""
    image = Image.fromarray(np.ascontiguousarray(rgb))
    if colours and image.mode == "RGB":
        image = image.quantize(colors=colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def png_data_uri(rgb: np.ndarray, colours: int | None = 256) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(rgb, colours)).decode("ascii")


def svg_data_uri(svg: str) -> str:
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode("utf-8")).decode("ascii")


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog and DOCTYPE: the SVG goes inline in HTML


def _figure(width: float = 2.7, height: float = 2.3):
    with plt.rc_context(_STYLE):
        return plt.subplots(figsize=(width, height))


def curve_svg(x: np.ndarray, y: np.ndarray, *, title: str, xlabel: str, ylabel: str, diagonal: bool = False,
              xmax: float = 1.0, note: str = "") -> str:
    """A curve on [0, xmax] x [0, 1] as an SVG string (``note``: a line in the corner, e.g. the area)."""
    with plt.rc_context(_STYLE):
        fig, ax = _figure()
        ax.plot(x, y, lw=1.4, color="#1f5fbf", drawstyle="default")
        if diagonal:
            ax.plot([0, xmax], [0, 1], lw=0.8, ls="--", color="#999999")
        ax.set(xlim=(0, xmax), ylim=(0, 1.02), title=title, xlabel=xlabel, ylabel=ylabel)
        if note:
            ax.text(0.97, 0.04, note, transform=ax.transAxes, ha="right", va="bottom")
        ax.grid(alpha=0.3)
        return _svg(fig)


def histogram_svg(groups: dict[str, np.ndarray], *, threshold: float | None, threshold_label: str,
                  title: str, bins: int = 40) -> str:
    """Score histograms (one per group: normal / anomalous, or all) on shared bins, with the
    threshold as a vertical line."""
    colours = {"normal": "#2c8c3c", "anomalous": "#c0392b", "all images": "#1f5fbf"}
    values = [v for v in groups.values() if len(v)]
    lo = min(float(np.min(v)) for v in values) if values else 0.0
    hi = max(float(np.max(v)) for v in values) if values else 1.0
    if threshold is not None and math.isfinite(threshold):
        lo, hi = min(lo, threshold), max(hi, threshold)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    with plt.rc_context(_STYLE):
        fig, ax = _figure(3.0, 2.3)
        for name, v in groups.items():
            if len(v):
                ax.hist(v, bins=edges, alpha=0.55, color=colours.get(name, "#555555"), label=f"{name} ({len(v)})")
        if threshold is not None and math.isfinite(threshold):
            ax.axvline(threshold, color="black", ls="--", lw=1.0, label=threshold_label)
        ax.set(title=title, xlabel="image score", ylabel="images")
        ax.legend(frameon=False, fontsize=7)
        return _svg(fig)


def colourbar_svg(scale: ColourScale, label: str = "anomaly map value") -> str:
    """The colour bar of ``scale`` (a horizontal strip with ticks)."""
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(4.0, 0.55))
        norm = matplotlib.colors.Normalize(vmin=scale.lo, vmax=scale.hi)
        fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=scale.cmap), cax=ax, orientation="horizontal")
        ax.set_xlabel(label)
        return _svg(fig)


def scatter_svg(a: np.ndarray, b: np.ndarray, *, title: str, xlabel: str, ylabel: str, max_points: int = 3000,
                seed: int = 0) -> str:
    """Score of A against score of B, with the diagonal; above ``max_points`` the points are a fixed
    random sample (said in the title) and drawn as a raster inside the SVG, so the file stays small."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    shown = len(a)
    if len(a) > max_points:
        pick = np.random.default_rng(seed).choice(len(a), max_points, replace=False)
        a, b, title = a[pick], b[pick], f"{title} ({max_points} of {shown} images)"
    lo = float(min(a.min(), b.min())) if len(a) else 0.0
    hi = float(max(a.max(), b.max())) if len(a) else 1.0
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    with plt.rc_context(_STYLE):
        fig, ax = _figure(3.4, 3.2)
        ax.scatter(a, b, s=4, alpha=0.5, color="#1f5fbf", rasterized=len(a) > 500)
        ax.plot([lo, hi], [lo, hi], lw=0.8, ls="--", color="#999999")
        ax.set(xlim=(lo, hi), ylim=(lo, hi), title=title, xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
        return _svg(fig)
