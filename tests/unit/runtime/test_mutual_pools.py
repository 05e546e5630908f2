"""Mutual scoring's passes without Ray: the pool choice (deterministic, independent of the listing
order, size min(N, pool_size + 1), the seed's effect, unaddressable rows left out), RsCIN's windows by
layout, and the RsCIN pass as per-category tasks with side tables (in-process executor): scores
shards rewritten with score_rscin and score, against a loop reference and against the whole
computation in one process (``rscin_scores``), a category split into query chunks included, and
side tables reused when their inputs did not change."""

import hashlib

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import load_spec
from pipeline.io import contracts
from pipeline.runtime import mutual, rescore


def _manifest(n_per_cat: dict[str, int]) -> pd.DataFrame:
    rows = []
    for cat, n in n_per_cat.items():
        for i in range(n):
            uri = f"/data/{cat}/test/good/{i:03d}.png"
            rows.append({"uri": uri, "image_id": hashlib.sha1(uri.encode()).hexdigest()[:16], "category": cat,
                         "etag": None, "size": 100 + i, "mtime": 1.0, "list_error_type": None})
    return pd.DataFrame(rows)


def test_pool_choice_is_a_seeded_hash_order_of_the_uris():
    spec = load_spec("jobs/musc.yaml", ["mutual.pool_size=5"])
    manifest = _manifest({"big": 20, "small": 4})
    chosen = mutual.choose(spec, manifest)
    sizes = chosen.groupby("category").size().to_dict()
    assert sizes == {"big": 6, "small": 4}  # pool_size + 1, or the whole category
    big = chosen[chosen["category"] == "big"].sort_values("shot")
    expected = sorted(manifest[manifest["category"] == "big"]["uri"],
                      key=lambda u: hashlib.sha256(f"0\0{u}".encode()).hexdigest())
    assert list(big["uri"]) == expected[:6] and list(big["shot"]) == list(range(6))
    shuffled = mutual.choose(spec, manifest.sample(frac=1.0, random_state=3))
    pd.testing.assert_frame_equal(shuffled.sort_values(["category", "shot"]).reset_index(drop=True),
                                  chosen.sort_values(["category", "shot"]).reset_index(drop=True))
    other = mutual.choose(load_spec("jobs/musc.yaml", ["mutual.pool_size=5", "mutual.seed=1"]), manifest)
    assert set(other[other["category"] == "big"]["uri"]) != set(big["uri"])
    broken = manifest.copy()
    broken.loc[broken["uri"] == expected[0], "list_error_type"] = "BrokenLink"
    again = mutual.choose(spec, broken)
    assert expected[0] not in set(again["uri"])
    assert list(again[again["category"] == "big"].sort_values("shot")["uri"]) == expected[1:7]


def _write_shard(path, rows):
    contract = contracts.load("scores")
    data = {f.name: [r.get(f.name) for r in rows] for f in contract.fields}
    pq.write_table(pa.table(data, schema=contract.schema), path)


def test_rscin_windows_follow_the_layout_unless_set():
    spec = load_spec("jobs/musc.yaml")
    assert spec.mutual.k_list is None
    assert spec.mutual.windows("visa") == spec.mutual.windows("visa_1cls") == (1, 8, 9)
    assert spec.mutual.windows("mvtec") == spec.mutual.windows("btad") == spec.mutual.windows("folder") == (1, 2, 3)
    assert load_spec("jobs/musc.yaml", ["mutual.k_list=[2,4]"]).mutual.windows("visa") == (2, 4)


def _rscin_run(tmp_path, use, chunk=0):
    rng = np.random.default_rng(0)
    cats = ["a"] * 7 + ["b"] * 5
    ids = [f"id{i:02d}" for i in range(len(cats))]
    raw = rng.uniform(0.2, 0.9, len(cats))
    emb = rng.normal(size=(len(cats), 8)) + 2.0  # mostly positive similarities
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    failed = 3  # a failed row: no score, no embedding
    rows = []
    for i, (iid, cat) in enumerate(zip(ids, cats)):
        ok = i != failed
        rows.append({"run_id": "r", "image_id": iid, "uri": f"/x/{iid}.png", "category": cat,
                     "status": "ok" if ok else "error",
                     "score": float(raw[i]) if ok else None, "score_mutual": float(raw[i]) if ok else None,
                     "scoring_mode": "whole_image", "score_method": "mutual", "pixel_method": "mutual",
                     "prompt_set": "none",
                     "clip_model": "zsad-tiny", "clip_weights": "random", "random_weights": True})
    (tmp_path / "scores").mkdir()
    _write_shard(tmp_path / "scores" / "s0.parquet", rows[:6])
    _write_shard(tmp_path / "scores" / "s1.parquet", rows[6:])
    contract = contracts.load("embeddings")
    keep = [i for i in range(len(cats)) if i != failed]
    pq.write_table(pa.table({"run_id": ["r"] * len(keep), "image_id": [ids[i] for i in keep],
                             "category": [cats[i] for i in keep],
                             "image_embedding": [emb[i].astype(np.float32).tolist() for i in keep]},
                             schema=contract.schema),
                   tmp_path / "e0.parquet")
    job = rescore.Rescore("rscin", "score_rscin", also_score=use == "rscin", k_list=(1, 2, 3), chunk=chunk)
    files = [str(tmp_path / "scores" / "s0.parquet"), str(tmp_path / "scores" / "s1.parquet")]
    before = pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True)
    summary = rescore.run(job, {"a": 7, "b": 5}, files, [str(tmp_path / "e0.parquet")], str(tmp_path), None,
                          {"executor": "local"}, lambda _: None)
    return summary, files, before, (cats, ids, raw, emb, keep, failed)


