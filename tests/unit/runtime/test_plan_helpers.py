"""Runtime helpers that need no running Ray: GPU fallback, feasibility of a local plan, typed
in-flight blocks, result rows (the schema-driven projection of the plan's rows)."""

import numpy as np
import pyarrow as pa
import pytest

from pipeline.config import load_spec
from pipeline.io import contracts
from pipeline.io.projection import project
from pipeline.runtime.ray_plan import check_feasible, cpu_contention, effective_gpus, stage_request
from pipeline.runtime.run import plan_for, run_values
from pipeline.runtime.udf import to_arrow, to_numpy
from pipeline.stages.plan import PlanError
from pipeline.stages.records import COMPONENTS, TENSOR, TILES


def test_gpu_request_falls_back_only_on_a_local_ray_without_gpus():
    spec = load_spec("jobs/smoke.yaml", ["resources.clip_score.num_gpus=0.5"])
    logs = []
    assert effective_gpus(spec, {"local": True, "resources": {"CPU": 2}}, logs.append) == 0.0
    assert "running clip_score on CPU" in logs[0]
    assert effective_gpus(spec, {"local": True, "resources": {"CPU": 2, "GPU": 1}}, logs.append) == 0.5
    assert effective_gpus(spec, {"local": False, "resources": {"CPU": 2}},
                          logs.append) == 0.5  # autoscaler may add GPUs
    assert len(logs) == 1


def test_typed_blocks_keep_nulls_and_records():
    """A block through the stage view and back keeps real nulls (no "" stand-ins), its records and its types."""
    block = pa.table({
        "error_type": pa.array([None, "EmptyFile"], pa.string()),
        "uri": pa.array(["a", "b"], pa.string()),
        "fg_components": pa.array([[{"id": 0, "box": [1, 2, 3, 4], "area": 5, "n_parts": 0}], None], COMPONENTS),
    })
    view = to_numpy(block)
    assert list(view["error_type"]) == [None, "EmptyFile"]
    assert view["fg_components"][0].tolist() == [[0, 1, 2, 3, 4, 5, 0]] and view["fg_components"][1] is None
    out = dict(view)
    out["tiles"] = np.array([np.array([[-1, 0, 0, 8, 6]]), np.zeros((0, 5), np.int64)], dtype=object)
    out["mask_rle"] = np.array([None, None], dtype=object)
    out["anomaly_map"] = np.array([np.zeros((2, 3), np.float32), np.zeros((0, 0), np.float32)], dtype=object)
    types = {"tiles": TILES, "mask_rle": pa.string(), "anomaly_map": TENSOR}
    back = to_arrow(out, types, block, view, "t")
    assert back.column("uri") is block.column("uri") or back.column("uri").equals(block.column("uri"))
    assert back.schema.field("mask_rle").type == pa.string() and back.column("mask_rle").null_count == 2
    assert back.schema.field("tiles").type.equals(TILES) and back.schema.field("fg_components").type.equals(COMPONENTS)
    assert back.column("tiles").to_pylist()[0] == [{"component_id": -1, "x0": 0, "y0": 0, "x1": 8, "y1": 6}]
    assert back.column("error_type").to_pylist() == [None, "EmptyFile"]
    with pytest.raises(TypeError, match="stage 't' produced column 'surprise'"):
        to_arrow({**out, "surprise": np.zeros(2)}, types, block, view, "t")


