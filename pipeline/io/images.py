"""Image bytes -> RGB uint8 arrays.

:func:`decode_image` (full size), :func:`decode_working` (straight to a working size) and :func:`probe`
(the header only, for a decode elsewhere: ``decode.device: model``) are the entry points. They are
pure (bytes in, array out), never touch the network or the disk, and turn every failure into a
:class:`DecodeError` whose ``error_type`` comes from a small fixed vocabulary (see
:data:`ERROR_TYPES`), so one bad file never stops a run.

Output convention: a C-contiguous, writeable ``np.ndarray`` of shape ``(H, W, 3)`` (row, column,
channel), dtype ``uint8``, channels in R, G, B order, in the *displayed* orientation (the EXIF
orientation tag is applied).

Mode conversions (Pillow mode -> RGB uint8):

* ``RGB``: as stored. ``L``, ``1`` (0/255), ``P``/``PA`` (palette colours; transparency ignored),
  ``RGBA``/``LA``/``RGBX`` (alpha dropped, colour values kept, like ``convert("RGB")``), ``CMYK``
  (Pillow's naive conversion, no ICC profile), ``YCbCr``, ``HSV``, ``LAB``: ``Image.convert("RGB")``.
* 16-bit grayscale (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``) and 32-bit integer ``I`` (how older
  Pillow versions open 16-bit PNGs): clipped to ``[0, 65535]`` and scaled by the 16-bit range,
  ``round(v / 257)``, the same for every image (65535 -> 255, 257 -> 1), never by the image's own
  maximum. A 32-bit integer image with values above 65535 therefore saturates.
* 32-bit float ``F``: NaN -> 0; if the largest finite value is <= 1 the image is taken as [0, 1] and
  mapped to ``round(clip(v, 0, 1) * 255)``, otherwise ``round(clip(v, 0, 255))``.
* 16-bit-per-channel RGB PNGs: Pillow itself opens them as 8-bit ``RGB`` keeping the high byte of
  each sample (``0x80FF`` -> 128), so they are truncated rather than rounded.
* Other modes Pillow cannot convert to RGB fail with ``UnsupportedMode``.

Multi-frame files (animated GIF/PNG/WebP, multi-page TIFF, MPO): the first frame only.

Accepted container formats: :data:`FORMATS` (those of them the installed Pillow supports). Other
formats Pillow knows (EPS, which runs Ghostscript; TGA, whose header has no magic number...) are not
tried on untrusted bytes; they fail as ``UnidentifiedImage``.

Decompression bombs: the header's declared size is checked against ``max_pixels`` right after
``Image.open`` (which reads only the header), before any pixel data is decoded. Pillow has its own
process-global guard (``PIL.Image.MAX_IMAGE_PIXELS``: a warning above it, an error above twice it,
raised inside ``Image.open``). zsad does not rely on it: both the warning and the error become
``DecompressionBomb``, and when ``max_pixels`` is larger than Pillow's limit the global is raised to
``max_pixels`` for the duration of that one decode only (under a lock, restored in ``finally``), so
images between the two limits decode. ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is never changed.

Truncation: with ``LOAD_TRUNCATED_IMAGES`` False (Pillow's default) Pillow (13.0 checked) refuses every
truncated JPEG and every PNG whose pixel data is incomplete. As a backstop (for a process where some
other code turned ``LOAD_TRUNCATED_IMAGES`` on) a JPEG that decodes must also have an end-of-image
marker after its first scan header; the marker segments are walked, so EXIF thumbnails and trailing
bytes after the marker do not fool the check. A PNG whose pixel data is complete but whose final
checksum bytes or IEND chunk are missing decodes (as it does in Pillow).

Thread safety: decodes may run in parallel threads, but ``warnings.catch_warnings`` (used to turn
Pillow's bomb warning into an error) changes process-global state in Python < 3.14, so zsad runs one
decode per worker process at a time (Ray tasks / single-threaded actors).
"""

