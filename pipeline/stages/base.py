"""What every stage is: the :class:`Stage` protocol, and the column check it runs on a batch.

A batch is a ``dict[str, np.ndarray]`` of equal-length columns (Ray Data's "numpy" batch format;
column conventions in :mod:`pipeline.stages.records`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    from pipeline.config import StageResources

StageKind = Literal["task", "actor"]
#: How a stage runs: ``task`` = stateless Ray tasks (CPU), ``actor`` = a pool of actors that build
#: their models once (``setup``), on a GPU when the stage's resources ask for one.
STAGE_KINDS: tuple[str, ...] = ("task", "actor")


@runtime_checkable
class Stage(Protocol):
    """One pipeline stage: a batch callable declared as data.

    - ``name``: the stage's name; its resources are ``resources.<name>`` of the job spec;
    - ``section``: the job-spec section that configures it (``decode``, ``foreground``...);
    - ``kind``: ``task`` or ``actor`` (see :data:`STAGE_KINDS`);
    - ``requires``: the columns it reads; ``produces``: the columns it adds or replaces, and
      ``types`` their in-flight types (:mod:`pipeline.stages.records`; same keys as ``produces``);
      ``drops``: the columns it removes;
    - ``timed`` (optional, False when absent): the stage times its rows in ``<name>_ms`` (run.json
      has ``<name>_busy``);
    - ``setup()``: builds models once per worker (a no-op for CPU stages); a stage with
      ``inputs`` (names of what the driver computes before the plan runs, e.g. ``("banks",)``) is
      set up with ``setup(inputs)``, a mapping of those names to their values;
    - ``__call__(batch) -> batch``;
    - ``from_spec(spec, storage)`` (classmethod): the configured stage, or None when the job
      does not use it.
    """

    name: ClassVar[str]
    section: ClassVar[str]
    requires: tuple[str, ...]
    produces: tuple[str, ...]
    types: Mapping[str, Any]
    drops: tuple[str, ...]

    @property
    def kind(self) -> str: ...

    def setup(self) -> None: ...

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]: ...


@dataclass(frozen=True)
class PlannedStage:
    """One stage of a built plan with its resources (``resources.<name>`` of the spec) and its
    inputs: what the driver computed for it before the plan runs (the few-shot ``banks``, the mutual
    ``pools``: :func:`pipeline.stages.plan.with_inputs`), handed to the stage's ``setup`` on each
    worker; the stage object itself is never changed by the driver."""

    stage: Any  # a Stage
    resources: StageResources
    inputs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.stage.name

    @property
    def kind(self) -> str:
        return self.stage.kind


def check_columns(stage_name: str, batch: Mapping[str, Any], required: tuple[str, ...]) -> int:
    """Check that ``batch`` has every ``required`` column and that all its columns have one length.

    Returns:
        The number of rows (0 for a batch with no columns).

    Raises:
        ValueError: naming the stage and the missing columns (and the columns present), or the
            length of every column when they differ.
        TypeError: ``batch`` is not a mapping of columns.
    """
    if not isinstance(batch, Mapping):
        raise TypeError(f"stage {stage_name!r}: a batch must be a dict of columns, got {type(batch).__name__}")
    missing = [name for name in required if name not in batch]
    if missing:
        raise ValueError(
            f"stage {stage_name!r} requires column(s) {', '.join(map(repr, missing))}, missing from the "
            f"input batch (it has: {', '.join(map(repr, batch)) or 'no columns'})"
        )
    lengths: dict[str, int] = {}
    for name, column in batch.items():
        try:
            lengths[name] = len(column)
        except TypeError:
            raise ValueError(
                f"stage {stage_name!r}: column {name!r} is not a sequence ({type(column).__name__})"
            ) from None
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{name}={n}" for name, n in lengths.items())
        raise ValueError(f"stage {stage_name!r}: input columns have different lengths ({detail})")
    return next(iter(lengths.values()), 0)


class LazyModule:
    """A module imported when one of its attributes is first used, not when the stage's module is.

    The driver imports every stage module to read the plan's declarations (names, columns,
    resources) but runs no model; torch and open_clip take seconds to import, which every
    ``zsad run``, ``validate`` and refused run paid. The actors use the module as if imported."""

    def __init__(self, name: str) -> None:
        self.__dict__["_name"] = name

    def __getattr__(self, attr: str) -> Any:
        module = self.__dict__.get("_module")
        if module is None:  # first use: import once, then every access is one lookup
            import importlib

            module = self.__dict__["_module"] = importlib.import_module(self.__dict__["_name"])
        return getattr(module, attr)


def inference_mode(fn):
    """``torch.inference_mode()`` as a decorator that imports torch when called, not when defined."""
    import functools

    @functools.wraps(fn)
    def run(*args, **kwargs):
        import torch

        with torch.inference_mode():
            return fn(*args, **kwargs)

    return run


def model_work(method):
    """For a model stage's methods: ``torch.inference_mode()``, and the stage's device and
    resolved precision (``self.device``, ``self.precision``) active for the forward passes
    (:func:`pipeline.models.precision.active`)."""
    import functools

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        import torch

        from pipeline.models.precision import active

        with torch.inference_mode(), active(self.device, self.precision):
            return method(self, *args, **kwargs)

    return run
