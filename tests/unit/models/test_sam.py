"""SAM: building (tiny/real architectures, seeded init, strict weights_only checkpoints) and the
embed-once / decode-many engine, checked against segment-anything's own SamPredictor and
SamAutomaticMaskGenerator on a tiny random-weight model and synthetic images."""

import pickle

import numpy as np
import pytest
import torch
from segment_anything import SamAutomaticMaskGenerator, SamPredictor

from pipeline.models import sam as sam_models
from pipeline.models.clip import ModelLoadError
from pipeline.models.sam import SamEmbedding, SamEngine, SamInputError, SamLoadError, build_sam


def _scene(h: int = 96, w: int = 128, seed: int = 0) -> np.ndarray:
    """A synthetic multi-object RGB image: noisy grey background, two rectangles and a disc."""
    rng = np.random.default_rng(seed)
    img = np.clip(rng.normal(110, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    img[h // 8 : h // 2, w // 10 : w // 3] = (200, 40, 40)
    img[h // 2 : h - h // 8, w // 2 : w - w // 10] = (30, 60, 210)
    yy, xx = np.mgrid[:h, :w]
    img[(yy - h // 4) ** 2 + (xx - 3 * w // 4) ** 2 < (min(h, w) // 7) ** 2] = (240, 230, 60)
    return img


@pytest.fixture(scope="module")
def tiny():
    return build_sam("tiny")


@pytest.fixture(scope="module")
def engine(tiny):
    return SamEngine(tiny)


@pytest.fixture(scope="module")
def image():
    return _scene()


@pytest.fixture(scope="module")
def emb(engine, image):
    return engine.embed(image)


def _logits(sam, image):
    eng = SamEngine(sam)
    e = eng.embed(image)
    low, iou = eng.decode_logits(e, points=[[[20.0, 30.0], [100.0, 70.0]]], labels=[[1, 0]])
    return e.features, low, iou


# ------------------------------------------------------------------------------------ building


def test_tiny_builds_in_eval_mode_with_the_documented_geometry(tiny):
    assert isinstance(tiny, sam_models.Sam)
    assert not tiny.training and not tiny.image_encoder.training
    assert tiny.image_encoder.img_size == 256
    assert sum(p.numel() for p in tiny.parameters()) < 1_000_000
    blocks = tiny.image_encoder.blocks
    assert [b.window_size for b in blocks] == [8, 0]  # windowed, then global attention
    eng = SamEngine(tiny)
    assert eng.embedding_size == (16, 16) and eng.low_res_size == 64


def test_random_init_is_seeded_and_leaves_the_global_rng_alone():
    a, b, c = build_sam("tiny"), build_sam("tiny"), build_sam("tiny", seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    torch.manual_seed(123)
    x = torch.rand(1)
    torch.manual_seed(123)
    build_sam("tiny", seed=5)
    assert torch.equal(torch.rand(1), x)


def test_checkpoint_roundtrip_reproduces_outputs(tmp_path, image):
    src = build_sam("tiny", seed=7)
    path = tmp_path / "sam_tiny.pt"
    torch.save(src.state_dict(), path)
    loaded = build_sam("tiny", str(path))  # seed 0 init, then every tensor replaced
    other = build_sam("tiny")  # seed 0, no checkpoint
    f_src, low_src, iou_src = _logits(src, image)
    f_ld, low_ld, iou_ld = _logits(loaded, image)
    f_o, low_o, _ = _logits(other, image)
    assert torch.equal(f_src, f_ld) and torch.equal(low_src, low_ld) and torch.equal(iou_src, iou_ld)
    assert not torch.allclose(f_src, f_o) and not torch.allclose(low_src, low_o)


def test_checkpoint_wrapped_or_data_parallel_prefixed_loads(tmp_path):
    src = build_sam("tiny", seed=3)
    path = tmp_path / "wrapped.pt"
    torch.save({"model": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    loaded = build_sam("tiny", str(path))
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in src.state_dict().items())


def test_checkpoint_with_missing_unexpected_or_misshapen_keys_fails_naming_them(tmp_path):
    sd = build_sam("tiny", seed=3).state_dict()
    key = "mask_decoder.iou_prediction_head.layers.2.weight"
    missing = {k: v for k, v in sd.items() if k != key}
    torch.save(missing, tmp_path / "missing.pt")
    named = r"missing\.pt does not fit tiny: missing keys \['mask_decoder\.iou_prediction_head\.layers\.2\.weight'\]"
    with pytest.raises(SamLoadError, match=named):
        build_sam("tiny", str(tmp_path / "missing.pt"))

    torch.save({**sd, "extra.weight": torch.zeros(1)}, tmp_path / "extra.pt")
    with pytest.raises(SamLoadError, match=r"unexpected keys \['extra\.weight'\]"):
        build_sam("tiny", str(tmp_path / "extra.pt"))

    torch.save({**sd, key: torch.zeros(7, 7)}, tmp_path / "shape.pt")
    with pytest.raises(SamLoadError, match=r"shape mismatch.*iou_prediction_head\.layers\.2\.weight: \(7, 7\)"):
        build_sam("tiny", str(tmp_path / "shape.pt"))

    # a vit_b-sized encoder key set does not fit tiny either (and is an error a runner catches)
    assert issubclass(SamLoadError, ModelLoadError)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_unsafe_unreadable_or_absent_checkpoints_are_refused(tmp_path):
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as fh:
        pickle.dump({"x": _Evil()}, fh, protocol=2)
    with pytest.raises(SamLoadError, match=r"evil\.pt could not be loaded safely \(weights_only=True\)"):
        build_sam("tiny", str(evil))

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(SamLoadError, match="junk.pt could not be loaded"):
        build_sam("tiny", str(junk))

    torch.save({"a": torch.zeros(1), "b": 3}, tmp_path / "mixed.pt")
    with pytest.raises(SamLoadError, match=r"not a state dict of tensors: non-tensor entries \['b'\]"):
        build_sam("tiny", str(tmp_path / "mixed.pt"))

    with pytest.raises(SamLoadError, match="does not exist"):
        build_sam("tiny", str(tmp_path / "nope.pt"))


def test_unknown_model_lists_the_valid_ones():
    with pytest.raises(SamLoadError, match="unknown SAM model 'vit_x'; valid: vit_h, vit_l, vit_b, tiny"):
        build_sam("vit_x")


def test_vit_b_architecture_constructs_with_about_90m_parameters():
    sam = build_sam("vit_b")  # construction only: a 1024 px forward pass is too slow for unit tests
    n = sum(p.numel() for p in sam.parameters())
    assert 85e6 < n < 100e6, n
    assert sam.image_encoder.img_size == 1024 and len(sam.image_encoder.blocks) == 12
    assert not sam.training
    assert SamEngine(sam).low_res_size == 256


# ------------------------------------------------------------------------------------ engine


def test_embed_matches_sam_predictor(tiny, engine, image, emb):
    pred = SamPredictor(tiny)
    pred.set_image(image)
    assert torch.equal(emb.features, pred.features)
    assert emb.original_size == (96, 128) and emb.input_size == (192, 256) == tuple(pred.input_size)


def test_decode_matches_sam_predictor_in_original_pixels(tiny, engine, image, emb):
    pred = SamPredictor(tiny)
    pred.set_image(image)
    pts, lab, box = np.array([[40.0, 30.0], [90.0, 70.0]]), np.array([1, 0]), np.array([10.0, 8.0, 60.0, 50.0])
    ref_masks, ref_iou, ref_low = pred.predict(point_coords=pts, point_labels=lab, box=box, multimask_output=True)
    out = engine.decode(emb, points=pts[None], labels=lab[None], boxes=box[None])
    assert np.array_equal(out.masks[0].numpy(), ref_masks)
    np.testing.assert_allclose(out.iou_predictions[0].numpy(), ref_iou, atol=1e-6)
    np.testing.assert_allclose(out.low_res_logits[0].numpy(), ref_low, atol=1e-5)


def test_batched_decode_equals_decoding_each_prompt_alone(engine, emb):
    rng = np.random.default_rng(1)
    points = rng.uniform([0, 0], [128, 96], size=(5, 3, 2)).astype(np.float32)
    labels = rng.integers(0, 2, size=(5, 3))
    labels[:, 0] = 1
    batch = engine.decode(emb, points=points, labels=labels)
    assert batch.low_res_logits.shape == (5, 3, 64, 64)
    for i in range(5):
        one = engine.decode(emb, points=points[i : i + 1], labels=labels[i : i + 1])
        torch.testing.assert_close(batch.low_res_logits[i : i + 1], one.low_res_logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(batch.iou_predictions[i : i + 1], one.iou_predictions, atol=1e-5, rtol=0)
    # different prompts give different outputs (the comparison above can fail)
    assert not torch.allclose(batch.low_res_logits[0], batch.low_res_logits[1])


def test_masks_come_back_at_the_original_size_of_a_non_square_image(engine):
    img = _scene(70, 150, seed=2)
    e = engine.embed(img)
    assert e.original_size == (70, 150) and e.input_size == (119, 256)
    out = engine.decode(e, points=[[[75.0, 35.0]], [[10.0, 60.0]]], labels=[[1], [1]])
    assert out.masks.shape == (2, 3, 70, 150) and out.masks.dtype == torch.bool
    assert out.iou_predictions.shape == (2, 3)
    single = engine.decode(e, points=[[[75.0, 35.0]]], labels=[[1]], multimask=False)
    assert single.masks.shape == (1, 1, 70, 150) and single.low_res_logits.shape == (1, 1, 64, 64)
    # the mask is the thresholded upscaled logits
    assert torch.equal(single.masks, engine.upscale(e, single.low_res_logits) > 0)


def test_boxes_and_mask_inputs_paths_run_the_cascade(engine, emb):
    boxes = np.array([[10.0, 10.0, 60.0, 50.0], [64.0, 48.0, 120.0, 90.0]])
    by_box = engine.decode(emb, boxes=boxes, multimask=False)
    assert by_box.masks.shape == (2, 1, 96, 128)

    pts, lab = np.array([[[30.0, 30.0], [100.0, 80.0]]] * 2), np.array([[1, 0], [1, 1]])
    m1 = engine.decode(emb, points=pts, labels=lab).best()  # step 1: best of the multimask outputs
    assert m1.masks.shape == (2, 1, 96, 128) and m1.low_res_logits.shape == (2, 1, 64, 64)
    m2 = engine.decode(emb, points=pts, labels=lab, mask_inputs=m1.low_res_logits, multimask=False)
    m3 = engine.decode(emb, points=pts, labels=lab, boxes=boxes, mask_inputs=m2.low_res_logits, multimask=False)
    assert m3.masks.shape == (2, 1, 96, 128) and m3.iou_predictions.shape == (2, 1)
    assert not torch.allclose(
        m2.low_res_logits, engine.decode(emb, points=pts, labels=lab, multimask=False).low_res_logits
    )
    only_mask = engine.decode(emb, mask_inputs=m1.low_res_logits)
    assert only_mask.masks.shape == (2, 3, 96, 128)


def test_best_keeps_the_highest_predicted_iou(engine, emb):
    out = engine.decode(emb, points=[[[30.0, 30.0]], [[90.0, 60.0]]], labels=[[1], [1]])
    best = out.best()
    idx = out.iou_predictions.argmax(1)
    for i in range(2):
        assert torch.equal(best.low_res_logits[i, 0], out.low_res_logits[i, idx[i]])
        assert best.iou_predictions[i, 0] == out.iou_predictions.max(1).values[i]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "at least one prompt"),
        ({"points": [[[1.0, 2.0]]]}, "points and labels go together"),
        ({"points": [[1.0, 2.0]], "labels": [[1]]}, r"points must be \(B, N, 2\)"),
        ({"points": [[[1.0, 2.0]]], "labels": [[1, 1]]}, r"labels must be \(B, N\) = \(1, 1\)"),
        ({"points": [[[1.0, 2.0]]], "labels": [[2]]}, "labels must be 1"),
        ({"boxes": [1.0, 2.0, 3.0, 4.0]}, r"boxes must be \(B, 4\)"),
        ({"points": [[[1.0, 2.0]]], "labels": [[1]], "boxes": np.zeros((2, 4))}, "prompt batch sizes differ"),
        ({"mask_inputs": np.zeros((1, 1, 256, 256))}, r"mask_inputs must be \(B, 1, 64, 64\)"),
    ],
)
def test_bad_prompts_are_refused_with_the_argument_named(engine, emb, kwargs, message):
    with pytest.raises(SamInputError, match=message):
        engine.decode(emb, **kwargs)


@pytest.mark.parametrize(
    "bad", [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 3), np.float32), np.zeros((8, 8, 4), np.uint8)]
)
def test_bad_images_are_refused(engine, bad):
    with pytest.raises(SamInputError, match=r"\(H, W, 3\) uint8 RGB"):
        engine.embed(bad)


def _count_calls(module):
    calls = []
    handle = module.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


def test_automatic_masks_runs_the_image_encoder_once(tiny, engine, image):
    enc_calls, h1 = _count_calls(tiny.image_encoder)
    dec_calls, h2 = _count_calls(tiny.mask_decoder)
    try:
        engine.automatic_masks(
            image, points_per_side=6, points_per_batch=10, pred_iou_thresh=0, stability_score_thresh=0
        )
        assert len(enc_calls) == 1
        assert len(dec_calls) == 4  # 36 points in batches of 10
        e = engine.embed(image)
        engine.automatic_masks(e, points_per_side=6, points_per_batch=36, pred_iou_thresh=0, stability_score_thresh=0)
        assert len(enc_calls) == 2 and len(dec_calls) == 5  # an embedding is reused: no encoder call
    finally:
        h1.remove()
        h2.remove()


def _check_records(records, shape):
    assert set(records[0]) == {"segmentation", "area", "bbox", "predicted_iou", "stability_score", "point_coords"}
    ious = [r["predicted_iou"] for r in records]
    assert ious == sorted(ious, reverse=True)
    for r in records:
        seg = r["segmentation"]
        assert isinstance(seg, np.ndarray) and seg.dtype == bool and seg.shape == shape
        assert r["area"] == int(seg.sum()) > 0
        ys, xs = np.nonzero(seg)
        assert r["bbox"] == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)  # x1, y1 exclusive
        assert 0.0 <= r["stability_score"] <= 1.0


def test_automatic_masks_records_are_well_formed(engine, image, emb):
    # random weights: masks are speckled over the whole image, so NMS would keep one; disable it
    records = engine.automatic_masks(
        emb, points_per_side=8, pred_iou_thresh=0, stability_score_thresh=0, box_nms_thresh=1.0
    )
    assert len(records) > 100  # 8 x 8 points x 3 masks, none empty here
    _check_records(records, image.shape[:2])
    assert len(engine.automatic_masks(emb, points_per_side=8, pred_iou_thresh=0, stability_score_thresh=0)) >= 1
    assert engine.automatic_masks(emb, points_per_side=8, pred_iou_thresh=10.0, stability_score_thresh=0) == []


def _blob_decoder(engine, radii, scores):
    """A stand-in for the decoder: K = len(radii) discs of those radii (original pixels) around each
    point, as low-res logits over the padded square (slope 1/px), with IoU predictions ``scores``."""

    def decode_logits(emb, points=None, labels=None, boxes=None, mask_inputs=None, multimask=True):
        pts = torch.as_tensor(points, dtype=torch.float32)[:, 0]  # (B, 2) original pixels
        scale = emb.input_size[0] / emb.original_size[0]
        n = engine.low_res_size
        c = (torch.arange(n, dtype=torch.float32) + 0.5) * engine.img_size / n / scale  # original px
        d = ((c[None, None, :] - pts[:, 0, None, None]) ** 2 + (c[None, :, None] - pts[:, 1, None, None]) ** 2).sqrt()
        low = torch.stack([(r - d) * scale for r in radii], dim=1)  # (B, K, n, n)
        iou = torch.tensor(scores, dtype=torch.float32).expand(len(pts), -1) + pts[:, :1] * 1e-4
        return low, iou

    return decode_logits


def test_automatic_masks_filters_and_suppresses_known_discs(tiny, image, emb, monkeypatch):
    eng = SamEngine(tiny)
    # 4 x 4 grid on 128 x 96: points 32 px apart in x, 24 in y; discs of radius 4, 7, 10 px
    monkeypatch.setattr(eng, "decode_logits", _blob_decoder(eng, radii=(4, 7, 10), scores=(0.95, 0.9, 0.85)))
    recs = eng.automatic_masks(emb, points_per_side=4, pred_iou_thresh=0, stability_score_thresh=0.5)
    assert len(recs) == 48  # nested discs: box IoU <= 0.49 < 0.7, all kept
    _check_records(recs, image.shape[:2])
    first = [r for r in recs if r["point_coords"] == pytest.approx((16.0, 12.0))]
    assert sorted(r["bbox"] for r in first) == sorted([(12, 8, 20, 16), (9, 5, 23, 19), (6, 2, 26, 22)])
    assert [r["predicted_iou"] for r in recs[:16]] == sorted(r["predicted_iou"] for r in recs if r["area"] < 60)[::-1]
    assert len(eng.automatic_masks(emb, points_per_side=4, pred_iou_thresh=0.92, stability_score_thresh=0)) == 16
    big = eng.automatic_masks(emb, points_per_side=4, pred_iou_thresh=0, stability_score_thresh=0, min_mask_area=100)
    assert len(big) == 32 and all(r["area"] >= 100 for r in big)  # the radius-4 discs (about 50 px) are gone

    # an empty mask (negative radius: all logits < 0) is never a record, whatever the thresholds
    monkeypatch.setattr(eng, "decode_logits", _blob_decoder(eng, radii=(-1, 7, 10), scores=(0.95, 0.9, 0.85)))
    recs = eng.automatic_masks(emb, points_per_side=4, pred_iou_thresh=0, stability_score_thresh=0)
    assert len(recs) == 32
    _check_records(recs, image.shape[:2])

    # near-identical discs (radius 9, 10, 11): NMS keeps the best-scored one per point
    monkeypatch.setattr(eng, "decode_logits", _blob_decoder(eng, radii=(9, 10, 11), scores=(0.8, 0.9, 0.85)))
    recs = eng.automatic_masks(emb, points_per_side=4, pred_iou_thresh=0, stability_score_thresh=0)
    assert len(recs) == 16
    assert {r["bbox"][2] - r["bbox"][0] for r in recs if 16 <= r["point_coords"][0] <= 112} == {20}  # radius 10


@pytest.fixture(scope="module")
def lively():
    """tiny with its mask hypernetworks' outputs scaled by 100: random-weight logits otherwise stay
    within +-0.2, so every stability score would be 0."""
    sam = build_sam("tiny")
    with torch.no_grad():
        for mlp in sam.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(100)
    return sam


def test_automatic_masks_match_segment_anythings_generator(lively, image):
    kw = dict(points_per_side=6, pred_iou_thresh=0.05, stability_score_thresh=0.6, box_nms_thresh=1.0)
    ours = SamEngine(lively).automatic_masks(image, **kw)
    ref = [r for r in SamAutomaticMaskGenerator(lively, **kw).generate(image) if r["area"] > 0]
    assert 10 < len(ours) < 6 * 6 * 3  # the thresholds remove some, not all
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        assert np.array_equal(a["segmentation"], b["segmentation"])
        assert a["area"] == b["area"]
        x, y, w, h = b["bbox"]  # SAM: XYWH of inclusive pixel extents
        assert a["bbox"] == (x, y, x + w + 1, y + h + 1)
        assert a["predicted_iou"] == pytest.approx(b["predicted_iou"], abs=1e-5)
        assert a["stability_score"] == pytest.approx(b["stability_score"], abs=1e-5)
        assert a["point_coords"] == pytest.approx(tuple(b["point_coords"][0]), abs=1e-4)


def test_embedding_is_a_plain_value_usable_by_another_engine(tiny, emb):
    other = SamEngine(tiny, device="cpu")
    assert isinstance(emb, SamEmbedding)
    out = other.decode(emb, points=[[[30.0, 30.0]]], labels=[[1]])
    assert out.masks.device.type == "cpu" and not out.masks.is_inference()
    out.masks[0, 0, 0, 0] = True  # ordinary tensors: callers may edit them in place


# ------------------------------------------------------------------------------------ the cascade


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("steps", [1, 2, 3])
def test_cascade_equals_three_sam_predictor_calls_by_hand(tiny, engine, image, emb, steps, multimask):
    """The CLIP-SAM cascade against segment-anything's own predictor: (1) points, best of three by
    IoU; (2) points + the step-1 low-res logits; (3) points + the box of mask 2 + its logits. With
    ``multimask`` (the default, the paper's "highest-scored mask"), steps 2 and 3 too take SAM's three
    masks (``multimask_output=True``) and keep the highest predicted IoU."""
    from pipeline.ops.points import bounding_box

    pred = SamPredictor(tiny)
    pred.set_image(image)
    pts, lab = np.array([[40.0, 30.0], [50.0, 36.0], [100.0, 80.0]]), np.array([1, 1, 0])

    def best(masks, iou, low):
        k = int(np.argmax(iou)) if multimask else 0
        return masks[k], iou[k], low[k : k + 1]

    masks1, iou1, low1 = pred.predict(point_coords=pts, point_labels=lab, multimask_output=True)
    k = int(np.argmax(iou1))
    expected = [(masks1[k], iou1[k], low1[k : k + 1])]
    m2, i2, l2 = best(
        *pred.predict(point_coords=pts, point_labels=lab, mask_input=low1[k : k + 1], multimask_output=multimask)
    )
    expected.append((m2, i2, l2))
    box = bounding_box(m2)
    m3, i3, l3 = best(
        *pred.predict(point_coords=pts, point_labels=lab, box=box, mask_input=l2, multimask_output=multimask)
    )
    expected.append((m3, i3, l3))
    calls = []
    original = tiny.image_encoder.forward
    tiny.image_encoder.forward = lambda *a, **kw: calls.append(1) or original(*a, **kw)
    try:
        got = engine.cascade(emb, pts, lab, steps=steps, multimask=multimask)
    finally:
        tiny.image_encoder.forward = original
    assert calls == []  # the encoder ran once, in embed, whatever the number of steps
    assert len(got) == steps
    for step, (mask, iou, low) in zip(got, expected):
        assert np.array_equal(step.mask.numpy(), mask)
        assert abs(step.iou - float(iou)) < 1e-5
        np.testing.assert_allclose(step.low_res_logits[0].numpy(), low, atol=1e-5)
    if steps == 3:
        np.testing.assert_array_equal(got[2].box, box)


def test_cascade_steps_must_be_1_2_or_3(engine, emb):
    with pytest.raises(SamInputError, match="cascade steps"):
        engine.cascade(emb, [[1.0, 1.0]], [1], steps=4)
