"""A small synthetic MVTec-layout dataset with known defects, for ``zsad demo`` and the tests.

Layout written under ``root`` (a local folder or an ``s3://`` prefix), per category::

    <category>/train/good/000.png ...                 normal training images
    <category>/test/good/000.png ...                  normal test images
    <category>/test/<defect>/000.png ...              anomalous test images (defect: scratch, hole)
    <category>/ground_truth/<defect>/000_mask.png     binary masks (uint8 0/255, same size)

Normal images are RGB: a smooth colour gradient plus deterministic low- and high-frequency noise,
and a per-category pattern: an *object* (a shaded disc or a square plate on a background) or a
*surface* (tiles separated by darker grout lines). Defects are drawn into a mask first and then
painted exactly on the mask's pixels, so the mask marks exactly the changed pixels:

- ``scratch``: a light line 2+ px wide across the object/surface;
- ``hole``: a dark elliptical blob.

Everything is a pure function of (category, split, index, seed), so two calls with the same
arguments write byte-identical files. numpy + Pillow only.
"""

from __future__ import annotations

import io
import posixpath
import zlib
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from pipeline.io.fs import StorageOptions, filesystem, is_remote, normalise

__all__ = ["DEFECTS", "make_dataset", "render_normal", "render_defect"]

DEFECTS: tuple[str, ...] = ("scratch", "hole")
_KINDS = ("disc", "surface", "plate")
_FIXED_KINDS = {"widget": "disc", "tile": "surface"}
_SPLIT_CODES = {"train": 1, "test_good": 2, "scratch": 3, "hole": 4}


def _kind(category: str) -> str:
    return _FIXED_KINDS.get(category, _KINDS[zlib.crc32(category.encode("utf-8")) % len(_KINDS)])


def _rng(seed: int, category: str, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(category.encode("utf-8")), _SPLIT_CODES[split], index])


def _base_colour(category: str) -> np.ndarray:
    code = zlib.crc32(category.encode("utf-8"))
    return np.array([90 + code % 60, 90 + (code >> 8) % 60, 90 + (code >> 16) % 60], dtype=np.float32)


