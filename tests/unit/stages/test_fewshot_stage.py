"""Few-shot scoring in the CLIP stage (no Ray): banks built by the bank stage's code, the three methods'
combination with their zero-shot parts, the reference-is-zero invariant, categories without
references, the per-actor bank cache, digests, stored banks reused, APRIL-GAN's transductive pass."""

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.config import load_spec
from pipeline.io.banks import BankError, StoredBank, manifest_uri, write_manifest
from pipeline.models import fewshot, pixel
from pipeline.ops.heatmap import map_shape
from pipeline.runtime import fewshot as fewshot_run
from pipeline.runtime.passes import RunContext
from pipeline.stages.bank import BankStage, BankTarget, bank_digest
from pipeline.stages.clip_score import ClipScoreStage
from tests.helpers.batches import image_batch

TINY = ["clip.model=zsad-tiny", "clip.weights=null", "allow_random_weights=true", "resources.clip_score.num_gpus=0"]
SMALL = {
    "fade": ("jobs/fade_fewshot.yaml", ["pixel.scales=[128,160]", "pixel.grid=8", "pixel.gem_depth=2"]),
    "winclip": ("jobs/winclip_fewshot.yaml", []),
    "april_gan": ("jobs/aprilgan_fewshot.yaml", ["pixel.weights=null", "pixel.layers=[2,4]", "pixel.image_size=64"]),
}


def spec_for(method, *extra):
    job, sets = SMALL[method]
    return load_spec(job, TINY + sets + ["maps.map_size=40", *extra])


def _images(seed, n, size=(72, 96)):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = np.full((*size, 3), 120, np.uint8) + rng.integers(0, 40, size=(*size, 3), dtype=np.uint8)
        out.append(img)
    return out


def build_banks(spec, tmp_path, refs: dict[str, list[np.ndarray]]):
    """Banks of ``refs`` through the bank stage's own code (the actor writes the parts), with the
    manifest the driver writes from the rows' metadata."""
    run_dir = str(tmp_path / "run")
    banks = {}
    for cat, images in refs.items():
        digest = bank_digest(spec, f"refs-{cat}", len(images), "fp32")
        stage = BankStage.from_spec(spec, target=BankTarget(run_dir, "banks", {cat: digest}))
        ids = [f"{cat}-{i}" for i in range(len(images))]
        out = stage(image_batch(images, [cat] * len(images), image_id=ids))
        assert list(out["status"]) == ["ok"] * len(images) and np.all(out["bank_ms"] > 0) and "image" not in out
        assert set(out["bank_precision"]) == {"fp32"} and len(set(out["bank_part"])) == 1  # one part per category
        parts = [{"name": out["bank_part"][0], "bytes": int(out["bank_part_bytes"][0]),
                  "sha256": out["bank_part_sha256"][0]}]
        uri = manifest_uri(run_dir, cat)
        write_manifest(uri, {"category": cat, "digest": digest, "precision": "fp32", "image_ids": ids, "parts": parts,
                             "k": len(images)})
        banks[cat] = {"uri": uri, "digest": digest, "k": len(images), "reference_digest": f"refs-{cat}"}
    return banks