@pytest.mark.parametrize("use,chunk", [("rscin", 0), ("raw", 0), ("rscin", 2)])
def test_rscin_pass_rewrites_the_scores_shards(tmp_path, use, chunk):
    summary, files, before, (cats, ids, raw, emb, keep, failed) = _rscin_run(tmp_path, use, chunk)
    assert summary["images"] == len(keep) and summary["categories_computed"] == ["a", "b"]
    # 7 rows in chunks of 2: 4 tasks
    assert summary["tasks"] == (2 if not chunk else 4 + 3) and summary["shard_tasks"] == 2
    out = pd.concat([pq.read_table(f).to_pandas() for f in files]).set_index("image_id")
    assert pq.read_table(files[0]).schema.metadata[b"zsad.schema_version"] == b"5"
    e32 = emb.astype(np.float32).astype(np.float64)
    for cat in ("a", "b"):
        idx = [i for i in keep if cats[i] == cat]
        s = raw[idx]
        c = (s - s.min()) / (s.max() - s.min())
        w = e32[idx] @ e32[idx].T
        want = []
        for r in range(len(idx)):
            order = np.argsort(-w[r])
            want.append(np.mean([sum(w[r, j] * c[j] for j in order[:k]) / sum(w[r, j] for j in order[:k])
                                 for k in (1, 2, 3)]))
        got = out.loc[[ids[i] for i in idx]]
        np.testing.assert_allclose(got["score_rscin"], want, atol=1e-9)
        np.testing.assert_allclose(got["score"], want if use == "rscin" else s, atol=1e-9)
    assert pd.isna(out.loc[ids[failed], "score_rscin"]) and pd.isna(out.loc[ids[failed], "score"])
    # the same values as the whole computation in one process (the driver's function before issue 28)
    vectors = {ids[i]: emb[i].astype(np.float32) for i in keep}
    whole = mutual.rscin_scores(before[["image_id", "category", "score_mutual"]], vectors, (1, 2, 3))
    for iid, v in whole.items():
        assert out.loc[iid, "score_rscin"] == pytest.approx(v, rel=0, abs=1e-12)


def test_rscin_side_tables_are_reused_and_recomputed_when_their_inputs_change(tmp_path):
    summary, files, _, _ = _rscin_run(tmp_path, "rscin", chunk=3)
    side = sorted((tmp_path / "rescore" / "rscin").rglob("chunk-*.parquet"))
    assert [p.parent.name for p in side] == ["a", "a", "a", "b", "b"] and summary["categories_reused"] == []
    job = rescore.Rescore("rscin", "score_rscin", also_score=True, k_list=(1, 2, 3), chunk=3)
    again = rescore.run(job, {"a": 7, "b": 5}, files, [str(tmp_path / "e0.parquet")], str(tmp_path), None,
                        {"executor": "local"}, lambda _: None)
    assert again["categories_reused"] == ["a", "b"] and again["categories_computed"] == []  # a resumed run
    t = pq.read_table(files[0])
    values = [0.95 if i == "id00" else v
              for i, v in zip(t.column("image_id").to_pylist(), t.column("score_mutual").to_pylist())]
    at = t.schema.get_field_index("score_mutual")  # category a's inputs changed: a is computed again
    pq.write_table(t.set_column(at, t.schema.field(at), pa.array(values, pa.float64())), files[0])
    third = rescore.run(job, {"a": 7, "b": 5}, files, [str(tmp_path / "e0.parquet")], str(tmp_path), None,
                        {"executor": "local"}, lambda _: None)
    assert third["categories_computed"] == ["a"] and third["categories_reused"] == ["b"]
