"""The output tables of presets on the tiny models equal the golden tables (tests/golden/record.py):
same rows, columns, types and values, with the in-process executor (every preset) and with the Ray
executor (the presets below, on one local Ray shared by the module's tests). smoke, fade and vvv were
recorded before the plan refactor; columns added to a contract since (scores v4: the few-shot
columns) must be all null in these zero-shot runs. Both executors run each preset through
:func:`pipeline.runtime.run.run_job` in the test's process."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.ops import heatmap
from tests.golden.record import HERE, PRESETS, VOLATILE, read_tables, run_preset

pytestmark = pytest.mark.integration
#: the presets whose Ray-executor tables are compared too (issue 26's list)
RAY_PRESETS = ("smoke", "winclip", "default", "vvv", "musc_fast", "clip_sam")


def _same(name: str, table: str, got, want) -> None:
    where = f"{name}/{table}"
    # schemas evolve additively: columns added since the recording must be null in these zero-shot runs
    added = [c for c in got.column_names if c not in want.column_names]
    for col in added:
        assert got.column(col).null_count == got.num_rows, (
            f"{where}.{col}: a column added since the recording has values"
        )
    want = want.select([c for c in want.column_names if c not in VOLATILE])
    got = got.select(want.column_names)
    assert got.schema.equals(want.schema), f"{where}: schema\n{got.schema}\n!=\n{want.schema}"
    assert got.num_rows == want.num_rows, f"{where}: {got.num_rows} rows != {want.num_rows}"
    for col in want.column_names:
        a, b = got.column(col).to_pylist(), want.column(col).to_pylist()
        if col == "map_png":  # compare the decoded 16-bit levels (at most one level apart)
            for x, y in zip(a, b):
                assert (x is None) == (y is None), f"{where}.{col}: null mismatch"
                if x is not None:
                    lx = heatmap.quantise(heatmap.decode_png16(x, 0, 1), 0, 1).astype(int)
                    ly = heatmap.quantise(heatmap.decode_png16(y, 0, 1), 0, 1).astype(int)
                    assert lx.shape == ly.shape and np.abs(lx - ly).max() <= 1, f"{where}.{col}: maps differ"
        elif pa.types.is_list(want.schema.field(col).type) and pa.types.is_floating(
            want.schema.field(col).type.value_type
        ):
            assert [v is None for v in a] == [v is None for v in b], f"{where}.{col}: nulls differ"
            for x, y in zip(a, b):
                if x is not None:
                    np.testing.assert_allclose(
                        np.array(x, float), np.array(y, float), rtol=1e-5, atol=1e-6, err_msg=f"{where}.{col}"
                    )
        elif want.schema.field(col).type in ("double", "float"):
            assert [v is None for v in a] == [v is None for v in b], f"{where}.{col}: nulls differ"
            x = np.array([v for v in a if v is not None], float)
            y = np.array([v for v in b if v is not None], float)
            # float32 models: the same images in differently sized batches (Ray Data's blocks vary
            # with timing) differ by a few 1e-7 relative; any change of method is orders larger
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=f"{where}.{col}")
        else:
            assert a == b, f"{where}.{col}: {a} != {b}"


def _check(name, executor, root):
    tables = PRESETS[name][2]
    run_dir = run_preset(name, root, executor=executor, in_process=True)
    got = read_tables(run_dir, root / "in", tables)
    for table in tables:
        _same(f"{name} ({executor})", table, got[table], pq.read_table(HERE / name / f"{table}.parquet"))
    if name.startswith("musc"):  # the passes ran on the executor's workers: parts, tasks, one load per pool
        import json

        mu = json.loads(
            (run_dir / "run.json").read_text() if hasattr(run_dir, "read_text") else open(f"{run_dir}/run.json").read()
        )["mutual"]
        assert all(p["parts"] >= 1 for p in mu["pools"].values() if p["images"] >= 5)
        assert mu["rscin_pass"]["tasks"] == len(mu["pools"]) and mu["rscin_pass"]["categories_computed"]
        assert sum(mu["pool_loads_by_actor"].values()) >= len(mu["rscin_pass"]["categories_computed"])


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_local_executor_tables_equal_the_golden_tables(name, tmp_path):
    _check(name, "local", tmp_path)


@pytest.fixture(scope="module")
def shared_ray():
    """One local Ray in this test process for the module's Ray-executor runs (run_job uses the Ray
    this process already runs and leaves it running); shut down after the last of them."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.mark.parametrize("name", RAY_PRESETS)
def test_ray_executor_tables_equal_the_golden_tables(name, tmp_path, shared_ray):
    """Needs Ray: the same presets through Ray Data (tasks and actor pools) must give the same tables."""
    _check(name, "ray", tmp_path)
