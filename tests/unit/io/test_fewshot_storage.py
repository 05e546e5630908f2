"""Few-shot files on the loopback S3 server, without Ray: references.parquet, bank files (whole and
header-only reads, digest check), and APRIL-GAN's transductive pass rewriting scores shards in place."""

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.io import contracts
from pipeline.io import fs as fsio
from pipeline.io.banks import BankError, bank_uri, read_bank, read_bank_metadata, write_bank
from pipeline.io.references import read_references, write_references
from pipeline.io.sinks import write_table
from pipeline.runtime.fewshot import rescore_transductive


def test_bank_and_references_round_trip_on_s3(s3_bucket, s3_env):
    storage = fsio.storage_options()
    run_dir = f"s3://{s3_bucket}/runs/r1"
    uri = bank_uri(run_dir, "pcb 1/x")
    assert uri == f"{run_dir}/banks/pcb%201%2Fx.safetensors"  # any category name is one object
    tensors = {"patch": np.arange(12, dtype=np.float32).reshape(3, 4), "window2": np.ones((2, 5), np.float32)}
    size = write_bank(uri, tensors, {"category": "pcb 1/x", "digest": "d" * 64, "k": 3, "references": ["a", "b"]}, storage)
    meta = read_bank_metadata(uri, storage)
    assert meta["digest"] == "d" * 64 and meta["k"] == "3" and int(meta["bytes"]) == size
    got, meta = read_bank(uri, "d" * 64, storage)
    assert set(got) == set(tensors) and all(np.array_equal(got[k], tensors[k]) for k in tensors)
    with pytest.raises(BankError, match="built for something else"):
        read_bank(uri, "e" * 64, storage)
    with pytest.raises(FileNotFoundError):
        read_bank_metadata(bank_uri(run_dir, "missing"), storage)

    chosen = pd.DataFrame({"category": ["a", "a"], "shot": [0, 1], "uri": ["s3://b/x.png", "s3://b/x.png"],
                           "image_id": ["i", "i"], "etag": ["e1", "e1"], "size": pd.array([5, 5], "Int64"),
                           "mtime": pd.array([None, None], "Float64")})
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
        cols.update(run_id=["r"] * n, image_id=[f"{c}{i}-{shard}" for i, (c, _, _) in enumerate(part)],
                    uri=["u"] * n, category=[c for c, _, _ in part], status=["ok"] * n,
                    score=[s for _, s, _ in part], score_language=[s for _, s, _ in part],
                    score_fewshot=[f for _, _, f in part], score_method=["m"] * n, pixel_method=["april_gan"] * n,
                    prompt_set=["p"] * n, clip_model=["c"] * n, clip_weights=["random"] * n, random_weights=[True] * n,
                    scoring_mode=["whole_image"] * n)
        uri = f"s3://{s3_bucket}/runs/r2/scores/shard-{shard:05d}.parquet"
        write_table(uri, pd.DataFrame(cols), "scores", storage)
        files.append(uri)
    assert rescore_transductive(files, storage, lambda m: None) == 4
    fs, _ = fsio.filesystem(files[0], storage)
    got = {}
    for uri in files:
        with fs.open(fsio.filesystem(uri, storage)[1], "rb") as fh:
            t = pq.read_table(fh)
        assert t.schema.metadata[b"zsad.table"] == b"scores"
        got.update(zip(t.column("score_language").to_pylist(), t.column("score_transductive").to_pylist()))
    np.testing.assert_allclose([got[0.2], got[0.4], got[0.6], got[0.8]], [0.1, 0.7, 0.3, 0.9])
