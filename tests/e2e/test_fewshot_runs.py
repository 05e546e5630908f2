"""Few-shot presets end to end with `zsad run ... --reference`: tiny CLIP, a generated MVTec tree whose
train/good images are the references; banks, scores, masks and metrics; categories without references
in both `few_shot.missing` modes; input, references and output on the loopback S3 server. In-process
executor (tests/helpers/zsad.py): the bank pass and the scoring are the plan's data, not Ray's."""

import json
import os
import shutil

import numpy as np
import pytest

from pipeline.io import contracts
from pipeline.io import fs as fsio
from pipeline.io.banks import StoredBank, read_manifest
from pipeline.synthetic import make_dataset
from tests.e2e.test_cli_run import check_run, read_table
from tests.helpers.zsad import TINY as _TINY
from tests.helpers.zsad import zsad

pytestmark = pytest.mark.integration

TINY = [*_TINY, "--set", "maps.map_size=48"]
PRESETS = {
    "fade": ("jobs/fade_fewshot.yaml", []),
    "winclip": ("jobs/winclip_fewshot.yaml", []),
    "april_gan": ("jobs/aprilgan_fewshot.yaml", ["--set", "pixel.layers=[2,4]", "--set", "pixel.image_size=64"]),
}
PIXEL = {"fade": "fade_zero_shot", "winclip": "winclip_windows", "april_gan": "april_gan"}


def run_preset(method, data, out, run_id, *extra, env=None):
    job, sets = PRESETS[method]
    return zsad(
        "run",
        job,
        "--input",
        data,
        "--output",
        out,
        "--run-id",
        run_id,
        "--reference",
        data,
        *TINY,
        *sets,
        *extra,
        env=env,
    )


def check_fewshot_run(run_dir, method, n_images, categories, k, storage=None, without=()):
    """A finished few-shot run: ``categories`` scored with k-shot banks, ``without`` zero-shot."""
    scores, _, record = check_run(run_dir, n_images, storage)
    few = record["few_shot"]
    assert few["method"] == method and few["k"] == k and few["categories_without_references"] == list(without)
    assert few["banks_built"] == sorted(categories) and few["banks_reused"] == []
    assert few["banks_reference_images"] <= k * len(categories)  # with replacement, a repeat is computed once
    refs = read_table(fsio.join(run_dir, "references.parquet"), storage).to_pandas()
    assert sorted(refs["category"].unique()) == sorted(categories) and (refs.groupby("category").size() == k).all()
    assert refs["uri"].str.contains("/train/good/").all()
    for cat in categories:
        bank = few["banks"][cat]
        tensors = StoredBank(bank["uri"], bank["digest"], storage).load()  # parts written by the workers
        meta = read_manifest(bank["uri"], storage)
        assert meta["method"] == method and int(meta["k"]) == k and bank["built"] is True and bank["parts"] >= 1
        settings = meta["settings"]  # the model spec, the resolved precision and the method's feature settings
        assert settings["clip"]["model"] == "zsad-tiny" and settings["clip"]["weights"] == "random"
        assert settings["clip"]["precision"] == meta["precision"] == bank["precision"] == "fp32"
        assert meta["references"] == list(refs[refs["category"] == cat].sort_values("shot")["uri"])
        n_rows = {key: v.shape[0] for key, v in tensors.items()}
        assert len(set(n % k for n in n_rows.values())) == 1  # k images' features stacked per key
    zero = scores[scores["category"].isin(without)]
    assert (
        (zero["few_shot_k"] == 0).all() and zero["score_fewshot"].isna().all() and zero["reference_digest"].isna().all()
    )
    assert (zero["score"] == zero["score_language"]).all()  # zero-shot: the language score alone
    ok = scores[(scores["status"] == "ok") & ~scores["category"].isin(without)]
    assert (ok["few_shot_k"] == k).all() and ok["score_fewshot"].notna().all() and ok["reference_digest"].notna().all()
    assert (ok["pixel_method"] == PIXEL[method]).all()
    masks = read_table(fsio.join(run_dir, "masks"), storage).to_pandas()
    assert sorted(masks["image_id"]) == sorted(scores["image_id"]) and masks["map_png"].notna().all()
    lo, hi = (0.0, 6.0) if method == "april_gan" else (0.0, 1.0)
    assert (masks["map_min"] == lo).all() and (masks["map_max"] == hi).all()
    if method == "april_gan":
        assert ok["score_transductive"].between(0, 1).all()
        for _, sc in ok.groupby("category"):
            v = sc["score_fewshot"]
            norm = (v - v.min()) / (v.max() - v.min())
            np.testing.assert_allclose(sc["score_transductive"], 0.5 * (sc["score_language"] + norm), atol=1e-12)
    else:
        assert ok["score_transductive"].isna().all()
    metrics = read_table(fsio.join(run_dir, "metrics"), storage).to_pandas()
    assert sorted(metrics["category"]) == sorted([*categories, *without, "mean"]) and metrics["random_weights"].all()
    assert (metrics["image_score_source"] == ("transductive" if method == "april_gan" else "method")).all()
    from sklearn.metrics import roc_auc_score

    column = "score_transductive" if method == "april_gan" else "score"
    for cat in categories:
        sc = ok[ok["category"] == cat]
        row = metrics[metrics["category"] == cat].iloc[0]
        assert row["image_auroc"] == pytest.approx(roc_auc_score(sc["gt_label"], sc[column]), abs=1e-9)
        assert 0 <= row["pixel_auroc"] <= 1
    return scores, record


