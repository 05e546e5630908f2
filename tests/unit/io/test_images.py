"""pipeline.io.images: bytes -> RGB uint8, every error type, the bomb guard, Pillow globals."""

from __future__ import annotations

import io
import pickle
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from pipeline.config import DecodeSpec
from pipeline.io import images
from pipeline.io.images import ERROR_TYPES, DecodeError, decode_image
from tests.helpers.badfiles import (
    bomb_png,
    encode,
    exif_jpeg,
    pattern_rgb,
    raw_png,
    rgb16_png,
    write_bad_inputs,
)

DEFAULT_MAX = DecodeSpec().max_pixels
BIG = 10**6


def decode_error(data: bytes, max_pixels: int = DEFAULT_MAX) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        decode_image(data, max_pixels)
    return info.value


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    return encode(Image.fromarray(array, mode) if mode else Image.fromarray(array), "PNG")


def jpeg(array: np.ndarray, **params) -> bytes:
    return encode(Image.fromarray(array), "JPEG", **params)


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    expected = write_bad_inputs(folder)
    return {name: ((folder / name).read_bytes(), spec) for name, spec in expected.items()}


# --------------------------------------------------------------------------------------------
# Output contract
# --------------------------------------------------------------------------------------------


def test_rgb_png_round_trips_exactly_as_row_col_channel():
    pixels = pattern_rgb(70, 90, seed=7)
    out = decode_image(png(pixels), DEFAULT_MAX)
    assert out.shape == (70, 90, 3)  # (H, W, 3): rows first
    assert out.dtype == np.uint8
    assert out.flags.c_contiguous and out.flags.writeable
    np.testing.assert_array_equal(out, pixels)


def test_bad_input_corpus_matches_its_declared_expectations(bad):
    assert set(bad) == {
        "zero.png", "truncated.png", "truncated.jpg", "random.png", "text.jpg", "bomb.png",
        "gray16.png", "rgba.png", "cmyk.jpg", "exif_rotated.jpg",
    }
    for name, (data, spec) in bad.items():
        if spec["expect"] == "ok":
            out = decode_image(data, DEFAULT_MAX)
            assert out.shape == (*spec["shape"], 3), name
            assert out.dtype == np.uint8, name
        else:
            err = decode_error(data)
            assert err.error_type == spec["error_type"], (name, err.error_type, err.message)
            assert err.error_type in ERROR_TYPES


def test_bad_corpus_is_deterministic(tmp_path):
    first = write_bad_inputs(tmp_path / "a")
    second = write_bad_inputs(tmp_path / "b")
    assert first == second
    for name in first:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


# --------------------------------------------------------------------------------------------
# Error types and messages
# --------------------------------------------------------------------------------------------


def test_empty_file():
    err = decode_error(b"")
    assert err.error_type == "EmptyFile"
    assert err.message == "empty file (0 bytes)"
    assert str(err) == err.message


def test_random_bytes_are_unidentified_and_show_their_start(bad):
    data, _ = bad["random.png"]
    err = decode_error(data)
    assert err.error_type == "UnidentifiedImage"
    assert "not a recognised image format" in err.message
    assert repr(data[:8])[:-1] in err.message  # the leading bytes, as Python shows them
    assert f"{len(data):,} bytes" in err.message
    assert "looks like" not in err.message  # binary noise gets no text hint


def test_text_file_is_unidentified_and_reads_as_text(bad):
    err = decode_error(bad["text.jpg"][0])
    assert err.error_type == "UnidentifiedImage"
    assert "b'This is not a JP" in err.message
    assert "looks like text" in err.message


def test_html_error_page_is_called_html():
    err = decode_error(b"<!DOCTYPE html><html><body>403 Forbidden</body></html>\n")
    assert err.error_type == "UnidentifiedImage"
    assert "b'<!DOCTYPE html><'" in err.message
    assert "HTML" in err.message


def test_unlisted_format_is_not_tried():
    # TGA is a Pillow format without a magic number; it is deliberately not in FORMATS.
    tga = encode(Image.fromarray(pattern_rgb(8, 8)), "TGA")
    assert Image.open(io.BytesIO(tga)).format == "TGA"
    assert "TGA" not in images.FORMATS
    assert decode_error(tga).error_type == "UnidentifiedImage"