def render_normal(category: str, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One normal image.

    Returns (image uint8 (size, size, 3) RGB, region bool (size, size)): ``region`` marks where a
    defect may be drawn (the object for object categories, the inner area for surfaces)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    base = _base_colour(category)
    angle = rng.uniform(0, 2 * np.pi)
    gradient = (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5))[..., None] * 40.0
    cells = max(size // 8, 2)
    coarse = rng.normal(0.0, 1.0, (cells, cells, 1)).astype(np.float32)
    coarse = np.kron(coarse, np.ones((size // cells + 1, size // cells + 1, 1), np.float32))[:size, :size]
    fine = rng.normal(0.0, 1.0, (size, size, 1)).astype(np.float32)
    img = base + gradient + 8.0 * coarse + 5.0 * fine
    kind = _kind(category)
    if kind == "surface":
        period = max(size // 4, 4)
        jitter = int(rng.integers(0, 3))
        grout = (((np.arange(size) + jitter) % period) < max(size // 48, 1)).astype(np.float32)
        lines = np.maximum(grout[None, :], grout[:, None])[..., None]
        img = img * (1.0 - 0.35 * lines)
        margin = size // 8
        region = np.zeros((size, size), bool)
        region[margin : size - margin, margin : size - margin] = True
    else:
        cx, cy = 0.5 + rng.uniform(-0.04, 0.04), 0.5 + rng.uniform(-0.04, 0.04)
        if kind == "disc":
            radius = 0.32
            dist = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
            region = dist <= radius
            shade = 1.0 - 0.5 * (dist / radius) ** 2
        else:  # plate
            half = 0.28
            region = (np.abs(xx - cx) <= half) & (np.abs(yy - cy) <= half)
            shade = np.full((size, size), 0.85, np.float32)
        obj = (base[::-1] + 70.0) * shade[..., None] + 4.0 * fine
        img = np.where(region[..., None], obj, img * 0.8)
    return np.clip(img, 0, 255).astype(np.uint8), region


def _pick_point(rng: np.random.Generator, region: np.ndarray, margin: int) -> tuple[int, int]:
    """A random (x, y) inside ``region``, at least ``margin`` px from the border."""
    size = region.shape[0]
    inner = np.zeros_like(region)
    inner[margin : size - margin, margin : size - margin] = True
    ys, xs = np.nonzero(region & inner)
    if len(xs) == 0:
        return size // 2, size // 2
    k = int(rng.integers(0, len(xs)))
    return int(xs[k]), int(ys[k])


def render_defect(
    image: np.ndarray, region: np.ndarray, defect: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``defect`` (``scratch`` or ``hole``) into a copy of ``image``.

    Returns (image uint8 (H, W, 3), mask uint8 (H, W) with 255 on exactly the changed pixels, else 0)."""
    size = image.shape[0]
    canvas = Image.new("L", (image.shape[1], size), 0)
    draw = ImageDraw.Draw(canvas)
    x, y = _pick_point(rng, region, margin=max(size // 6, 2))
    if defect == "scratch":
        length = rng.uniform(0.25, 0.4) * size
        theta = rng.uniform(0, np.pi)
        dx, dy = np.cos(theta) * length / 2, np.sin(theta) * length / 2
        width = max(size // 40, 2)
        draw.line([(x - dx, y - dy), (x + dx, y + dy)], fill=255, width=width)
        colour = np.array([235, 235, 225], np.float32)
    elif defect == "hole":
        rx, ry = rng.uniform(0.05, 0.09) * size, rng.uniform(0.05, 0.09) * size
        draw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=255)
        colour = np.array([18, 14, 12], np.float32)
    else:
        raise ValueError(f"unknown synthetic defect {defect!r}; known: {', '.join(DEFECTS)}")
    mask = np.asarray(canvas, dtype=np.uint8).copy()
    mask[mask > 0] = 255
    mask[~region] = 0  # a defect stays on the object / inner surface
    out = image.copy()
    on = mask > 0
    noise = rng.normal(0.0, 3.0, (int(on.sum()), 3))
    out[on] = np.clip(colour + noise, 0, 255).astype(np.uint8)
    # The painted colour is far from every normal pixel value, but make "exactly the changed
    # pixels" hold even where a noise draw lands on the original value.
    same = on & np.all(out == image, axis=-1)
    if same.any():
        out[same] = colour.astype(np.uint8)
        still = same & np.all(out == image, axis=-1)
        out[still] = 255 - out[still]
    return out, mask


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def make_dataset(
    root: str,
    categories: tuple[str, ...] | list[str] = ("widget", "tile"),
    n_good: int = 4,
    n_bad: int = 4,
    size: int = 96,
    seed: int = 0,
    storage: StorageOptions | None = None,
    n_train: int | None = None,
) -> dict[str, Any]:
    """Write a synthetic MVTec-layout dataset under ``root`` (local folder or s3:// prefix).

    Per category: ``n_train`` (default ``n_good``) train/good images, ``n_good`` test/good images,
    ``n_bad`` anomalous test images spread round-robin over :data:`DEFECTS`, each with its
    ``ground_truth/<defect>/<stem>_mask.png``. Images are ``size`` x ``size`` RGB PNGs.

    Returns a summary: ``root`` (normalised), ``categories``, ``defects``, ``counts``
    ({category: {train, test_good, test_anomalous, masks, by_defect}}), ``n_test``, ``n_files``.
    """
    categories = list(categories)
    if not categories:
        raise ValueError("make_dataset needs at least one category")
    for category in categories:
        if not category or "/" in category or category.startswith("."):
            raise ValueError(f"invalid category name {category!r}")
    if len(set(categories)) != len(categories):
        raise ValueError(f"duplicate category names in {categories}")
    if n_good < 0 or n_bad < 0 or (n_train is not None and n_train < 0):
        raise ValueError("image counts must be >= 0")
    if size < 16:
        raise ValueError(f"size must be at least 16 px, got {size}")
    n_train = n_good if n_train is None else n_train

    fs, base = filesystem(root, storage)
    base = base.rstrip("/")
    files: dict[str, bytes] = {}
    counts: dict[str, Any] = {}
    defects_used: list[str] = []
    for category in categories:
        for i in range(n_train):
            image, _ = render_normal(category, _rng(seed, category, "train", i), size)
            files[f"{category}/train/good/{i:03d}.png"] = _png(image)
        for i in range(n_good):
            image, _ = render_normal(category, _rng(seed, category, "test_good", i), size)
            files[f"{category}/test/good/{i:03d}.png"] = _png(image)
        by_defect: dict[str, int] = {}
        for j in range(n_bad):
            defect = DEFECTS[j % len(DEFECTS)]
            index = by_defect.get(defect, 0)
            by_defect[defect] = index + 1
            rng = _rng(seed, category, defect, index)
            image, region = render_normal(category, rng, size)
            image, mask = render_defect(image, region, defect, rng)
            files[f"{category}/test/{defect}/{index:03d}.png"] = _png(image)
            files[f"{category}/ground_truth/{defect}/{index:03d}_mask.png"] = _png(mask)
            if defect not in defects_used:
                defects_used.append(defect)
        counts[category] = {
            "train": n_train,
            "test_good": n_good,
            "test_anomalous": n_bad,
            "masks": n_bad,
            "by_defect": by_defect,
        }

    paths = {f"{base}/{rel}": data for rel, data in files.items()}
    if not is_remote(root):
        for folder in sorted({posixpath.dirname(p) for p in paths}):
            fs.makedirs(folder, exist_ok=True)
    if paths:
        fs.pipe(paths)
    return {
        "root": normalise(root),
        "categories": categories,
        "defects": defects_used,
        "counts": counts,
        "n_test": len(categories) * (n_good + n_bad),
        "n_files": len(paths),
    }