from __future__ import annotations

import io
import math
import re
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.errors import ZsadError

#: Every ``error_type`` :func:`decode_image` produces itself. An exception nobody anticipated is
#: reported under its own class name instead (``MemoryError``...).
ERROR_TYPES = (
    "EmptyFile",  # zero bytes
    "UnidentifiedImage",  # not one of FORMATS (text, HTML, random bytes...)
    "TruncatedImage",  # a recognised image whose data ends early
    "CorruptImage",  # a recognised image whose header or pixel data cannot be parsed
    "DecompressionBomb",  # header declares more than max_pixels pixels
    "UnsupportedMode",  # a pixel mode with no conversion to RGB
)

#: Container formats tried by ``Image.open``, in this order (filtered to those Pillow supports).
FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "WEBP", "GIF", "PPM", "JPEG2000", "AVIF", "QOI")

# Magic numbers of the formats above, used only to word error messages.
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG2000"),
    (b"\xff\x4f\xff\x51", "JPEG2000"),
    (b"qoif", "QOI"),
)

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")

_LIMIT_LOCK = threading.Lock()
_formats_cache: tuple[str, ...] | None = None


class DecodeError(ZsadError):
    """A file that cannot become an RGB image.

    ``error_type`` is one of :data:`ERROR_TYPES` (or an unexpected exception's class name);
    ``message`` says what is wrong in words a user can act on; ``str(exc) == message``.
    """

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):  # keep both fields when pickled (Ray ships exceptions between processes)
        return (type(self), (self.error_type, self.message))


@dataclass(frozen=True)
class WorkingSize:
    """What the models of a plan need of an image (``decode.resolution: working``): its short side at
    least ``short`` pixels, its long side at least ``long``, and each side at least ``scale`` (a
    linear factor, 0 to 1) of the original's: a constraint that grows with the image, for tiles
    planned in original pixels whose crops must keep their model's input size (see
    :func:`pipeline.stages.decode.working_size`). Sizes are in displayed orientation."""

    short: int = 0
    long: int = 0
    scale: float = 0.0

    def size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) to decode an image of ``height`` x ``width`` to: the smallest size
        with the aspect ratio kept that meets every need (rounded up), never above the original."""
        r = max(self.short / max(1, min(height, width)), self.long / max(1, max(height, width)), self.scale)
        if r >= 1.0:
            return height, width
        up = lambda n: min(n, max(1, math.ceil(n * r - 1e-6)))  # noqa: E731 - 3000 * (896 / 3000) is 896.0000001
        return up(height), up(width)


#: EXIF orientations that swap width and height (transpose, 90 and 270 degree rotations)
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode one encoded image to RGB.

    Args:
        data: the whole file's bytes.
        max_pixels: largest accepted ``width * height`` declared by the header (``decode.max_pixels``).

    Returns:
        ``(H, W, 3)`` uint8 array (row, column, RGB) in displayed orientation; first frame only.

    Raises:
        DecodeError: for every problem with the bytes (never any other exception for bad input).
        ValueError: ``max_pixels`` below 1 (a programming error, not a bad file).
    """
    return decode_working(data, max_pixels, None)[0]


