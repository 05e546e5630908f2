"""decode.resolution: working (issue 31): images decoded straight to the smallest size the plan's
models need; JPEGs through libjpeg's DCT scaling (Pillow's draft), never below that size; the
original size kept; EXIF orientation as in the exact decode; other formats on the plain path."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
from PIL import Image

from pipeline.config import load_spec
from pipeline.io import images
from pipeline.io.images import WorkingSize, decode_image, decode_working, resize_rgb
from pipeline.stages.decode import DecodeStage, working_size
from pipeline.stages.records import image_hw, with_original, working_box

BIG = 10**9


def smooth(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB image (JPEG-friendly: small blocks upsampled)."""
    rng = np.random.default_rng(seed)
    small = (rng.random((max(2, height // 16), max(2, width // 16), 3)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC))


def encode(array: np.ndarray, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **params)
    return buf.getvalue()


@pytest.fixture
def resizes(monkeypatch):
    """Every resize the decoder makes: (source size, target size), both (w, h)."""
    seen = []
    original = images.resize_rgb

    def spy(rgb, size):
        seen.append(((rgb.shape[1], rgb.shape[0]), (size[1], size[0])))
        return original(rgb, size)

    monkeypatch.setattr(images, "resize_rgb", spy)
    return seen


@pytest.fixture
def drafts(monkeypatch):
    """Every draft request: (format, mode, requested (w, h), the size it gave)."""
    seen = []
    original = Image.Image.draft

    def spy(self, mode, size):
        out = original(self, mode, size)
        seen.append((self.format, self.mode, tuple(size), self.size))
        return out

    monkeypatch.setattr(Image.Image, "draft", spy)
    from PIL import JpegImagePlugin

    jpeg_original = JpegImagePlugin.JpegImageFile.draft

    def jpeg_spy(self, mode, size):
        out = jpeg_original(self, mode, size)
        seen.append((self.format, self.mode, tuple(size), self.size))
        return out

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", jpeg_spy)
    return seen


def test_the_working_size_meets_every_need_and_is_the_smallest():
    """Property over sizes and needs: short side >= short, long side >= long, at least `scale` of
    the original, never above the original, aspect ratio kept to a pixel; one pixel less would
    break a need (it is the smallest)."""
    for (h, w), need in itertools.product(
        [(3000, 4000), (4000, 3000), (1080, 1920), (517, 518), (240, 240), (100, 3000), (7, 5)],
        [WorkingSize(short=896), WorkingSize(short=240), WorkingSize(long=1024), WorkingSize(short=518, long=700),
         WorkingSize(scale=0.3), WorkingSize(short=240, scale=0.5)],
    ):
        th, tw = need.size(h, w)
        assert th <= h and tw <= w
        assert min(th, tw) >= min(need.short, min(h, w)) and max(th, tw) >= min(need.long, max(h, w))
        assert th >= min(h, need.scale * h - 1e-6) and tw >= min(w, need.scale * w - 1e-6)
        if (th, tw) != (h, w):  # reduced: the aspect ratio is kept (to a pixel), and it is the smallest such size
            assert abs(th / h - tw / w) <= 1 / h + 1 / w
            smaller = WorkingSize(short=need.short - 1 if need.short else 0, long=need.long - 1 if need.long else 0,
                                  scale=need.scale * 0.99)
            assert smaller.size(h, w) <= (th, tw)


@pytest.mark.parametrize("h, w, short", [(1200, 1600, 240), (1200, 1600, 300), (1200, 1600, 600), (1200, 1600, 599),
                                         (1600, 1200, 150), (963, 1283, 121), (640, 480, 448), (640, 480, 479)])
def test_a_jpeg_is_draft_decoded_never_below_its_working_size(h, w, short, resizes, drafts):
    data = encode(smooth(h, w), "JPEG", quality=92)
    need = WorkingSize(short=short)
    resizes.clear()
    drafts.clear()
    array, original = decode_working(data, BIG, need)
    target = need.size(h, w)
    assert original == (h, w) and array.shape == (*target, 3) and array.dtype == np.uint8
    assert drafts and drafts[0][0] == "JPEG"
    given = drafts[0][3]  # (w, h) after DCT scaling
    assert given[0] >= target[1] and given[1] >= target[0]  # never below the working size
    assert all(src[0] >= dst[0] and src[1] >= dst[1] for src, dst in resizes)  # only ever reduced
    scale = w / given[0]
    if scale < 8:  # a finer scale was possible only if it would have gone below the working size
        finer = -(-w // (scale * 2)), -(-h // (scale * 2))
        assert finer[0] < target[1] or finer[1] < target[0]
    # the same pixels, up to the DCT scaling's rounding, as a full decode resized the same way
    exact = np.asarray(Image.fromarray(decode_image(data, BIG)).resize((target[1], target[0]),
                                                                      Image.Resampling.BICUBIC))
    assert np.abs(array.astype(int) - exact.astype(int)).mean() < 5.0


def test_an_image_at_or_below_its_working_size_is_decoded_as_it_is(resizes):
    data = encode(smooth(200, 300), "JPEG", quality=95)
    resizes.clear()
    array, original = decode_working(data, BIG, WorkingSize(short=240))
    assert original == (200, 300) and np.array_equal(array, decode_image(data, BIG)) and not resizes


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_exif_orientation_is_applied_as_in_the_exact_decode(orientation):
    stored = smooth(900, 1200, seed=orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    exact = decode_image(data, BIG)
    array, original = decode_working(data, BIG, WorkingSize(short=300))
    assert original == exact.shape[:2]  # displayed orientation: 1200 x 900 for 6 and 8
    assert min(array.shape[:2]) == 300 and (array.shape[0] > array.shape[1]) == (exact.shape[0] > exact.shape[1])
    resized = np.asarray(Image.fromarray(exact).resize((array.shape[1], array.shape[0]), Image.Resampling.BICUBIC))
    assert np.abs(array.astype(int) - resized.astype(int)).mean() < 3.0  # the same picture, the same way up


@pytest.mark.parametrize("kind", ["png", "tiff", "png16", "cmyk_jpeg", "cmyk_tiff"])
def test_other_formats_take_the_plain_path_and_one_resize(kind, drafts, resizes):
    rgb = smooth(600, 800, seed=3)
    if kind == "png":
        data = encode(rgb, "PNG")
    elif kind == "tiff":
        data = encode(rgb, "TIFF")
    elif kind == "png16":
        buf = io.BytesIO()
        Image.fromarray((rgb[:, :, 0].astype(np.uint16) * 257)).save(buf, "PNG")  # 16-bit grey
        data = buf.getvalue()
    else:
        buf = io.BytesIO()
        Image.fromarray(rgb).convert("CMYK").save(buf, "JPEG" if kind == "cmyk_jpeg" else "TIFF")
        data = buf.getvalue()
    drafts.clear()
    resizes.clear()
    array, original = decode_working(data, BIG, WorkingSize(short=150))
    assert original == (600, 800) and array.shape == (150, 200, 3)
    assert not [d for d in drafts if d[2] != d[3] or d[0] != "JPEG"] or kind == "cmyk_jpeg"
    assert all(d[1] not in ("RGB", "L") or d[0] != "JPEG" for d in drafts) if kind == "cmyk_jpeg" else not drafts
    assert resizes == [((800, 600), (200, 150))]  # full size, one resize
    full = decode_image(data, BIG)
    assert np.array_equal(array, resize_rgb(full, (150, 200)))
    pillow = np.asarray(Image.fromarray(full).resize((200, 150), Image.Resampling.BICUBIC))
    assert np.abs(array.astype(int) - pillow.astype(int)).max() <= 2  # Pillow's bicubic within two grey levels


def test_the_resize_is_pillows_bicubic_within_two_grey_levels():
    rgb = smooth(1500, 2000, seed=9)
    rgb = np.clip(rgb.astype(int) + np.random.default_rng(1).normal(0, 6, rgb.shape), 0, 255).astype(np.uint8)
    for size in [(896, 1195), (240, 320), (1499, 1999), (700, 1000)]:
        got = resize_rgb(rgb, size)
        pillow = np.asarray(Image.fromarray(rgb).resize((size[1], size[0]), Image.Resampling.BICUBIC))
        assert got.shape == (*size, 3) and got.dtype == np.uint8 and got.flags.c_contiguous
        diff = np.abs(got.astype(int) - pillow.astype(int))
        assert diff.max() <= 2 and diff.mean() < 0.05, size  # measured: max 1 (2 on 10 pixels at 1499), mean 0.004


def test_the_decode_stage_keeps_the_original_size_in_its_rows(tmp_path):
    path = tmp_path / "big.jpg"
    path.write_bytes(encode(smooth(960, 1280), "JPEG", quality=90))
    small = tmp_path / "small.png"
    small.write_bytes(encode(smooth(64, 96), "PNG"))
    spec = load_spec("jobs/smoke.yaml", ["decode.resolution=working"])
    stage = DecodeStage.from_spec(spec, None)
    assert stage.working == working_size(spec) and stage.working.short == 128  # zsad-tiny's input
    out = stage({"uri": np.array([str(path), str(small)], dtype=object)})
    assert list(out["status"]) == ["ok", "ok"]
    assert (out["height"].tolist(), out["width"].tolist()) == ([960, 64], [1280, 96])
    assert out["image"][0].shape == (128, 171, 3) and out["image"][1].shape == (64, 96, 3)
    exact = DecodeStage.from_spec(load_spec("jobs/smoke.yaml"), None)
    assert exact.working is None
    assert exact({"uri": np.array([str(path)], dtype=object)})["image"][0].shape == (960, 1280, 3)
    marked = with_original(out["image"][0], 960, 1280)
    assert image_hw(marked) == (960, 1280) and image_hw(out["image"][1]) == (64, 96)
    assert np.array_equal(np.asarray(marked), out["image"][0])


def test_each_plan_needs_its_models_sizes_sam_its_long_side_and_tiles_a_scale():
    assert working_size(load_spec("jobs/clip_sam.yaml", ["decode.resolution=working"])) == WorkingSize(short=518,
                                                                                                        long=1024)
    assert working_size(load_spec("jobs/default.yaml", ["decode.resolution=exact"])) is None
    assert working_size(load_spec("jobs/default.yaml", ["decode.resolution=working"])) == WorkingSize(short=896)
    assert working_size(load_spec("jobs/musc.yaml", ["decode.resolution=working"])) == WorkingSize(short=518)
    # vvv: 352-px tiles squashed to inputs up to 448 px need every original pixel: the full size
    vvv = working_size(load_spec("jobs/vvv.yaml"))
    assert vvv == WorkingSize(short=448, long=1024, scale=1.0) and vvv.size(3000, 4000) == (3000, 4000)
    bigger = working_size(load_spec("jobs/vvv.yaml", ["tiling.min_tile=1024"]))
    assert bigger == WorkingSize(short=448, long=1024, scale=448 / 1024) and bigger.size(3000, 4000) == (1313, 1750)
    classical = working_size(load_spec("jobs/vvv.yaml", ["tiling.min_tile=1024", "foreground.kind=classical"]))
    assert classical == WorkingSize(short=448, scale=448 / 1024)  # the classical map needs no size
    dis = working_size(load_spec("jobs/vvv.yaml", ["foreground.dis_model=/m/dis.onnx", "foreground.dis_input_size=800",
                                                   "tiling.min_tile=2048"]))
    assert dis == WorkingSize(short=800, long=1024, scale=448 / 2048)  # the dichotomous model's square input
    assert working_size(load_spec("jobs/vvv.yaml", ["decode.resolution=exact"])) is None


@pytest.mark.parametrize("min_tile", [96, 352, 640, 1024, 2000])
def test_the_smallest_tile_keeps_the_pixels_its_models_need_and_no_more(min_tile):
    """Property over vvv plans and image sizes: in the working image the smallest possible tile
    (min_tile original pixels, clipped to the image) keeps min(its side, the largest model input)
    pixels, SAM's long side and the whole-image input hold, and a working size one percent smaller
    would break one of them (it is the smallest)."""
    spec = load_spec("jobs/vvv.yaml", [f"tiling.min_tile={min_tile}"])
    need = working_size(spec)
    largest = max(spec.pixel.scales)

    def meets(h, w, th, tw):
        side = min(min_tile, h, w)  # a tile is clipped to the image's short side
        image = with_original(np.zeros((th, tw, 3), np.uint8), h, w)
        x0, y0, x1, y1 = working_box(image, (0, 0, side, side))
        tile = min(x1 - x0, y1 - y0) >= min(side, largest)
        return tile and max(th, tw) >= min(1024, max(h, w)) and min(th, tw) >= min(largest, h, w)

    for h, w in [(3000, 4000), (4000, 3000), (1080, 1920), (960, 1280), (500, 700), (300, 2000), (7, 5)]:
        th, tw = need.size(h, w)
        assert th <= h and tw <= w and meets(h, w, th, tw), (h, w, th, tw)
        if (th, tw) != (h, w):
            r = max(th / h, tw / w) * 0.99
            assert not meets(h, w, max(1, int(h * r)), max(1, int(w * r))), (h, w, th, tw)
    if min_tile <= largest:
        assert need.size(3000, 4000) == (3000, 4000)  # vvv's own values: every pixel


def test_a_box_in_original_pixels_maps_to_the_working_pixels_it_covers():
    """working_box: the original box scaled, start floored and end ceiled (so the crop covers the
    whole region, at most a pixel more on each side), clipped, at least one pixel; as given for an
    image at its original size."""
    rng = np.random.default_rng(2)
    plain = np.zeros((40, 50, 3), np.uint8)
    assert working_box(plain, (3, 4, 20, 30)) == (3, 4, 20, 30)
    assert working_box(with_original(plain, 40, 50), (3, 4, 20, 30)) == (3, 4, 20, 30)
    for _ in range(500):
        oh, ow = (int(v) for v in rng.integers(2, 3000, 2))
        h, w = max(1, int(oh * rng.uniform(0.05, 1))), max(1, int(ow * rng.uniform(0.05, 1)))
        x0, x1 = sorted(int(v) for v in rng.choice(ow + 1, 2, replace=False))
        y0, y1 = sorted(int(v) for v in rng.choice(oh + 1, 2, replace=False))
        image = with_original(np.zeros((h, w, 3), np.uint8), oh, ow)
        bx0, by0, bx1, by1 = working_box(image, (x0, y0, x1, y1))
        assert 0 <= bx0 < bx1 <= w and 0 <= by0 < by1 <= h
        for a, b, lo, hi, n, on in ((bx0, bx1, x0, x1, w, ow), (by0, by1, y0, y1, h, oh)):
            assert a <= lo * n / on + 1e-9 and b >= min(n, hi * n / on) - 1e-9  # covers the region
            assert a > lo * n / on - 1 or a == n - 1  # floored (clipped to leave one pixel)
            assert b < hi * n / on + 1 or b == a + 1  # ceiled (or one pixel)
    assert working_box(with_original(np.zeros((10, 10, 3), np.uint8), 1000, 1000), (995, 0, 1000, 3)) == (9, 0, 10, 1)


def test_images_travel_between_stages_as_arrow_tensors_at_the_working_size(tmp_path):
    """What Ray moves from the decode stage to the model stage: the image column as Ray's Arrow
    tensor extension (raw pixels, no pickled objects), of the working size's bytes."""
    import pyarrow as pa

    from pipeline.runtime.udf import TaskStage

    paths = []
    for i, (h, w) in enumerate([(960, 1280), (1280, 960)]):
        paths.append(tmp_path / f"{i}.jpg")
        paths[-1].write_bytes(encode(smooth(h, w, seed=i), "JPEG", quality=90))
    block = pa.table({"uri": [str(p) for p in paths]})
    sizes = {}
    for mode in ("exact", "working"):
        stage = DecodeStage.from_spec(load_spec("jobs/smoke.yaml", [f"decode.resolution={mode}"]), None)
        out = TaskStage(stage)(block)
        column = out.column("image")
        assert "Tensor" in type(column.type).__name__ and not pa.types.is_binary(column.type.storage_type)
        assert out.column("height").to_pylist() == [960, 1280] and out.column("width").to_pylist() == [1280, 960]
        sizes[mode] = column.nbytes
    assert sizes["exact"] >= 2 * 960 * 1280 * 3
    assert 2 * 128 * 171 * 3 <= sizes["working"] <= 2 * 128 * 171 * 3 * 1.01  # the pixels, a few offsets more
