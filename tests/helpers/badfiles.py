"""Synthetic input files for decode tests: good images and every kind of bad one.

Everything is generated in code, deterministically (seeded), and small (64-96 px).
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

#: Declared size of ``bomb.png``: 900 million pixels, above the default ``decode.max_pixels``
#: (89,478,485) and above twice Pillow's own default limit.
BOMB_SIZE = (30000, 30000)  # (width, height)

EXIF_ORIENTATION = 0x0112


def pattern_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    """An ``(height, width, 3)`` uint8 image with visible structure: gradients, a bright rectangle
    and a dark disc at seeded positions, plus mild seeded noise."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width]
    img = np.stack(
        [
            255.0 * cols / max(width - 1, 1),
            255.0 * rows / max(height - 1, 1),
            127.5 + 127.5 * np.sin((rows + cols) / 6.0 + seed),
        ],
        axis=-1,
    )
    top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
    img[top : top + height // 4, left : left + width // 4] = (250.0, 240.0, 40.0)
    cy, cx, r = rng.integers(height // 4, 3 * height // 4), rng.integers(width // 4, 3 * width // 4), height // 6
    img[(rows - cy) ** 2 + (cols - cx) ** 2 <= r * r] = (20.0, 30.0, 90.0)
    img += rng.normal(0.0, 4.0, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    """One PNG chunk: length, type, payload, CRC-32 of type + payload."""
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def raw_png(width: int, height: int, bit_depth: int, colour_type: int, idat: bytes) -> bytes:
    """A PNG assembled by hand: signature, IHDR, one IDAT holding ``idat`` (already compressed), IEND."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def bomb_png(width: int = BOMB_SIZE[0], height: int = BOMB_SIZE[1]) -> bytes:
    """A PNG whose header declares ``width x height`` 8-bit gray pixels but whose IDAT holds only a
    few compressed bytes (never decoded: the size guard fires first)."""
    return raw_png(width, height, 8, 0, zlib.compress(b"\x00" * 64))


def rgb16_png(pixels: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (colour type 2, bit depth 16) from an ``(H, W, 3)`` uint16 array
    (Pillow cannot write these itself)."""
    height, width, _ = pixels.shape
    big = pixels.astype(">u2")
    raw = b"".join(b"\x00" + big[row].tobytes() for row in range(height))
    return raw_png(width, height, 16, 2, zlib.compress(raw))


def exif_jpeg(pixels: np.ndarray, orientation: int, quality: int = 95) -> bytes:
    """A JPEG of ``pixels`` (stored as given) with an EXIF Orientation tag."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    return encode(Image.fromarray(pixels), "JPEG", quality=quality, exif=exif.tobytes())


def write_bad_inputs(folder: Path) -> dict[str, dict]:
    """Write the bad-input corpus (and four unusual but valid images) into ``folder``.

    Returns ``{filename: {"expect": "error" | "ok", "error_type": str | None, "shape": (H, W) | None}}``
    where ``shape`` is the decoded (displayed) shape of the "ok" files.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1234)
    files: dict[str, tuple[bytes, dict]] = {}

    def error(kind: str) -> dict:
        return {"expect": "error", "error_type": kind, "shape": None}

    def ok(shape: tuple[int, int]) -> dict:
        return {"expect": "ok", "error_type": None, "shape": shape}

    files["zero.png"] = (b"", error("EmptyFile"))

    good_png = encode(Image.fromarray(pattern_rgb(80, 96, seed=1)), "PNG")
    files["truncated.png"] = (good_png[: len(good_png) // 2], error("TruncatedImage"))

    good_jpg = encode(Image.fromarray(pattern_rgb(80, 96, seed=2)), "JPEG", quality=90)
    files["truncated.jpg"] = (good_jpg[: len(good_jpg) // 2], error("TruncatedImage"))

    noise = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    files["random.png"] = (b"\x13\x37" + noise, error("UnidentifiedImage"))  # fixed start: no magic number

    text = (
        "This is not a JPEG.\nIt is a plain text file that was given an image extension by mistake.\n"
        * 8
    ).encode("utf-8")
    files["text.jpg"] = (text, error("UnidentifiedImage"))

    files["bomb.png"] = (bomb_png(), error("DecompressionBomb"))

    ramp = np.linspace(0, 65535, 64 * 80).round().astype(np.uint16).reshape(64, 80)
    files["gray16.png"] = (encode(Image.fromarray(ramp), "PNG"), ok((64, 80)))

    rgba = np.dstack([pattern_rgb(72, 64, seed=3), np.linspace(0, 255, 72 * 64).astype(np.uint8).reshape(72, 64)])
    files["rgba.png"] = (encode(Image.fromarray(rgba, "RGBA"), "PNG"), ok((72, 64)))

    cmyk = Image.fromarray(pattern_rgb(64, 88, seed=4)).convert("CMYK")
    files["cmyk.jpg"] = (encode(cmyk, "JPEG", quality=92), ok((64, 88)))

    stored = pattern_rgb(64, 96, seed=5)  # stored landscape: 64 rows x 96 columns
    stored[:16, :16] = (255, 0, 0)  # marker in the stored top-left corner -> displayed top-right
    files["exif_rotated.jpg"] = (exif_jpeg(stored, orientation=6), ok((96, 64)))

    expected: dict[str, dict] = {}
    for name, (data, expect) in files.items():
        (folder / name).write_bytes(data)
        expected[name] = expect
    return expected


def write_good_images(folder: Path, n: int, size: tuple[int, int] = (64, 64), seed: int = 0) -> list[Path]:
    """Write ``n`` RGB PNGs ``good_000.png``... of ``size = (height, width)`` with distinct
    synthetic content (image ``i`` uses seed ``seed + i``). Returns their paths in order."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    height, width = size
    paths = []
    for i in range(n):
        path = folder / f"good_{i:03d}.png"
        Image.fromarray(pattern_rgb(height, width, seed=seed + i)).save(path, "PNG")
        paths.append(path)
    return paths
