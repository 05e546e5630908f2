"""The CLIP scorer of the scoring stage: zero-shot image-level score (METHODS.md sections 1-2), a
zero-shot pixel map when configured (section 3; the method of ``pixel.kind``,
:mod:`pipeline.stages.pixel_methods`) and few-shot scoring against a category's memory bank
(section 4; the strategy of the few-shot method, :mod:`pipeline.stages.fewshot_methods`).

:meth:`ClipScorer.setup` builds the model once per actor; text classifiers are computed once per
category per actor and cached; images of a batch are encoded in one forward pass. The stage that
turns rows into scored rows is :class:`pipeline.stages.clip_score.ClipScoreStage`.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

from pipeline.config import (
    AprilGanAdapters,
    ClipSegMaps,
    ClipSpec,
    FadeZeroShot,
    FewShotSpec,
    MapOutputSpec,
    NoPixelMap,
    RetrySpec,
    WinclipWindows,
    ZeroShotImageScore,
)
from pipeline.io.fs import StorageOptions
from pipeline.io.retry import retrying, stderr_log
from pipeline.io.weights import resolve
from pipeline.models.prompts import ensemble, object_name, read_prompt_file
from pipeline.ops.heatmap import map_shape
from pipeline.stages.base import LazyModule, inference_mode, model_work
from pipeline.stages.fewshot_methods import few_shot_method
from pipeline.stages.pixel_methods import pixel_method
from pipeline.stages.records import image_hw

# imported by the actors when they first use them; the driver only reads the declarations
torch = LazyModule("torch")
clip_models = LazyModule("pipeline.models.clip")
pixel_maps = LazyModule("pipeline.models.pixel")
scoring = LazyModule("pipeline.models.scoring")
precision = LazyModule("pipeline.models.precision")

ModelFactory = Callable[[], tuple]  # () -> (torch module, pipeline.models.clip.Preprocess)
#: the float columns of a scored row (``score_images``' results)
SCORE_KEYS = ("score", "score_language", "score_vision", "score_fewshot", "max_pixel_score")


def prompt_file_problem(spec, storage: StorageOptions | None = None, objects: bool = True) -> str | None:
    """The first unusable prompt file of ``spec`` (``score.prompt_files``, ``pixel.prompt_files``) as
    ``key: reason``, checked on the driver before a run: a local file must exist, match its sha256
    and parse; an object (``objects``) is only checked to exist (the actors fetch, check and parse it)."""
    from pipeline.io.weights import WeightsError, preflight
    from pipeline.models.prompts import PromptFileError

    for key, files in (("score.prompt_files", spec.score.prompt_files),
                       ("pixel.prompt_files", getattr(getattr(spec, "pixel", None), "prompt_files", ()))):
        for f in files:
            try:
                if f.path:
                    read_prompt_file(resolve(f.as_weights(), what="prompt file").path)
                elif objects:
                    preflight(f.as_weights(), storage)
            except (WeightsError, PromptFileError) as exc:
                return f"{key}: {exc}"
    return None


def pick_device(use_gpu: bool) -> torch.device:
    """The stage's device: CUDA when the stage was given a GPU and this worker has one."""
    return torch.device("cuda") if use_gpu and torch.cuda.is_available() else torch.device("cpu")