@pytest.mark.parametrize("method", ["fade", "winclip", "april_gan"])
def test_a_reference_scores_zero_and_scores_combine_as_the_method_does(method, tmp_path):
    spec = spec_for(method)
    refs = _images(1, 2)
    stage = ClipScoreStage.from_spec(spec)
    stage.banks = build_banks(spec, tmp_path, {"gear": refs})
    query = _images(2, 1)[0]
    query[20:50, 30:60] = (250, 10, 10)  # a red defect
    out = stage(image_batch([refs[1], query], ["gear", "gear"]))
    assert list(out["status"]) == ["ok", "ok"] and list(out["few_shot_k"]) == [2, 2]
    assert list(out["reference_digest"]) == ["refs-gear"] * 2
    lang, fs = out["score_language"], out["score_fewshot"]
    assert fs[0] <= 1e-6 or method == "april_gan"  # the reference itself: distance 0
    assert fs[1] > 1e-3
    zero_shot = ClipScoreStage.from_spec(spec.model_copy(update={"few_shot": None}))
    zs = zero_shot(image_batch([refs[1], query], ["gear", "gear"]))
    np.testing.assert_allclose(lang, zs["score"], atol=1e-6)  # the language part is the zero-shot score
    if method == "winclip":
        np.testing.assert_allclose(out["score"], (lang + fs) / 2, atol=1e-12)
    elif method == "fade":
        np.testing.assert_allclose(out["score"], np.clip((lang + fs) / 2, 0, 1), atol=1e-12)
        np.testing.assert_allclose(out["score_vision"], fs)
    else:
        np.testing.assert_allclose(out["score"], lang, atol=1e-12)  # transductive part comes later

    # the map against the formula, from the model-level functions
    m = stage.model.visual
    img = query
    with torch.no_grad():
        t = stage._tensors([img])
        bank = stage.bank("gear")
        shape = map_shape(img.shape[0], img.shape[1], 40)
        if method == "winclip":
            from pipeline.models import clip as clip_models

            batch = clip_models.preprocess_images(t, stage.preprocess)
            q = fewshot.winclip_features(m, batch, (2, 3))
            s_img = torch.tensor([lang[1]], dtype=torch.float32)
            zs_map = pixel.winclip_map(m, batch, stage.text_classifier("gear"), spec.score.temperature, s_img, (2, 3))
            fs_map = fewshot.winclip_fewshot_map(q, bank, 8, (2, 3))
            assert fs[1] == pytest.approx(float(fs_map.max()), abs=1e-6)
            want = pixel.upsample((zs_map + fs_map) / 2, shape)[0]
        elif method == "fade":
            sizes = stage.fade_sizes(t)
            lang_map, patches = pixel.fade_language(m, sizes, stage.pixel_text_classifier(), 0.01, 8, 2)
            v = fewshot.fade_fewshot_vision({f"scale{s}": p[1] for s, p in patches.items()}, bank, 8, 3.5)
            assert fs[1] == pytest.approx(float(v.max()), abs=1e-6)
            want = pixel.upsample(((0.15 * lang_map + 0.85 * v).clamp(0, 1)), shape)[0]
        else:
            from pipeline.models.adapters import adapter_map

            _, tokens = stage.april_gan_pass(t)
            text = stage.text_classifier("gear")
            tt = torch.stack([text.normal, text.anomalous], dim=-1)
            q = fewshot.aprilgan_features(tokens, (2, 4))
            dist = fewshot.aprilgan_distances(q, bank, (2, 4))
            want = adapter_map(stage.adapters, tokens, tt, shape) + fewshot.aprilgan_upsample_sum(dist, shape)
            full = adapter_map(stage.adapters, tokens, tt, (64, 64)) + fewshot.aprilgan_upsample_sum(dist, (64, 64))
            assert fs[1] == pytest.approx(float(full.max()), abs=1e-5)  # the max at the adapters' input size
            want = want[0]
    np.testing.assert_allclose(out["anomaly_map"][1], want.clamp(*spec.map_range()).numpy(), atol=1e-5)
    assert spec.map_range() == ((0.0, 6.0) if method == "april_gan" else (0.0, 1.0))


def test_categories_without_references_are_scored_zero_shot(tmp_path):
    spec = spec_for("winclip", "few_shot.missing=zero_shot")
    stage = ClipScoreStage.from_spec(spec)
    stage.banks = build_banks(spec, tmp_path, {"gear": _images(3, 1)})
    images = _images(4, 3)
    out = stage(image_batch(images, ["gear", "plate", "gear"]))
    assert list(out["few_shot_k"]) == [1, 0, 1] and list(out["reference_digest"]) == ["refs-gear", None, "refs-gear"]
    zs = ClipScoreStage.from_spec(spec.model_copy(update={"few_shot": None}))(image_batch(images[1:2], ["plate"]))
    assert out["score"][1] == pytest.approx(zs["score"][0], abs=1e-6) and np.isnan(out["score_fewshot"][1])
    np.testing.assert_allclose(out["anomaly_map"][1], zs["anomaly_map"][0], atol=1e-6)
    alone = stage(image_batch(images[:1], ["gear"]))  # mixing categories does not change a row
    assert out["score"][0] == pytest.approx(alone["score"][0], abs=1e-6)


