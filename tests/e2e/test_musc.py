"""Mutual scoring (MuSc) end to end with `zsad run jobs/musc.yaml` and jobs/musc_fast.yaml on the tiny
CLIP: a generated MVTec tree with 2 categories (+ one of 4 images, too small to score); pools, raw and
RsCIN scores, embeddings, masks and metrics; the raw scores recomputed in the test from the stored
images with the library's model and pipeline.models.mutual (the stage's wiring: pool membership, the
image left out, K); RsCIN recomputed from the written tables with an explicit loop; input and output
on the loopback S3 server (pool parts written to S3 and read through the node cache). In-process
executor (tests/helpers/zsad.py): pools and scores are the plan's data, not Ray's; the same preset on a
local Ray (pool parts written by Ray actors, RsCIN as Ray tasks) is held to the golden tables in
tests/e2e/test_golden_outputs.py."""

import dataclasses
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.io import contracts
from pipeline.io import fs as fsio
from pipeline.io.banks import StoredBank
from pipeline.synthetic import make_dataset
from tests.e2e.test_cli_run import check_run, read_table
from tests.helpers.zsad import TINY as _TINY
from tests.helpers.zsad import zsad

pytestmark = pytest.mark.integration

LAYERS = [2, 4, 6, 8]
SIZE = 128
TINY = [
    *_TINY,
    "--set",
    "maps.map_size=48",
    "--set",
    f"pixel.layers=[{','.join(map(str, LAYERS))}]",
    "--set",
    f"pixel.image_size={SIZE}",
]


def run_musc(data, out, run_id, *extra, job="jobs/musc.yaml", env=None, ray=False):
    return zsad("run", job, "--input", data, "--output", out, "--run-id", run_id, *TINY, *extra, env=env, ray=ray)


def raw_scores_in_test(uris, pool_uris, k_interval=0.3):
    """score_mutual of ``uris`` computed here: the tiny model as the stage builds it (random init,
    seeded), PIL bicubic squash to SIZE, every image against ``pool_uris`` minus itself (or minus the
    pool's last image when it is not in the pool)."""
    from pipeline.models import clip as clip_models
    from pipeline.models import mutual

    model, pre = clip_models.build_clip("zsad-tiny")
    pre = dataclasses.replace(pre, resize="pil", size=SIZE)
    images = [torch.from_numpy(np.asarray(Image.open(u).convert("RGB")).copy()) for u in [*uris, *pool_uris]]
    with torch.inference_mode():
        batch = clip_models.preprocess_images(images, pre)
        _, tokens, grid = mutual.image_features(model.visual, batch, LAYERS)
    q = {key: v[: len(uris)] for key, v in mutual.query_features(tokens, LAYERS, (1, 3, 5), grid).items()}
    pool = {l: mutual.layer_norm_map(t[len(uris) :]) for l, t in zip(LAYERS, tokens)}
    p = len(pool_uris)
    exclude = torch.zeros(len(uris), p, dtype=torch.bool)
    for i, u in enumerate(uris):
        exclude[i, pool_uris.index(u) if u in pool_uris else p - 1] = True
    grids = mutual.mutual_map(q, pool, grid, int((p - 1) * k_interval), exclude)
    return mutual.upsample(grids, (SIZE, SIZE)).amax(dim=(1, 2)).double().numpy()


def rscin_in_test(scores, emb, k_list):
    """RsCIN with explicit loops: per image, its k most similar images (itself included)."""
    c = (scores - scores.min()) / (scores.max() - scores.min())
    w = emb @ emb.T
    out = np.zeros(len(scores))
    for i in range(len(scores)):
        order = np.argsort(-w[i], kind="stable")
        vals = []
        for k in k_list:
            nb = order[: min(k, len(scores))]
            vals.append(sum(w[i, j] * c[j] for j in nb) / sum(w[i, j] for j in nb))
        out[i] = np.mean(vals)
    return out


