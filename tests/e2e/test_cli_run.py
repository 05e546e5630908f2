"""The CLI as a user runs it: `zsad run jobs/smoke.yaml` on local disk, on S3 (moto server on
127.0.0.1), and on a folder of broken files. The runs use the in-process executor
(tests/helpers/zsad.py), except the S3 one, which shows the Ray workers reading and writing S3."""

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import load_spec
from pipeline.io import contracts
from pipeline.io import fs as fsio
from pipeline.ops import heatmap, rle
from pipeline.stages.clip_score import ClipScoreStage
from pipeline.synthetic import make_dataset
from tests.helpers.badfiles import write_bad_inputs, write_good_images
from tests.helpers.batches import image_batch
from tests.helpers.zsad import TINY, zsad

pytestmark = pytest.mark.integration


def read_table(uri, storage=None):
    fs, path = fsio.filesystem(uri, storage)
    return pads.dataset(path, filesystem=fs, format="parquet").to_table()


def check_run(run_dir, n_expected, storage=None, n_failed=0):
    """Shared checks of one finished run's tables and manifest; returns (scores df, errors df, run.json)."""
    scores_t = read_table(fsio.join(run_dir, "scores"), storage)
    errors_t = read_table(fsio.join(run_dir, "errors"), storage)
    assert scores_t.schema.remove_metadata().equals(contracts.load("scores").schema.remove_metadata())
    assert errors_t.schema.remove_metadata().equals(contracts.load("errors").schema.remove_metadata())
    fs, path = fsio.filesystem(fsio.join(run_dir, "scores"), storage)
    first = sorted(fs.glob(path + "/shard-*.parquet"))[0]
    with fs.open(first, "rb") as fh:
        meta = pq.read_metadata(fh).metadata
    assert meta[b"zsad.table"] == b"scores"
    assert meta[b"zsad.schema_version"] == str(contracts.load("scores").version).encode()
    scores, errors = scores_t.to_pandas(), errors_t.to_pandas()
    assert len(scores) == n_expected and scores["image_id"].is_unique
    ok = scores[scores["status"] == "ok"]
    assert ok["score"].between(0, 1).all() and ok["score"].notna().all()
    assert scores.loc[scores["status"] != "ok", "score"].isna().all()
    assert scores["random_weights"].all() and (scores["clip_weights"] == "random").all()
    assert (scores["clip_model"] == "zsad-tiny").all()
    assert len(errors) == n_failed == (scores["status"] == "error").sum()
    with fs.open(
        fsio.join(path.rsplit("/", 1)[0], "run.json") if fsio.is_remote(run_dir) else os.path.join(run_dir, "run.json")
    ) as fh:
        manifest = json.load(fh)
    assert manifest["counts"] == {"images": n_expected, "ok": n_expected - n_failed, "failed": n_failed, "missing": 0}
    assert manifest["random_weights"] is True and manifest["model"]["clip_weights"] == "random"
    assert set(manifest["versions"]) >= {"zsad", "torch", "open_clip", "ray", "pyarrow"}
    assert manifest["spec"]["clip"]["model"] == "zsad-tiny"
    assert manifest["stage_seconds"]["plan_wall"] > 0 and manifest["ended"] >= manifest["started"]
    inputs = read_table(fsio.join(run_dir, "inputs.parquet"), storage).to_pandas()
    assert sorted(inputs["image_id"]) == sorted(scores["image_id"])
    return scores, errors, manifest


def check_masks(run_dir, scores, method, storage=None):
    """The masks table: contract, one row per image, maps decode to the recorded max pixel score."""
    t = read_table(fsio.join(run_dir, "masks"), storage)
    assert t.schema.remove_metadata().equals(contracts.load("masks").schema.remove_metadata())
    masks = pd.read_parquet(fsio.join(run_dir, "masks")) if storage is None else t.to_pandas()
    assert sorted(masks["image_id"]) == sorted(scores["image_id"])
    assert (masks["method"] == method).all() and (masks["map_min"] == 0).all() and (masks["map_max"] == 1).all()
    assert not masks["refined"].any()
    by_id = scores.set_index("image_id")
    for row in masks[masks["status"] == "ok"].itertuples():
        m = heatmap.decode_png16(row.map_png, row.map_min, row.map_max)
        assert m.shape == (row.map_height, row.map_width) and max(m.shape) == 256
        assert abs(m.max() - by_id.loc[row.image_id, "max_pixel_score"]) <= 1.0 / 65535 + 1e-7
    assert (scores["pixel_method"] == method).all()
    return masks