class ClipScorer:
    """CLIP's image score, pixel map and few-shot score of a batch of images (:meth:`score_images`),
    and the few-shot bank features of reference images (:meth:`bank_features`).

    ``model_factory`` (optional) returns (model, preprocess) and replaces weight resolution, for
    tests that build their own model. Its input is the few-shot banks (``banks``: category ->
    {"uri", "digest", "k", "reference_digest"}), given by the driver once they are built
    (:meth:`use_inputs`; categories without references are scored zero-shot)."""

    #: the inputs the driver hands it (:meth:`use_inputs`)
    inputs: tuple[str, ...] = ("banks",)
    #: per-row outputs beyond the scores and maps (result key -> object column) and their types
    extra_outputs: tuple[str, ...] = ()
    extra_types: Mapping[str, Any] = {}

    def __init__(
        self,
        clip: ClipSpec,
        score: ZeroShotImageScore,
        *,
        weights_cache: str | None = None,
        storage: StorageOptions | None = None,
        pixel: NoPixelMap | WinclipWindows | FadeZeroShot | ClipSegMaps | AprilGanAdapters = NoPixelMap(),
        maps: MapOutputSpec = MapOutputSpec(),
        use_gpu: bool = False,
        model_factory: ModelFactory | None = None,
        retries: RetrySpec | None = None,
        map_range: tuple[float, float] = (0.0, 1.0),
        few_shot: FewShotSpec | None = None,
        few_shot_method: str | None = None,
    ) -> None:
        self.clip = clip
        self.few_shot = few_shot
        self.few_shot_method = few_shot_method if few_shot is not None else None
        if few_shot is not None and few_shot_method is None:
            raise ValueError("few_shot needs its method (winclip, april_gan or fade)")
        self.banks: dict[str, dict] = {}
        self._bank_cache: collections.OrderedDict = collections.OrderedDict()
        self.bank_loads = 0  # banks read from storage by this actor (each category once while cached)
        self.map_range = map_range
        self.score = score
        self.pixel = pixel
        self.maps = maps
        self.weights_cache = weights_cache
        self.storage = storage
        self.use_gpu = use_gpu
        self.model_factory = model_factory
        self.retries = retries or RetrySpec()
        self.localiser = None  # CLIPSeg, when pixel.kind is clipseg
        self.adapters = None  # APRIL-GAN's adapters, when pixel.kind is april_gan
        self.model: torch.nn.Module | None = None
        self.preprocess: clip_models.Preprocess | None = None
        self.device = None  # a torch.device from setup
        self.precision = "fp32"  # clip.precision resolved for the device, from setup
        self._tokenizer = None
        self._text: dict[str, scoring.TextClassifier] = {}
        self._pixel_text: scoring.TextClassifier | None = None
        self._prompt_files: dict[str, tuple] = {}  # location -> (normal, abnormal) sentences

    @classmethod
    def from_spec(cls, spec, storage: StorageOptions | None = None) -> "ClipScorer":
        return cls(spec.clip, spec.score, weights_cache=spec.weights_cache, storage=storage, pixel=spec.pixel,
                   maps=spec.maps, retries=spec.retries, map_range=spec.map_range(), few_shot=spec.few_shot,
                   few_shot_method=spec.few_shot_method())

    def use_inputs(self, inputs: Mapping[str, Any] | None) -> None:
        """Take the driver's inputs (only the names of :attr:`inputs`; the banks)."""
        for name, value in (inputs or {}).items():
            if name in self.inputs:
                setattr(self, name, dict(value))

    @property
    def loads_column(self) -> str | None:
        """``bank_loads`` for a few-shot scorer (with ``scorer``, the actor: run.json counts loads per actor)."""
        return "bank_loads" if self.few_shot is not None else None

    def loads(self) -> int:
        return self.bank_loads

    def score_rows(self, images: list[np.ndarray], categories: list[str],
                   image_ids: list[str | None]) -> dict[str, object]:
        """The rows' results (:meth:`score_images`; the mutual scorer needs the rows' image ids)."""
        return self.score_images(images, categories)

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        if self.model is not None:
            return
        self.device = pick_device(self.use_gpu)
        # cpu_int8's quantised layers run in fp32 (CPU autocast does not apply to them)
        self.precision = "fp32" if self.clip.cpu_int8 and self.device.type == "cpu" else \
            precision.resolve(self.clip.precision, self.device)
        if self.model_factory is not None:
            model, pre = self.model_factory()
            model = model.to(self.device).eval()
        else:
            r = self.retries
            model, pre = retrying(self._load, retries=r.model_load, backoff_s=r.backoff_s,
                                  max_backoff_s=r.max_backoff_s,
                                  what=f"load {self.clip.model}", log=stderr_log)
        if self.clip.activation:
            from pipeline.models.adapters import set_activation

            set_activation(model, self.clip.activation)
        if self.clip.cpu_int8 and self.device.type == "cpu":
            model = clip_models.quantise_vision_int8(model)
        self.model, self.preprocess = model, dataclasses.replace(pre, resize=self.clip.resize)
        pixel_method(self.pixel.kind).check(self)
        self._tokenizer = clip_models.tokenizer(self.clip.model)
        for f in (*self.score.prompt_files, *getattr(self.pixel, "prompt_files", ())):
            if f.location not in self._prompt_files:
                self._prompt_files[f.location] = read_prompt_file(
                    resolve(f.as_weights(), self.weights_cache, self.storage, what="prompt file").path)
        if self.pixel.kind == "april_gan":
            self.adapters = self._load_adapters()
        if self.pixel.kind == "clipseg":
            r = self.retries
            self.localiser = retrying(self._load_clipseg, retries=r.model_load, backoff_s=r.backoff_s,
                                      max_backoff_s=r.max_backoff_s, what="load CLIPSeg", log=stderr_log)

    def _load_clipseg(self):
        from pipeline.models.clipseg import ClipSegLocaliser, build_clipseg

        p = self.pixel
        path = resolve(p.weights, self.weights_cache, self.storage).path if p.weights else None
        model = build_clipseg(path, arch=p.arch, device=self.device)
        return ClipSegLocaliser(model, prompts=list(p.prompts) if p.prompts else None, device=self.device)

    def _load_adapters(self):
        """APRIL-GAN's adapters for this backbone: a checkpoint (zsad's or the authors' format,
        shapes checked against the backbone) or, without weights, a seeded random initialisation."""
        from pipeline.models.adapters import Adapters, load_adapters

        visual = self.model.visual
        width, embed = visual.transformer.width, int(visual.output_dim)
        n = len(self.pixel.layers)
        if self.pixel.weights is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(clip_models.RANDOM_INIT_SEED)
                adapters = Adapters(width, embed, n)
        else:
            path = resolve(self.pixel.weights, self.weights_cache, self.storage, what="adapters file").path
            adapters, _ = load_adapters(path, width=width, embed=embed, n_layers=n)
        return adapters.to(self.device).eval()

    def _load(self):
        """Fetch (URI weights: once per node, cached) and build the model; transient failures are
        retried by :meth:`setup` (``retries.model_load``)."""
        weights = resolve(self.clip.weights, self.weights_cache, self.storage)
        return clip_models.build_clip(
            self.clip.model,
            tag=weights.tag,
            checkpoint=weights.path,
            cache_dir=self.weights_cache,
            image_size=self.clip.image_size,
            precision="fp32",  # weights stay fp32; the forward passes run under autocast (self.precision)
            device=self.device,
        )

    def text_classifier(self, category: str) -> scoring.TextClassifier:
        """The (normal, anomalous) text classifier of ``category``, computed once and cached."""
        cached = self._text.get(category)
        if cached is None:
            sc = self.score
            name = object_name(category, sc.object_names.policy, sc.object_names.overrides)
            normal, anomalous = ensemble((sc.prompt_set,) if sc.prompt_set else (),
                                         [self._prompt_files[f.location] for f in sc.prompt_files], name, sc.wrapper)
            raw = clip_models.encode_text(self.model, self._tokenizer, normal + anomalous, self.device)
            cached = scoring.build_classifier(raw[: len(normal)], raw[len(normal) :], self.score.aggregation)
            self._text[category] = cached
        return cached

    @inference_mode
    def pixel_text_classifier(self) -> scoring.TextClassifier:
        """FADE's object-agnostic text classifier (category-independent), computed once."""
        if self._pixel_text is None:
            p = self.pixel
            normal, anomalous = ensemble(p.prompt_sets, [self._prompt_files[f.location] for f in p.prompt_files],
                                         p.object_name, p.wrapper)
            raw = clip_models.encode_text(self.model, self._tokenizer, normal + anomalous, self.device)
            self._pixel_text = scoring.build_classifier(raw[: len(normal)], raw[len(normal) :], p.aggregation)
        return self._pixel_text

    @model_work
    def score_images(self, images: list[np.ndarray], categories: list[str],
                     map_side: int | None = None) -> dict[str, object]:
        """Score uint8 (H, W, 3) images in one batch. Returns ``score``/``score_language``/
        ``score_vision``/``score_fewshot``/``max_pixel_score`` float64 (B,), ``few_shot_k`` and
        ``reference_digest`` (lists, None without few-shot) and ``maps``: a list of float32 (H', W')
        maps (empty when the stage has no pixel method) at the stored map size, or ``map_side`` x
        ``map_side`` when given (tiles). Images of a category with a bank are scored few-shot, the
        others zero-shot."""
        if self.few_shot is None or map_side is not None:
            return self._score_zero_shot(images, categories, map_side)
        has = np.array([c in self.banks for c in categories], dtype=bool)
        if has.all():
            return self._score_few_shot(images, categories)
        if not has.any():
            out = self._score_zero_shot(images, categories)
            out["few_shot_k"] = [0] * len(images)  # no references: scored zero-shot, and the row says so
            return out
        parts = [(np.flatnonzero(has), self._score_few_shot), (np.flatnonzero(~has), self._score_zero_shot)]
        b = len(images)
        merged: dict[str, object] = {k: np.full(b, np.nan) for k in SCORE_KEYS}
        merged.update(maps=[None] * b, few_shot_k=[0] * b, reference_digest=[None] * b)
        for idx, fn in parts:
            r = fn([images[i] for i in idx], [categories[i] for i in idx])
            for j, i in enumerate(idx.tolist()):
                for key in SCORE_KEYS:
                    merged[key][i] = r[key][j]
                if r["maps"]:
                    merged["maps"][i] = r["maps"][j]
                if fn == self._score_few_shot:
                    merged["few_shot_k"][i] = r["few_shot_k"][j]
                    merged["reference_digest"][i] = r["reference_digest"][j]
        return merged

    def _tensors(self, images: list[np.ndarray]) -> list:
        return [torch.from_numpy(img if img.flags.writeable and img.flags.c_contiguous else np.array(img))
                for img in images]

    def _stored_maps(self, images, grids, map_side=None) -> tuple[list[np.ndarray], np.ndarray]:
        """Map grids (a (B, h, w) tensor, or a list of maps already at their size) -> the stored maps
        (float32, clipped to the map range) and their maxima."""
        maps: list[np.ndarray] = []
        max_pixel = np.full(len(images), np.nan)
        for i, img in enumerate(images):
            shape = (map_side, map_side) if map_side else map_shape(*image_hw(img), self.maps.map_size)
            grid = grids[i] if isinstance(grids, list) else grids[i : i + 1]  # a list: maps made at their size
            m = pixel_maps.upsample(grid.float(), shape)[0].clamp(*self.map_range)
            maps.append(m.cpu().numpy().astype(np.float32))
            max_pixel[i] = float(maps[-1].max())
        return maps, max_pixel

    def _score_zero_shot(self, images: list[np.ndarray], categories: list[str],
                         map_side: int | None = None) -> dict[str, object]:
        tensors = self._tensors(images)
        tokens = None
        method = pixel_method(self.pixel.kind)
        if method.uses_tokens:  # APRIL-GAN: the score and the layers' tokens from one pass at the adapters' size
            from pipeline.models.adapters import layer_features

            pre = dataclasses.replace(self.preprocess, size=self.pixel.image_size)
            batch = clip_models.preprocess_images(tensors, pre, device=self.device)
            dtype = next(self.model.parameters()).dtype
            feats, tokens = layer_features(self.model.visual, batch.to(dtype), self.pixel.layers)
            feats = feats.float()
        else:
            batch = clip_models.preprocess_images(tensors, self.preprocess, device=self.device)
            feats = clip_models.encode_image(self.model, batch)
        b = len(images)
        score = np.empty(b, dtype=np.float64)
        vision = np.full(b, np.nan)
        cats = np.asarray(categories, dtype=object)
        groups = {cat: np.flatnonzero(cats == cat) for cat in dict.fromkeys(categories)}
        for cat, idx in groups.items():
            probs = scoring.anomaly_probability(feats[idx], self.text_classifier(cat), self.score.temperature)
            score[idx] = probs.double().cpu().numpy()
        if tokens is not None:
            batch = tokens  # APRIL-GAN's maps are made from the layers' tokens
        grids, vision_score = method.grids(self, images, tensors, batch, score, groups, map_side)
        if vision_score is not None:
            vision = vision_score
        maps: list[np.ndarray] = []
        max_pixel = np.full(b, np.nan)
        if grids is not None:
            maps, max_pixel = self._stored_maps(images, grids, map_side)
        return {"score": score, "score_language": score.copy(), "score_vision": vision,
                "score_fewshot": np.full(b, np.nan),
                "max_pixel_score": max_pixel, "maps": maps, "few_shot_k": [None] * b, "reference_digest": [None] * b}

    # ---------------------------------------------------------------- few-shot (METHODS.md section 4)
    def bank(self, category: str) -> dict[str, "torch.Tensor"]:
        """The memory bank of ``category`` on this actor's device: read once from the run folder
        (its digest checked), then kept among the ``few_shot.max_cached_banks`` most recently used."""
        cached = self._bank_cache.get(category)
        if cached is not None:
            self._bank_cache.move_to_end(category)
            return cached
        stored = self.open_stored(self.banks[category])
        bank = {k: precision.to_device(torch.from_numpy(v), self.device) for k, v in stored.load().items()}
        self.bank_loads += 1
        self._bank_cache[category] = bank
        while len(self._bank_cache) > self.few_shot.max_cached_banks:
            self._bank_cache.popitem(last=False)
        return bank

    def open_stored(self, ref: dict):
        """A bank or pool from its manifest (:class:`pipeline.io.banks.StoredBank`: digest checked,
        parts mapped), refused when it was computed at another precision than this actor runs."""
        from pipeline.io.banks import BankError, StoredBank

        stored = StoredBank(ref["uri"], ref["digest"], self.storage, self.weights_cache)
        if stored.precision is not None and stored.precision != self.precision:
            raise BankError(f"bank {ref['uri']}: computed at {stored.precision}, this actor runs {self.precision} "
                            "(clip.precision resolves differently here): start a new run, or set clip.precision")
        return stored

    @property
    def chunks(self) -> tuple[int, int]:
        """(query, bank) chunk sizes of the nearest-neighbour search."""
        return self.few_shot.query_chunk, self.few_shot.bank_chunk

    def fade_sizes(self, tensors) -> dict[int, "torch.Tensor"]:
        """The images preprocessed at each of FADE's scales."""
        return {size: clip_models.preprocess_images(tensors, dataclasses.replace(self.preprocess, size=size),
                                                    device=self.device)
                for size in self.pixel.scales}

    def april_gan_pass(self, tensors) -> tuple["torch.Tensor", list]:
        """The class embeddings and the layers' tokens of one pass at the adapters' input size."""
        from pipeline.models.adapters import layer_features

        pre = dataclasses.replace(self.preprocess, size=self.pixel.image_size)
        batch = clip_models.preprocess_images(tensors, pre, device=self.device)
        dtype = next(self.model.parameters()).dtype
        feats, tokens = layer_features(self.model.visual, batch.to(dtype), self.pixel.layers)
        return feats.float(), [t.float() for t in tokens]

    @model_work
    def bank_features(self, images: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Per reference image, its bank features {key: float32 (N, D)}: the same code as the query
        side of :meth:`score_images`."""
        feats = few_shot_method(self.few_shot_method).features(self, self._tensors(images))
        return [{k: v[i].float().cpu().numpy() for k, v in feats.items()} for i in range(len(images))]

    def _score_few_shot(self, images: list[np.ndarray], categories: list[str]) -> dict[str, object]:
        """Images whose categories all have banks: the method's zero-shot map and score completed by
        its nearest-neighbour vision map (the method's strategy, :mod:`pipeline.stages.fewshot_methods`)."""
        tensors = self._tensors(images)
        b = len(images)
        cats = np.asarray(categories, dtype=object)
        groups = {cat: np.flatnonzero(cats == cat) for cat in dict.fromkeys(categories)}
        language = np.empty(b)
        out = {"score": np.empty(b), "score_fewshot": np.empty(b), "score_vision": np.full(b, np.nan)}
        method = few_shot_method(self.few_shot_method)
        state = method.forward(self, images, tensors)
        for cat, idx in groups.items():
            text = self.text_classifier(cat)
            probs = scoring.anomaly_probability(state.feats[idx], text, self.score.temperature).double().cpu().numpy()
            language[idx] = probs
            bank = self.bank(cat)
            q = {k: v[idx] for k, v in state.queries.items()}
            method.score_category(self, state, images, idx, probs, text, bank, q, out)
        maps, max_pixel = self._stored_maps(images, state.grids)
        return {"score": out["score"], "score_language": language, "score_vision": out["score_vision"],
                "score_fewshot": out["score_fewshot"], "max_pixel_score": max_pixel, "maps": maps,
                "few_shot_k": [int(self.banks[c]["k"]) for c in categories],
                "reference_digest": [self.banks[c]["reference_digest"] for c in categories]}
