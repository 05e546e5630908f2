"""A toy stage added with only the steps of pipeline/README.md ("How to add a stage"), inside this
test, and a tiny job run through it with the in-process executor:

1. the stage class (here ``ToyStage``; in the tree, ``pipeline/stages/toy.py``);
2. its spec section and ``resources.toy`` (here subclasses of the spec models; in the tree,
   ``pipeline/config/toy.py``, its ``JobSpec`` field in ``config/job.py``, ``config/resources.py``
   and README.md's key table);
3. its place in ``STAGE_ORDER`` (here patched; in the tree, one entry in ``pipeline/stages/plan.py``);
4. no table stores a column of its own (it replaces ``score``, which ``scores`` stores already);
5. this test.

Nothing else is told about it: run.json's plan and busy seconds, the result columns and the tables
follow from its declarations."""

import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
from pydantic import BaseModel, ConfigDict

from pipeline.config import JobSpec, ResourcesSpec, StageResources, load_spec
from pipeline.runtime.run import run_job
from pipeline.stages import plan
from pipeline.stages.base import check_columns
from pipeline.stages.clip_score import ClipScoreStage
from tests.golden.record import REPO, make_data


# step 1: the stage
class ToyStage:
    """Replaces the score of every scored row by the spec's ``toy.score``; times its rows."""

    name = "toy"
    section = "toy"
    kind = "task"
    timed = True  # toy_ms; run.json's toy_busy
    requires = ("score", "status")
    types = {"score": pa.float64(), "toy_ms": pa.float64()}
    produces = tuple(types)
    drops: tuple[str, ...] = ()

    def __init__(self, value: float) -> None:
        self.value = value

    @classmethod
    def from_spec(cls, spec, storage=None):
        toy = getattr(spec, "toy", None)
        return None if toy is None else cls(toy.score)

    def setup(self) -> None:
        """Nothing to build."""

    def __call__(self, batch):
        n = check_columns(self.name, batch, self.requires)
        t0 = time.perf_counter()
        ok = np.asarray([s == "ok" for s in batch["status"]], dtype=bool)
        score = np.where(ok, self.value, np.asarray(batch["score"], dtype=np.float64))
        ms = np.where(ok, (time.perf_counter() - t0) * 1000.0 / max(n, 1), np.nan)
        return {**batch, "score": score, "toy_ms": ms}


# step 2: its spec section and resources.toy
class ToySpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    score: float = 0.25


class ToyResources(ResourcesSpec):
    toy: StageResources = StageResources(num_cpus=1, batch_size=4)


class ToyJobSpec(JobSpec):
    toy: ToySpec | None = None
    resources: ToyResources = ToyResources()


def test_a_toy_stage_added_with_the_documented_steps_runs_in_a_tiny_job(tmp_path, monkeypatch):
    # step 3: its place in STAGE_ORDER (after the scoring stage)
    order = list(plan.STAGE_ORDER)
    monkeypatch.setattr(plan, "STAGE_ORDER", (*order[: order.index(ClipScoreStage) + 1], ToyStage,
                                              *order[order.index(ClipScoreStage) + 1 :]))
    base = load_spec(str(REPO / "jobs" / "smoke.yaml"), ["maps.map_size=48", "max_error_rate=0.5",
                                                          "runtime.executor=local", "report.enabled=false"], tiny=True)
    spec = ToyJobSpec.model_validate({**base.model_dump(), "toy": {"score": 0.25}})
    data = make_data("mvtec", tmp_path)
    result = run_job(spec, str(data), str(tmp_path / "out"), run_id="toy", log=lambda _m: None)
    assert result.status == "succeeded", result.record.get("reason")
    record = json.loads((tmp_path / "out" / "toy" / "run.json").read_text())
    stages = [e.get("stage") for e in record["plan"]]
    assert stages == ["decode", "clip_score", "toy", "encode"]
    assert record["stage_seconds"]["toy_busy"] >= 0.0
    scores = pads.dataset(str(tmp_path / "out" / "toy" / "scores"), format="parquet").to_table().to_pandas()
    ok = scores[scores["status"] == "ok"]
    assert len(ok) and (ok["score"] == 0.25).all()
