"""The image score: the ``score`` section (a union by ``kind``) and the prompt settings it shares with
the pixel methods."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Field, field_validator, model_validator

from pipeline.config.base import SpecModel, WeightsSpec, exactly_one_of, file_location

PromptSetName = Literal["winclip", "winclip_anomalib", "april_gan", "vvv", "zsad_agnostic"]


class PromptFileSpec(SpecModel):
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
        return file_location(value.strip()) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _exactly_one(self) -> "PromptFileSpec":
        exactly_one_of(self, ("path", "uri"), "a prompt file")
        return self

    @property
    def location(self) -> str:
        return self.path or self.uri or ""

    def as_weights(self) -> "WeightsSpec":
        """The same file as a :class:`WeightsSpec`, to reuse its fetching and digest check."""
        return WeightsSpec(path=self.path, uri=self.uri, sha256=self.sha256)


def check_wrapper(value: str | None) -> str | None:
    """A sentence wrapper holds exactly one ``{}`` (the sentence) and no other braces."""
    if value is None:
        return value
    if value.count("{}") != 1 or "{" in value.replace("{}", "") or "}" in value.replace("{}", ""):
        raise ValueError(f"wrapper {value!r} must hold exactly one '{{}}' (the sentence) and no other braces")
    return value
Aggregation = Literal["mean_raw", "mean_norm", "mean_norm_renorm", "per_prompt"]


class ObjectNameSpec(SpecModel):
    """How a category becomes the object name in prompts: ``raw`` folder name, ``underscore``
    (``_`` -> space, the default) or ``mapping`` (the built-in table for MVTec/VisA names, e.g.
    pcb1 -> "printed circuit board", then underscores). ``overrides`` maps category -> name and wins
    over the policy."""

    policy: Literal["raw", "underscore", "mapping"] = "mapping"
    overrides: dict[str, str] = Field(default_factory=dict)


def _describe_prompts(sets: list[str], files: tuple[PromptFileSpec, ...]) -> str:
    return "+".join([*sets, *(f"file:{f.location.rstrip('/').rsplit('/', 1)[-1]}" for f in files)])


class ZeroShotImageScore(SpecModel):
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
        return check_wrapper(value)

    @model_validator(mode="after")
    def _some_prompts(self) -> "ZeroShotImageScore":
        if self.prompt_set is None and not self.prompt_files:
            raise ValueError("score needs prompts: a prompt_set, prompt_files, or both")
        return self

    def describe_prompts(self) -> str:
        """The prompts in one word for the tables' ``prompt_set`` column: the set's name and the
        files' names, joined by ``+`` (``winclip``, ``winclip+file:extra.json``)."""
        return _describe_prompts([self.prompt_set] if self.prompt_set else [], self.prompt_files)


class MutualImageScore(SpecModel):
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
