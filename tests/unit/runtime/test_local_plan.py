"""The in-process executor (pipeline.runtime.local_plan) with small stages written here: batches of
each stage's own size across block boundaries, actors set up once on a copy of the planned stage,
input order, the selected columns, the GPU fallback and the statistics; and the executor choice
(pipeline.runtime.executors). No Ray is started."""

import numpy as np
import pyarrow as pa
import pytest

from pipeline.config import StageResources
from pipeline.runtime.executors import ExecutorError, check, execute, plan_session
from pipeline.runtime.local_plan import rebatch, run_plan_local
from pipeline.runtime.udf import to_numpy
from pipeline.stages.base import PlannedStage
from pipeline.stages.records import TENSOR


class CountTask:
    """A task stage: each row gets the size of the batch it came in (``task_n``) and ``x * 2``."""

    name, kind = "double", "task"
    types = {"task_n": pa.int64(), "y": pa.int64()}

    def __call__(self, batch):
        n = len(batch["x"])
        return {**batch, "task_n": np.full(n, n), "y": batch["x"] * 2}


class CountActor:
    """An actor stage: counts its set-ups; each row gets the batch size (``actor_n``), the set-up
    count (``setups``) and an image of a size that depends on the row (a tensor column of mixed shapes)."""

    name, kind = "model", "actor"
    types = {"actor_n": pa.int64(), "setups": pa.int64(), "image": TENSOR}

    def __init__(self):
        self.setups = 0
        self.use_gpu = None

    def setup(self):
        self.setups += 1

    def __call__(self, batch):
        n = len(batch["x"])
        images = np.empty(n, dtype=object)
        for i, x in enumerate(batch["x"]):
            images[i] = np.full((1 + x % 3, 2), x, np.uint8)
        return {**batch, "actor_n": np.full(n, n), "setups": np.full(n, self.setups), "image": images}


def _plan(task_batch=4, actor_batch=3, gpus=0.0):
    return [PlannedStage(CountTask(), StageResources(batch_size=task_batch)),
            PlannedStage(CountActor(), StageResources(batch_size=actor_batch, num_gpus=gpus))]


def _session(gpus=0.0):
    return {"executor": "local", "address": None, "resources": {"CPU": 2.0, "GPU": gpus}, "local": True,
            "where": "this process"}


def test_rebatch_gives_exact_sizes_across_blocks_in_order():
    blocks = [pa.table({"x": list(range(a, b))}) for a, b in ((0, 5), (5, 6), (6, 13))]
    out = list(rebatch(blocks, 4))
    assert [t.num_rows for t in out] == [4, 4, 4, 1]
    assert sum((t.column("x").to_pylist() for t in out), []) == list(range(13))
    assert [t.num_rows for t in rebatch(blocks, None)] == [5, 1, 7]  # None: the blocks as they come


def test_plan_runs_in_process_with_each_stage_batch_size_and_one_setup():
    plan = _plan()
    inputs = pa.table({"x": np.arange(10)})
    stats = []
    lines = []
    batches = list(run_plan_local(None, plan, inputs, ["x", "y", "task_n", "actor_n", "setups", "image"], _session(),
                                  lines.append, on_stats=stats.append))
    rows = [r for b in batches for r in b.to_pylist()]
    assert [r["x"] for r in rows] == list(range(10))  # input order
    assert [r["y"] for r in rows] == [2 * x for x in range(10)]
    # input blocks of the first stage's batch size (4); each stage then gets batches of its own size
    assert [r["task_n"] for r in rows] == [4] * 8 + [2] * 2
    assert [r["actor_n"] for r in rows] == [3] * 9 + [1]
    assert {r["setups"] for r in rows} == {1}  # set up once, on the copy the executor made
    assert plan[1].stage.setups == 0 and plan[1].stage.use_gpu is None  # the planned stage is untouched
    images = [im for batch in batches for im in to_numpy(batch)["image"]]  # the next stage's view
    assert [im.shape for im in images] == [(1 + x % 3, 2) for x in range(10)]
    assert set(batches[0].column_names) == {"x", "y", "task_n", "actor_n", "setups", "image"}
    assert "double (task): 10 rows in 3 batches" in stats[0] and "model (actor): 10 rows in 4 batches" in stats[0]
    assert not lines  # nothing to say: no GPU asked


def test_a_gpu_request_without_a_gpu_runs_on_cpu_and_says_so():
    lines = []
    batches = list(run_plan_local(None, _plan(gpus=1.0), pa.table({"x": np.arange(3)}), ["x"], _session(gpus=0.0),
                                  lines.append))
    assert sum(b.num_rows for b in batches) == 3
    assert lines == ["model: 1.0 GPU asked but this process has no GPU: running model on CPU"]


def test_result_batches_of_a_given_size():
    batches = list(run_plan_local(None, _plan(), pa.table({"x": np.arange(10)}), ["x"], _session(), lambda m: None,
                                  result_batch_rows=6))
    assert [b.num_rows for b in batches] == [6, 4] and batches[0].column_names == ["x"]


def test_the_executor_choice_and_its_errors():
    check("ray", None)
    check("ray", "auto")
    check("local", None)
    with pytest.raises(ExecutorError, match="use ray or local"):
        check("dask", None)
    with pytest.raises(ExecutorError, match="--address auto needs the ray executor"):
        check("local", "auto")
    lines = []
    with plan_session("local", None, lines.append) as session:
        assert session["executor"] == "local" and session["resources"]["CPU"] >= 1 and session["resources"]["GPU"] == 0
        rows = list(execute(None, _plan(), pa.table({"x": np.arange(5)}), ["y"], session, lines.append))
    assert [r["y"] for b in rows for r in b.to_pylist()] == [0, 2, 4, 6, 8]
    assert "executor local" in lines[0]
