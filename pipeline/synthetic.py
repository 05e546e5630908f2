"""Synthetic demo and test datasets with known defects, for ``zsad demo``, the tests and the benchmarks.

:func:`make_dataset` writes a small MVTec-layout dataset (below); :func:`make_multi_instance_dataset`
writes multi-instance images (several objects each, some with a defect) for the foreground and tiling
stages.

:func:`make_dataset` layout, written under ``root`` (a local folder or an ``s3://`` prefix), per category::

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


# --- Multi-instance images (several objects per image, for the foreground / tiling tests) --------

_MULTI_SPLIT_CODES = {"good": 11, "defect": 12}
#: Object colours (RGB): some darker, some brighter than the grey background, some of another hue.
_MULTI_PALETTE = np.array(
    [[62, 40, 28], [236, 230, 214], [206, 52, 44], [238, 196, 58], [44, 74, 170], [66, 142, 72]], np.float32
)
_DEFECT_DARK = np.array([18, 14, 12], np.float32)
_CORNER = 0.4  # corner radius of the rounded rectangles, as a fraction of the short half axis
_DEFECT_LIGHT = np.array([250, 250, 244], np.float32)


def _instance_mask(
    kind: str, cx: float, cy: float, a: float, b: float, theta: float, hw: tuple[int, int]
) -> np.ndarray:
    """Bool (H, W) mask of a rotated ellipse or rounded rectangle (half axes a >= b, angle theta)."""
    yy, xx = np.mgrid[0 : hw[0], 0 : hw[1]].astype(np.float32)
    dx, dy = xx - cx, yy - cy
    u = np.cos(theta) * dx + np.sin(theta) * dy
    v = -np.sin(theta) * dx + np.cos(theta) * dy
    if kind == "ellipse":
        return (u / a) ** 2 + (v / b) ** 2 <= 1.0
    radius = _CORNER * b
    qx, qy = np.abs(u) - (a - radius), np.abs(v) - (b - radius)
    outside = np.sqrt(np.maximum(qx, 0.0) ** 2 + np.maximum(qy, 0.0) ** 2)
    return outside + np.minimum(np.maximum(qx, qy), 0.0) <= radius


def _render_instances(
    rng: np.random.Generator, hw: tuple[int, int], n: int
) -> tuple[np.ndarray, list[np.ndarray], list[int]]:
    """A background with ``n`` separated objects: (image uint8 (H, W, 3), object masks, palette index
    of each object). Objects are kept apart: their circumscribed discs (plus a gap) do not meet."""
    h, w = hw
    short = min(h, w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    level = rng.uniform(135.0, 160.0)
    tint = rng.uniform(-6.0, 6.0, 3)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * (xx / max(w - 1, 1) - 0.5) + np.sin(angle) * (yy / max(h - 1, 1) - 0.5)
    img = (level + tint)[None, None, :] + 24.0 * ramp[..., None]  # a gentle illumination gradient
    placed: list[tuple[float, float, float]] = []  # (cx, cy, circumscribed radius)
    masks: list[np.ndarray] = []
    colours: list[int] = []
    scale = 1.0
    gap = max(4.0, 0.03 * short)
    while len(placed) < n:
        kind = "ellipse" if rng.random() < 0.5 else "rounded_rect"
        for _ in range(200):
            a = rng.uniform(0.08, 0.13) * short * scale
            b = a * rng.uniform(0.5, 0.9)
            # circumscribed radius: a for an ellipse; corner-circle centre distance + radius for a box
            corner = _CORNER * b
            reach = a if kind == "ellipse" else float(np.hypot(a - corner, b - corner)) + corner
            cx = rng.uniform(reach + gap, w - reach - gap)
            cy = rng.uniform(reach + gap, h - reach - gap)
            if all(np.hypot(cx - px, cy - py) >= reach + pr + gap for px, py, pr in placed):
                break
        else:
            scale *= 0.85  # crowded: try smaller objects
            continue
        theta = rng.uniform(0, np.pi)
        mask = _instance_mask(kind, cx, cy, a, b, theta, hw)
        colour = int(rng.integers(0, len(_MULTI_PALETTE)))
        dist = np.sqrt(((xx - cx) / a) ** 2 + ((yy - cy) / a) ** 2)
        shade = 1.0 - 0.12 * np.clip(dist, 0.0, 1.0) ** 2
        img = np.where(mask[..., None], _MULTI_PALETTE[colour] * shade[..., None], img)
        placed.append((cx, cy, reach))
        masks.append(mask)
        colours.append(colour)
    img = img + rng.normal(0.0, 3.0, img.shape)  # mild sensor noise
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), masks, colours


def _multi_defect(
    image: np.ndarray, mask: np.ndarray, colour: int, rng: np.random.Generator, kind: str
) -> tuple[np.ndarray, np.ndarray]:
    """A dark/light ``spot`` or ``scratch`` inside one object (away from its outline), painted
    exactly on the returned mask (uint8 0/255): the colour contrasting most with the object."""
    from scipy import ndimage  # local: only the multi-instance generator needs scipy

    interior = ndimage.binary_erosion(mask, iterations=3)
    if not interior.any():
        interior = mask
    depth = ndimage.distance_transform_edt(mask)
    ys, xs = np.nonzero(interior & (depth >= 0.5 * depth.max()))  # a point well inside the object
    k = int(rng.integers(0, len(xs)))
    x, y = int(xs[k]), int(ys[k])
    extent = float(np.sqrt(mask.sum() / np.pi))  # about the object's mean radius
    canvas = Image.new("L", (image.shape[1], image.shape[0]), 0)
    draw = ImageDraw.Draw(canvas)
    if kind == "spot":
        r = max(2.0, rng.uniform(0.2, 0.3) * extent)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
    else:
        length = rng.uniform(0.8, 1.2) * extent
        theta = rng.uniform(0, np.pi)
        dx, dy = np.cos(theta) * length / 2, np.sin(theta) * length / 2
        draw.line([(x - dx, y - dy), (x + dx, y + dy)], fill=255, width=2)
    on = (np.asarray(canvas) > 0) & interior
    obj = _MULTI_PALETTE[colour]
    paint = _DEFECT_DARK if np.abs(obj - _DEFECT_DARK).sum() >= np.abs(obj - _DEFECT_LIGHT).sum() else _DEFECT_LIGHT
    out = image.copy()
    out[on] = np.clip(paint + rng.normal(0.0, 2.0, (int(on.sum()), 3)), 0, 255).astype(np.uint8)
    same = on & np.all(out == image, axis=-1)  # make "mask = exactly the changed pixels" hold
    out[same] = 255 - out[same]
    return out, np.where(on, 255, 0).astype(np.uint8)


def make_multi_instance_dataset(
    root: str,
    *,
    n_good: int = 3,
    n_bad: int = 3,
    size: tuple[int, int] = (256, 320),
    instances: tuple[int, int] = (2, 5),
    seed: int = 0,
    category: str = "pills",
    storage: StorageOptions | None = None,
) -> dict[str, Any]:
    """Write an MVTec-layout category of multi-instance images under ``root`` (folder or s3:// prefix)::

        <category>/test/good/000.png ...               n_good normal images
        <category>/test/defect/000.png ...             n_bad anomalous images
        <category>/ground_truth/defect/000_mask.png    their masks (uint8 0/255, exactly the changed pixels)

    Each image is ``size = (H, W)`` RGB: a flat grey background with a gentle linear illumination
    gradient, ``instances = (lo, hi)`` (inclusive; drawn per image) separated objects (rotated
    ellipses and rounded rectangles in colours darker, brighter or of another hue than the
    background, mildly shaded), and sensor noise (sigma 3 levels). On anomalous images one object
    carries a small defect (alternately a ``spot`` and a ``scratch``, dark on light objects, light
    on dark ones) inside its outline. A pure function of the arguments (byte-identical reruns).

    Returns ``root`` (normalised), ``category``, ``n_files`` and ``images``: one dict per image, good
    ones first: ``path`` (relative to root), ``label`` (0 good / 1 anomalous), ``mask_path`` (or
    None), ``n_instances``, ``boxes`` (the objects' ``(x0, y0, x1, y1)`` boxes from their masks,
    x1/y1 exclusive), ``defect_instance`` (index into ``boxes``, or None) and ``defect_kind``.
    """
    if not category or "/" in category or category.startswith("."):
        raise ValueError(f"invalid category name {category!r}")
    if n_good < 0 or n_bad < 0:
        raise ValueError(f"n_good and n_bad must be >= 0, got {n_good}, {n_bad}")
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"size must be (H, W), got {size!r}") from exc
    if h < 64 or w < 64:
        raise ValueError(f"size must be at least (64, 64) px, got {(h, w)}")
    try:
        lo, hi = (int(v) for v in instances)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"instances must be (min, max), got {instances!r}") from exc
    if not 1 <= lo <= hi <= 8:
        raise ValueError(f"instances must satisfy 1 <= min <= max <= 8, got {instances!r}")

    fs, base = filesystem(root, storage)
    base = base.rstrip("/")
    files: dict[str, bytes] = {}
    images: list[dict[str, Any]] = []
    code = zlib.crc32(category.encode("utf-8"))
    for split, count in (("good", n_good), ("defect", n_bad)):
        for i in range(count):
            rng = np.random.default_rng([seed, code, _MULTI_SPLIT_CODES[split], i])
            n = int(rng.integers(lo, hi + 1))
            image, masks, colours = _render_instances(rng, (h, w), n)
            boxes = []
            for m in masks:
                ys, xs = np.nonzero(m)
                boxes.append((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
            info: dict[str, Any] = {
                "path": f"{category}/test/{split}/{i:03d}.png",
                "label": int(split == "defect"),
                "mask_path": None,
                "n_instances": n,
                "boxes": boxes,
                "defect_instance": None,
                "defect_kind": None,
            }
            if split == "defect":
                target = int(rng.integers(0, n))
                kind = ("spot", "scratch")[i % 2]
                image, mask = _multi_defect(image, masks[target], colours[target], rng, kind)
                info.update(
                    mask_path=f"{category}/ground_truth/defect/{i:03d}_mask.png",
                    defect_instance=target,
                    defect_kind=kind,
                )
                files[info["mask_path"]] = _png(mask)
            files[info["path"]] = _png(image)
            images.append(info)

    paths = {f"{base}/{rel}": data for rel, data in files.items()}
    if not is_remote(root):
        for folder in sorted({posixpath.dirname(p) for p in paths}):
            fs.makedirs(folder, exist_ok=True)
    if paths:
        fs.pipe(paths)
    return {"root": normalise(root), "category": category, "images": images, "n_files": len(paths)}


__all__ += ["make_multi_instance_dataset"]