@pytest.mark.parametrize("method", ["april_gan", "winclip"])
def test_fewshot_preset_runs_locally(method, tmp_path):
    make_dataset(str(tmp_path / "data"), categories=("gear", "plate"), n_good=1, n_bad=2, n_train=3)
    res = run_preset(method, str(tmp_path / "data"), str(tmp_path / "out"), "fs1", "--set", "few_shot.k=2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "built 2 bank(s)" in res.stderr and "metrics:" in res.stdout
    scores, _ = check_fewshot_run(str(tmp_path / "out" / "fs1"), method, 6, ["gear", "plate"], 2)
    if method == "winclip":  # interrupted after the bank pass (no run.json, no shard done): the banks are reused
        run_dir = tmp_path / "out" / "fs1"
        os.remove(run_dir / "run.json")
        shutil.rmtree(run_dir / "_done")
        res = zsad("resume", str(run_dir), "--no-evaluate")
        assert res.returncode == 0, res.stderr[-3000:]
        few = json.loads((run_dir / "run.json").read_text())["few_shot"]
        assert few["banks_reused"] == ["gear", "plate"] and few["banks_built"] == []
        assert sum(few["bank_loads_by_actor"].values()) == 2  # grouped by category: each bank loaded once
        again = read_table(fsio.join(str(run_dir), "scores")).to_pandas().set_index("image_id").sort_index()
        np.testing.assert_allclose(
            again["score"], scores.set_index("image_id").sort_index()["score"], rtol=0, atol=1e-6
        )


def test_fade_fewshot_locally_with_a_category_without_references(tmp_path):
    """FADE few-shot on a generated MVTec tree whose train/good are the references, except for one
    category that has none: refused with missing: error, scored zero-shot with missing: zero_shot."""
    data = tmp_path / "data"
    make_dataset(str(data), categories=("gear", "plate", "screw"), n_good=1, n_bad=1, n_train=3)
    shutil.rmtree(data / "screw" / "train")
    refused = run_preset("fade", str(data), str(tmp_path / "out"), "strict", "--set", "few_shot.k=2")
    assert refused.returncode == 2
    assert (
        "no reference images for category 'screw'" in refused.stderr and "few_shot.missing: zero_shot" in refused.stderr
    )
    assert not (tmp_path / "out" / "strict").exists()  # refused before anything was written

    res = run_preset(
        "fade",
        str(data),
        str(tmp_path / "out"),
        "lenient",
        "--set",
        "few_shot.k=2",
        "--set",
        "few_shot.missing=zero_shot",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "scoring them zero-shot" in res.stderr and "built 2 bank(s)" in res.stderr
    run_dir = tmp_path / "out" / "lenient"
    check_fewshot_run(str(run_dir), "fade", 6, ["gear", "plate"], 2, without=["screw"])
    assert sorted(os.listdir(run_dir / "banks")) == ["gear", "plate"]  # one folder per category: parts + manifest
    assert all("manifest.json" in os.listdir(run_dir / "banks" / c) for c in ("gear", "plate"))
    record = json.loads((run_dir / "run.json").read_text())
    assert record["few_shot"]["reference_layout"] == "mvtec"


def test_references_in_a_folder_per_category(tmp_path):
    """A folder of references per category (no dataset layout), listed without Ray: the dry run."""
    make_dataset(str(tmp_path / "data"), categories=("gear",), n_good=1, n_bad=1, n_train=2)
    shutil.copytree(tmp_path / "data" / "gear" / "train" / "good", tmp_path / "refs" / "gear")
    job, sets = PRESETS["fade"]
    res = zsad(
        "run",
        job,
        "--input",
        str(tmp_path / "data"),
        "--output",
        str(tmp_path / "out"),
        "--dry-run",
        "--reference",
        str(tmp_path / "refs"),
        *TINY,
        *sets,
        "--set",
        "few_shot.k=2",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    plan = json.loads(res.stdout)
    assert plan["few_shot"] == {
        "method": "fade",
        "k": 2,
        "reference": str(tmp_path / "refs"),
        "reference_layout": "folder",
        "references_by_category": {"gear": 2},
        "categories_without_references": [],
    }
    assert plan["plan"][0]["stage"] == "bank"


@pytest.mark.parametrize("method", sorted(PRESETS))
def test_fewshot_preset_on_s3(method, tmp_path, s3_bucket, s3_env):
    storage = fsio.storage_options()
    data = f"s3://{s3_bucket}/datasets/synth"
    make_dataset(data, categories=("gear",), n_good=1, n_bad=2, n_train=2, storage=storage)
    env = {
        k: os.environ[k]
        for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    }
    res = run_preset(method, data, f"s3://{s3_bucket}/runs", "s3fs", "--set", "few_shot.k=2", env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    run_dir = f"s3://{s3_bucket}/runs/s3fs"
    scores, record = check_fewshot_run(run_dir, method, 3, ["gear"], 2, storage)
    assert record["few_shot"]["banks"]["gear"]["uri"] == f"{run_dir}/banks/gear/manifest.json"
    assert scores["uri"].str.startswith(f"{data}/gear/test/").all()
    assert contracts.load("scores").version == 5