def test_result_rows():
    batch = pa.table({
        "uri": ["/a.png", "/b.png", "/c.png"], "image_id": ["ia", "ib", "ic"], "category": ["x", "x", "y"],
        "gt_label": pa.array([1, None, 0], pa.int64()),
        "status": ["ok", "error", "error"], "error_stage": [None, "decode", "clip_score"],
        "error_type": [None, "EmptyFile", "RuntimeError"], "error_message": [None, "empty file (0 bytes)", "boom"],
        "height": [10, 0, 12], "width": [20, 0, 14], "decode_ms": [1.0, 0.5, 2.0],
        "score": pa.array([0.25, None, None], pa.float64()),
        "score_language": pa.array([0.25, None, None], pa.float64()),
        "clip_score_ms": pa.array([3.0, None, None], pa.float64()),
        "score_vision": pa.array([None, None, None], pa.float64()),
        "max_pixel_score": pa.array([0.5, None, None], pa.float64()), "scoring_mode": ["whole_image", None, None],
        "map_png": pa.array([b"png", None, None], pa.binary()), "map_height": [4, 0, 0], "map_width": [5, 0, 0],
        "mask_rle": pa.array([None, None, None], pa.string()), "threshold": pa.array([None, None, None], pa.float64()),
        "encode_ms": pa.array([0.1, None, None], pa.float64()),
        "refined": pa.array([False, False, False]),  # without sam_refine, the driver adds it (its default)
    })
    spec = load_spec("jobs/smoke.yaml")
    values = {**run_values(spec, "r1"), "clip_model": "m", "random_weights": True}
    cols = project(batch, contracts.load("scores"), values).to_pydict()
    assert cols["score"] == [0.25, None, None]
    assert cols["gt_label"] == [1, None, 0]
    assert cols["height"] == [10, None, 12]  # decode failures have no size; later failures keep it
    assert cols["error_stage"] == [None, "decode", "clip_score"]
    assert cols["clip_score_ms"] == [3.0, None, None]
    assert cols["random_weights"] == [True] * 3 and cols["run_id"] == ["r1"] * 3
    assert cols["max_pixel_score"] == [0.5, None, None] and cols["score_vision"] == [None, None, None]
    assert cols["encode_ms"] == [0.1, None, None]
    # zero-shot: no few-shot values
    assert cols["few_shot_k"] == [None] * 3 and cols["score_transductive"] == [None] * 3
    assert cols["score_language"] == cols["score"] and cols["scoring_mode"] == ["whole_image", "none", "none"]
    assert cols["n_tiles"] == [None] * 3 and cols["sam_model"] == [None] * 3  # no such stage in this plan
    masks = project(batch, contracts.load("masks"), values).to_pydict()
    assert masks["map_png"] == [b"png", None, None] and masks["map_height"] == [4, None, None]
    assert masks["mask_rle"] == [None, None, None] and masks["threshold"] == [None, None, None]
    assert masks["map_min"] == [0.0] * 3 and masks["map_max"] == [1.0] * 3
    assert masks["refined"] == [False] * 3 and masks["refine_rle"] == [None] * 3
    errs = project(batch, contracts.load("errors"), values).to_pydict()
    assert errs["uri"] == ["/b.png", "/c.png"] and errs["stage"] == ["decode", "clip_score"]
    assert errs["message"] == ["empty file (0 bytes)", "boom"]


def test_record_tables_are_projections_of_the_row():
    """foreground: record fields per row; tiles: one row per tile, lists taken apart in parallel."""
    comps = [[{"id": 0, "box": [1, 2, 5, 6], "area": 9, "n_parts": 2},
              {"id": 1, "box": [7, 0, 9, 4], "area": 3, "n_parts": 0}],
             [], None]
    tiles = [[{"component_id": 0, "x0": 0, "y0": 0, "x1": 8, "y1": 8},
              {"component_id": 1, "x0": 2, "y0": 0, "x1": 10, "y1": 8}],
             [{"component_id": -1, "x0": 0, "y0": 0, "x1": 10, "y1": 6}], None]
    batch = pa.table({
        "uri": ["/a", "/b", "/c"], "image_id": ["ia", "ib", "ic"], "category": ["x", "x", "x"],
        "status": ["ok", "ok", "error"], "error_stage": [None, None, "decode"],
        "fg_rle": ["{}", None, None], "fg_sam_masks": [4, 0, 0], "fg_kept_masks": [2, 0, 0],
        "fg_components": pa.array(comps, COMPONENTS), "tiles": pa.array(tiles, TILES),
        "tile_reasons": pa.array([["component", "clipped"], ["whole_image"], None], pa.list_(pa.string())),
        "tile_scores": pa.array([[0.5, 0.25], [0.75], None], pa.list_(pa.float64())),
        "tile_component_scores": pa.array([[0.5, 0.25], [0.75], None], pa.list_(pa.float64())),
    })
    spec = load_spec("jobs/vvv.yaml", ["foreground.kind=classical"])
    values = run_values(spec, "r1")
    fg = project(batch, contracts.load("foreground"), values).to_pydict()
    assert fg["kind"] == ["classical"] * 3 and fg["n_components"] == [2, 0, None]
    assert fg["component_ids"] == [[0, 1], [], None] and fg["component_boxes"] == [[[1, 2, 5, 6], [7, 0, 9, 4]], [],
                                                                                   None]
    assert fg["component_areas"] == [[9, 3], [], None] and fg["component_parts"] == [[2, 0], [], None]
    assert fg["n_sam_masks"] == [4, 0, None] and fg["foreground_rle"] == ["{}", None, None]
    t = project(batch, contracts.load("tiles"), values).to_pydict()
    assert t["image_id"] == ["ia", "ia", "ib"] and t["tile_index"] == [0, 1, 0]
    assert t["component_id"] == [0, 1, -1] and t["x1"] == [8, 10, 10] and t["reason"] == ["component", "clipped",
                                                                                          "whole_image"]
    assert t["tile_score"] == [0.5, 0.25, 0.75] and t["run_id"] == ["r1"] * 3


