"""Table contracts and the Parquet sinks."""

import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.io import contracts
from pipeline.io.sinks import TableWriter, read_json, write_json, write_table


def test_contracts_load():
    assert {"scores", "errors", "inputs"} <= set(contracts.table_names())
    scores = contracts.load("scores")
    for name in ("run_id", "image_id", "uri", "category", "score", "gt_label", "status", "clip_model",
                 "random_weights", "decode_ms", "clip_score_ms"):
        assert name in scores.names
    assert scores.schema.field("score").nullable and not scores.schema.field("uri").nullable
    errors = contracts.load("errors")
    assert {"uri", "stage", "error_type", "message"} <= set(errors.names)
    with pytest.raises(contracts.ContractError, match="no contract for table 'nope'"):
        contracts.load("nope")


def _error_cols(n=2, **over):
    cols = {"run_id": ["r"] * n, "image_id": ["i"] * n, "uri": ["u"] * n, "category": ["c"] * n,
            "stage": ["decode"] * n, "error_type": ["EmptyFile"] * n, "message": ["m"] * n}
    cols.update(over)
    return cols


def test_to_table_checks_columns_types_nulls():
    c = contracts.load("errors")
    t = contracts.to_table(_error_cols(), c)
    assert t.schema.equals(c.schema) and t.schema.metadata[b"zsad.schema_version"] == b"1"
    with pytest.raises(contracts.ContractError, match=r"missing columns \['message'\]"):
        cols = _error_cols()
        del cols["message"]
        contracts.to_table(cols, c)
    with pytest.raises(contracts.ContractError, match="'message' has 1 null"):
        contracts.to_table(_error_cols(message=["m", None]), c)
    with pytest.raises(contracts.ContractError, match="'gt_label' cannot be stored as int64"):
        rows = {n: [None] for n in contracts.load("inputs").names}
        rows.update(uri=["u"], image_id=["i"], category=["c"], gt_label=["bad"])
        contracts.to_table(rows, contracts.load("inputs"))


def test_validate_rejects_wrong_type_and_extra_column():
    c = contracts.load("errors")
    t = contracts.to_table(_error_cols(), c)
    with pytest.raises(contracts.ContractError, match="unexpected columns \\['x'\\]"):
        contracts.validate(t.append_column("x", pa.array([1, 2])), c)
    bad = t.set_column(0, "run_id", pa.array([1, 2]))
    with pytest.raises(contracts.ContractError, match="'run_id' has type int64"):
        contracts.validate(bad, c)


def test_pandas_nullable_ints_roundtrip(tmp_path):
    df = pd.DataFrame({"uri": ["a", "b"], "image_id": ["1", "2"], "category": ["x", "x"],
                       "gt_label": pd.array([1, None], dtype="Int64"), "mask_uri": [None, "m"],
                       "size": pd.array([3, None], dtype="Int64"), "mtime": [1.5, None], "etag": [None, None],
                       "list_error_type": [None, None], "list_error_message": [None, None]})
    t = write_table(str(tmp_path / "inputs.parquet"), df, "inputs")
    back = pq.read_table(tmp_path / "inputs.parquet")
    assert back.schema.equals(contracts.load("inputs").schema) and back.column("gt_label").to_pylist() == [1, None]
    assert t.num_rows == 2


def test_table_writer_parts_and_empty(tmp_path):
    w = TableWriter(str(tmp_path / "errors"), "errors", rows_per_part=3)
    for _ in range(4):
        w.write(_error_cols(2))
    files = w.close()
    assert [f.rsplit("/", 1)[-1] for f in files] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert [pq.read_metadata(f).num_rows for f in files] == [3, 3, 2]
    assert len(pd.read_parquet(tmp_path / "errors")) == 8
    empty = TableWriter(str(tmp_path / "none"), "errors")
    [f] = empty.close()
    t = pq.read_table(f)
    assert t.num_rows == 0 and t.schema.equals(contracts.load("errors").schema)
    w2 = TableWriter(str(tmp_path / "errors"), "errors")
    w2.clear()
    assert not list((tmp_path / "errors").glob("part-*"))


def test_json_roundtrip(tmp_path):
    write_json(str(tmp_path / "r" / "run.json"), {"a": 1})
    assert read_json(str(tmp_path / "r" / "run.json")) == {"a": 1}
    assert json.loads((tmp_path / "r" / "run.json").read_text()) == {"a": 1}
    assert not [p for p in (tmp_path / "r").iterdir() if p.name.startswith((".run-", ".tmp-"))]


def _tables_by_hand(spec) -> list[str]:
    """What a run writes, as the code listed it before the contracts said it (issue 30)."""
    tables = ["scores", "errors"]
    tables += ["masks"] if spec.pixel.kind != "none" else []
    tables += ["foreground"] if spec.foreground is not None else []
    tables += ["tiles"] if spec.tiling is not None and spec.tiling.write_table else []
    return tables + (["embeddings"] if spec.mutual is not None else [])


def test_the_tables_a_run_writes_come_from_the_contracts():
    """Issue 30: no list of tables in the code; each shard table's contract says when a run writes
    it (shards.when, a job-spec key), and their order; every preset gets what the hand-kept rule gave."""
    from pathlib import Path

    from pipeline.config import load_spec
    from pipeline.io.contracts import load, shard_tables, written_tables

    jobs = Path(__file__).resolve().parents[3] / "jobs"

    assert shard_tables() == ["scores", "errors", "masks", "foreground", "tiles", "embeddings"]
    specs = [load_spec(str(p)) for p in sorted(jobs.glob("*.yaml")) if "train" not in p.name]
    specs += [load_spec(str(jobs / "vvv.yaml"), ["tiling.write_table=false"]),
              load_spec(str(jobs / "smoke.yaml"), ["pixel.kind=none"])]
    seen = set()
    for spec in specs:
        assert written_tables(spec) == _tables_by_hand(spec), spec.name
        seen |= set(written_tables(spec))
    assert seen == set(shard_tables())  # each rule is exercised
    assert written_tables(specs[-1]) == ["scores", "errors"]
    assert not load("inputs").written_by(specs[0]) and not load("metrics").written_by(specs[0])


def test_a_malformed_shards_rule_is_refused(tmp_path, monkeypatch):
    (tmp_path / "odd.yaml").write_text("table: odd\nversion: 1\nfields:\n"
                                       "  - {name: a, type: string, nullable: false}\nshards: {when: mutual}\n")
    monkeypatch.setattr(contracts, "_files", lambda: tmp_path)
    contracts.load.cache_clear()
    try:
        with pytest.raises(contracts.ContractError, match=r"schemas/odd.yaml: shards must be \{order: N"):
            contracts.load("odd")
    finally:
        contracts.load.cache_clear()