def decode_working(data: bytes, max_pixels: int,
                   working: WorkingSize | None) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode one encoded image straight to its working size (see :class:`WorkingSize`; None: the
    full size, as :func:`decode_image`).

    An RGB or grey JPEG is decoded with libjpeg's DCT scaling (Pillow's ``draft``) at the smallest
    scale (1/2, 1/4, 1/8) whose result is still at least the working size; other formats (PNG, TIFF,
    16-bit, CMYK JPEG...) are decoded at full size. Every image is then resized once
    (:func:`resize_rgb`: antialiased bicubic on the 8-bit RGB image) to exactly that size. EXIF
    orientation is applied as by :func:`decode_image`. Returns (``(h, w, 3)`` uint8 RGB, the original (height, width) in
    displayed orientation). Errors as :func:`decode_image`."""
    return _guarded(data, max_pixels, lambda data: _decode(data, max_pixels, working))


@dataclass(frozen=True)
class Header:
    """What an image's header says (:func:`probe`): its container ``format`` (one of
    :data:`FORMATS`), Pillow's pixel ``mode``, its ``height`` and ``width`` in displayed orientation
    and its EXIF ``orientation`` (1 when it has none)."""

    format: str
    mode: str
    height: int
    width: int
    orientation: int = 1

    @property
    def plain_jpeg(self) -> bool:
        """An RGB or grey baseline/progressive JPEG (no CMYK, not a multi-picture file): what a JPEG
        decoder other than Pillow's (nvJPEG, torchvision's) is given."""
        return self.format == "JPEG" and self.mode in ("RGB", "L")


def probe(data: bytes, max_pixels: int) -> Header:
    """Read an image's header without decoding any pixel: the same checks as :func:`decode_working`
    makes before it decodes (a recognised format, a parsable header, at most ``max_pixels`` pixels,
    for a JPEG an end-of-image marker). Raises :class:`DecodeError` as :func:`decode_working`."""
    return _guarded(data, max_pixels, lambda data: _probe(data, max_pixels))


def _guarded(data: bytes, max_pixels: int, step):
    """``step(bytes)`` with Pillow's bomb guard at ``max_pixels`` and every failure a DecodeError."""
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
    data = bytes(data)
    if not data:
        raise DecodeError("EmptyFile", "empty file (0 bytes)")
    try:
        with _pillow_limit(max_pixels), warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return step(data)
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        declared = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
        raise DecodeError(
            "DecompressionBomb",
            f"image declares {declared}, more than decode.max_pixels = {max_pixels:,} (possible "
            f"decompression bomb); not decoded (Pillow: {exc})",
        ) from exc
    except Exception as exc:  # noqa: BLE001 - the contract: no raw exception escapes
        raise DecodeError(type(exc).__name__, _text(exc)) from exc


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """The image opened on its header (no pixel decoded), its size checked against ``max_pixels``."""
    try:
        image = Image.open(io.BytesIO(data), formats=_formats())
    except UnidentifiedImageError as exc:
        raise _unidentified(data, exc) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise _broken(data, exc, during="header") from exc
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise DecodeError(
            "DecompressionBomb",
            f"{image.format} header declares {width} x {height} = {width * height:,} pixels, more than "
            f"decode.max_pixels = {max_pixels:,} (possible decompression bomb); not decoded",
        )
    return image


def _truncated_jpeg(data: bytes) -> DecodeError:
    return DecodeError("TruncatedImage",
                       f"JPEG data ({len(data):,} bytes) ends before its end-of-image marker (0xFFD9)")


def _probe(data: bytes, max_pixels: int) -> Header:
    with _open(data, max_pixels) as image:
        fmt = image.format or "image"
        if fmt in ("JPEG", "MPO") and _jpeg_complete(data) is False:
            raise _truncated_jpeg(data)
        try:
            orientation = int(image.getexif().get(0x0112) or 1)
        except Exception:  # noqa: BLE001 - an unreadable EXIF block: as Pillow's exif_transpose, no rotation
            orientation = 1
        width, height = image.size
        if orientation in _SWAPPING_ORIENTATIONS:
            width, height = height, width
        return Header(fmt, image.mode, height, width, orientation if 1 <= orientation <= 8 else 1)


