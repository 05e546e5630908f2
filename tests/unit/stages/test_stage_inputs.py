"""What the driver computes before the plan runs (banks, pools) reaches a stage as its inputs: the
planned stage carries them (pipeline.stages.plan.with_inputs), the executor hands them to the
stage's ``setup`` on the worker's own copy, and the driver's stage object is never changed."""

import numpy as np
import pyarrow as pa
import pytest

from pipeline.config import StageResources
from pipeline.runtime.local_plan import run_plan_local
from pipeline.stages.base import PlannedStage
from pipeline.stages.fused import FusedStage
from pipeline.stages.plan import PlanError, with_inputs


class Scaler:
    """An actor stage that takes one input, ``factor``, at set-up."""

    name, kind = "scale", "actor"
    requires, drops = ("x",), ()
    types = {"y": pa.int64()}
    produces = tuple(types)
    inputs = ("factor",)

    def __init__(self):
        self.factor = None
        self.use_gpu = None

    def setup(self, inputs=None):
        if inputs:
            self.factor = inputs["factor"]

    def __call__(self, batch):
        return {**batch, "y": batch["x"] * self.factor}


class Plain:
    name, kind = "plain", "task"
    requires, drops = ("x",), ()
    types = {"z": pa.int64()}
    produces = tuple(types)

    def setup(self):
        pass

    def __call__(self, batch):
        return {**batch, "z": batch["x"] + 1}


def _session():
    return {"executor": "local", "address": None, "resources": {"CPU": 2.0, "GPU": 0.0}, "local": True,
            "where": "this process"}


def test_inputs_go_to_the_stage_that_takes_them_and_through_setup_on_the_workers_copy():
    plan = [PlannedStage(Plain(), StageResources(batch_size=4)), PlannedStage(Scaler(), StageResources(batch_size=4))]
    given = with_inputs(plan, {"factor": 3})
    assert given[0] is plan[0] and given[1].inputs == {"factor": 3} and plan[1].inputs == {}
    rows = [r for b in run_plan_local(None, given, pa.table({"x": np.arange(5)}), ["x", "y", "z"], _session(),
                                      lambda m: None) for r in b.to_pylist()]
    assert [r["y"] for r in rows] == [0, 3, 6, 9, 12] and [r["z"] for r in rows] == [1, 2, 3, 4, 5]
    assert plan[1].stage.factor is None  # the driver's stage object is unchanged


def test_an_input_no_stage_takes_is_a_plan_error():
    with pytest.raises(PlanError, match="banks"):
        with_inputs([PlannedStage(Plain(), StageResources())], {"banks": {}})


def test_a_fused_stage_gives_each_part_its_own_inputs():
    fused = FusedStage([Plain(), Scaler()])
    assert fused.inputs == ("factor",)
    fused.setup({"factor": 2})
    assert fused.parts[1].factor == 2
