"""The fused model stage (``runtime.fuse_models: true``): the plan's model stages (SAM foreground,
CLIP scoring, SAM refinement) and the CPU stages between them run as ONE actor pool.

Each actor builds every fused model once (``setup``) on its device and passes each batch through
the fused stages in plan order, so a row's image, SAM embedding and maps stay in the actor's
process: no hand-over between pools and one copy of each model per GPU. The columns a stage reads
and writes are its own (the fused stage requires what the first one requires and produces what
any of them produces); a row that fails in one part passes through the later parts untouched, as
between separate stages.

Resources: ``resources.clip_score``'s pool size and batch size, with the largest ``num_cpus`` and
``num_gpus`` of the fused model stages (:func:`fused_resources`).
"""

from __future__ import annotations

from typing import Any, Mapping

from pipeline.config import StageResources
from pipeline.stages.base import PlannedStage

NAME = "models"


class FusedStage:
    """The stages ``parts`` (in plan order, at least one actor stage among them) as one actor stage,
    called ``name`` (a stage that runs a part first in its actor, ``decode.device: model``, keeps
    its own name and resources)."""

    section = "runtime"
    kind = "actor"

    def __init__(self, parts: list[Any], name: str = NAME) -> None:
        if not parts:
            raise ValueError("nothing to fuse")
        self.parts = list(parts)
        self.name = name

    def describe(self) -> str:
        return "+".join(p.name for p in self.parts)

    @property
    def requires(self) -> tuple[str, ...]:
        """The columns the fused stages read that none of them produces before it."""
        have: set[str] = set()
        need: list[str] = []
        for part in self.parts:
            need += [c for c in part.requires if c not in have and c not in need]
            have |= set(part.produces)
            have -= set(part.drops)
        return tuple(need)

    @property
    def types(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for part in self.parts:
            out.update(part.types)
        dropped = self.drops
        return {k: v for k, v in out.items() if k not in dropped}

    @property
    def produces(self) -> tuple[str, ...]:
        return tuple(self.types)

    @property
    def drops(self) -> tuple[str, ...]:
        """Columns some part drops and no later part produces again."""
        gone: set[str] = set()
        for part in self.parts:
            gone -= set(part.produces)
            gone |= set(part.drops)
        return tuple(sorted(gone))

    @property
    def use_gpu(self) -> bool:
        return any(getattr(p, "use_gpu", False) for p in self.parts)

    @use_gpu.setter
    def use_gpu(self, value: bool) -> None:
        for part in self.parts:
            if part.kind == "actor":
                part.use_gpu = value

    def find(self, name: str) -> Any | None:
        """The fused part called ``name``, or None."""
        return next((p for p in self.parts if p.name == name), None)

    @property
    def inputs(self) -> tuple[str, ...]:
        """The inputs the parts take (each part is set up with its own)."""
        return tuple(name for part in self.parts for name in getattr(part, "inputs", ()))

    def setup(self, inputs: Mapping[str, Any] | None = None) -> None:
        for part in self.parts:
            mine = {k: v for k, v in (inputs or {}).items() if k in getattr(part, "inputs", ())}
            part.setup(mine) if mine else part.setup()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        for part in self.parts:
            batch = part(batch)
        return batch


def fused_resources(planned: list[Any], clip: StageResources) -> StageResources:
    """One actor pool for the fused ``planned`` stages: ``clip``'s (``resources.clip_score``) pool
    and batch sizes, the largest ``num_cpus`` and ``num_gpus`` of the fused actor stages, their
    summed ``memory``."""
    actors = [p.resources for p in planned if p.kind == "actor"]
    memory = [r.memory for r in actors if r.memory]
    return clip.model_copy(update={
        "num_cpus": max(r.num_cpus for r in actors), "num_gpus": max(r.num_gpus for r in actors),
        "memory": sum(memory) if memory else None,
    })


def fuse(planned: list[Any]) -> list[Any]:
    """``planned`` with its model stages, and everything between the first and the last of them,
    replaced by one :class:`FusedStage` (unchanged with fewer than two model stages)."""
    actors = [i for i, p in enumerate(planned) if p.kind == "actor"]
    if len(actors) < 2:
        return list(planned)
    first, last = actors[0], actors[-1]
    group = planned[first : last + 1]
    clip = next((p.resources for p in group if p.name == "clip_score"), group[0].resources)
    fused = PlannedStage(FusedStage([p.stage for p in group]), fused_resources(group, clip))
    return [*planned[:first], fused, *planned[last + 1 :]]


def find_stage(planned: list[Any], name: str) -> Any | None:
    """The stage called ``name`` in a built plan, also inside a fused stage."""
    for p in planned:
        stage = p.stage
        if isinstance(stage, FusedStage) and stage.find(name) is not None:
            return stage.find(name)
        if stage.name == name:
            return stage
    return None
