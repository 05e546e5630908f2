"""The settings that depend on the model's shape, checked on the driver before anything starts.

A spec can be valid on its own and still not fit its model: ViT-L's layers ``[6, 12, 18, 24]`` on a
model of 8 blocks, an input size that is not a whole number of patches, WinCLIP windows wider than
the patch grid, adapters trained for other layers, a SAM checkpoint of another size. Found inside
the model actors, such a setting costs a Ray start and a model load, fails every actor with a
traceback, and the run is left "interrupted" although a resume could never help. Here the model's
depth, width, patch size and native input come from open_clip's model config
(:func:`pipeline.models.registry.vision`, cached: open_clip is not imported), and local adapter and
SAM files are read without loading their tensors (memory-mapped), so ``zsad run`` (and
``--dry-run``), ``zsad train``, ``zsad validate`` and ``zsad submit`` refuse such a spec with exit 2,
each problem naming the key, its value and what the model allows. No Ray is imported here.

:func:`spec_problem` is the one check of a spec before anything starts (``zsad validate``, ``zsad
submit``, and the run's own driver with ``objects=True``): model name and tag, weight and prompt
files, and :func:`model_problems`. :func:`layout_problem` checks a ``--layout`` option.
"""

from __future__ import annotations

import os
from typing import Any

from pipeline.config import AprilGanAdapters, FadeZeroShot, MutualMaps, NoPixelMap, TrainSpec, WinclipWindows
from pipeline.models import registry


