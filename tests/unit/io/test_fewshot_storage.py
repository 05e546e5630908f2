"""Few-shot files on the loopback S3 server, without Ray: references.parquet, a bank as part files and
a manifest (read through the node cache, mapped, digest checked), and APRIL-GAN's transductive pass
(per-category tasks, side tables, scores shards rewritten in place)."""

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.io import contracts
from pipeline.io import fs as fsio
from pipeline.io.banks import BankError, StoredBank, category_dir, manifest_uri, write_manifest, write_part
from pipeline.io.references import read_references, write_references
from pipeline.io.sinks import write_table
from pipeline.runtime import rescore


def test_bank_and_references_round_trip_on_s3(s3_bucket, s3_env, tmp_path):
    storage = fsio.storage_options()
    run_dir = f"s3://{s3_bucket}/runs/r1"
    folder = category_dir(run_dir, "pcb 1/x")
    assert folder == f"{run_dir}/banks/pcb%201%2Fx"  # any category name is one folder
    feats = [
        {"patch": np.arange(12, dtype=np.float32).reshape(3, 4) + 100 * i, "window2": np.full((2, 5), i, np.float32)}
        for i in range(3)
    ]
    meta = {"category": "pcb 1/x", "digest": "d" * 64, "precision": "fp32"}
    parts = [
        write_part(folder, feats[:2], ["a", "b"], meta, storage),
        write_part(folder, feats[2:], ["c"], meta, storage),
    ]
    uri = manifest_uri(run_dir, "pcb 1/x")
    write_manifest(
        uri,
        {
            "category": "pcb 1/x",
            "digest": "d" * 64,
            "precision": "fp32",
            "image_ids": ["c", "a", "b"],
            "parts": parts,
            "k": 3,
        },
        storage,
    )
    bank = StoredBank(uri, "d" * 64, storage, cache=str(tmp_path / "cache"))
    assert bank.image_ids == ["c", "a", "b"] and bank.keys == ["patch", "window2"] and bank.precision == "fp32"
    got = bank.load()  # in manifest order, from the node's copies of the parts
    np.testing.assert_array_equal(
        got["patch"], np.concatenate([feats[2]["patch"], feats[0]["patch"], feats[1]["patch"]])
    )
    np.testing.assert_array_equal(
        bank.rows("window2", 1, 3), np.concatenate([feats[0]["window2"], feats[1]["window2"]])
    )
    assert len(list((tmp_path / "cache" / "run-parts").glob("*.safetensors"))) == 2  # downloaded once per node
    with pytest.raises(BankError, match="built for something else"):
        StoredBank(uri, "e" * 64, storage, cache=str(tmp_path / "cache"))
    with pytest.raises(BankError, match="no such manifest"):
        StoredBank(manifest_uri(run_dir, "missing"), None, storage)

    chosen = pd.DataFrame(
        {
            "category": ["a", "a"],
            "shot": [0, 1],
            "uri": ["s3://b/x.png", "s3://b/x.png"],
            "image_id": ["i", "i"],
            "etag": ["e1", "e1"],
            "size": pd.array([5, 5], "Int64"),
            "mtime": pd.array([None, None], "Float64"),
        }
    )
    write_references(chosen, f"{run_dir}/references.parquet", storage)
    back = read_references(f"{run_dir}/references.parquet", storage)
    pd.testing.assert_frame_equal(back, chosen, check_dtype=False)


def test_transductive_pass_rewrites_the_scores_shards_on_s3(s3_bucket, s3_env):
    storage = fsio.storage_options()
    contract = contracts.load("scores")
    files = []
    rows = [("a", 0.2, 1.0), ("a", 0.4, 3.0), ("b", 0.6, 2.0), ("b", 0.8, 4.0)]
    for shard, part in enumerate((rows[:3], rows[3:])):
        n = len(part)
        cols = {f.name: [None] * n for f in contract.fields}
        cols.update(
            run_id=["r"] * n,
            image_id=[f"{c}{i}-{shard}" for i, (c, _, _) in enumerate(part)],
            uri=["u"] * n,
            category=[c for c, _, _ in part],
            status=["ok"] * n,
            score=[s for _, s, _ in part],
            score_language=[s for _, s, _ in part],
            score_fewshot=[f for _, _, f in part],
            score_method=["m"] * n,
            pixel_method=["april_gan"] * n,
            prompt_set=["p"] * n,
            clip_model=["c"] * n,
            clip_weights=["random"] * n,
            random_weights=[True] * n,
            scoring_mode=["whole_image"] * n,
        )
        uri = f"s3://{s3_bucket}/runs/r2/scores/shard-{shard:05d}.parquet"
        write_table(uri, pd.DataFrame(cols), "scores", storage)
        files.append(uri)
    job = rescore.Rescore("transductive", "score_transductive")
    summary = rescore.run(
        job, {"a": 2, "b": 2}, files, [], f"s3://{s3_bucket}/runs/r2", storage, {"executor": "local"}, lambda m: None
    )
    assert summary["images"] == 4 and summary["categories_computed"] == ["a", "b"]
    fs, _ = fsio.filesystem(files[0], storage)
    got = {}
    for uri in files:
        with fs.open(fsio.filesystem(uri, storage)[1], "rb") as fh:
            t = pq.read_table(fh)
        assert t.schema.metadata[b"zsad.table"] == b"scores"
        got.update(zip(t.column("score_language").to_pylist(), t.column("score_transductive").to_pylist()))
    np.testing.assert_allclose([got[0.2], got[0.4], got[0.6], got[0.8]], [0.1, 0.7, 0.3, 0.9])
    # the same values as the whole computation in one process (the driver's function before issue 28)
    frame = pd.DataFrame(
        {
            "category": [c for c, _, _ in rows],
            "score_language": [s for _, s, _ in rows],
            "score_fewshot": [f for _, _, f in rows],
        }
    )
    np.testing.assert_array_equal(
        [got[s] for s in frame["score_language"]], rescore.transductive_scores(frame).to_numpy()
    )
