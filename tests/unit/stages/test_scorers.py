"""The scoring stage's registries cover the spec: a scorer for every ``score.kind``, a pixel method
for every ``pixel.kind`` and a few-shot strategy for every few-shot method, so a new kind in the
spec without its code (or the reverse) fails here, not in a run."""

import typing

from pipeline.config import FEW_SHOT_PIXEL, PixelSpec, ScoreSpec
from pipeline.stages.clip_score import SCORERS, ClipScoreStage
from pipeline.stages.fewshot_methods import FEW_SHOT_METHODS
from pipeline.stages.pixel_methods import PIXEL_METHODS
from pipeline.stages.plan import STAGE_ORDER


def _kinds(spec_type) -> set[str]:
    union = typing.get_args(spec_type)[0]
    return {cls.model_fields["kind"].default for cls in typing.get_args(union)}


def test_every_kind_of_the_spec_has_its_code():
    assert set(SCORERS) == _kinds(ScoreSpec)
    assert set(PIXEL_METHODS) == _kinds(PixelSpec)
    assert set(FEW_SHOT_METHODS) == set(FEW_SHOT_PIXEL)


def test_one_stage_per_name_in_the_plan():
    names = [cls.name for cls in STAGE_ORDER]
    assert len(names) == len(set(names)) and names.count(ClipScoreStage.name) == 1