def check_metrics(run_dir, scores, masks):
    """The metrics table equals an independent computation (scikit-learn) from the written tables."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    from pipeline.metrics import curves
    from pipeline.metrics.state import ValueTable

    metrics = pd.read_parquet(os.path.join(run_dir, "metrics"))
    inputs = pd.read_parquet(os.path.join(run_dir, "inputs.parquet")).set_index("image_id")
    assert list(metrics["category"])[-1] == "mean" and metrics["random_weights"].all()
    for cat in sorted(scores["category"].unique()):
        row = metrics[metrics["category"] == cat].iloc[0]
        sc = scores[scores["category"] == cat]
        assert row["image_auroc"] == pytest.approx(roc_auc_score(sc["gt_label"], sc["score"]), abs=1e-9)
        assert row["image_ap"] == pytest.approx(average_precision_score(sc["gt_label"], sc["score"]), abs=1e-9)
        ys, ss, tables = [], [], []
        for r in masks[masks["category"] == cat].itertuples():
            m = heatmap.decode_png16(r.map_png, 0.0, 1.0)
            uri = inputs.loc[r.image_id, "mask_uri"]
            gt = (
                np.zeros(m.shape, bool)
                if not isinstance(uri, str)
                else (np.asarray(Image.open(uri).convert("L").resize((m.shape[1], m.shape[0]), Image.NEAREST)) > 0)
            )
            ys.append(gt.ravel())
            ss.append(m.ravel())
            tables.append(ValueTable.from_pixels(m, gt))
        y, s_ = np.concatenate(ys), np.concatenate(ss)
        assert row["pixel_auroc"] == pytest.approx(roc_auc_score(y, s_), abs=1e-9)
        assert row["pixel_ap"] == pytest.approx(average_precision_score(y, s_), abs=1e-9)
        assert row["n_pixels"] == y.size and row["n_anomalous"] == (sc["gt_label"] == 1).sum()
        assert row["pixel_aupro"] == pytest.approx(curves.aupro(ValueTable().merge(*tables), 0.3), abs=1e-9)
    mean = metrics[metrics["category"] == "mean"].iloc[0]
    per_cat = metrics[metrics["category"] != "mean"]
    assert mean["pixel_auroc"] == pytest.approx(per_cat["pixel_auroc"].mean(), abs=1e-12)
    return metrics


def test_run_on_local_mvtec_tree(tmp_path):
    info = make_dataset(str(tmp_path / "data"), n_good=3, n_bad=3)
    res = zsad(
        "run",
        "jobs/smoke.yaml",
        "--input",
        str(tmp_path / "data"),
        "--output",
        str(tmp_path / "out"),
        "--run-id",
        "local1",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "progress:" in res.stderr and "images/s" in res.stderr
    assert "succeeded" in res.stdout and "random model weights" in res.stdout
    scores, errors, manifest = check_run(str(tmp_path / "out" / "local1"), info["n_test"])
    assert manifest["status"] == "succeeded" and manifest["layout"] == "mvtec"
    assert set(scores["category"]) == {"widget", "tile"}
    assert set(scores["gt_label"]) == {0, 1}
    assert (scores["gt_label"] == 1).sum() == 6
    assert scores["decode_ms"].notna().all() and scores["clip_score_ms"].notna().all()
    # smoke = WinCLIP windows: one masks row per image, maps on the fixed [0, 1] grid
    masks = check_masks(str(tmp_path / "out" / "local1"), scores, "winclip_windows")
    assert masks["mask_rle"].isna().all()

    check_metrics(str(tmp_path / "out" / "local1"), scores, masks)
    assert "metrics:" in res.stdout and (tmp_path / "out" / "local1" / "metrics.md").read_text().startswith(
        "**Random model weights"
    )

    # the run gives the same scores as the stage called directly
    spec = load_spec("jobs/smoke.yaml")
    stage = ClipScoreStage(spec.clip, spec.score)
    sample = scores.sort_values("uri").head(4)
    out = stage(
        image_batch([np.asarray(Image.open(u).convert("RGB")) for u in sample["uri"]], list(sample["category"]))
    )
    np.testing.assert_allclose(out["score"], sample["score"].to_numpy(), atol=1e-5)

    # zsad evaluate with explicit ground truth and non-default settings
    ev = zsad(
        "evaluate",
        str(tmp_path / "out" / "local1"),
        "--ground-truth",
        str(tmp_path / "data"),
        "--layout",
        "mvtec",
        "--eval-size",
        "64",
        "--image-score",
        "max_map",
        "--pro-mode",
        "fixed_grid_200",
        "--aupro-limit",
        "0.2",
    )
    assert ev.returncode == 0, ev.stderr[-3000:]
    m2 = pd.read_parquet(tmp_path / "out" / "local1" / "metrics")
    row = m2.iloc[0]
    assert (row["eval_size"], row["image_score_source"], row["aupro_mode"], row["aupro_limit"]) == (
        "64",
        "max_map",
        "fixed_grid_200",
        0.2,
    )
    sc = scores[scores["category"] == row["category"]]
    from sklearn.metrics import roc_auc_score

    assert row["image_auroc"] == pytest.approx(roc_auc_score(sc["gt_label"], sc["max_pixel_score"]), abs=1e-9)
    assert row["n_pixels"] == len(sc) * 64 * 64
    paper = zsad("evaluate", str(tmp_path / "out" / "local1"), "--paper", "winclip")  # an mvtec layout: MVTec's row
    assert paper.returncode == 0, paper.stderr[-2000:]
    mean = pd.read_parquet(tmp_path / "out" / "local1" / "metrics").set_index("category").loc["mean"]
    assert (
        f"| P-AUROC | 85.10 | {100 * mean['pixel_auroc']:.2f} | {100 * mean['pixel_auroc'] - 85.1:+.2f} |"
        in paper.stdout
    )
    assert "published: winclip on mvtec" in paper.stdout and "random weights" in paper.stdout
    unknown = zsad("evaluate", str(tmp_path / "out" / "local1"), "--paper", "vvv")  # VVV publishes VisA only
    assert unknown.returncode == 2 and "no published numbers for preset 'vvv' on 'mvtec'" in unknown.stderr
    bad = zsad("evaluate", str(tmp_path / "out" / "local1"), "--eval-size", "big")
    assert bad.returncode == 2 and "--eval-size" in bad.stderr
    missing = zsad("evaluate", str(tmp_path / "out" / "nope"))
    assert missing.returncode == 2 and "no run.json" in missing.stderr

    again = zsad(
        "run",
        "jobs/smoke.yaml",
        "--input",
        str(tmp_path / "data"),
        "--output",
        str(tmp_path / "out"),
        "--run-id",
        "local1",
    )
    assert again.returncode == 2 and "already exists" in again.stderr


def test_run_with_input_and_output_on_s3(tmp_path, s3_bucket, s3_env):
    """Needs Ray: the decode tasks and the scoring actors (Ray workers) read and write S3."""
    storage = fsio.storage_options()
    make_dataset(f"s3://{s3_bucket}/datasets/synth", categories=("gear",), n_good=2, n_bad=2, storage=storage)
    env = {
        k: os.environ[k]
        for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    }
    res = zsad(
        "run",
        "jobs/smoke.yaml",
        "--input",
        f"s3://{s3_bucket}/datasets/synth",
        "--output",
        f"s3://{s3_bucket}/runs",
        "--run-id",
        "s3run",
        env=env,
        ray=True,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    scores, _, manifest = check_run(f"s3://{s3_bucket}/runs/s3run", 4, storage)
    assert scores["uri"].str.startswith(f"s3://{s3_bucket}/datasets/synth/gear/test/").all()
    assert manifest["output"] == f"s3://{s3_bucket}/runs/s3run"
    fs, _ = fsio.filesystem(f"s3://{s3_bucket}", storage)
    assert fs.exists(f"{s3_bucket}/runs/s3run/run.json")
    # pandas reads the S3 tables directly too
    df = pd.read_parquet(f"s3://{s3_bucket}/runs/s3run/scores", storage_options=storage)
    assert len(df) == 4


def test_bad_inputs_are_reported_and_the_error_budget_holds(tmp_path):
    folder = tmp_path / "mixed"
    expected = write_bad_inputs(folder / "parts")
    write_good_images(folder / "parts", 120)
    n_total = 120 + len(expected)
    bad = {k: v for k, v in expected.items() if v["expect"] == "error"}
    assert len(bad) == 6 and 6 / n_total <= 0.05

    res = zsad("run", "jobs/smoke.yaml", "--input", str(folder), "--output", str(tmp_path / "out"), "--run-id", "bad1")
    assert res.returncode == 0, res.stderr[-3000:]
    scores, errors, manifest = check_run(str(tmp_path / "out" / "bad1"), n_total, n_failed=6)
    by_name = {Path(u).name: row for u, row in zip(errors["uri"], errors.to_dict("records"))}
    assert set(by_name) == set(bad)
    for name, want in bad.items():
        row = by_name[name]
        assert row["stage"] == "decode" and row["error_type"] == want["error_type"], (name, row)
        assert len(row["message"]) > 10
    assert "0 bytes" in by_name["zero.png"]["message"]
    assert "900,000,000 pixels" in by_name["bomb.png"]["message"]

    rows = scores.set_index(scores["uri"].map(lambda u: Path(u).name))
    for name, want in expected.items():
        if want["expect"] == "ok":
            assert rows.loc[name, "status"] == "ok", name
            assert (rows.loc[name, "height"], rows.loc[name, "width"]) == want["shape"], name
    # the EXIF-rotated JPEG is scored in its displayed orientation
    spec = load_spec("jobs/smoke.yaml")
    stage = ClipScoreStage(spec.clip, spec.score)
    stored = np.asarray(Image.open(folder / "parts" / "exif_rotated.jpg").convert("RGB"))  # no transpose
    displayed = np.rot90(stored, k=-1)  # orientation 6: rotate 90 degrees clockwise
    out = stage(image_batch([np.ascontiguousarray(displayed), stored], ["parts", "parts"]))
    assert rows.loc["exif_rotated.jpg", "score"] == pytest.approx(out["score"][0], abs=1e-5)
    assert abs(out["score"][0] - out["score"][1]) > 1e-6  # orientation matters to the score

    strict = zsad(
        "run",
        "jobs/smoke.yaml",
        "--input",
        str(folder),
        "--output",
        str(tmp_path / "out"),
        "--run-id",
        "bad2",
        "--set",
        "max_error_rate=0.04",
    )
    assert strict.returncode == 1
    assert "above max_error_rate 0.04" in strict.stderr + strict.stdout
    assert manifest["failed_by_stage"] == {"decode": 6}
    stats = (tmp_path / "out" / "bad1" / "local_stats.txt").read_text()  # the executor's statistics
    assert f"decode (task): {n_total} rows" in stats and "clip_score (actor)" in stats
    run2 = json.loads((tmp_path / "out" / "bad2" / "run.json").read_text())
    assert run2["status"] == "failed" and run2["counts"]["failed"] == 6


def test_fade_preset_with_tiny_model_writes_masks(tmp_path):
    make_dataset(str(tmp_path / "data"), categories=("gear",), n_good=1, n_bad=2)
    res = zsad(
        "run",
        "jobs/fade.yaml",
        "--input",
        str(tmp_path / "data"),
        "--output",
        str(tmp_path / "out"),
        "--run-id",
        "fade1",
        *TINY,
        "--set",
        "maps.map_size=256",
        "--set",
        "maps.threshold=0.5",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    scores, _, manifest = check_run(str(tmp_path / "out" / "fade1"), 3)
    assert manifest["model"]["pixel_method"] == "fade_zero_shot"
    assert scores["score_vision"].notna().all() and scores["max_pixel_score"].between(0, 1).all()
    assert (scores["score"] == scores["score_language"]).all()
    masks = check_masks(str(tmp_path / "out" / "fade1"), scores, "fade_zero_shot")
    for row in masks.itertuples():
        m = heatmap.decode_png16(row.map_png, 0.0, 1.0)
        mask = rle.decode(json.loads(row.mask_rle))
        assert row.threshold == 0.5 and mask.shape == m.shape
        near = np.abs(m - 0.5) <= 1.0 / 65535  # within a quantisation step of the threshold either side is right
        assert np.array_equal(mask[~near], (m >= 0.5)[~near])
