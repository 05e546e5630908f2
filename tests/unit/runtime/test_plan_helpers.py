"""Runtime helpers that need no running Ray: GPU fallback, sparse text columns, result rows."""

import numpy as np
import pandas as pd

from pipeline.config import load_spec
from pipeline.runtime.ray_plan import effective_gpus
from pipeline.runtime.udf import _dense_text, _sparse_text
from pipeline.runtime.run import error_rows, mask_rows, score_rows


def test_gpu_request_falls_back_only_on_a_local_ray_without_gpus():
    spec = load_spec("jobs/smoke.yaml", ["resources.clip_score.num_gpus=0.5"])
    logs = []
    assert effective_gpus(spec, {"local": True, "resources": {"CPU": 2}}, logs.append) == 0.0
    assert "running clip_score on CPU" in logs[0]
    assert effective_gpus(spec, {"local": True, "resources": {"CPU": 2, "GPU": 1}}, logs.append) == 0.5
    assert effective_gpus(spec, {"local": False, "resources": {"CPU": 2}}, logs.append) == 0.5  # autoscaler may add GPUs
    assert len(logs) == 1


def test_sparse_text_roundtrip():
    batch = {"error_type": np.array([None, "EmptyFile"], dtype=object), "uri": np.array(["a", "b"], dtype=object)}
    dense = _dense_text(dict(batch))
    assert list(dense["error_type"]) == ["", "EmptyFile"] and dense["uri"] is batch["uri"]
    assert list(_sparse_text(dense)["error_type"]) == [None, "EmptyFile"]


def test_result_rows():
    batch = pd.DataFrame({
        "uri": ["/a.png", "/b.png", "/c.png"], "image_id": ["ia", "ib", "ic"], "category": ["x", "x", "y"],
        "status": ["ok", "error", "error"], "error_stage": ["", "decode", "clip_score"],
        "error_type": ["", "EmptyFile", "RuntimeError"], "error_message": ["", "empty file (0 bytes)", "boom"],
        "height": [10, 0, 12], "width": [20, 0, 14], "decode_ms": [1.0, 0.5, 2.0], "score": [0.25, np.nan, np.nan],
        "clip_score_ms": [3.0, np.nan, np.nan], "score_language": [0.25, np.nan, np.nan],
        "score_vision": [np.nan, np.nan, np.nan], "max_pixel_score": [0.5, np.nan, np.nan],
        "map_png": [b"png", b"", b""], "map_height": [4, 0, 0], "map_width": [5, 0, 0], "mask_rle": ["", "", ""],
        "encode_ms": [0.1, 0.0, 0.0],
    })
    cols = score_rows(batch, "r1", {"ia": 1, "ib": None, "ic": 0}, {"clip_model": "m", "random_weights": True})
    assert cols["score"] == [0.25, None, None]
    assert cols["gt_label"] == [1, None, 0]
    assert cols["height"] == [10, None, 12]  # decode failures have no size; later failures keep it
    assert cols["error_stage"] == [None, "decode", "clip_score"]
    assert cols["clip_score_ms"] == [3.0, None, None]
    assert cols["random_weights"] == [True] * 3 and cols["run_id"] == ["r1"] * 3
    assert cols["max_pixel_score"] == [0.5, None, None] and cols["score_vision"] == [None, None, None]
    assert cols["encode_ms"] == [0.1, None, None]
    masks = mask_rows(batch, "r1", "winclip_windows", (0.0, 1.0), None)
    assert masks["map_png"] == [b"png", None, None] and masks["map_height"] == [4, None, None]
    assert masks["mask_rle"] == [None, None, None] and masks["threshold"] == [None, None, None]
    assert masks["map_min"] == [0.0] * 3 and masks["map_max"] == [1.0] * 3
    errs = error_rows(batch, "r1")
    assert errs["uri"] == ["/b.png", "/c.png"] and errs["stage"] == ["decode", "clip_score"]
    assert errs["message"] == ["empty file (0 bytes)", "boom"]
