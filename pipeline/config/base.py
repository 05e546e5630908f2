"""The shared parts of the spec models: :class:`SpecError`, the frozen base model that rejects unknown
keys (:class:`SpecModel`), the weights spec every model section uses, and small helpers."""

from __future__ import annotations

import os
import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from pipeline.errors import ZsadError


class SpecError(ZsadError, ValueError):
    """A job spec that cannot be used; the message names the file and the offending key (exit 2)."""

    exit_code = 2


#: a per-node cache folder (``weights_cache`` of job and training specs), ``~`` expanded
CacheDir = Annotated[str | None, AfterValidator(lambda v: os.path.expanduser(v) if v else v)]


class SpecModel(BaseModel):
    """The base of every spec model: frozen, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")


URI_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


def file_location(text: str) -> dict[str, str]:
    """A file named by one string: ``{"uri": ...}`` when it has a scheme (``file://`` is a path),
    else ``{"path": ...}``."""
    if text.startswith("file://"):
        return {"path": text[len("file://") :]}
    return {"uri": text} if URI_RE.match(text) else {"path": text}


def exactly_one_of(model: BaseModel, keys: tuple[str, ...], what: str) -> None:
    given = [k for k in keys if getattr(model, k)]
    if len(given) != 1:
        raise ValueError(f"{what} needs exactly one of {', '.join(keys)} (got {given or 'none'})")


class WeightsSpec(SpecModel):
    """Where model weights come from.

    Exactly one of ``tag`` (an open_clip pretrained tag such as ``laion400m_e31``), ``path``
    (a local checkpoint file) or ``uri`` (``s3://``, ``gs://``, ``https://``... fetched once per
    node into the weights cache) is set. ``sha256`` is checked for ``path`` and ``uri``.

    In YAML a plain string is accepted: a string with a URI scheme is a ``uri``, one that looks like
    a file (contains a path separator or ends in .pt/.pth/.bin/.ckpt/.safetensors) is a ``path``,
    anything else is an open_clip pretrained ``tag``.
    """

    tag: str | None = None
    path: str | None = None
    uri: str | None = None
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            looks_like_file = os.sep in text or "/" in text or text.lower().endswith(_WEIGHT_SUFFIXES)
            if not URI_RE.match(text) and not looks_like_file:
                return {"tag": text}
            return file_location(text)
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> "WeightsSpec":
        exactly_one_of(self, ("tag", "path", "uri"), "a weights spec")
        if self.tag and self.sha256:
            raise ValueError("sha256 applies to path or uri weights, not to an open_clip pretrained tag")
        return self

    def describe(self) -> str:
        """A short human-readable form stored in every output row (``tag:x``, ``path:x``, ``uri:x``)."""
        if self.tag:
            return f"tag:{self.tag}"
        if self.path:
            return f"path:{self.path}"
        return f"uri:{self.uri}"


def redacted_data(spec: BaseModel) -> dict[str, Any]:
    """``spec`` as plain data with the storage credentials replaced by ``***`` (run.json, _plan.json)."""
    data = spec.model_dump(mode="json")
    for key in ("access_key_id", "secret_access_key"):
        if data["storage"].get(key):
            data["storage"][key] = "***"
    return data
