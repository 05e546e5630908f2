"""Typed job specification.

A job spec is a YAML file validated into :class:`JobSpec` (pydantic v2, frozen, unknown keys
rejected). ``--set dotted.key=value`` overrides are applied to the raw YAML mapping before
validation, so an override of a misspelled key fails exactly like the same key in the file.

Every field has a documented default; ``zsad validate JOB...`` checks files without running them.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class SpecError(ValueError):
    """A job spec that cannot be used; the message names the file and the offending key."""


#: a per-node cache folder (``weights_cache`` of job and training specs), ``~`` expanded
CacheDir = Annotated[str | None, AfterValidator(lambda v: os.path.expanduser(v) if v else v)]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------

_URI_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


def _file_location(text: str) -> dict[str, str]:
    """A file named by one string: ``{"uri": ...}`` when it has a scheme (``file://`` is a path),
    else ``{"path": ...}``."""
    if text.startswith("file://"):
        return {"path": text[len("file://") :]}
    return {"uri": text} if _URI_RE.match(text) else {"path": text}


def _one_of(model: BaseModel, keys: tuple[str, ...], what: str) -> None:
    given = [k for k in keys if getattr(model, k)]
    if len(given) != 1:
        raise ValueError(f"{what} needs exactly one of {', '.join(keys)} (got {given or 'none'})")


class WeightsSpec(_Model):
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
            if not _URI_RE.match(text) and not (os.sep in text or "/" in text or text.lower().endswith(_WEIGHT_SUFFIXES)):
                return {"tag": text}
            return _file_location(text)
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> "WeightsSpec":
        _one_of(self, ("tag", "path", "uri"), "a weights spec")
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


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


class StorageSpec(_Model):
    """Object-storage access. Unset fields fall back to the standard AWS environment variables
    (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION), then to the
    usual botocore chain (instance profile...). ``anon`` reads public buckets without credentials."""

    endpoint_url: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    region: str | None = None
    anon: bool = False


class DataSpec(_Model):
    """How the input is listed.

    ``layout``: ``auto`` (detect), ``folder``, ``mvtec`` or ``manifest``. ``category``: force one
    category for every image of a ``folder`` input (default: the first sub-folder under the input,
    or the input folder's own name for files directly in it). ``extensions``: image file endings
    listed by ``folder``/``mvtec`` (case-insensitive). ``categories``: keep only the images of these
    categories (an unknown one is an error listing the available ones). ``max_images``: keep only the first N listed
    images (sorted by URI), for trials."""

    layout: Literal["auto", "folder", "mvtec", "manifest", "visa", "visa_1cls", "mpdd", "btad"] = "auto"
    category: str | None = None
    categories: tuple[str, ...] | None = None  # keep only these categories (after listing); None = all
    extensions: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
    max_images: int | None = Field(default=None, ge=1)


class DecodeSpec(_Model):
    """Decode stage: bytes -> RGB uint8. ``max_pixels`` guards against decompression bombs (an image
    whose header declares more pixels fails with error_type ``DecompressionBomb`` before any pixel
    is decoded). Default: Pillow's own limit, 89,478,485 pixels (about 9459 x 9459)."""

    max_pixels: int = Field(default=89_478_485, ge=1)


class StageResources(_Model):
    """Resources of one pipeline stage. CPU stages run as Ray tasks; model stages as an actor pool of
    ``min_actors``..``max_actors`` actors. ``num_gpus`` may be fractional. ``memory`` in bytes is a
    scheduling reservation (Ray's ``memory`` resource), not a hard limit."""

    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)
    batch_size: int = Field(default=16, ge=1)
    min_actors: int = Field(default=1, ge=1)
    max_actors: int = Field(default=1, ge=1)
    memory: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _pool(self) -> "StageResources":
        if self.max_actors < self.min_actors:
            raise ValueError(f"max_actors ({self.max_actors}) is below min_actors ({self.min_actors})")
        return self


class RetrySpec(_Model):
    """Retries of transient failures (connection reset, timeout, throttling, HTTP 429/5xx; see
    :func:`pipeline.io.retry.is_transient`). ``read``: extra attempts to fetch one image's bytes before
    the row becomes an error row. ``model_load``: extra attempts to fetch and load a model in a model
    actor before the stage (and the run) fails. Waits start at ``backoff_s`` and double, capped at
    ``max_backoff_s``. Permanent errors (missing file, access denied, sha256 mismatch, bad
    checkpoint) are never retried. Lost nodes and crashed workers are retried by Ray itself."""

    read: int = Field(default=3, ge=0)
    model_load: int = Field(default=3, ge=0)
    backoff_s: float = Field(default=1.0, ge=0)
    max_backoff_s: float = Field(default=30.0, ge=0)


class ResourcesSpec(_Model):
    """One section per pipeline stage (``resources.<stage>``), each a :class:`StageResources`.
    Task stages (decode, tiling, aggregate, encode; foreground without SAM) run as CPU tasks and
    never ask for GPUs; actor stages (clip_score; foreground with SAM) use ``num_gpus`` and the pool
    size."""

    decode: StageResources = StageResources(num_cpus=1, batch_size=32)
    foreground: StageResources = StageResources(num_cpus=1, batch_size=4)
    sam_refine: StageResources = StageResources(num_cpus=1, batch_size=4)
    tiling: StageResources = StageResources(num_cpus=1, batch_size=32)
    clip_score: StageResources = StageResources(num_cpus=1, batch_size=16)
    aggregate: StageResources = StageResources(num_cpus=1, batch_size=32)
    encode: StageResources = StageResources(num_cpus=1, batch_size=32)


Precision = Literal["auto", "fp32", "bf16", "fp16"]


class ClipSpec(_Model):
    """The CLIP backbone. ``model``: an open_clip model name (``zsad-tiny`` is a tiny config zsad
    registers for tests and the offline demo). ``weights``: a weights spec, or ``null`` for random
    initialisation (needs top-level ``allow_random_weights: true``). ``image_size``: input side in
    pixels (default: the model's own). ``precision``: ``auto`` (default: fp32 on a CPU worker, bf16 on
    a GPU that supports it), ``fp32``, ``bf16`` or ``fp16`` (GPU only; a CPU worker runs fp32): the
    image tower's forward passes run under autocast in that precision with fp32 weights; text
    embeddings, similarities, logits and maps stay fp32 (:mod:`pipeline.models.precision`; the
    deviation per method is in BENCHMARKS.md).
    ``cpu_int8``: on CPU workers, quantise the vision tower's MLP linear layers to int8 (dynamic
    quantisation) for speed; scores and maps deviate slightly from fp32 (measured in BENCHMARKS.md).
    ``resize``: how an image is squashed to the model's input size(s), bicubic either way:
    ``torch`` (default; torch's antialiased bicubic on float pixels, as anomalib's WinCLIP) or
    ``pil`` (PIL's bicubic on the 8-bit image, rounded back to 8 bits, as torchvision's ``Resize``
    on a PIL image in FADE's data loader).
    ``activation``: the activation of every transformer MLP, ``quick_gelu`` or ``gelu``; ``null``
    (default) keeps the model's own. APRIL-GAN's released adapters were trained on ViT-L-14-336
    built with ``gelu`` although OpenAI's weights were trained with QuickGELU: ``gelu`` reproduces it.
    """

    model: str
    weights: WeightsSpec | None
    image_size: int | None = Field(default=None, ge=16)
    precision: Precision = "auto"
    cpu_int8: bool = False
    resize: Literal["torch", "pil"] = "torch"
    activation: Literal["quick_gelu", "gelu"] | None = None


PromptSetName = Literal["winclip", "winclip_anomalib", "april_gan", "vvv", "zsad_agnostic"]


class PromptFileSpec(_Model):
    """A prompt file the user supplies, in FADE's JSON layout: ``{"normal": {"prompts": [...]},
    "abnormal": {"prompts": [...]}}`` (or plain lists under ``normal`` and ``abnormal``); sentences
    may hold ``{classname}`` for the object name. Exactly one of ``path`` (local) or ``uri``
    (``s3://``... fetched once per node into the weights cache); ``sha256`` is checked when given.
    A plain string is a ``uri`` when it has a scheme, else a ``path``."""

    path: str | None = None
    uri: str | None = None
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return _file_location(value.strip()) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _exactly_one(self) -> "PromptFileSpec":
        _one_of(self, ("path", "uri"), "a prompt file")
        return self

    @property
    def location(self) -> str:
        return self.path or self.uri or ""

    def as_weights(self) -> "WeightsSpec":
        """The same file as a :class:`WeightsSpec`, to reuse its fetching and digest check."""
        return WeightsSpec(path=self.path, uri=self.uri, sha256=self.sha256)


def _check_wrapper(value: str | None) -> str | None:
    """A sentence wrapper holds exactly one ``{}`` (the sentence) and no other braces."""
    if value is None:
        return value
    if value.count("{}") != 1 or "{" in value.replace("{}", "") or "}" in value.replace("{}", ""):
        raise ValueError(f"wrapper {value!r} must hold exactly one '{{}}' (the sentence) and no other braces")
    return value
Aggregation = Literal["mean_raw", "mean_norm", "mean_norm_renorm", "per_prompt"]


class ObjectNameSpec(_Model):
    """How a category becomes the object name in prompts: ``raw`` folder name, ``underscore``
    (``_`` -> space, the default) or ``mapping`` (the built-in table for MVTec/VisA names, e.g.
    pcb1 -> "printed circuit board", then underscores). ``overrides`` maps category -> name and wins
    over the policy."""

    policy: Literal["raw", "underscore", "mapping"] = "mapping"
    overrides: dict[str, str] = Field(default_factory=dict)


def _describe_prompts(sets: list[str], files: tuple[PromptFileSpec, ...]) -> str:
    return "+".join([*sets, *(f"file:{f.location.rstrip('/').rsplit('/', 1)[-1]}" for f in files)])


class ZeroShotImageScore(_Model):
    """Zero-shot image-level score from prompts (METHODS.md sections 1-2), the scorer of every
    preset: a prompt ensemble (``prompt_set``: WinCLIP's compositional one, APRIL-GAN's, VVV's or
    zsad's), aggregated into two text embeddings per category, softmax over [normal, anomalous]
    cosines / tau. The ``kind`` keeps its historical name ``winclip_zero_shot`` (it is stored in
    the scores table's ``score_method``). ``prompt_files``: sentence files the user supplies
    (:class:`PromptFileSpec`), used after the set's sentences (``prompt_set: null`` for the files
    alone). ``wrapper``: a template applied to every sentence, e.g. ``"a photo of a {}."``, which is
    what FADE's text encoder (GEM's ``encode_text``) does to each of its sentences."""

    kind: Literal["winclip_zero_shot"] = "winclip_zero_shot"
    prompt_set: PromptSetName | None = "winclip"
    prompt_files: tuple[PromptFileSpec, ...] = ()
    wrapper: str | None = None
    aggregation: Aggregation = "mean_norm_renorm"
    temperature: float = Field(default=0.01, gt=0)
    object_names: ObjectNameSpec = ObjectNameSpec()

    @field_validator("wrapper")
    @classmethod
    def _wrapper(cls, value: str | None) -> str | None:
        return _check_wrapper(value)

    @model_validator(mode="after")
    def _some_prompts(self) -> "ZeroShotImageScore":
        if self.prompt_set is None and not self.prompt_files:
            raise ValueError("score needs prompts: a prompt_set, prompt_files, or both")
        return self

    def describe_prompts(self) -> str:
        """The prompts in one word for the tables' ``prompt_set`` column: the set's name and the
        files' names, joined by ``+`` (``winclip``, ``winclip+file:extra.json``)."""
        return _describe_prompts([self.prompt_set] if self.prompt_set else [], self.prompt_files)


class MutualImageScore(_Model):
    """MuSc's image score (MUSC.md section 5.1; needs ``pixel.kind: mutual``): the maximum of the
    image's mutual map at the model's input size, no prompts. With ``mutual.rscin`` the run's
    ``score`` becomes the RsCIN re-score (``mutual.score``)."""

    kind: Literal["mutual"] = "mutual"

    @property
    def prompt_files(self) -> tuple[()]:
        return ()

    def describe_prompts(self) -> str:
        return "none"


ScoreSpec = Annotated[Union[ZeroShotImageScore, MutualImageScore], Field(discriminator="kind")]


class NoPixelMap(_Model):
    """No pixel map: image-level scores only (no ``masks/`` rows are written)."""

    kind: Literal["none"] = "none"


class WinclipWindows(_Model):
    """WinCLIP zero-shot pixel map (METHODS.md section 3): windows of ``window_sizes`` patches at
    stride 1 scored with the image-level prompts (``score`` section), harmonic mean per patch,
    scales fused harmonically with the image score when ``fuse_image_score``."""

    kind: Literal["winclip_windows"] = "winclip_windows"
    window_sizes: tuple[int, ...] = (2, 3)
    fuse_image_score: bool = True

    @field_validator("window_sizes")
    @classmethod
    def _sizes(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(k < 1 for k in value):
            raise ValueError("window_sizes needs at least one size >= 1")
        return value


class FadeZeroShot(_Model):
    """FADE zero-shot maps (METHODS.md section 3): GEM language maps at ``scales`` (input sizes in
    pixels) averaged on a ``grid`` x ``grid`` map, the zero-shot vision map (2nd nearest neighbour
    among the image's own patches, 0.5 * (1 - cos), times ``vision_multiplier``), fused as
    (1 - ``vision_weight``) * language + ``vision_weight`` * vision, clipped to [0, 1].
    The language map uses ``prompt_sets`` and ``prompt_files`` (:class:`PromptFileSpec`; FADE's own
    LLM-written lists when the user has them) with the object name ``object_name``
    (object-agnostic), each sentence wrapped by ``wrapper`` when set (FADE: ``"a photo of a {}."``),
    text aggregation ``aggregation`` and ``temperature``; GEM runs on the last ``gem_depth`` blocks.
    ``vision_features``: the patch features of the vision map, ``gem`` (FADE's published zero-shot
    setting) or ``clip`` (the plain final patch tokens; FADE's few-shot setting)."""

    kind: Literal["fade_zero_shot"] = "fade_zero_shot"
    scales: tuple[int, ...] = (240, 448, 896)
    grid: int = Field(default=56, ge=1)
    gem_depth: int = Field(default=6, ge=1)
    vision_multiplier: float = Field(default=80.0, ge=0)
    vision_weight: float = Field(default=0.5, ge=0, le=1)
    vision_features: Literal["gem", "clip"] = "gem"
    prompt_sets: tuple[PromptSetName, ...] = ("winclip", "zsad_agnostic")
    prompt_files: tuple[PromptFileSpec, ...] = ()
    wrapper: str | None = None
    object_name: str = "object"
    aggregation: Aggregation = "mean_norm"
    temperature: float = Field(default=0.01, gt=0)

    @field_validator("wrapper")
    @classmethod
    def _wrapper(cls, value: str | None) -> str | None:
        return _check_wrapper(value)

    @model_validator(mode="after")
    def _some_prompts(self) -> "FadeZeroShot":
        if not self.prompt_sets and not self.prompt_files:
            raise ValueError("pixel needs prompts: prompt_sets, prompt_files, or both")
        return self

    @field_validator("scales")
    @classmethod
    def _scales(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(s < 16 for s in value):
            raise ValueError("scales needs at least one input size >= 16 pixels")
        return value


class ClipSegMaps(_Model):
    """CLIPSeg pixel localiser (VVV, METHODS.md section 5): the transformers CLIPSeg model with the
    18 object-agnostic localising prompts (``prompts: null``) or a given list, per-prompt sigmoid
    maps combined by the harmonic mean. ``weights``: a weights spec for a CLIPSeg state-dict file
    (``rd64-refined`` architecture), or ``null`` for random initialisation (needs
    ``allow_random_weights: true``). Needs the optional extra ``pip install 'zsad[clipseg]'``."""

    kind: Literal["clipseg"] = "clipseg"
    arch: Literal["rd64-refined", "tiny"] = "rd64-refined"
    weights: WeightsSpec | None = None
    prompts: tuple[str, ...] | None = None


def _block_numbers(value: tuple[int, ...]) -> tuple[int, ...]:
    """``layers`` of a pixel method: 1-indexed block numbers, increasing, without repeats."""
    if not value or any(v < 1 for v in value) or list(value) != sorted(set(value)):
        raise ValueError("layers needs block numbers >= 1 (1-indexed), increasing, without repeats")
    return value


class AprilGanAdapters(_Model):
    """APRIL-GAN adapter maps (METHODS.md section 3): the raw residual outputs of blocks ``layers``
    (1-indexed, class token dropped) at an input of ``image_size`` pixels, one trained linear adapter
    per layer into the joint space, softmax(100 * cos) against the image score's two text vectors
    (the ``score`` section: APRIL-GAN uses the same text for both) after bilinear upsampling to the
    map size; the map is the SUM over the layers, stored on the fixed range [0, len(layers)]. The
    image score uses the class embedding of the same forward pass (at ``image_size``).
    ``weights``: the adapters, a weights spec for zsad's safetensors file (``zsad train``) or the
    authors' released ``.pth`` (``mvtec_pretrained.pth``, ``visa_pretrained.pth``); ``null`` is
    random initialisation (needs ``allow_random_weights: true``)."""

    kind: Literal["april_gan"] = "april_gan"
    layers: tuple[int, ...] = (6, 12, 18, 24)
    image_size: int = Field(default=518, ge=16)
    weights: WeightsSpec | None = None

    _layers = field_validator("layers")(classmethod(lambda cls, value: _block_numbers(value)))


class MutualMaps(_Model):
    """MuSc's mutual maps (MUSC.md sections 1-4; settings of the scoring in the ``mutual`` section):
    the raw residual-stream outputs of blocks ``layers`` (1-indexed, class token dropped, before
    ln_post) at an input of ``image_size`` pixels (a multiple of the patch size; squashed), each
    block's token map standardised as a whole, averaged over r x r neighbourhoods for r in
    ``degrees`` and L2-normalised; each patch is scored by its distance to the nearest patch of the
    other images of its category's pool (``mutual.pool_size``). The map (distances on unit vectors)
    is stored on [0, 2]."""

    kind: Literal["mutual"] = "mutual"
    layers: tuple[int, ...] = (6, 12, 18, 24)
    image_size: int = Field(default=518, ge=16)
    degrees: tuple[int, ...] = (1, 3, 5)

    _layers = field_validator("layers")(classmethod(lambda cls, value: _block_numbers(value)))

    @field_validator("degrees")
    @classmethod
    def _degrees(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(r < 1 or r % 2 == 0 for r in value) or len(set(value)) != len(value):
            raise ValueError("degrees needs odd neighbourhood sizes >= 1 without repeats (MuSc: 1, 3, 5)")
        return value


PixelSpec = Annotated[Union[NoPixelMap, WinclipWindows, FadeZeroShot, ClipSegMaps, AprilGanAdapters, MutualMaps],
                      Field(discriminator="kind")]


class MutualSpec(_Model):
    """Mutual scoring of the input's own images (MuSc; MUSC.md; needs ``pixel.kind: mutual``).

    Per category a *pool* of images of the input is chosen deterministically (the
    ``pool_size + 1`` images with the smallest sha256 of ``seed`` and their URI; the whole category
    when it has at most ``pool_size + 1`` images), written to ``RUN/pools.parquet``; the pool's
    features are computed once per category (``RUN/pools/<category>/``: part files written by the actors and a manifest, reused on resume)
    and read by the scoring actors. Every image of the category is compared with ``P - 1`` pool
    images, P the pool's size (itself left out when it is in the pool, else the pool's last image),
    so with a whole-category pool the result is MuSc exactly. Per patch the mean of the
    ``int(interval * (P - 1))`` smallest nearest-patch distances is kept (MuSc: 0.3). A category with
    fewer than 5 usable images cannot be scored (its rows fail with ``PoolTooSmall``).

    ``rscin``: after every image is scored, MuSc's RsCIN re-scores each image with its ``k_list``
    nearest images of the category by CLIP image embedding (``score_rscin``; a k above the
    category's size counts all its images). ``k_list`` unset follows the input's layout as MuSc's
    code does: [1, 8, 9] for visa and visa_1cls, [1, 2, 3] for every other layout (MVTec AD, BTAD,
    ...); run.json records what was used. RsCIN runs as Ray tasks, one per category, a category of
    more than ``rscin_chunk`` images split into query chunks of that many rows. ``score``:
    which image score the ``score`` column holds, ``rscin`` or ``raw`` (the map's maximum). Both
    are transductive: an image's score depends on the other images of its category.
    ``query_chunk``/``pool_chunk``: patches per block of the nearest-patch search (memory per block
    = their product x 4 bytes). ``max_cached_pools``: pools a scoring actor keeps in memory.
    ``max_pool_bytes``: the most of one pool a scoring actor holds; a larger pool is read from its
    memory-mapped part files in chunks of images through the same running top-K (same results).
    ``pool_dtype``: how pools are stored, ``float32`` (exact) or ``float16`` (half the bytes on
    storage, in the node cache and in the actor; computed in float32 after reading)."""

    pool_size: int = Field(default=200, ge=4)
    seed: int = 0
    interval: float = Field(default=0.3, gt=0, le=1)
    rscin: bool = True
    k_list: tuple[int, ...] | None = None
    score: Literal["rscin", "raw"] = "rscin"
    query_chunk: int = Field(default=4096, ge=1)
    pool_chunk: int = Field(default=16384, ge=1)
    max_cached_pools: int = Field(default=2, ge=1)
    max_pool_bytes: int = Field(default=2 << 30, ge=1)
    pool_dtype: Literal["float32", "float16"] = "float32"
    rscin_chunk: int = Field(default=20000, ge=1)

    @field_validator("k_list")
    @classmethod
    def _k_list(cls, value: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if value is None:
            return None
        if not value or any(k < 1 for k in value):
            raise ValueError("k_list needs window sizes >= 1 (MuSc: [1, 2, 3], VisA [1, 8, 9])")
        return value

    @model_validator(mode="after")
    def _score_needs_rscin(self) -> "MutualSpec":
        if self.score == "rscin" and not self.rscin:
            raise ValueError("mutual.score rscin needs mutual.rscin: true (or set mutual.score: raw)")
        return self

    def windows(self, layout: str | None) -> tuple[int, ...]:
        """RsCIN's window sizes: ``k_list`` when set, else by the input's layout as MuSc's code
        chooses them ([1, 8, 9] for VisA, [1, 2, 3] otherwise)."""
        if self.k_list is not None:
            return tuple(self.k_list)
        return (1, 8, 9) if layout in ("visa", "visa_1cls") else (1, 2, 3)


#: few_shot.method -> the pixel.kind whose zero-shot map it completes (METHODS.md section 4)
FEW_SHOT_PIXEL = {"winclip": "winclip_windows", "april_gan": "april_gan", "fade": "fade_zero_shot"}


class FewShotSpec(_Model):
    """Few-shot scoring (METHODS.md section 4): ``k`` normal reference images per category, a memory
    bank of their features per category built once per run (``RUN/banks/``), and the method's
    nearest-neighbour vision map added to its zero-shot map.

    ``reference``: the reference images (``--reference`` overrides it): a folder with one
    sub-folder per category, an mvtec/visa/visa_1cls/mpdd/btad root (its train split's normal
    images) or a manifest (.csv/.parquet with ``uri``, ``category``); ``layout`` as for inputs
    (``auto`` detects). ``k`` images per category are chosen with ``seed``, without replacement
    unless ``with_replacement`` (APRIL-GAN's sampler draws with replacement); the choice is written
    to ``RUN/references.parquet``. ``missing``: a category of the input without references is an
    ``error`` (the run stops before scoring, naming them) or is scored ``zero_shot`` (its rows say
    so: ``few_shot_k`` 0). ``method``: ``winclip`` (WinCLIP+), ``april_gan`` or ``fade``; it must
    match ``pixel.kind`` (winclip_windows, april_gan, fade_zero_shot) and defaults to it.
    FADE only: ``vision_multiplier`` (3.5), ``vision_weight`` (0.85, the weight of the vision map
    in the fused map) and ``vision_features`` (``clip``: the final patch tokens, FADE's few-shot
    recipe; ``gem``: the GEM stream's), at ``pixel.scales``. ``query_chunk``/``bank_chunk``:
    rows per block of the exact nearest-neighbour search (memory per block = their product x 4
    bytes). ``max_cached_banks``: banks a scoring actor keeps in memory at once (least recently
    used go first).

    ``sampler``: how the references are drawn. ``numpy`` (default): per category its own numpy
    generator seeded from (``seed``, the category's name), so a category's choice does not depend
    on the others. ``torch_randint``: what ``torch.manual_seed(seed)`` then ``torch.randint(0, n,
    (k,))`` per category gives, one stream over the categories in alphabetical order, each
    category's candidates sorted by URI (APRIL-GAN's reference draw; with replacement, seed in
    [0, 2^32)). APRIL-GAN's test.py draws after building its models, which consumes its global
    generator first, so its own k_shot.txt can differ from this draw on the same seed.
    ``torch_shuffle``: per category, the first ``k`` images of what a shuffling torch DataLoader
    yields after ``torch.manual_seed(seed)``, candidates sorted by URI (FADE's reference draw,
    without replacement; seed in [0, 2^64))."""

    reference: str | None = None
    layout: Literal["auto", "folder", "mvtec", "visa", "visa_1cls", "mpdd", "btad", "manifest"] = "auto"
    k: int = Field(default=1, ge=1)
    seed: int = 0
    with_replacement: bool = False
    missing: Literal["error", "zero_shot"] = "error"
    method: Literal["winclip", "april_gan", "fade"] | None = None
    vision_multiplier: float = Field(default=3.5, ge=0)
    vision_weight: float = Field(default=0.85, ge=0, le=1)
    vision_features: Literal["clip", "gem"] = "clip"
    query_chunk: int = Field(default=4096, ge=1)
    bank_chunk: int = Field(default=16384, ge=1)
    max_cached_banks: int = Field(default=8, ge=1)
    sampler: Literal["numpy", "torch_randint", "torch_shuffle"] = "numpy"

    @model_validator(mode="after")
    def _torch_sampler(self) -> "FewShotSpec":
        if self.sampler == "torch_randint":
            if not self.with_replacement:
                raise ValueError("few_shot.sampler torch_randint draws with replacement (as torch.randint): set "
                                 "few_shot.with_replacement: true")
            if not 0 <= self.seed < 2**32:
                raise ValueError(f"few_shot.seed {self.seed}: torch_randint needs a seed in [0, 2^32)")
        if self.sampler == "torch_shuffle":
            if self.with_replacement:
                raise ValueError("few_shot.sampler torch_shuffle draws without replacement (a permutation): set "
                                 "few_shot.with_replacement: false")
            if not 0 <= self.seed < 2**64:
                raise ValueError(f"few_shot.seed {self.seed}: torch_shuffle needs a seed in [0, 2^64)")
        return self


class SamSpec(_Model):
    """Segment Anything (METHODS.md sections 5-6). ``model``: ``vit_h``, ``vit_l``, ``vit_b`` or
    ``tiny`` (a small SAM assembled from segment-anything's modules, for tests). ``weights``: a
    checkpoint path or URI (SAM has no pretrained tags), or ``null`` for random initialisation
    (needs ``allow_random_weights: true``). ``cpu_allocator``: on a worker where SAM runs on the
    CPU, ``keep_freed`` (default) makes glibc keep freed memory in the process
    (:func:`pipeline.models.sam.keep_freed_memory`): SAM runs faster (vit_b's encoder 1.9x; with
    smaller point batches, the automatic masks' decoder 3.5x) and the worker's resident size is
    higher (BENCHMARKS.md); ``default`` leaves glibc's settings. GPU workers are not changed.
    ``precision``: as ``clip.precision``, for SAM's image encoder (the prompt and mask decoders,
    a small part of the work, stay fp32, so masks are thresholded from fp32 logits)."""

    model: Literal["vit_h", "vit_l", "vit_b", "tiny"] = "vit_b"
    weights: WeightsSpec | None = None
    cpu_allocator: Literal["keep_freed", "default"] = "keep_freed"
    precision: Precision = "auto"

    @field_validator("weights")
    @classmethod
    def _no_tag(cls, value: WeightsSpec | None) -> WeightsSpec | None:
        if value is not None and value.tag:
            raise ValueError(f"SAM weights need a checkpoint path or URI; {value.tag!r} looks like a pretrained tag")
        return value


class SamRefineSpec(_Model):
    """SAM refinement, the CLIP-SAM prompt cascade (METHODS.md section 6), on each image's CLIP map
    brought to the image's resolution. SAM (the ``sam`` section) embeds the image once.

    - Extreme region R: ``threshold_mode`` ``fraction`` (map >= ``threshold`` x the image's max, the
      default 0.8), ``absolute`` (map >= ``threshold``) or ``quantile`` (map >= that quantile).
    - Positive points: the ``positive_points`` highest map values in R, at least ``min_distance``
      pixels apart (``squared_distance: true`` compares squared distances: the paper's "400 pixels"
      read as 20^2).
    - Negative points: in the ring dilate(R) - R (elliptical ``ring_kernel`` x ``ring_kernel``), the
      ``negative_points`` pixels whose SAM features are least similar to R's pooled feature.
    - ``steps``: 1 (points), 2 (+ the step-1 logits), 3 (+ the box of mask 2): the paper's ablation.
    - ``combine`` makes the final map from the refined mask M and the CLIP map C (range [lo, hi]):
      ``max`` (default: max(C, hi x M): refined pixels rank first, the CLIP order stays elsewhere so
      pixel AUROC keeps its meaning), ``replace`` (hi x M, lo elsewhere), ``blend``
      ((1 - ``blend_weight``) C + ``blend_weight`` hi x M) or ``gate`` (C inside M, lo outside).
    - ``score_gate``: images whose score is below it keep their CLIP map (not refined), as do images
      without a region; ``refined`` is false and ``refine_info`` says why.
    - ``multimask`` (default true): steps 2 and 3 take SAM's three masks and keep the highest
      predicted IoU (the paper's "highest-scored mask"); false: SAM's single-mask output there.
    - ``geometry``: where ``ring_kernel`` and ``min_distance`` are measured. ``sam_input``
      (default): in pixels of SAM's input (the image scaled so its long side is 1024), so the ring
      and the spacing cover the same part of any image whatever its resolution; ``image``: in the
      image's own pixels (before issue 29). ``refine_info`` records the pixel values used."""

    threshold_mode: Literal["absolute", "fraction", "quantile"] = "fraction"
    threshold: float = Field(default=0.8, ge=0)
    positive_points: int = Field(default=5, ge=1)
    negative_points: int = Field(default=5, ge=0)
    min_distance: float = Field(default=20.0, ge=0)
    squared_distance: bool = False
    ring_kernel: int = Field(default=25, ge=3)
    steps: Literal[1, 2, 3] = 3
    combine: Literal["max", "replace", "blend", "gate"] = "max"
    blend_weight: float = Field(default=0.5, ge=0, le=1)
    score_gate: float | None = None
    multimask: bool = True
    geometry: Literal["sam_input", "image"] = "sam_input"

    @field_validator("ring_kernel")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError("ring_kernel must be odd (an elliptical kernel has a centre pixel)")
        return value


class ForegroundSpec(_Model):
    """Foreground extraction (METHODS.md section 5). ``kind``:

    - ``sam_dis`` (default): SAM automatic masks (a ``points_per_side`` grid of point prompts),
      a mask kept when at least ``min_inside`` of it lies inside the foreground-probability map
      (``>= prob_threshold``); the union of kept masks is the foreground. The map comes from the
      dichotomous segmentation model ``dis_model`` (an ONNX file, run with onnxruntime) or, when
      that is ``null``, from the classical map (below).
    - ``classical``: the classical map alone, no SAM: a background colour model from the image
      border, distance to it, morphology (``pipeline/ops/foreground.py``).
    - ``none``: no foreground; every image is scored whole.

    Connected components of the foreground smaller than ``min_component_fraction`` of the image
    are dropped."""

    kind: Literal["sam_dis", "classical", "none"] = "sam_dis"
    dis_model: WeightsSpec | None = None
    dis_input_size: int = Field(default=1024, ge=16)
    min_inside: float = Field(default=0.8, gt=0, le=1)
    prob_threshold: float = Field(default=0.5, gt=0, lt=1)
    min_component_fraction: float = Field(default=0.001, ge=0, lt=1)
    points_per_side: int = Field(default=32, ge=1)
    points_per_batch: int = Field(default=64, ge=1)
    pred_iou_thresh: float = Field(default=0.88, ge=0, le=1)
    stability_score_thresh: float = Field(default=0.95, ge=0, le=1)
    box_nms_thresh: float = Field(default=0.7, gt=0, le=1)
    border: float = Field(default=0.05, gt=0, lt=0.5)


class TilingSpec(_Model):
    """Instance tiling (METHODS.md section 5): a square tile centred on each foreground component,
    side at least ``min_tile`` pixels (clipped to the image); a component whose box aspect ratio
    exceeds ``elongated_aspect`` and that holds more than ``elongated_min_parts`` SAM parts is tiled
    along its long axis with a step of half its short side. ``write_table``: write ``tiles/``.
    Tiles are scored by the CLIP stage at ``tile_map_size`` (pixel maps per tile, square)."""

    min_tile: int = Field(default=352, ge=16)
    elongated_aspect: float = Field(default=1.5, ge=1)
    elongated_min_parts: int = Field(default=20, ge=0)
    write_table: bool = True
    tile_map_size: int = Field(default=240, ge=8)


class AggregationSpec(_Model):
    """Tile aggregation (METHODS.md section 5): tile maps scaled by their tile score, pasted back,
    overlaps averaged; component score = mean of its tiles' scores; image score = mean of the top
    ``top_fraction`` of component scores (at least one)."""

    top_fraction: float = Field(default=0.25, gt=0, le=1)


class MapOutputSpec(_Model):
    """How pixel maps are stored in ``masks/``. ``map_size``: ``original`` (the decoded image's size)
    or the long side in pixels (aspect kept; default 256, enough for evaluation at the papers'
    resolution while keeping the table small). ``threshold``: when set, a binary mask (map >=
    threshold) is stored as COCO RLE."""

    map_size: Union[Literal["original"], int] = 256
    threshold: float | None = Field(default=None, ge=0, le=1)

    @field_validator("map_size")
    @classmethod
    def _size(cls, value):
        if isinstance(value, int) and value < 1:
            raise ValueError("map_size must be 'original' or a positive long side in pixels")
        return value


class ReportSpec(_Model):
    """The HTML report ``zsad run`` writes at the end of a run (``RUN/report.html``, also for a
    failed run; ``zsad report RUN`` writes it again). ``enabled``: false to skip it; ``top``: images
    shown per category, most anomalous and again nearest the threshold; ``map_range``: the heatmap
    colour scale shared by every image of the page: ``auto`` (0.5th-99.9th percentile of the shown
    maps' pixels), ``stored`` (the maps' stored range) or ``LO,HI``."""

    enabled: bool = True
    top: int = Field(default=6, ge=1, le=200)
    map_range: str = "auto"

    @field_validator("map_range")
    @classmethod
    def _range(cls, value: str) -> str:
        if value in ("auto", "stored"):
            return value
        try:
            lo, hi = (float(v) for v in value.split(","))
        except ValueError:
            raise ValueError(f"{value!r}: use auto, stored or LO,HI (two numbers, LO < HI)") from None
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise ValueError(f"{value!r}: LO,HI must be finite numbers with LO < HI")
        return value


class RuntimeSpec(_Model):
    """How the model stages share the hardware. ``fuse_models: true`` runs every model stage
    (SAM foreground, CLIP scoring, SAM refinement, and the CPU stages between them) in ONE actor
    pool, with ``resources.clip_score``'s pool size and batch size and the largest ``num_gpus`` /
    ``num_cpus`` of the fused stages: one copy of each model per GPU and no hand-over between pools,
    for small clusters (one or two GPUs) where separate pools would sit idle waiting for each other.
    The default (``false``) keeps one pool per model stage, sharing GPUs by the fractions of
    ``resources.<stage>.num_gpus`` (README "GPU execution").

    ``executor``: what runs the plan. ``ray`` (the default) streams it through Ray Data: a local Ray
    started for the command, or the cluster at ``--address``; actor pools, parallel stages, GPUs
    by request, workers on other nodes. ``local`` runs the same stages, batch by batch, in the
    command's own process without starting Ray: seconds instead of a Ray start, for a quick look at
    a few images, debugging a stage, or tests; one stage at a time, no pools, one machine.
    ``zsad run --executor`` sets it; it never changes the results, so a run may be resumed with the
    other executor."""

    fuse_models: bool = False
    executor: Literal["ray", "local"] = "ray"


class JobSpec(_Model):
    """A whole job. See ``jobs/*.yaml`` for the presets and README for every key."""

    name: str = "zsad-job"
    clip: ClipSpec
    score: ScoreSpec = ZeroShotImageScore()
    pixel: PixelSpec = NoPixelMap()
    maps: MapOutputSpec = MapOutputSpec()
    allow_random_weights: bool = False
    max_error_rate: float = Field(default=0.05, ge=0, le=1)
    shard_size: int = Field(default=1000, ge=1)
    skip_scored: str | None = None
    stall_timeout_s: float | None = Field(default=1800.0, gt=0)
    lease_timeout_s: float = Field(default=3600.0, gt=0)  # a run lease whose heartbeat is older is stale (resume may take it over)
    data: DataSpec = DataSpec()
    decode: DecodeSpec = DecodeSpec()
    storage: StorageSpec = StorageSpec()
    few_shot: FewShotSpec | None = None
    mutual: MutualSpec | None = None
    sam: SamSpec | None = None
    foreground: ForegroundSpec | None = None
    tiling: TilingSpec | None = None
    sam_refine: SamRefineSpec | None = None
    aggregation: AggregationSpec = AggregationSpec()
    resources: ResourcesSpec = ResourcesSpec()
    retries: RetrySpec = RetrySpec()
    report: ReportSpec = ReportSpec()
    runtime: RuntimeSpec = RuntimeSpec()
    weights_cache: CacheDir = None

    @model_validator(mode="before")
    @classmethod
    def _default_kinds(cls, data: Any) -> Any:
        """A per-kind section given without ``kind`` (``score: {prompt_set: vvv}``) takes the
        section's default kind, as documented."""
        if isinstance(data, dict) and isinstance(data.get("pixel"), dict) and data["pixel"].get("kind") == "mutual":
            # MuSc: its score and mutual sections follow from the pixel kind when not given
            data = {**data, "score": data.get("score") or {"kind": "mutual"},
                    "mutual": data["mutual"] if data.get("mutual") is not None else {}}
        if isinstance(data, dict):
            for section in KIND_SECTIONS:
                value = data.get(section)
                if isinstance(value, dict) and "kind" not in value:
                    data = {**data, section: {"kind": cls.model_fields[section].default.kind, **value}}
        return data

    @model_validator(mode="after")
    def _random_weights_gate(self) -> "JobSpec":
        for key in self.random_models():
            if not self.allow_random_weights:
                raise ValueError(
                    f"{key} is null, which means random initialisation; scores from random weights "
                    "are meaningless. Give a weights spec (a path or a URI; for CLIP also an open_clip "
                    "pretrained tag), or set allow_random_weights: true (tests/benchmarks only; the "
                    "run is marked random)"
                )
        return self

    @model_validator(mode="after")
    def _stages_fit(self) -> "JobSpec":
        if self.tiling is not None and self.foreground is None:
            raise ValueError("tiling needs a foreground section (foreground.kind: sam_dis, classical or none)")
        if self.foreground is not None and self.foreground.kind == "sam_dis" and self.sam is None:
            raise ValueError("foreground.kind sam_dis needs a sam section (sam.model, sam.weights)")
        if self.sam_refine is not None and self.sam is None:
            raise ValueError("sam_refine needs a sam section (sam.model, sam.weights)")
        if self.sam_refine is not None and isinstance(self.pixel, NoPixelMap):
            raise ValueError("sam_refine refines a pixel map: set pixel.kind (e.g. april_gan or fade_zero_shot)")
        if self.tiling is not None and isinstance(self.pixel, AprilGanAdapters):
            raise ValueError("pixel.kind april_gan does not run per tile yet: remove the tiling section")
        mutual = {"pixel.kind": self.pixel.kind == "mutual", "score.kind": self.score.kind == "mutual",
                  "the mutual section": self.mutual is not None}
        if any(mutual.values()) and not all(mutual.values()):
            have = ", ".join(k for k, v in mutual.items() if v)
            lack = ", ".join(k for k, v in mutual.items() if not v)
            raise ValueError(f"mutual scoring (MuSc) needs pixel.kind: mutual, score.kind: mutual and a mutual section; "
                             f"this spec has {have} but not {lack}")
        if self.mutual is not None:
            if self.few_shot is not None:
                raise ValueError("mutual scoring compares the input's own images: remove the few_shot section")
            if self.tiling is not None:
                raise ValueError("mutual scoring does not run per tile: remove the tiling section")
        if self.few_shot is not None:
            methods = {v: k for k, v in FEW_SHOT_PIXEL.items()}
            if self.pixel.kind not in methods:
                raise ValueError(f"few_shot needs a pixel method it completes (pixel.kind: {', '.join(FEW_SHOT_PIXEL.values())}); "
                                 f"pixel.kind is {self.pixel.kind}")
            if self.few_shot.method is not None and FEW_SHOT_PIXEL[self.few_shot.method] != self.pixel.kind:
                raise ValueError(f"few_shot.method {self.few_shot.method} completes pixel.kind {FEW_SHOT_PIXEL[self.few_shot.method]}, "
                                 f"but pixel.kind is {self.pixel.kind}")
            if self.tiling is not None:
                raise ValueError("few_shot does not run per tile yet: remove the tiling section")
        return self

    def few_shot_method(self) -> str | None:
        """``winclip``, ``april_gan`` or ``fade`` when the job scores few-shot, else None."""
        if self.few_shot is None:
            return None
        return self.few_shot.method or {v: k for k, v in FEW_SHOT_PIXEL.items()}[self.pixel.kind]

    def uses_sam(self) -> bool:
        return (self.foreground is not None and self.foreground.kind == "sam_dis") or self.sam_refine is not None

    def random_models(self) -> list[str]:
        """The spec keys of models that would run with random weights."""
        keys = ["clip.weights"] if self.clip.weights is None else []
        if self.uses_sam() and self.sam is not None and self.sam.weights is None:
            keys.append("sam.weights")
        if isinstance(self.pixel, (ClipSegMaps, AprilGanAdapters)) and self.pixel.weights is None:
            keys.append("pixel.weights")
        return keys

    def map_range(self) -> tuple[float, float]:
        """The fixed range the pixel maps are stored on (16-bit PNG levels, evaluation): [0, 1] for
        probabilities, [0, number of layers] for APRIL-GAN's summed layer maps ([0, 3 x layers] few-shot:
        each layer adds its nearest-neighbour distance 1 - cos, at most 2)."""
        if isinstance(self.pixel, MutualMaps):  # distances between unit vectors
            return 0.0, 2.0
        if isinstance(self.pixel, AprilGanAdapters):  # few-shot adds up to 2 (1 - cos) per layer
            return 0.0, float(len(self.pixel.layers) * (3 if self.few_shot is not None else 1))
        return 0.0, 1.0

    @property
    def random_weights(self) -> bool:
        return bool(self.random_models())

    def redacted(self) -> dict[str, Any]:
        """The resolved spec as plain data with secrets removed (for run.json)."""
        return _redacted(self)


# --------------------------------------------------------------------------------------------
# Training (zsad train)
# --------------------------------------------------------------------------------------------


def _redacted(spec: BaseModel) -> dict[str, Any]:
    data = spec.model_dump(mode="json")
    for key in ("access_key_id", "secret_access_key"):
        if data["storage"].get(key):
            data["storage"][key] = "***"
    return data


class TrainingSpec(_Model):
    """How the adapters are trained (APRIL-GAN, METHODS.md section 3): frozen CLIP; per layer focal
    (gamma 2) + binary dice loss on the layer's map, summed; Adam with ``learning_rate`` and
    ``betas``; ``batch_size`` images per step and worker; ``epochs`` passes over the data;
    ``mosaic_probability``: the chance that a training image is replaced by a 2 x 2 mosaic of four
    images of its category (with their masks); ``seed`` fixes the adapters' initialisation, the
    order and the mosaics.

    Ray Train: ``num_workers`` data-parallel workers, each asking Ray for ``resources_per_worker``
    (e.g. ``{CPU: 4, GPU: 1}``; the GPU count defaults to 1 when a GPU is used). ``use_gpu``:
    ``auto`` (default) trains on GPUs where the Ray session can have them (a cluster, or a local
    Ray with a GPU) and on the CPU of a local Ray without one, saying so; ``true`` always asks for
    GPUs (on a local Ray without one: refused at once, exit 2); ``false`` never does. On a local Ray
    a request that the machine can never satisfy is refused at once (exit 2, naming these keys); on
    a cluster the command waits for the workers, says every minute what it waits for and what the
    cluster has, and gives up after ``start_timeout_s`` seconds (exit 1). ``max_failures``: how
    many times Ray Train restarts failed workers (from the last finished epoch's checkpoint)
    before the training fails; never unbounded."""

    epochs: int = Field(default=3, ge=1)
    batch_size: int = Field(default=8, ge=1)
    learning_rate: float = Field(default=1e-3, gt=0)
    betas: tuple[float, float] = (0.5, 0.999)
    seed: int = 111
    mosaic_probability: float = Field(default=0.2, ge=0, le=1)
    num_workers: int = Field(default=1, ge=1)
    use_gpu: Union[bool, Literal["auto"]] = "auto"
    resources_per_worker: dict[str, float] = Field(default_factory=lambda: {"CPU": 1.0})
    start_timeout_s: float = Field(default=1800.0, gt=0)
    max_failures: int = Field(default=1, ge=0)

    @field_validator("resources_per_worker")
    @classmethod
    def _amounts(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {k: v for k, v in value.items() if not (v >= 0 and math.isfinite(v))}
        if bad:
            raise ValueError(f"resource amounts must be finite numbers >= 0, got {bad}")
        return value

    @model_validator(mode="after")
    def _gpu_agrees(self) -> "TrainingSpec":
        gpus = self.resources_per_worker.get("GPU")
        if self.use_gpu is False and gpus:
            raise ValueError(f"use_gpu is false but resources_per_worker asks for GPU: {gpus:g}; set use_gpu: auto "
                             "(or true), or remove GPU from resources_per_worker")
        if self.use_gpu is True and gpus == 0:
            raise ValueError("use_gpu is true but resources_per_worker has GPU: 0; set use_gpu: false, or ask for GPUs")
        return self


class TrainSpec(_Model):
    """A training job (``zsad train``): adapters for ``pixel.kind: april_gan``.

    ``clip``: the frozen backbone (with ``activation``); ``score``: the prompts whose two text
    vectors the maps are trained against (APRIL-GAN's set by default); ``adapters``: the layers and
    input size, and ``weights`` to start from (``null``: random initialisation with ``train.seed``);
    ``data``: how the labelled input is listed (a layout with masks: mvtec, visa, manifest with
    ``mask_uri``). ``allow_random_weights`` applies to CLIP's weights only."""

    name: str = "train-adapters"
    clip: ClipSpec
    score: ZeroShotImageScore = ZeroShotImageScore(prompt_set="april_gan", aggregation="mean_norm_renorm",
                                                   object_names=ObjectNameSpec(policy="raw"))
    adapters: AprilGanAdapters = AprilGanAdapters()
    train: TrainingSpec = TrainingSpec()
    allow_random_weights: bool = False
    data: DataSpec = DataSpec()
    decode: DecodeSpec = DecodeSpec()
    storage: StorageSpec = StorageSpec()
    resources: ResourcesSpec = ResourcesSpec()
    retries: RetrySpec = RetrySpec()
    weights_cache: CacheDir = None

    @model_validator(mode="after")
    def _random_weights_gate(self) -> "TrainSpec":
        if self.clip.weights is None and not self.allow_random_weights:
            raise ValueError("clip.weights is null, which means random initialisation: adapters trained on a random "
                             "CLIP are meaningless. Give a weights spec, or set allow_random_weights: true (tests only)")
        return self

    @property
    def random_weights(self) -> bool:
        return self.clip.weights is None

    def redacted(self) -> dict[str, Any]:
        return _redacted(self)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


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


#: Sections whose model is chosen by ``kind`` (a discriminated union): each kind has its own keys.
KIND_SECTIONS: tuple[str, ...] = ("score", "pixel")


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
