"""open_clip's model names and pretrained tags, known without importing open_clip.

Importing open_clip imports torch and torchvision: about five seconds on the project's machines.
The driver of ``zsad run``, ``train`` and ``validate`` checks a spec's model name and tag before
anything starts, and needs nothing else from open_clip; so the registry (every model open_clip
knows, zsad's own configs included, with its pretrained tags) is read from open_clip once and kept
in a small JSON file in zsad's cache folder (``$ZSAD_CACHE_DIR``, default ``~/.cache/zsad``; the
weights cache is beside it), named by open_clip's installed version and zsad's config files. Another open_clip version or another config file is
another name, so a stale registry is never read. Where that folder cannot be written, open_clip is
imported every time (slower, same answer).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import tempfile
from pathlib import Path

CONFIG_DIR = Path(__file__).with_name("configs")  # zsad's own open_clip configs (zsad-tiny)


class ModelLoadError(RuntimeError):
    """A model that cannot be built or whose weights do not load; the message says why."""


def _cache_file() -> Path:
    configs = hashlib.sha256()
    for path in sorted(CONFIG_DIR.glob("*.json")):
        configs.update(path.name.encode() + b"\0" + path.read_bytes())
    version = importlib.metadata.version("open_clip_torch")
    root = Path(os.environ.get("ZSAD_CACHE_DIR") or "~/.cache/zsad").expanduser()
    return root / f"open_clip-{version}-{configs.hexdigest()[:16]}.json"


def _from_open_clip() -> dict[str, list[str]]:
    from pipeline.models.clip import register_configs  # open_clip, with zsad's configs in its registry

    open_clip = register_configs()
    return {name: list(open_clip.list_pretrained_tags_by_model(name)) for name in open_clip.list_models()}


def models() -> dict[str, list[str]]:
    """Every model name open_clip knows (zsad's configs included) -> its pretrained tags."""
    path = _cache_file()
    with contextlib.suppress(OSError, ValueError):
        known = json.loads(path.read_text())
        if isinstance(known, dict) and known:
            return known
    known = _from_open_clip()
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".open_clip-", suffix=".json")
        with os.fdopen(fd, "w") as fh:
            json.dump(known, fh)
        os.replace(tmp, path)
    return known


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
        raise ModelLoadError(f"open_clip has no pretrained tag {tag!r} for {model} (known: {', '.join(tags) or 'none'})")