def _decode(data: bytes, max_pixels: int, working: WorkingSize | None) -> tuple[np.ndarray, tuple[int, int]]:
    with _open(data, max_pixels) as image:
        width, height = image.size
        fmt = image.format or "image"
        target = shown = None
        if working is not None:
            swapped = image.getexif().get(0x0112) in _SWAPPING_ORIENTATIONS
            shown = (width, height) if swapped else (height, width)  # (displayed height, displayed width)
            target = working.size(*shown)
            if target != shown and fmt in ("JPEG", "MPO") and image.mode in ("RGB", "L"):
                # DCT scaling (libjpeg picks the smallest scale still at least the requested size);
                # CMYK/YCCK JPEGs take the plain path
                stored = (target[1], target[0]) if swapped else (target[0], target[1])  # (h, w) as stored
                image.draft("RGB", (stored[1], stored[0]))
        try:
            image.load()  # first frame only
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise _broken(data, exc, during="pixels") from exc
        if fmt in ("JPEG", "MPO") and _jpeg_complete(data) is False:
            raise _truncated_jpeg(data)
        try:
            oriented = ImageOps.exif_transpose(image)
        except Exception as exc:  # noqa: BLE001
            raise DecodeError(type(exc).__name__, f"cannot apply the EXIF orientation: {_text(exc)}") from exc
        rgb = _to_rgb(oriented)
        original = shown or (rgb.shape[0], rgb.shape[1])  # the header's size: a draft decodes below it
        if target is not None and rgb.shape[:2] != target:
            rgb = resize_rgb(rgb, target)
        return rgb, original


