"""open_clip's model names, pretrained tags and vision-tower geometry, known without importing open_clip.

Importing open_clip imports torch and torchvision: about five seconds on the project's machines.
The driver of ``zsad run``, ``train`` and ``validate`` checks a spec's model name and tag before
anything starts (and the settings that depend on the model's shape: :mod:`pipeline.runtime.preflight`),
and needs nothing else from open_clip; so the registry (every model open_clip knows, zsad's own
configs included, with its pretrained tags and, for a plain ViT, the depth, width, patch size and
native input size of its vision tower, read from the model's config) is read from open_clip once and kept
in a small JSON file in zsad's cache folder (``$ZSAD_CACHE_DIR``, default ``~/.cache/zsad``; the
weights cache is beside it), named by open_clip's installed version and zsad's config files. Another
open_clip version or another config file is another name, so a stale registry is never read. Where
that folder cannot be written, open_clip is imported every time (slower, same answer).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ZsadError
from pipeline.io.atomic import write_atomic

CONFIG_DIR = Path(__file__).with_name("configs")  # zsad's own open_clip configs (zsad-tiny)
TINY_MODEL = "zsad-tiny"


class ModelLoadError(ZsadError, RuntimeError):
    """A model that cannot be built or whose weights do not load; the message says why."""

    exit_code = 2


#: the layout of the cached file; another layout is another file name
_FORMAT = 2


@dataclass(frozen=True)
class VisionGeometry:
    """An open_clip vision tower as zsad's ViT walkers see it (:mod:`pipeline.models.vit`), from the
    model's config without building it: ``layers`` residual blocks of ``width``, ``patch_size``-pixel
    patches, a native input of ``image_size`` pixels (its patch grid ``image_size // patch_size``),
    joint embedding ``embed_dim``. ``walkable``: a plain ViT with class-token pooling (no attention
    pooling), which pixel maps, mutual scoring and adapters need; otherwise ``why`` says what it is."""

    walkable: bool
    why: str = ""
    layers: int = 0
    width: int = 0
    patch_size: int = 0
    image_size: int = 0
    embed_dim: int = 0

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size if self.patch_size else 0


def _geometry(config: dict | None) -> dict:
    """The cached form of :class:`VisionGeometry` for one open_clip model config."""
    vision = (config or {}).get("vision_cfg") or {}
    if not vision:
        return {"walkable": False, "why": "no vision tower config"}
    if vision.get("timm_model_name"):
        return {"walkable": False, "why": f"a timm vision tower ({vision['timm_model_name']})"}
    layers = vision.get("layers")
    if not isinstance(layers, int):
        return {"walkable": False, "why": "a ResNet vision tower"}
    if vision.get("attentional_pool") or vision.get("pool_type", "tok") != "tok" or vision.get("final_ln_after_pool"):
        return {"walkable": False, "why": "a ViT without class-token pooling"}
    size, patch = vision.get("image_size", 224), vision.get("patch_size", 16)
    size = size[0] if isinstance(size, (list, tuple)) else size
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    return {
        "walkable": True,
        "layers": layers,
        "width": int(vision.get("width", 768)),
        "patch_size": int(patch),
        "image_size": int(size),
        "embed_dim": int(config.get("embed_dim", 0)),
    }


def _cache_file() -> Path:
    configs = hashlib.sha256()
    for path in sorted(CONFIG_DIR.glob("*.json")):
        configs.update(path.name.encode() + b"\0" + path.read_bytes())
    version = importlib.metadata.version("open_clip_torch")
    root = Path(os.environ.get("ZSAD_CACHE_DIR") or "~/.cache/zsad").expanduser()
    return root / f"open_clip-{version}-{configs.hexdigest()[:16]}-v{_FORMAT}.json"


def register_configs():
    """open_clip, with zsad's own configs (``zsad-tiny``) registered. Imported on first use, not
    with this module: importing open_clip takes seconds (torch, torchvision), which the driver of
    a run does not need. Idempotent."""
    import open_clip

    if TINY_MODEL not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)
    return open_clip


def _from_open_clip() -> dict[str, dict]:
    open_clip = register_configs()
    names = open_clip.list_models()
    return {
        "models": {name: list(open_clip.list_pretrained_tags_by_model(name)) for name in names},
        "vision": {name: _geometry(open_clip.get_model_config(name)) for name in names},
    }


def _known() -> dict[str, dict]:
    """The cached registry: ``{"models": {name: tags}, "vision": {name: geometry}}``."""
    path = _cache_file()
    with contextlib.suppress(OSError, ValueError):
        known = json.loads(path.read_text())
        if (
            isinstance(known, dict)
            and isinstance(known.get("models"), dict)
            and known["models"]
            and isinstance(known.get("vision"), dict)
        ):
            return known
    known = _from_open_clip()
    with contextlib.suppress(OSError):
        write_atomic(str(path), json.dumps(known).encode())
    return known


def models() -> dict[str, list[str]]:
    """Every model name open_clip knows (zsad's configs included) -> its pretrained tags."""
    return _known()["models"]


def vision(model: str) -> VisionGeometry | None:
    """The vision tower of ``model`` (None for a name open_clip does not know)."""
    found = _known()["vision"].get(model)
    return None if found is None else VisionGeometry(**found)


def check_model(model: str, tag: str | None = None) -> None:
    """Raise :class:`ModelLoadError` unless ``model`` is in open_clip's registry and ``tag``, when
    given, is one of its pretrained tags. Weight files are not checked."""
    known = models()
    if model not in known:
        close = [m for m in known if m.lower().startswith(model.lower()[:5])][:8]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ModelLoadError(f"unknown open_clip model {model!r}{hint}")
    if tag and tag not in known[model]:
        tags = known[model]
        raise ModelLoadError(
            f"open_clip has no pretrained tag {tag!r} for {model} (known: {', '.join(tags) or 'none'})"
        )
