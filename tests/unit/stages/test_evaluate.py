"""Evaluation stage on plain dicts: exact level statistics, class-index masks, missing masks."""

import numpy as np
from PIL import Image

from pipeline.metrics.state import LevelStats
from pipeline.ops import heatmap
from pipeline.stages.evaluate import EvaluateStage, stats_from_row
from tests.helpers.batches import image_batch


def _png(values):
    return heatmap.encode_png16(values, 0.0, 1.0)


def test_level_statistics_and_class_index_masks(tmp_path):
    rng = np.random.default_rng(0)
    m1, m2 = rng.random((8, 10)), rng.random((8, 10))
    mask = np.zeros((16, 20), np.uint8)
    mask[2:6, 4:10] = 2  # class-index mask (value 2), twice the map size
    Image.fromarray(mask).save(tmp_path / "m.png")
    out = EvaluateStage()(image_batch(
        None, "c", status=["ok", "ok", "error"], image_id=["a", "b", "x"], map_png=[_png(m1), _png(m2), None],
        gt_label=[1, 0, 1], mask_uri=[str(tmp_path / "m.png"), None, None]))
    assert list(out["category"]) == ["c"] and out["problems"][0] == ""
    st = stats_from_row(out["neg"][0], out["pos"][0], out["pro"][0], out["n_regions"][0])
    small = np.asarray(Image.fromarray(mask * 127).resize((10, 8), Image.NEAREST)) > 0
    ref = LevelStats().add(heatmap.quantise(m1, 0, 1).astype(np.int64), small)
    ref = ref.add(heatmap.quantise(m2, 0, 1).astype(np.int64), np.zeros((8, 10), bool))
    assert np.array_equal(st.neg, ref.neg) and np.array_equal(st.pos, ref.pos) and st.n_regions == ref.n_regions == 1
    assert st.pos.sum() == small.sum() > 0


def test_missing_mask_is_reported_not_normal(tmp_path):
    out = EvaluateStage()(image_batch(
        None, "c", status=["ok", "ok"], image_id=["a", "b"], map_png=[_png(np.zeros((4, 4)))] * 2, gt_label=[1, 1],
        mask_uri=[None, str(tmp_path / "gone.png")]))
    problems = out["problems"][0].split("\n")
    assert len(problems) == 2 and "a: FileNotFoundError" in problems[0] and "gone.png" in problems[1]
    st = stats_from_row(out["neg"][0], out["pos"][0], out["pro"][0], out["n_regions"][0])
    assert st.neg.sum() == 0 and st.pos.sum() == 0  # neither image counted as normal


def test_eval_size_transforms_map_and_mask_identically(tmp_path):
    mask = np.zeros((8, 8), np.uint8)
    mask[:4] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    out = EvaluateStage(eval_size=4)(image_batch(
        None, "c", image_id=["a"], map_png=[_png(np.linspace(0, 1, 64).reshape(8, 8))], gt_label=[1],
        mask_uri=[str(tmp_path / "m.png")]))
    st = stats_from_row(out["neg"][0], out["pos"][0], out["pro"][0], out["n_regions"][0])
    assert st.neg.sum() + st.pos.sum() == 16 and st.pos.sum() == 8
