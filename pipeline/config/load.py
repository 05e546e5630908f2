"""Loading a job spec.

A job spec is a YAML file validated into :class:`JobSpec` (pydantic v2, frozen, unknown keys
rejected). ``--set dotted.key=value`` overrides are applied to the raw YAML mapping before
validation, so an override of a misspelled key fails exactly like the same key in the file.

Every field has a documented default; ``zsad validate JOB...`` checks files without running them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from pipeline.config.base import SpecError
from pipeline.config.job import KIND_SECTIONS, JobSpec
from pipeline.config.pixel import FadeZeroShot


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value). The value is parsed as YAML (so ``null``,
    ``true``, ``3``, ``[1, 2]`` work); an empty value is the empty string."""
    if "=" not in text:
        raise SpecError(f"override {text!r} is not of the form dotted.key=value")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise SpecError(f"override {text!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise SpecError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``dotted.key=value`` override applied.

    An override of a per-kind section's ``kind`` (:data:`KIND_SECTIONS`, e.g. ``pixel.kind``) to
    another kind replaces the section: the old kind's keys go, so a method can be switched from
    the command line. Kind overrides are applied first, so the other overrides of that section stay
    whatever their order on the command line."""
    import copy

    def kind_of(path: list[str]) -> str | None:
        """The section whose kind this override sets, if it is a per-kind section."""
        return path[0] if len(path) == 2 and path[0] in KIND_SECTIONS and path[1] == "kind" else None

    out = copy.deepcopy(data)
    parsed = [(text, *parse_override(text)) for text in overrides]
    for text, path, value in sorted(parsed, key=lambda p: kind_of(p[1]) is None):  # stable: kinds first
        section_name = kind_of(path)
        section = out.get(section_name) if section_name else None
        if isinstance(section, dict):
            current = section.get("kind", JobSpec.model_fields[section_name].default.kind)
            if current != value:
                out[section_name] = {}
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
                node[part] = child
            elif not isinstance(child, dict):
                raise SpecError(f"override {text!r}: {part!r} is not a mapping (it is {child!r})")
            node = child
        node[path[-1]] = value
    return out


# Tag values of the discriminated unions: pydantic puts them in error locations
# (score.winclip_zero_shot.temperature); users wrote score.temperature.
_KIND_TAGS = {"winclip_zero_shot", "none", "winclip_windows", "fade_zero_shot", "clipseg"}


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"invalid job spec {source}:"]
    for err in exc.errors():
        loc = [str(p) for i, p in enumerate(err["loc"]) if not (i > 0 and p in _KIND_TAGS)]
        key = ".".join(loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (misspelled?)")
        else:
            msg = err["msg"]
            for prefix in ("Value error, ", "Assertion failed, "):
                msg = msg[len(prefix) :] if msg.startswith(prefix) else msg
            lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def spec_from_dict(data: Any, source: str = "<spec>", model: type[BaseModel] | None = None) -> Any:
    """Validate ``data`` as a :class:`JobSpec` (or ``model``, e.g. :class:`TrainSpec`)."""
    if not isinstance(data, dict):
        raise SpecError(f"invalid job spec {source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return (model or JobSpec).model_validate(data)
    except ValidationError as exc:
        raise SpecError(_format_errors(exc, source)) from None


def is_training_spec(path: str | os.PathLike[str]) -> bool:
    """Whether a spec file is a training spec (``zsad train``: top-level ``train`` or ``adapters``)."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False  # load_spec reports it
    return isinstance(data, dict) and ("train" in data or "adapters" in data)


#: ``--tiny``: the tiny random-weight stand-ins of the models (tests, trying a preset without weights)
TINY_CLIP = "zsad-tiny"  # pipeline/models/configs/zsad-tiny.json: 8 blocks, width 64, patch 16, 128 px
TINY_LAYERS = "[2,4,6,8]"  # four of its eight blocks, as the presets take four of 24 (or 12)
TINY_IMAGE_SIZE = 128


def tiny_overrides(data: dict[str, Any]) -> list[str]:
    """The ``--set`` overrides that put every model section of a spec (as read from its file) on the
    tiny random-weight models, so any preset runs in seconds on a CPU without downloading weights:

    - ``clip``: ``zsad-tiny`` with random weights (and its own image size), ``allow_random_weights``;
    - ``pixel``: APRIL-GAN and mutual maps on layers 2/4/6/8 at 128 px (APRIL-GAN's adapters random),
      FADE at scales 128 (and 160) on an 8-cell grid with GEM depth 2, CLIPSeg's tiny architecture;
    - ``sam``: the tiny SAM with random weights; ``foreground``: no DIS model (the classical map);
    - ``tiling``: 96-px tiles with 32-px tile maps; ``maps.map_size``: 64;
    - ``adapters`` (training specs): layers 2/4/6/8 at 128 px; ``train``: CPU workers of one CPU;
    - every ``resources.<stage>.num_gpus`` the spec sets: 0.

    The keys are applied before the command's own ``--set`` overrides, which therefore win. The
    outputs say random weights as for any random-weight run."""
    sets = [f"clip.model={TINY_CLIP}", "clip.weights=null", "clip.image_size=null", "allow_random_weights=true",
            "maps.map_size=64"]
    pixel = data.get("pixel") if isinstance(data.get("pixel"), dict) else {}
    kind = pixel.get("kind")
    if kind in ("april_gan", "mutual"):
        sets += [f"pixel.layers={TINY_LAYERS}", f"pixel.image_size={TINY_IMAGE_SIZE}"]
    if kind == "april_gan":
        sets.append("pixel.weights=null")
    if kind == "fade_zero_shot":
        n = len(pixel.get("scales") or FadeZeroShot.model_fields["scales"].default)
        sets += [f"pixel.scales={[128, 160][:max(1, min(n, 2))]}".replace(" ", ""), "pixel.grid=8", "pixel.gem_depth=2"]
    if kind == "clipseg":
        sets += ["pixel.arch=tiny", "pixel.weights=null"]
    if isinstance(data.get("sam"), dict):
        sets += ["sam.model=tiny", "sam.weights=null"]
    if isinstance(data.get("foreground"), dict):
        sets.append("foreground.dis_model=null")
    if isinstance(data.get("tiling"), dict):
        sets += ["tiling.min_tile=96", "tiling.tile_map_size=32"]
    if isinstance(data.get("adapters"), dict) or isinstance(data.get("train"), dict):
        sets = [x for x in sets if not x.startswith("maps.")]
        sets += [f"adapters.layers={TINY_LAYERS}", f"adapters.image_size={TINY_IMAGE_SIZE}", "train.use_gpu=false",
                 "train.resources_per_worker={CPU: 1}"]
    for stage, res in (data.get("resources") or {}).items():
        if isinstance(res, dict) and res.get("num_gpus"):
            sets.append(f"resources.{stage}.num_gpus=0")
    return sets


def load_spec(path: str | os.PathLike[str], overrides: list[str] | None = None, model: type[BaseModel] | None = None,
              tiny: bool = False) -> Any:
    """Load a YAML job spec and apply ``--set`` overrides (after :func:`tiny_overrides` when ``tiny``).
    Raises :class:`SpecError` naming the file and the offending key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"cannot read job spec {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"job spec {path} is not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(f"invalid job spec {path}: the top level must be a mapping")
    data = apply_overrides(data, [*(tiny_overrides(data) if tiny else []), *(overrides or [])])
    return spec_from_dict(data, str(path), model)