def _multiple(key: str, size: int, g: registry.VisionGeometry, model: str) -> str | None:
    """A problem when the input side ``size`` is not a whole number of the model's patches."""
    p = g.patch_size
    if size % p == 0:
        return None
    lo, hi = (size // p) * p, (size // p + 1) * p
    near = f"{lo} or {hi}" if lo >= p else f"{hi}"
    return (f"{key} {size} is not a multiple of {model}'s patch size {p} (its patch embedding would drop the last "
            f"{size % p} pixels): use {near}")


def _blocks(key: str, layers: tuple[int, ...], g: registry.VisionGeometry, model: str) -> str | None:
    if layers and layers[-1] > g.layers:
        return (f"{key} {list(layers)} exceed the {g.layers} blocks of {model} (block numbers 1..{g.layers}; "
                f"e.g. {_spread(g.layers, len(layers))})")
    return None


def _spread(depth: int, n: int) -> list[int]:
    """``n`` block numbers evenly up to ``depth`` (ViT-L's 6/12/18/24 pattern)."""
    n = max(1, min(n, depth))
    return sorted({round(depth * (i + 1) / n) for i in range(n)})


def _adapter_problems(key: str, weights, layers: tuple[int, ...], g: registry.VisionGeometry, model: str,
                      layers_key: str) -> list[str]:
    """A local adapters file against the backbone and the layers it is used with (URIs: at start-up)."""
    if weights is None or not weights.path:
        return []
    from pipeline.models.adapters import AdapterLoadError, read_adapter_file

    path = os.path.expanduser(weights.path)
    try:
        tensors, meta = read_adapter_file(path)
    except AdapterLoadError as exc:
        return [f"{key}: {exc}"]
    problems = []
    count = len({k.split(".")[1] for k in tensors if k.startswith("fc.") and k.count(".") == 2})
    if count and count != len(layers):
        problems.append(f"{layers_key} {list(layers)}: the adapters in {path} are for {count} layers, "
                        f"not {len(layers)}")
    trained = meta.get("layers") if isinstance(meta, dict) else None
    if isinstance(trained, (list, tuple)) and list(trained) != list(layers) and len(trained) == len(layers):
        problems.append(f"{layers_key} {list(layers)}: the adapters in {path} were trained on layers {list(trained)} "
                        f"(of {meta.get('backbone', 'their backbone')}); use those")
    weight = tensors.get("fc.0.weight")
    shape = tuple(getattr(weight, "shape", ()))
    if len(shape) == 2 and shape != (g.embed_dim, g.width):
        problems.append(f"{key}: the adapters in {path} map width {shape[1]} to {shape[0]}, but {model} has width "
                        f"{g.width} and embedding {g.embed_dim}: they were trained for another backbone")
    return problems


def _sam_problems(spec) -> list[str]:
    """A local SAM checkpoint: readable, and of the size ``sam.model`` names."""
    if not spec.uses_sam() or spec.sam is None or spec.sam.weights is None or not spec.sam.weights.path:
        return []
    from pipeline.models import checkpoints
    from pipeline.models.sam import ENCODER_WIDTHS, SamLoadError

    path = os.path.expanduser(spec.sam.weights.path)
    try:
        sd = checkpoints.read_state_dict(path, what="SAM checkpoint", error=SamLoadError, mmap=True)
    except SamLoadError as exc:
        return [f"sam.weights: {exc}"]
    proj = sd.get("image_encoder.patch_embed.proj.weight")
    if proj is None:
        return []  # not a SAM state dict at all: the strict load names the keys at start-up
    width = int(proj.shape[0])
    want = ENCODER_WIDTHS[spec.sam.model]
    if width == want:
        return []
    fits = [name for name, w in ENCODER_WIDTHS.items() if w == width]
    which = f"a {fits[0]} checkpoint" if fits else f"a checkpoint of image-encoder width {width}"
    return [f"sam.model {spec.sam.model}: {path} is {which} (image-encoder width {width}; {spec.sam.model} has "
            f"{want}): "
            f"set sam.model{': ' + fits[0] if fits else ''} or give a {spec.sam.model} checkpoint"]


def model_problems(spec: Any) -> list[str]:
    """Every setting of ``spec`` (a JobSpec or a TrainSpec) that its CLIP model, its adapters file or
    its SAM checkpoint cannot take, one line each (empty: all fit). An unknown model name is left to
    :func:`registry.check_model`."""
    model = spec.clip.model
    g = registry.vision(model)
    if g is None:
        return []
    training = isinstance(spec, TrainSpec)
    pixel = None if training else spec.pixel
    needs_walk = training or not isinstance(pixel, NoPixelMap) and pixel.kind != "clipseg"
    problems: list[str] = [] if training else _sam_problems(spec)
    if needs_walk and not g.walkable:
        what = "adapters training" if training else f"pixel.kind {pixel.kind}"
        problems.append(f"clip.model {model}: {what} needs a CLIP ViT with class-token pooling (open_clip's "
                        f"VisionTransformer); {model} has {g.why} (e.g. ViT-B-16-plus-240, ViT-L-14-336)")
        return problems
    if not g.walkable:
        return problems
    size = spec.clip.image_size or g.image_size
    if spec.clip.image_size:
        problems.append(_multiple("clip.image_size", spec.clip.image_size, g, model))
    if training:
        a = spec.adapters
        problems += [_blocks("adapters.layers", a.layers, g, model),
                     _multiple("adapters.image_size", a.image_size, g, model),
                     *_adapter_problems("adapters.weights", a.weights, a.layers, g, model, "adapters.layers")]
    elif isinstance(pixel, (AprilGanAdapters, MutualMaps)):
        problems += [_blocks("pixel.layers", pixel.layers, g, model),
                     _multiple("pixel.image_size", pixel.image_size, g, model)]
        if isinstance(pixel, AprilGanAdapters):
            problems += _adapter_problems("pixel.weights", pixel.weights, pixel.layers, g, model, "pixel.layers")
    elif isinstance(pixel, FadeZeroShot):
        if pixel.gem_depth > g.layers:
            problems.append(f"pixel.gem_depth {pixel.gem_depth} exceeds the {g.layers} blocks of {model} "
                            f"(1..{g.layers})")
        problems += [_multiple(f"pixel.scales {list(pixel.scales)}: scale", s, g, model) for s in pixel.scales]
    elif isinstance(pixel, WinclipWindows):
        grid = size // g.patch_size
        too_big = [k for k in pixel.window_sizes if k > grid]
        if too_big:
            problems.append(f"pixel.window_sizes {list(pixel.window_sizes)}: windows of {too_big} patches do not "
                            "fit the "
                            f"{grid} x {grid} patch grid of {model} at {size} px (at most {grid})")
    return [p for p in problems if p]


def shape_error(spec: Any, problems: list[str]) -> str:
    """The message of a command refused by :func:`model_problems` (one problem per line)."""
    lines = "\n".join(f"  {p}" for p in problems)
    return f"the spec does not fit its models (clip.model {spec.clip.model}); nothing was started:\n{lines}"


def layout_problem(layout: str) -> str | None:
    """Why ``layout`` (a ``--layout`` option) cannot be used: it is neither ``auto`` nor a registered
    dataset layout. None when it can."""
    from pipeline.io.layouts import LAYOUTS

    if layout not in LAYOUTS:
        return f"--layout {layout!r} is not one of {', '.join(LAYOUTS)}"
    return None


def spec_problem(spec: Any, storage: Any = None, *, objects: bool = False) -> str | None:
    """The first reason ``spec`` (a JobSpec or a TrainSpec) cannot run, as ``key: reason``; None when
    none is found. The one check of ``zsad validate``, ``zsad submit``, ``zsad run`` and the run's
    driver, made before anything starts, in this order: the model name and pretrained tag against
    open_clip's registry (:func:`pipeline.models.registry.check_model`); the settings that depend on
    the model's shape (:func:`model_problems`, before any weights are looked up: one message, a
    problem per line); the weight files the job uses (local files must exist); the prompt files
    (local files must parse); the job's plan (:func:`pipeline.stages.plan.build_plan`).

    ``objects``: as a run's driver checks before Ray starts: also look up the weights and prompt
    files given by URI (with ``storage``), and read the structure of local torch checkpoints
    (``clip.weights``, CLIPSeg's ``pixel.weights``; tensors mapped, not read), so an unusable file
    is refused here with its reason instead of in every model actor. Without it (``zsad validate``,
    ``zsad submit``) objects are left to the run: the cluster, not this machine, has to reach them."""
    from pipeline.io.weights import WeightsError, preflight

    tag = spec.clip.weights.tag if spec.clip.weights else None
    for key, checked_tag in (("clip.model", None), ("clip.weights", tag)):
        try:
            registry.check_model(spec.clip.model, checked_tag)
        except registry.ModelLoadError as exc:
            return f"{key}: {exc}"
    problems = model_problems(spec)
    if problems:
        return shape_error(spec, problems)
    sam = spec.uses_sam() if hasattr(spec, "uses_sam") else False
    files = {"clip.weights": spec.clip.weights,
             "sam.weights": spec.sam.weights if sam and getattr(spec, "sam", None) else None,
             "foreground.dis_model": spec.foreground.dis_model if sam and getattr(spec, "foreground", None) else None,
             "pixel.weights": getattr(getattr(spec, "pixel", None), "weights", None),
             "adapters.weights": getattr(getattr(spec, "adapters", None), "weights", None)}
    for key, weights in files.items():
        if weights is not None and (weights.path or objects):
            try:
                preflight(weights, storage)
            except WeightsError as exc:
                return f"{key}: {exc}"
    from pipeline.stages.clip_score import prompt_file_problem

    problem = prompt_file_problem(spec, storage, objects=objects)
    if problem:
        return problem
    problem = _plan_problem(spec, storage)
    if problem:
        return problem
    return _checkpoint_problem(spec) if objects else None


def _plan_problem(spec: Any, storage: Any) -> str | None:
    """Why the plan of a JobSpec cannot be built (a stage combination the plan refuses, such as
    ``decode.device: model`` before a CPU stage), as ``plan: reason``; None for a TrainSpec."""
    if not hasattr(spec, "decode") or not hasattr(spec, "runtime"):
        return None
    from pipeline.runtime.rows import SOURCE_COLUMNS
    from pipeline.stages.plan import PlanError, build_plan

    try:
        build_plan(spec, storage, source=SOURCE_COLUMNS)
    except PlanError as exc:
        return f"plan: {exc}"
    return None


def _checkpoint_problem(spec: Any) -> str | None:
    """A local torch checkpoint (``clip.weights``, CLIPSeg's ``pixel.weights``) that cannot be read
    (SAM's and the adapters' files are read by :func:`model_problems`)."""
    pixel = getattr(spec, "pixel", None)
    files = {"clip.weights": (spec.clip.weights, "weights file"),
             "pixel.weights": (pixel.weights if getattr(pixel, "kind", None) == "clipseg" else None,
                               "CLIPSeg weights file")}
    for key, (weights, what) in files.items():
        if weights is not None and weights.path:
            from pipeline.models.checkpoints import read_state_dict  # torch: only when there is a file to read

            try:
                read_state_dict(weights.path, what=what, error=registry.ModelLoadError, mmap=True)
            except registry.ModelLoadError as exc:
                return f"{key}: {exc}"
    return None