def check_musc_run(run_dir, n_images, categories, storage=None, n_failed=0, k_list=(1, 2, 3)):
    scores, errors, record = check_run(run_dir, n_images, storage, n_failed=n_failed)
    mu = record["mutual"]
    assert mu["transductive"] is True and mu["rscin"] is True and mu["score"] == "rscin"
    assert record["plan"][0] == {"stage": "bank", "kind": "actor", "pass": "pools"}
    pools = read_table(fsio.join(run_dir, "pools.parquet"), storage).to_pandas()
    ok = scores[scores["status"] == "ok"]
    assert (ok["score_method"] == "mutual").all() and (ok["pixel_method"] == "mutual").all()
    assert ok["score_mutual"].between(0, 2).all() and ok["score_rscin"].notna().all()
    np.testing.assert_array_equal(ok["score"], ok["score_rscin"])  # mutual.score: rscin
    assert ok["score_language"].isna().all() and ok["few_shot_k"].isna().all()
    emb = read_table(fsio.join(run_dir, "embeddings"), storage).to_pandas()
    assert sorted(emb["image_id"]) == sorted(ok["image_id"])
    vectors = {i: np.asarray(v, dtype=np.float64) for i, v in zip(emb["image_id"], emb["image_embedding"])}
    for cat in categories:
        entry = mu["pools"][cat]
        stored = StoredBank(entry["uri"], entry["digest"], storage)  # written by the workers: parts + manifest
        tensors = stored.load()
        chosen = pools[pools["category"] == cat].sort_values("shot")
        assert stored.image_ids == list(chosen["image_id"]) and entry["images"] == len(chosen)
        assert stored.precision == entry["precision"] == "fp32" and entry["parts"] >= 1
        assert all(tensors[f"layer{l}"].shape[0] == len(chosen) for l in LAYERS)
        sc = ok[ok["category"] == cat].sort_values("image_id")
        e = np.stack([vectors[i] for i in sc["image_id"]])
        np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(
            sc["score_rscin"], rscin_in_test(sc["score_mutual"].to_numpy(), e, k_list), atol=1e-9
        )
    masks = read_table(fsio.join(run_dir, "masks"), storage).to_pandas()
    assert (masks["map_min"] == 0.0).all() and (masks["map_max"] == 2.0).all()
    assert masks.loc[masks["image_id"].isin(ok["image_id"]), "map_png"].notna().all()
    metrics = read_table(fsio.join(run_dir, "metrics"), storage).to_pandas()
    assert set(categories) <= set(metrics["category"]) and metrics["random_weights"].all()
    assert metrics["pixel_auroc"].notna().all()
    return scores, errors, record, pools


def test_musc_preset_locally_with_resume_and_a_too_small_category(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    make_dataset(str(data), categories=("gear", "tile"), n_good=4, n_bad=3, size=80)
    make_dataset(str(tmp_path / "small"), categories=("nut",), n_good=2, n_bad=2, size=80)
    shutil.copytree(tmp_path / "small" / "nut", data / "nut")
    # gear and tile: 7 images each; pool_size 4 -> pools of 5 of their images (2 images outside each pool)
    res = run_musc(str(data), str(out), "r1", "--set", "mutual.pool_size=4", "--set", "max_error_rate=0.5")
    assert res.returncode == 0, res.stderr[-3000:]
    run_dir = str(out / "r1")
    scores, errors, record, pools = check_musc_run(run_dir, 18, ["gear", "tile"], n_failed=4)
    assert sorted(pools.groupby("category").size().items()) == [("gear", 5), ("nut", 4), ("tile", 5)]
    assert record["mutual"]["pools"]["nut"]["images"] == 4 and not os.path.exists(
        out / "r1" / "pools" / "nut" / "manifest.json"
    )
    # the category of 4 images: a clear per-row error, never a NaN score
    assert set(errors["error_type"]) == {"PoolTooSmall"} and errors["message"].str.contains("at least 5").all()
    assert scores.loc[scores["category"] == "nut", "score"].isna().all()
    # the raw scores, recomputed here from the images and the written pool choice
    for cat in ("gear",):
        sc = scores[scores["category"] == cat].sort_values("image_id")
        pool_uris = list(pools[pools["category"] == cat].sort_values("shot")["uri"])
        assert len(set(sc["uri"]) - set(pool_uris)) == 2  # queries outside the pool leave out its last image
        np.testing.assert_allclose(sc["score_mutual"], raw_scores_in_test(list(sc["uri"]), pool_uris), atol=1e-5)
    # a driver killed in the pool pass or the RsCIN pass, then resumed: tests/e2e/test_pass_resume.py


def test_musc_fast_preset_on_s3_with_the_whole_category_as_pool(tmp_path, s3_bucket, s3_env):
    storage = fsio.storage_options()
    data = f"s3://{s3_bucket}/datasets/synth"
    make_dataset(data, categories=("gear",), n_good=3, n_bad=3, size=80, storage=storage)
    env = {
        k: os.environ[k]
        for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    }
    res = run_musc(data, f"s3://{s3_bucket}/runs", "s3musc", job="jobs/musc_fast.yaml", env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    run_dir = f"s3://{s3_bucket}/runs/s3musc"
    scores, _, record, pools = check_musc_run(run_dir, 6, ["gear"], storage)
    assert record["mutual"]["pools"]["gear"]["uri"] == f"{run_dir}/pools/gear/manifest.json"
    assert len(pools) == 6 and record["spec"]["name"] == "musc_fast"  # pool = the whole category: MuSc exactly
    assert record["mutual"]["rscin_pass"]["tasks"] == 1 and record["mutual"]["pools"]["gear"]["parts"] >= 1
    assert sum(record["mutual"]["pool_loads_by_actor"].values()) == 1  # one category: loaded once
    assert contracts.load("scores").version == 5
    assert scores["uri"].str.startswith(f"{data}/gear/test/").all()
