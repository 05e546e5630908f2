"""Mutual scoring's driver passes without Ray: the pool choice (deterministic, independent of the
listing order, size min(N, pool_size + 1), the seed's effect, unaddressable rows left out) and the
RsCIN table pass (scores shards rewritten with score_rscin and score, against a loop reference)."""

import hashlib

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import load_spec
from pipeline.io import contracts
from pipeline.runtime import mutual


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
    expected = sorted(manifest[manifest["category"] == "big"]["uri"], key=lambda u: hashlib.sha256(f"0\0{u}".encode()).hexdigest())
    assert list(big["uri"]) == expected[:6] and list(big["shot"]) == list(range(6))
    shuffled = mutual.choose(spec, manifest.sample(frac=1.0, random_state=3))
    pd.testing.assert_frame_equal(shuffled.sort_values(["category", "shot"]).reset_index(drop=True),
                                  chosen.sort_values(["category", "shot"]).reset_index(drop=True))
    other = mutual.choose(load_spec("jobs/musc.yaml", ["mutual.pool_size=5", "mutual.seed=1"]), manifest)
    assert set(other[other["category"] == "big"]["uri"]) != set(big["uri"])
    broken = manifest.copy()
    broken.loc[broken["uri"] == expected[0], "list_error_type"] = "BrokenLink"
    again = mutual.choose(spec, broken)
    assert expected[0] not in set(again["uri"]) and list(again[again["category"] == "big"].sort_values("shot")["uri"]) == expected[1:7]


def _write_shard(path, rows):
    contract = contracts.load("scores")
    data = {f.name: [r.get(f.name) for r in rows] for f in contract.fields}
    pq.write_table(pa.table(data, schema=contract.schema), path)


@pytest.mark.parametrize("use", ["rscin", "raw"])
def test_rscin_pass_rewrites_the_scores_shards(tmp_path, use):
    rng = np.random.default_rng(0)
    sets = ["mutual.k_list=[1,2,3]"] + (["mutual.score=raw"] if use == "raw" else [])
    spec = load_spec("jobs/musc.yaml", sets)
    cats = ["a"] * 7 + ["b"] * 5
    ids = [f"id{i:02d}" for i in range(len(cats))]
    raw = rng.uniform(0.2, 0.9, len(cats))
    emb = rng.normal(size=(len(cats), 8)) + 2.0  # mostly positive similarities
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    failed = 3  # a failed row: no score, no embedding
    rows = []
    for i, (iid, cat) in enumerate(zip(ids, cats)):
        ok = i != failed
        rows.append({"run_id": "r", "image_id": iid, "uri": f"/x/{iid}.png", "category": cat, "status": "ok" if ok else "error",
                     "score": float(raw[i]) if ok else None, "score_mutual": float(raw[i]) if ok else None,
                     "scoring_mode": "whole_image", "score_method": "mutual", "pixel_method": "mutual", "prompt_set": "none",
                     "clip_model": "zsad-tiny", "clip_weights": "random", "random_weights": True})
    _write_shard(tmp_path / "s0.parquet", rows[:6])
    _write_shard(tmp_path / "s1.parquet", rows[6:])
    contract = contracts.load("embeddings")
    keep = [i for i in range(len(cats)) if i != failed]
    pq.write_table(pa.table({"run_id": ["r"] * len(keep), "image_id": [ids[i] for i in keep], "category": [cats[i] for i in keep],
                             "image_embedding": [emb[i].astype(np.float32).tolist() for i in keep]}, schema=contract.schema),
                   tmp_path / "e0.parquet")
    summary = mutual.rescore_rscin(spec, [str(tmp_path / "s0.parquet"), str(tmp_path / "s1.parquet")],
                                   [str(tmp_path / "e0.parquet")], None, lambda _: None)
    assert summary["images"] == len(keep) and summary["categories"] == 2
    out = pd.concat([pq.read_table(tmp_path / f"s{k}.parquet").to_pandas() for k in (0, 1)]).set_index("image_id")
    assert pq.read_table(tmp_path / "s0.parquet").schema.metadata[b"zsad.schema_version"] == b"5"
    e32 = emb.astype(np.float32).astype(np.float64)
    for cat in ("a", "b"):
        idx = [i for i in keep if cats[i] == cat]
        s = raw[idx]
        c = (s - s.min()) / (s.max() - s.min())
        w = e32[idx] @ e32[idx].T
        want = []
        for r in range(len(idx)):
            order = np.argsort(-w[r])
            want.append(np.mean([sum(w[r, j] * c[j] for j in order[:k]) / sum(w[r, j] for j in order[:k]) for k in (1, 2, 3)]))
        got = out.loc[[ids[i] for i in idx]]
        np.testing.assert_allclose(got["score_rscin"], want, atol=1e-9)
        np.testing.assert_allclose(got["score"], want if use == "rscin" else s, atol=1e-9)
    assert pd.isna(out.loc[ids[failed], "score_rscin"]) and pd.isna(out.loc[ids[failed], "score"])