def test_plan_columns_are_checked_when_the_plan_is_built():
    spec = load_spec("jobs/vvv.yaml", ["foreground.kind=classical", "clip.model=zsad-tiny", "clip.weights=null",
                                      "allow_random_weights=true"])
    plan, columns = plan_for(spec, None, ["scores", "errors", "masks", "foreground", "tiles"])
    assert [p.name for p in plan] == ["decode", "foreground", "tiling", "clip_score", "aggregate", "encode"]
    assert [p.kind for p in plan] == ["task", "task", "task", "actor", "task", "task"]
    assert "image" not in columns and "anomaly_map" not in columns and "tile_maps" not in columns  # never sent back
    assert {"fg_components", "tiles", "tile_reasons", "map_png", "gt_label"} <= set(columns)


def test_a_task_never_asks_for_a_gpu_and_infeasible_local_requests_fail_at_once():
    """The vvv preset with the classical foreground on a machine without GPU: the foreground runs as
    CPU tasks that ask for no GPU (it used to ask for 0.5 and wait forever)."""
    spec = load_spec("jobs/vvv.yaml", ["foreground.kind=classical", "clip.model=zsad-tiny", "clip.weights=null",
                                      "allow_random_weights=true"])
    plan, _ = plan_for(spec, None, ["scores", "errors"])
    session = {"local": True, "resources": {"CPU": 2.0, "memory": 8e9}}
    logs = []
    requests = [(p, stage_request(p, spec, session, logs.append)) for p in plan]
    assert all("GPU" not in r for _, r in requests)
    assert any("resources.foreground.num_gpus=0.5 is not used: foreground runs as CPU tasks" in m for m in logs)
    check_feasible(requests, session["resources"])  # runs here
    big = load_spec("jobs/smoke.yaml", ["resources.clip_score.num_cpus=4"])
    plan, _ = plan_for(big, None, ["scores", "errors"])
    requests = [(p, stage_request(p, big, session, logs.append)) for p in plan]
    with pytest.raises(PlanError, match=r"stage 'clip_score' asks for \{'CPU': 4.0\} per actor.*resources.clip_score"):
        check_feasible(requests, session["resources"])
    pools = load_spec("jobs/smoke.yaml", ["resources.clip_score.min_actors=3", "resources.clip_score.max_actors=3"])
    plan, _ = plan_for(pools, None, ["scores", "errors"])
    requests = [(p, stage_request(p, pools, session, logs.append)) for p in plan]
    with pytest.raises(PlanError, match="stage 'clip_score' asks for 3 actors"):
        check_feasible(requests, session["resources"])


def test_pools_that_hold_every_cpu_are_pointed_out():
    """clip_sam on a 2-CPU local Ray: the CLIP and SAM actors hold both CPUs, so encode (after
    them) waits for a pool to finish; with CPU fractions it runs beside them."""
    session = {"local": True, "resources": {"CPU": 2.0}}
    sets = ["clip.model=zsad-tiny", "clip.weights=null", "pixel.weights=null", "sam.model=tiny", "sam.weights=null",
            "allow_random_weights=true", "pixel.layers=[2,4,6,8]", "pixel.image_size=128"]

    def advice(extra):
        spec = load_spec("jobs/clip_sam.yaml", sets + extra)
        plan, _ = plan_for(spec, None, ["scores", "errors", "masks"])
        return cpu_contention([(p, stage_request(p, spec, session, lambda m: None)) for p in plan],
                              session["resources"])

    text = advice([])
    assert text and "hold 2 of this machine's 2 CPUs, so encode can only run" in text
    assert "resources.clip_score.num_cpus, resources.sam_refine.num_cpus" in text
    assert advice(["resources.clip_score.num_cpus=0.5", "resources.sam_refine.num_cpus=0.5"]) is None
    smoke = load_spec("jobs/smoke.yaml")  # one pool of 1 CPU: encode runs beside it
    plan, _ = plan_for(smoke, None, ["scores", "errors"])
    assert cpu_contention([(p, stage_request(p, smoke, session, lambda m: None)) for p in plan],
                          session["resources"]) is None
