"""Building the declared plan (no Ray): stage order from the spec, column contracts and stage kinds
checked at start-up."""

import pyarrow as pa
import pytest

from pipeline.config import load_spec
from pipeline.io import contracts, projection
from pipeline.stages.plan import STAGE_ORDER, PlanError, build_plan, check_columns

SOURCE = contracts.load("inputs").names
TINY = ["clip.model=zsad-tiny", "clip.weights=null", "allow_random_weights=true"]


def test_the_plan_follows_the_spec():
    smoke = build_plan(load_spec("jobs/smoke.yaml"), source=SOURCE)
    assert [p.name for p in smoke] == ["decode", "clip_score", "encode"]
    vvv = build_plan(load_spec("jobs/vvv.yaml", TINY + ["sam.model=tiny", "sam.weights=null"]), source=SOURCE)
    assert [(p.name, p.kind) for p in vvv] == [("decode", "task"), ("foreground", "actor"), ("tiling", "task"),
                                               ("clip_score", "actor"), ("aggregate", "task"), ("encode", "task")]
    resources = load_spec("jobs/vvv.yaml", TINY + ["sam.model=tiny", "sam.weights=null"]).resources
    assert [p.resources for p in vvv] == [resources.decode, resources.foreground, resources.tiling,
                                          resources.clip_score,
                                          resources.aggregate, resources.encode]  # each its own section
    spec = load_spec("jobs/smoke.yaml", ["resources.encode.batch_size=7"])
    assert build_plan(spec, source=SOURCE)[-1].resources.batch_size == 7


class _NeedsMasks:
    """A stage that reads a column nothing produces (named after a stage that has a resources section)."""

    name, section, kind = "aggregate", "maps", "task"
    requires = ("sam_mask",)
    types = {"refined_map": pa.binary()}
    produces = tuple(types)
    drops = ()

    @classmethod
    def from_spec(cls, spec, storage=None):
        return cls()


class _Gpu(_NeedsMasks):
    name, kind, requires = "clip_score", "gpu", ()


class _NoResources(_NeedsMasks):
    name = "needs_masks"


def test_a_missing_required_column_fails_when_the_plan_is_built():
    with pytest.raises(PlanError,
                       match=r"stage 'aggregate' requires column\(s\) 'sam_mask' that no earlier stage produces"):
        build_plan(load_spec("jobs/smoke.yaml"), source=SOURCE, order=STAGE_ORDER + (_NeedsMasks,))


def test_a_stage_of_unknown_kind_fails_when_the_plan_is_built():
    with pytest.raises(PlanError, match="stage 'clip_score' has unknown kind 'gpu' \\(known: task, actor\\)"):
        build_plan(load_spec("jobs/smoke.yaml"), source=SOURCE, order=(_Gpu,))


def test_a_stage_without_its_resources_section_fails():
    with pytest.raises(PlanError, match="no resources section \\(resources.needs_masks"):
        build_plan(load_spec("jobs/smoke.yaml"), source=("sam_mask",), order=(_NoResources,))


def test_an_output_table_needing_a_column_nothing_produces_fails():
    outputs = {"masks": projection.needs(contracts.load("masks"))}
    with pytest.raises(PlanError, match="table 'masks' needs column\\(s\\) map_png"):
        build_plan(load_spec("jobs/smoke.yaml"), source=SOURCE, outputs=outputs, order=STAGE_ORDER[:4])


def test_dropped_columns_are_gone_for_later_stages():
    plan = build_plan(load_spec("jobs/smoke.yaml"), source=SOURCE)
    final = check_columns(plan, SOURCE)
    assert "anomaly_map" not in final and {"map_png", "score", "gt_label", "image"} <= final


def test_the_sam_embedding_is_shared_when_the_plan_has_both_sam_stages():
    """The SAM foreground offers its embedding and the refinement uses it: build_plan joins them,
    neither stage asks whether the other is in the job."""
    sam = TINY + ["sam.model=tiny", "sam.weights=null"]
    spec = load_spec("jobs/vvv.yaml", sam + ["sam_refine={steps: 2}"])
    both = {p.name: p.stage for p in build_plan(spec, source=SOURCE)}
    assert both["foreground"].share_embedding and "sam_embedding" in both["foreground"].produces
    assert both["sam_refine"].shared_embedding and both["sam_refine"].drops == ("sam_embedding",)
    alone = {p.name: p.stage for p in build_plan(load_spec("jobs/vvv.yaml", sam), source=SOURCE)}
    assert not alone["foreground"].share_embedding and "sam_embedding" not in alone["foreground"].produces


def test_a_stage_the_plan_does_not_run_gives_its_default_columns():
    """sam_refine's ``refined`` is False in a plan without it: the driver adds it, no other stage
    writes it on its behalf."""
    from pipeline.stages.plan import column_defaults

    smoke = build_plan(load_spec("jobs/smoke.yaml"), source=SOURCE)
    assert column_defaults(smoke) == {"refined": (pa.bool_(), False)}
    assert all("refined" not in p.stage.produces for p in smoke)
    clip_sam = build_plan(load_spec("jobs/clip_sam.yaml", TINY + ["sam.model=tiny", "sam.weights=null"]), source=SOURCE)
    assert column_defaults(clip_sam) == {}