def test_truncated_png_and_jpeg(bad):
    for name in ("truncated.png", "truncated.jpg"):
        err = decode_error(bad[name][0])
        assert err.error_type == "TruncatedImage", name
        assert "truncated" in err.message, name  # Pillow's own message is kept
        assert "ends early" in err.message, name


@pytest.mark.parametrize("progressive", [False, True])
def test_jpeg_cut_anywhere_is_truncated(progressive):
    data = jpeg(pattern_rgb(48, 56, seed=3), quality=85, progressive=progressive)
    assert data.endswith(b"\xff\xd9")
    for cut in list(range(4, len(data), 23)) + [len(data) - 2, len(data) - 1]:
        err = decode_error(data[:cut])
        assert err.error_type == "TruncatedImage", (cut, err.error_type, err.message)


def test_png_cut_inside_pixel_data_is_truncated():
    data = png(pattern_rgb(48, 56, seed=4))
    idat = data.index(b"IDAT")
    for cut in range(idat + 8, len(data) - 24, 97):
        assert decode_error(data[:cut]).error_type == "TruncatedImage", cut


def test_jpeg_header_cut_is_truncated_not_unidentified():
    data = jpeg(pattern_rgb(48, 56))
    err = decode_error(data[:30])
    assert err.error_type == "TruncatedImage"
    assert "JPEG" in err.message


def test_truncated_jpeg_caught_even_if_pillow_is_told_to_load_truncated(monkeypatch, bad):
    data = bad["truncated.jpg"][0]
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with Image.open(io.BytesIO(data)) as im:  # Pillow alone now accepts it silently
        im.load()
    err = decode_error(data)
    assert err.error_type == "TruncatedImage"
    assert "0xFFD9" in err.message
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # we never touch it


