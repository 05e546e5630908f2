"""decode.device: model (issue 31): the encoded bytes travel to the model actor, which decodes its
JPEGs with torchvision's decode_jpeg on its device and everything else with Pillow. On a CPU actor
the device code runs on the CPU, which is what these tests run: the same decoder, the same
orientation and resize code as on a GPU (only the ``device`` argument differs)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.config import load_spec
from pipeline.io import contracts
from pipeline.io.images import DecodeError, WorkingSize, decode_working, probe
from pipeline.models.device_decode import DeviceDecoder
from pipeline.stages.decode import DecodeStage, DeviceDecodeStage
from pipeline.stages.fused import FusedStage, find_stage
from pipeline.stages.plan import PlanError, build_plan, check_columns
from tests.unit.io.test_working_decode import encode, smooth

BIG = 10**9
SOURCE = contracts.load("inputs").names
TINY = ["clip.model=zsad-tiny", "clip.weights=null", "allow_random_weights=true"]


def jpeg(array: np.ndarray, orientation: int = 1, **params) -> bytes:
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    return encode(array, "JPEG", quality=92, exif=exif.tobytes(), **params)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_full_size_jpeg_decodes_to_pillows_pixels_in_every_exif_orientation(orientation):
    data = jpeg(smooth(96, 160, seed=orientation), orientation)
    decoder = DeviceDecoder("cpu", BIG)
    [got] = decoder.decode([data])
    ref = decode_working(data, BIG, None)[0]
    assert got.shape == ref.shape == ((160, 96, 3) if orientation >= 5 else (96, 160, 3))
    assert np.array_equal(got, ref)  # both libjpeg-turbo at full size: the same pixels
    assert (decoder.on_device, decoder.on_cpu, decoder.refused) == (1, 0, 0)


@pytest.mark.parametrize("orientation", [1, 6])
@pytest.mark.parametrize("grey", [False, True])
def test_at_the_working_size_it_matches_the_draft_decode_within_a_grey_level(orientation, grey):
    rgb = smooth(960, 1280, seed=3)
    data = jpeg(rgb[..., 0] if grey else rgb, orientation)
    need = WorkingSize(short=300)
    decoder = DeviceDecoder("cpu", BIG, need)
    [got] = decoder.decode([data])
    ref, original = decode_working(data, BIG, need)
    assert got.shape == ref.shape and got.shape[:2] == need.size(*original)
    assert decoder.on_device == 1
    diff = np.abs(got.astype(int) - ref.astype(int))
    assert diff.mean() < 1.0 and diff.max() <= 8  # measured: mean 0.32, max 3 (full decode + torch bicubic)


@pytest.mark.parametrize("kind", ["png", "tiff", "png16", "cmyk_jpeg"])
def test_other_formats_are_decoded_by_pillow_as_the_decode_stage_would(kind):
    rgb = smooth(120, 200, seed=5)
    if kind == "png16":
        data = encode((rgb[..., 0].astype(np.uint16) * 257), "PNG")
    elif kind == "cmyk_jpeg":
        buf = io.BytesIO()
        Image.fromarray(rgb).convert("CMYK").save(buf, "JPEG")
        data = buf.getvalue()
    else:
        data = encode(rgb, kind.upper())
    need = WorkingSize(short=60)
    decoder = DeviceDecoder("cpu", BIG, need)
    [got] = decoder.decode([data])
    assert np.array_equal(got, decode_working(data, BIG, need)[0])
    assert (decoder.on_device, decoder.on_cpu) == (0, 1)


def test_bad_bytes_fail_alone_with_the_decode_stages_error_types():
    good = jpeg(smooth(64, 64))
    broken = bytearray(good)
    table = broken.find(b"\xff\xc4")  # a Huffman table Pillow's header read accepts and libjpeg refuses
    broken[table + 5 : table + 21] = b"\xff" * 16
    decoder = DeviceDecoder("cpu", 10_000)
    out = decoder.decode([b"", b"<html>nope</html>", bytes(broken), good[:300], jpeg(smooth(128, 128)), good])
    kinds = [r.error_type if isinstance(r, DecodeError) else "ok" for r in out]
    assert kinds == ["EmptyFile", "UnidentifiedImage", "CorruptImage", "TruncatedImage", "DecompressionBomb", "ok"]
    # the batch decode failed on the broken table: retried one by one, the refused JPEG went to Pillow
    assert decoder.refused == 1 and "Huffman" in decoder.last_refusal
    assert np.array_equal(out[-1], decode_working(good, BIG, None)[0])


def test_probe_reads_the_displayed_size_without_decoding():
    head = probe(jpeg(smooth(40, 70), orientation=8), BIG)
    assert (head.format, head.mode, head.height, head.width, head.orientation) == ("JPEG", "RGB", 70, 40, 8)
    assert head.plain_jpeg and not probe(encode(smooth(8, 8), "PNG"), BIG).plain_jpeg
    with pytest.raises(DecodeError) as err:
        probe(jpeg(smooth(40, 70)), 100)
    assert err.value.error_type == "DecompressionBomb"


# ------------------------------------------------------------------ the stages and the plan


def test_the_decode_stage_ships_the_bytes_and_the_model_actor_decodes_them(tmp_path):
    files = {"a.jpg": jpeg(smooth(300, 400, seed=1), orientation=6), "b.png": encode(smooth(90, 120), "PNG"),
             "c.jpg": b"not an image"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    spec = load_spec("jobs/default.yaml", TINY + ["decode.device=model", "decode.resolution=working"])
    fetch = DecodeStage.from_spec(spec, None)
    assert fetch.ship_bytes and "image_bytes" in fetch.produces and "image" not in fetch.produces
    uris = np.array([str(tmp_path / n) for n in files], dtype=object)
    shipped = fetch({"uri": uris})
    assert shipped["image_bytes"][0] == files["a.jpg"] and shipped["image_bytes"][2] is None
    assert shipped["height"].tolist() == [400, 90, 0] and shipped["width"].tolist() == [300, 120, 0]
    assert shipped["error_type"].tolist() == [None, None, "UnidentifiedImage"]

    stage = DeviceDecodeStage.from_spec(spec)
    out = stage(shipped)
    assert "image_bytes" not in out and stage.decoder.device.type == "cpu"
    on_cpu = DecodeStage.from_spec(spec, None, on_cpu=True)({"uri": uris})  # what the CPU decode stage makes
    for i in range(2):
        assert out["image"][i].shape == on_cpu["image"][i].shape
        assert np.abs(out["image"][i].astype(int) - on_cpu["image"][i].astype(int)).mean() < 1.0
    assert np.array_equal(out["image"][1], on_cpu["image"][1])  # the PNG: Pillow in both
    assert out["status"].tolist() == ["ok", "ok", "error"] and out["image"][2].shape == (0, 0, 3)
    assert out["height"].tolist() == [400, 90, 0] and (out["decode_ms"][:2] > shipped["decode_ms"][:2]).all()


def test_the_plan_decodes_in_the_first_model_actor():
    spec = load_spec("jobs/default.yaml", TINY + ["decode.device=model"])
    plan = build_plan(spec, source=SOURCE)
    assert [(p.name, p.kind) for p in plan] == [("decode", "task"), ("clip_score", "actor"), ("encode", "task")]
    scoring = plan[1]
    assert isinstance(scoring.stage, FusedStage) and [s.name for s in scoring.stage.parts] == ["device_decode",
                                                                                                 "clip_score"]
    assert scoring.resources == spec.resources.clip_score and find_stage(plan, "clip_score").name == "clip_score"
    assert "image_bytes" in check_columns(plan[:1], SOURCE) and "image" in check_columns(plan, SOURCE)
    plain = build_plan(load_spec("jobs/default.yaml", TINY), source=SOURCE)[1].stage  # without: clip_score alone
    assert type(plain) is type(find_stage(plan, "clip_score")) and plain.name == "clip_score"

    cascade = load_spec("jobs/clip_sam.yaml", TINY + ["sam.model=tiny", "sam.weights=null", "decode.device=model",
                                                      "runtime.fuse_models=true"])
    fused = build_plan(cascade, source=SOURCE)[1].stage
    assert fused.name == "models" and [s.name for s in fused.parts][:2] == ["device_decode", "clip_score"]

    classical = load_spec("jobs/vvv.yaml", TINY + ["sam.model=tiny", "sam.weights=null", "decode.device=model",
                                                   "foreground.kind=classical"])
    with pytest.raises(PlanError, match="decode.device: model .* 'foreground', a CPU task"):
        build_plan(classical, source=SOURCE)