def test_banks_are_read_once_per_actor_and_the_cache_is_bounded(tmp_path):
    spec = spec_for("fade", "few_shot.max_cached_banks=1")
    stage = ClipScoreStage.from_spec(spec)
    stage.banks = build_banks(spec, tmp_path, {"a": _images(5, 1), "b": _images(6, 1)})
    img = _images(7, 1)
    stage(image_batch(img * 2, ["a", "a"]))
    stage(image_batch(img, ["a"]))
    assert stage.bank_loads == 1  # once, then from the cache
    stage(image_batch(img, ["b"]))
    stage(image_batch(img, ["a"]))
    assert stage.bank_loads == 3 and len(stage._bank_cache) == 1  # one bank held at a time


def test_a_bank_with_another_digest_is_refused(tmp_path):
    spec = spec_for("fade")
    banks = build_banks(spec, tmp_path, {"a": _images(8, 1)})
    with pytest.raises(BankError, match="built for something else"):
        StoredBank(banks["a"]["uri"], "0" * 64)
    stage = ClipScoreStage.from_spec(spec)
    stage.banks = {"a": {**banks["a"], "digest": "1" * 64}}
    out = stage(image_batch(_images(9, 1), ["a"]))
    assert out["status"][0] == "error" and "built for something else" in out["error_message"][0]
    # the digest follows what the features depend on
    other = spec_for("fade", "few_shot.vision_features=gem")
    assert bank_digest(other, "r", 1) != bank_digest(spec, "r", 1) != bank_digest(spec, "r", 2)
    assert bank_digest(spec_for("fade", "few_shot.vision_weight=0.5"), "r", 1) == bank_digest(spec, "r", 1)


def test_stored_banks_are_reused_and_a_changed_spec_is_an_error(tmp_path):
    """What a resumed run does: banks already in the run folder with the expected digest are used as
    they are (no pass runs: the session is never opened here); a bank built for another spec is an error."""
    spec = spec_for("winclip")
    run_dir = str(tmp_path / "run")
    chosen = pd.DataFrame({"category": ["gear"], "shot": [0], "uri": ["/r/0.png"], "image_id": ["x"], "etag": [None],
                           "size": pd.array([10], "Int64"), "mtime": pd.array([1.0], "Float64")})
    entries = fewshot_run.bank_entries(spec, chosen, run_dir, "fp32")
    write_manifest(entries["gear"]["uri"],
                   {"category": "gear", "digest": entries["gear"]["digest"], "precision": "fp32",
                                            "image_ids": ["x"], "parts": [], "k": 1})

    def no_session():
        raise AssertionError("a reused bank needs no session")

    ctx = RunContext(spec, run_dir, None, lambda m: None, open_session=no_session)
    got, summary = fewshot_run.build_banks(spec, chosen, ctx, "fp32")
    assert summary["built"] == [] and summary["reused"] == ["gear"] and got["gear"]["built"] is False
    with pytest.raises(fewshot_run.FewShotError, match="another spec or other images"):
        fewshot_run.build_banks(spec_for("winclip", "pixel.window_sizes=[2]"), chosen, ctx, "fp32")
    with pytest.raises(fewshot_run.FewShotError, match=r"precision \(fp32 stored, bf16 now\)"):
        fewshot_run.build_banks(spec, chosen, ctx, "bf16")  # a GPU run does not reuse a CPU run's bank


def test_transductive_score_is_the_per_category_min_max():
    scores = pd.DataFrame({"category": ["a", "a", "a", "b", "b", "c"],
                           "score_language": [0.2, 0.4, 0.6, 0.1, 0.9, 0.5],
                           "score_fewshot": [1.0, 3.0, 2.0, 5.0, 5.0, np.nan]})
    got = fewshot_run.transductive_scores(scores)
    want = [0.5 * (0.2 + 0.0), 0.5 * (0.4 + 1.0), 0.5 * (0.6 + 0.5), 0.05, 0.45]
    np.testing.assert_allclose(got[:5], want)
    assert np.isnan(got[5])