def test_jpeg_end_marker_walk():
    data = jpeg(pattern_rgb(40, 40, seed=9))
    assert images._jpeg_complete(data) is True
    assert images._jpeg_complete(data + b"\x00" * 50 + b"trailer") is True  # bytes after EOI are fine
    assert images._jpeg_complete(data[:-2]) is False
    assert images._jpeg_complete(data[: len(data) // 2]) is False
    assert images._jpeg_complete(data[:10]) is False
    assert images._jpeg_complete(b"\x89PNG\r\n\x1a\n") is None
    # An APP1 segment carrying a complete thumbnail JPEG (with its own 0xFFD9) must not make a
    # truncated main image look complete.
    thumb = jpeg(pattern_rgb(8, 8))
    app1 = b"\xff\xe1" + struct.pack(">H", len(thumb) + 2) + thumb
    with_thumb = data[:2] + app1 + data[2:]
    assert images._jpeg_complete(with_thumb) is True
    assert decode_image(with_thumb, DEFAULT_MAX).shape == (40, 40, 3)
    assert images._jpeg_complete(with_thumb[: len(with_thumb) - len(data) // 2]) is False


def test_png_with_broken_header_checksum_is_corrupt():
    data = bytearray(raw_png(4, 4, 8, 0, zlib.compress(b"\x00" * 20)))
    data[29] ^= 0xFF  # inside the IHDR CRC
    err = decode_error(bytes(data))
    assert err.error_type == "CorruptImage"
    assert "PNG" in err.message


def test_png_with_garbage_pixel_stream_is_corrupt():
    err = decode_error(raw_png(20, 20, 8, 0, b"this is not a zlib stream"), max_pixels=1000)
    assert err.error_type == "CorruptImage"
    assert "broken data stream" in err.message


def test_unexpected_exception_becomes_decode_error_named_after_its_class(monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("kaboom in exif")

    monkeypatch.setattr(ImageOps, "exif_transpose", boom)
    err = decode_error(png(pattern_rgb(8, 8)))
    assert err.error_type == "RuntimeError"
    assert "kaboom in exif" in err.message


def test_unexpected_exception_from_open(monkeypatch):
    def open_fails(*args, **kwargs):
        raise KeyError("plugin table broken")

    monkeypatch.setattr(Image, "open", open_fails)
    err = decode_error(png(pattern_rgb(8, 8)))
    assert err.error_type == "KeyError"
    assert "plugin table broken" in err.message


def test_unsupported_mode():
    with pytest.raises(DecodeError) as info:
        images._to_rgb(Image.new("La", (2, 2)))
    assert info.value.error_type == "UnsupportedMode"
    assert "'La'" in info.value.message


def test_decode_error_pickles_with_both_fields():
    err = pickle.loads(pickle.dumps(DecodeError("TruncatedImage", "cut short")))
    assert (err.error_type, err.message, str(err)) == ("TruncatedImage", "cut short", "cut short")


def test_max_pixels_must_be_positive():
    with pytest.raises(ValueError, match="max_pixels"):
        decode_image(png(pattern_rgb(4, 4)), 0)


# --------------------------------------------------------------------------------------------
# Decompression bombs
# --------------------------------------------------------------------------------------------


def test_bomb_png_rejected_with_default_limit(bad):
    data, _ = bad["bomb.png"]
    assert len(data) < 200  # tiny on disk
    err = decode_error(data)
    assert err.error_type == "DecompressionBomb"
    assert "900,000,000 pixels" in err.message
    assert f"{DEFAULT_MAX:,}" in err.message


def test_bomb_rejected_even_when_pillow_guard_is_off(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    err = decode_error(bomb_png())
    assert err.error_type == "DecompressionBomb"
    assert "30000 x 30000" in err.message
    assert Image.MAX_IMAGE_PIXELS is None


def test_guard_fires_before_pixel_data_is_read():
    # The IDAT is not even zlib: decoding it would be CorruptImage. Rejection comes first.
    data = raw_png(5000, 5000, 8, 0, b"not zlib at all")
    err = decode_error(data, max_pixels=1_000_000)
    assert err.error_type == "DecompressionBomb"
    assert "5000 x 5000 = 25,000,000 pixels" in err.message
    assert decode_error(raw_png(20, 20, 8, 0, b"not zlib"), max_pixels=100).error_type == "DecompressionBomb"


def test_max_pixels_boundary():
    data = png(pattern_rgb(20, 20))
    err = decode_error(data, max_pixels=100)
    assert err.error_type == "DecompressionBomb"
    assert "20 x 20 = 400 pixels" in err.message
    assert decode_error(data, max_pixels=399).error_type == "DecompressionBomb"
    assert decode_image(data, 400).shape == (20, 20, 3)


def test_max_pixels_above_pillow_limit_is_honoured(monkeypatch):
    # Stand-in for "an image between Pillow's default and a larger max_pixels" at a small scale.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    big = png(pattern_rgb(20, 20))  # 400 px: Pillow alone raises (> 2 x its limit)
    middling = png(pattern_rgb(12, 12))  # 144 px: Pillow alone warns (> 1 x its limit)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(big))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert decode_image(big, 1000).shape == (20, 20, 3)
        assert decode_image(middling, 1000).shape == (12, 12, 3)
        assert decode_image(big, DEFAULT_MAX).shape == (20, 20, 3)  # our limit, not Pillow's
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert Image.MAX_IMAGE_PIXELS == 100  # restored
    assert decode_error(big, max_pixels=300).error_type == "DecompressionBomb"
    assert Image.MAX_IMAGE_PIXELS == 100


def test_pillow_bomb_warning_becomes_our_error(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)
    data = png(pattern_rgb(20, 20))  # 400 px: between Pillow's 1x and 2x -> Pillow warns in open()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        err = decode_error(data, max_pixels=200)
    assert err.error_type == "DecompressionBomb"
    assert "400 pixels" in err.message
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_pillow_globals_and_warning_filters_unchanged(bad):
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES, list(warnings.filters))
    for data, _ in bad.values():
        for max_pixels in (100, DEFAULT_MAX, 2 * Image.MAX_IMAGE_PIXELS + 1):
            try:
                decode_image(data, max_pixels)
            except DecodeError:
                pass
    after = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES, list(warnings.filters))
    assert after == before
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# --------------------------------------------------------------------------------------------
# Modes
# --------------------------------------------------------------------------------------------


def assert_gray(out: np.ndarray, expected) -> None:
    expected = np.asarray(expected, dtype=np.uint8)
    assert out.shape == (*expected.shape, 3)
    for channel in range(3):
        np.testing.assert_array_equal(out[:, :, channel], expected)


def test_grayscale_l():
    gray = np.arange(64 * 64, dtype=np.uint32).reshape(64, 64).astype(np.uint8)
    assert_gray(decode_image(png(gray), BIG), gray)


def test_one_bit():
    bits = np.zeros((16, 24), bool)
    bits[4:8, 2:20] = True
    image = Image.fromarray(bits)
    assert image.mode == "1"
    assert_gray(decode_image(encode(image, "PNG"), BIG), np.where(bits, 255, 0))


def test_gray16_scaled_by_dtype_range():
    values = np.array([[0, 257, 65535, 128, 129, 385, 386, 32896]], np.uint16)
    data = png(values)
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    assert_gray(decode_image(data, BIG), [[0, 1, 255, 0, 1, 1, 2, 128]])


def test_gray16_same_value_same_output_across_images():
    dim = np.full((4, 4), 1000, np.uint16)
    bright = dim.copy()
    bright[0, 0] = 65535
    a, b = decode_image(png(dim), BIG), decode_image(png(bright), BIG)
    assert a[1, 1, 0] == b[1, 1, 0] == 4  # round(1000 / 257), not stretched to the image maximum


def test_gray16_file_from_corpus(bad):
    out = decode_image(bad["gray16.png"][0], BIG)
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255
    assert np.all(np.diff(out[:, :, 0].ravel().astype(int)) >= 0)  # the ramp stays monotonic


def test_int32_mode_i_clipped_to_16_bit_range():
    values = np.array([[0, 257, 65535, 70000, -5]], np.int32)
    data = encode(Image.fromarray(values), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    assert_gray(decode_image(data, BIG), [[0, 1, 255, 255, 0]])


def test_float_unit_range():
    values = np.array([[0.0, 0.25, 0.5, 1.0, -0.5, np.nan]], np.float32)
    data = encode(Image.fromarray(values), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    assert_gray(decode_image(data, BIG), [[0, 64, 128, 255, 0, 0]])


def test_float_wider_range_clipped_to_0_255():
    values = np.array([[-5.0, 0.4, 100.4, 254.6, 300.0]], np.float32)
    assert_gray(decode_image(encode(Image.fromarray(values), "TIFF"), BIG), [[0, 0, 100, 255, 255]])


def test_rgba_drops_alpha_keeps_colour():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = (10, 20, 30)
    rgba[0, 0] = (200, 100, 50, 0)  # fully transparent: colour still kept
    out = decode_image(png(rgba, "RGBA"), BIG)
    assert out.shape == (4, 4, 3)
    assert tuple(out[0, 0]) == (200, 100, 50)
    assert tuple(out[3, 3]) == (10, 20, 30)


def test_rgba_from_corpus_matches_its_colour_planes(bad):
    data = bad["rgba.png"][0]
    with Image.open(io.BytesIO(data)) as im:
        rgb_planes = np.asarray(im)[..., :3]
    np.testing.assert_array_equal(decode_image(data, BIG), rgb_planes)


def test_la_drops_alpha():
    la = np.zeros((3, 3, 2), np.uint8)
    la[..., 0] = 100
    la[..., 1] = 0
    assert_gray(decode_image(png(la, "LA"), BIG), np.full((3, 3), 100))


@pytest.mark.parametrize("transparency", [None, 0, b"\x00\xff"])
def test_palette_colours(transparency):
    indices = np.array([[0, 1], [2, 1]], np.uint8)
    image = Image.fromarray(indices, "L").convert("P")
    image.putdata(indices.ravel().tolist())
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    params = {} if transparency is None else {"transparency": transparency}
    data = encode(image, "PNG", **params)
    assert Image.open(io.BytesIO(data)).mode == "P"
    out = decode_image(data, BIG)
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[0, 1]) == (0, 255, 0)
    assert tuple(out[1, 0]) == (0, 0, 255)


def test_cmyk_jpeg_colours():
    for colour in [(255, 0, 0), (0, 200, 0), (30, 60, 220)]:
        data = encode(Image.new("RGB", (32, 32), colour).convert("CMYK"), "JPEG", quality=95)
        assert Image.open(io.BytesIO(data)).mode == "CMYK"
        out = decode_image(data, BIG)
        assert out.shape == (32, 32, 3)
        assert np.abs(out[16, 16].astype(int) - colour).max() <= 12, (colour, out[16, 16])


def test_cmyk_jpeg_from_corpus_is_close_to_source(bad):
    out = decode_image(bad["cmyk.jpg"][0], BIG).astype(int)
    source = pattern_rgb(64, 88, seed=4).astype(int)
    assert np.abs(out - source).mean() < 8


def test_ycbcr_matches_pillow_conversion():
    rgb = Image.fromarray(pattern_rgb(16, 16, seed=2))
    ycc = rgb.convert("YCbCr")
    out = images._to_rgb(ycc)
    np.testing.assert_array_equal(out, np.asarray(ycc.convert("RGB")))
    assert np.abs(out.astype(int) - np.asarray(rgb, dtype=int)).max() <= 3


def test_rgb16_png_keeps_high_byte():
    pixels = np.array(
        [[[0, 257, 65535], [257 * 100, 257 * 7, 257 * 200]], [[0x80FF, 0x8000, 0x7F80], [65535, 0, 0]]],
        np.uint16,
    )
    out = decode_image(rgb16_png(pixels), BIG)
    assert out.shape == (2, 2, 3)
    np.testing.assert_array_equal(out[0, 0], [0, 1, 255])
    np.testing.assert_array_equal(out[0, 1], [100, 7, 200])
    np.testing.assert_array_equal(out[1, 0], [128, 128, 127])  # high byte, as Pillow reads it
    np.testing.assert_array_equal(out[1, 1], [255, 0, 0])


def test_first_frame_of_gif_and_tiff():
    red, blue = Image.new("RGB", (16, 12), (255, 0, 0)), Image.new("RGB", (16, 12), (0, 0, 255))
    gif = encode(red, "GIF", save_all=True, append_images=[blue])
    tiff = encode(blue, "TIFF", save_all=True, append_images=[red])
    assert Image.open(io.BytesIO(gif)).n_frames == 2
    assert Image.open(io.BytesIO(tiff)).n_frames == 2
    assert tuple(decode_image(gif, BIG)[5, 5]) == (255, 0, 0)
    assert tuple(decode_image(tiff, BIG)[5, 5]) == (0, 0, 255)
    assert decode_image(gif, BIG).shape == (12, 16, 3)


# --------------------------------------------------------------------------------------------
# EXIF orientation
# --------------------------------------------------------------------------------------------


def is_red(patch: np.ndarray) -> bool:
    mean = patch.reshape(-1, 3).mean(axis=0)
    return mean[0] > 200 and mean[1] < 60 and mean[2] < 60


def marked(height: int = 20, width: int = 40) -> np.ndarray:
    pixels = np.full((height, width, 3), 128, np.uint8)
    pixels[:8, :8] = (255, 0, 0)  # stored top-left corner
    return pixels


@pytest.mark.parametrize(
    "orientation, shape, corner",
    [
        (1, (20, 40), "top_left"),
        (3, (20, 40), "bottom_right"),  # rotated 180
        (6, (40, 20), "top_right"),  # displayed rotated 90 degrees clockwise
        (8, (40, 20), "bottom_left"),  # displayed rotated 90 degrees counter-clockwise
    ],
)
def test_exif_orientation_applied(orientation, shape, corner):
    out = decode_image(exif_jpeg(marked(), orientation), BIG)
    assert out.shape == (*shape, 3)
    corners = {
        "top_left": out[1:6, 1:6],
        "top_right": out[1:6, -6:-1],
        "bottom_left": out[-6:-1, 1:6],
        "bottom_right": out[-6:-1, -6:-1],
    }
    assert is_red(corners.pop(corner))
    assert not any(is_red(patch) for patch in corners.values())


def test_exif_rotated_corpus_file_is_portrait_with_marker_top_right(bad):
    data, spec = bad["exif_rotated.jpg"]
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (96, 64)  # stored landscape (W, H)
        assert im.getexif()[0x0112] == 6
    out = decode_image(data, BIG)
    assert out.shape == (96, 64, 3) == (*spec["shape"], 3)
    assert is_red(out[2:12, -12:-2])
    assert not is_red(out[2:12, 2:12])