def resize_rgb(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An ``(H, W, 3)`` uint8 image resized to ``size`` (height, width): antialiased bicubic with
    torch's uint8 kernel, which gives Pillow's bicubic resize within two grey levels (measured on
    a 2000 x 1500 photo: mean 0.003-0.004, max 1, 2 on a few pixels at scales near 1) at about a
    sixth of its CPU time."""
    import torch  # a dependency of zsad; imported when an image is first resized, not with this module
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None]
    y = F.interpolate(x, size=tuple(size), mode="bicubic", antialias=True, align_corners=False)
    return np.ascontiguousarray(y[0].permute(1, 2, 0).numpy())


def _to_rgb(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        gray = ((values + 128) // 257).astype(np.uint8)  # == round(v / 257); 257 is odd: no ties
        return _gray_to_rgb(gray)
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        finite = np.isfinite(values)
        peak = values[finite].max() if finite.any() else 0.0
        values = np.where(np.isnan(values), 0.0, values)
        scaled = np.clip(values, 0.0, 1.0) * 255.0 if peak <= 1.0 else np.clip(values, 0.0, 255.0)
        return _gray_to_rgb(np.rint(scaled).astype(np.uint8))
    if mode != "RGB":
        try:
            image = image.convert("RGB")
        except ValueError as exc:
            raise DecodeError("UnsupportedMode", f"pixel mode {mode!r} cannot be converted to RGB ({exc})") from exc
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3:  # defensive: the contract is (H, W, 3)
        raise DecodeError("UnsupportedMode", f"mode {mode!r} decoded to shape {array.shape}, not (H, W, 3)")
    if not (array.flags.writeable and array.flags.c_contiguous):
        array = np.array(array, dtype=np.uint8, order="C")
    return array


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))


# --------------------------------------------------------------------------------------------
# Error wording
# --------------------------------------------------------------------------------------------


def _text(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _signature(data: bytes) -> str | None:
    for magic, name in _SIGNATURES:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _looks_truncated(data: bytes, fmt: str | None) -> bool:
    if fmt == "JPEG":
        return _jpeg_complete(data) is False
    if fmt == "PNG":
        return _png_ends_early(data)
    return False


def _unidentified(data: bytes, exc: Exception) -> DecodeError:
    fmt = _signature(data)
    if fmt is None:
        return DecodeError(
            "UnidentifiedImage",
            f"not a recognised image format ({', '.join(_formats())}): the {len(data):,} bytes start with "
            f"{data[:16]!r}{_content_hint(data)}",
        )
    if _looks_truncated(data, fmt):
        return DecodeError(
            "TruncatedImage", f"{fmt} file ({len(data):,} bytes) ends inside its header, before any pixel data"
        )
    return DecodeError(
        "CorruptImage", f"starts like a {fmt} file but its header cannot be parsed ({len(data):,} bytes)"
    )


def _broken(data: bytes, exc: Exception, during: str) -> DecodeError:
    message = _text(exc)
    fmt = _signature(data) or "image"
    if "truncat" in message.lower() or _looks_truncated(data, _signature(data)):
        return DecodeError("TruncatedImage", f"{fmt} data ends early ({len(data):,} bytes): {message}")
    return DecodeError("CorruptImage", f"{fmt} {during} cannot be decoded: {message}")


def _content_hint(data: bytes) -> str:
    """A few words on what non-image bytes look like (text, HTML...), or ''."""
    head = data[:256]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:  # not just a character cut at the 256-byte boundary
            return ""
        text = head[: exc.start].decode("utf-8")
    if not text or not all(ch.isprintable() or ch in "\r\n\t" for ch in text):
        return ""
    lower = text.lstrip().lower()
    if lower.startswith("<"):
        return " (looks like HTML/XML text)"
    if lower.startswith(("{", "[")):
        return " (looks like JSON text)"
    return " (looks like text)"


# --------------------------------------------------------------------------------------------
# Structure walks (no pixel decoding)
# --------------------------------------------------------------------------------------------


def _jpeg_complete(data: bytes) -> bool | None:
    """Whether a JPEG has an end-of-image marker after its first start-of-scan segment.

    Walks the marker segments from SOI by their lengths (so APPn payloads such as an EXIF thumbnail,
    which has its own markers, are skipped whole). Returns False when the data ends before the first
    scan or has no 0xFFD9 after it (inside entropy-coded data 0xFF is always followed by 0x00 or a
    restart marker, so the first 0xFFD9 there is the real end). Returns None when the bytes are not a
    JPEG or the segment structure cannot be followed (then nothing is claimed).
    """
    if not data.startswith(b"\xff\xd8"):
        return None
    size = len(data)
    pos = 2
    while True:
        if pos >= size:
            return False
        if data[pos] != 0xFF:
            return None
        while pos < size and data[pos] == 0xFF:  # fill bytes before a marker
            pos += 1
        if pos >= size:
            return False
        marker = data[pos]
        pos += 1
        if marker == 0xD9:  # EOI before any scan
            return True
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # standalone markers
            continue
        if pos + 2 > size:
            return False
        length = int.from_bytes(data[pos : pos + 2], "big")
        if length < 2:
            return None
        if pos + length > size:
            return False
        pos += length
        if marker == 0xDA:  # SOS: entropy-coded data follows; searched from the end, where the EOI of
            # a whole file is (the same answer as from the front, without scanning megabytes of data)
            return data.rfind(b"\xff\xd9", pos) != -1


def _png_ends_early(data: bytes) -> bool:
    """True when a PNG's chunk sequence runs past the end of the data before IEND."""
    pos = 8
    size = len(data)
    while pos + 8 <= size:
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if end > size:
            return True
        if kind == b"IEND":
            return False
        pos = end
    return True


# --------------------------------------------------------------------------------------------
# Pillow globals
# --------------------------------------------------------------------------------------------


def _formats() -> tuple[str, ...]:
    global _formats_cache
    if _formats_cache is None:
        Image.init()
        _formats_cache = tuple(name for name in FORMATS if name in Image.OPEN)
    return _formats_cache


@contextmanager
def _pillow_limit(max_pixels: int) -> Iterator[None]:
    """Raise ``PIL.Image.MAX_IMAGE_PIXELS`` to ``max_pixels`` for one decode when it is lower.

    Pillow checks its global inside ``Image.open`` and again while loading some formats (TIFF tiles,
    GIF frames); our own check against ``max_pixels`` is the one that matters, so Pillow's must not
    be stricter. Nothing is changed when Pillow's limit is already at least ``max_pixels`` (the
    default configuration) or disabled (None). Changes are serialised by a lock and always undone.
    """
    current = Image.MAX_IMAGE_PIXELS
    if current is None or current >= max_pixels:
        yield
        return
    with _LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved
