"""CLIP scoring stage: zero-shot image-level score (METHODS.md sections 1-2) and, when configured,
a zero-shot pixel map (section 3: WinCLIP windows or FADE's GEM language + vision maps).

Runs as a model actor pool: :meth:`ClipScoreStage.setup` builds the model once per actor; text
classifiers are computed once per category per actor and cached; images of a batch are encoded in
one forward pass. Rows that failed earlier pass through untouched; a failure while scoring turns
the affected rows into ``status = error`` rows with ``error_stage = clip_score``.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Callable

import numpy as np
import pyarrow as pa

from pipeline.config import (
    AprilGanAdapters, ClipSegMaps, ClipSpec, FadeZeroShot, FewShotSpec, MapOutputSpec, NoPixelMap, RetrySpec, SpecError,
    TilingSpec, WinclipWindows, ZeroShotImageScore,
)
from pipeline.io.fs import StorageOptions
from pipeline.io.retry import retrying, stderr_log
from pipeline.io.weights import resolve
from pipeline.models.prompts import ensemble, object_name, read_prompt_file
from pipeline.ops.heatmap import map_shape
from pipeline.stages.base import LazyModule, check_columns, inference_mode, model_work
from pipeline.stages.records import TENSOR, RowErrors, object_column

# imported by the actors when they first use them; the driver only reads the declarations
torch = LazyModule("torch")
clip_models = LazyModule("pipeline.models.clip")
pixel_maps = LazyModule("pipeline.models.pixel")
scoring = LazyModule("pipeline.models.scoring")
fewshot = LazyModule("pipeline.models.fewshot")
precision = LazyModule("pipeline.models.precision")

STAGE = "clip_score"
ModelFactory = Callable[[], tuple]  # () -> (torch module, pipeline.models.clip.Preprocess)


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


class ClipScoreStage:
    """Batch callable: adds ``score`` (float64, NaN when not scored), ``score_vision`` (NaN when the
    method has none), ``max_pixel_score``, ``anomaly_map`` (float32 (H, W) maps in [0, 1] at the
    configured map size; empty (0, 0) when there is no map), ``scoring_mode`` (``whole_image``, or
    ``tiles`` in tiling mode until the aggregation decides; None for failed rows) and
    ``clip_score_ms``; in tiling mode also ``tile_scores`` and ``tile_maps``.

    ``model_factory`` (optional) returns (model, preprocess) and replaces weight resolution, for
    tests that build their own model.
    """

    name = STAGE
    section = "clip"
    kind = "actor"
    requires = ("image", "category", "status", "error_stage", "error_type", "error_message")
    drops: tuple[str, ...] = ()

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
        tiling: TilingSpec | None = None,
        map_range: tuple[float, float] = (0.0, 1.0),
        few_shot: FewShotSpec | None = None,
        few_shot_method: str | None = None,
    ) -> None:
        self.clip = clip
        self.few_shot = few_shot
        self.few_shot_method = few_shot_method if few_shot is not None else None
        if few_shot is not None and few_shot_method is None:
            raise ValueError("few_shot needs its method (winclip, april_gan or fade)")
        #: category -> {"uri", "digest", "k", "reference_digest"} of its bank; set by the driver once
        #: the banks are built (categories without references are scored zero-shot)
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
        self.tiling = tiling
        self.tile_batch_size = 16
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
        self.oom_splits = 0  # batches this actor split after running out of accelerator memory

    #: per-row outputs of a subclass beyond the scores and maps (result key -> column), object columns
    extra_outputs: tuple[str, ...] = ()

    @classmethod
    def from_spec(cls, spec, storage: StorageOptions | None = None) -> "ClipScoreStage | None":
        if getattr(spec, "mutual", None) is not None:  # MuSc: pipeline.stages.mutual_score
            return None
        return cls(spec.clip, spec.score, weights_cache=spec.weights_cache, storage=storage, pixel=spec.pixel,
                   maps=spec.maps, retries=spec.retries, tiling=spec.tiling, map_range=spec.map_range(),
                   few_shot=spec.few_shot, few_shot_method=spec.few_shot_method())

    @property
    def types(self) -> dict[str, object]:
        out = {"score": pa.float64(), "score_language": pa.float64(), "score_vision": pa.float64(),
               "score_fewshot": pa.float64(), "few_shot_k": pa.int64(), "reference_digest": pa.string(),
               "max_pixel_score": pa.float64(), "anomaly_map": TENSOR,
               "scoring_mode": pa.string(), "clip_score_ms": pa.float64(), "status": pa.string(),
               "error_stage": pa.string(), "error_type": pa.string(), "error_message": pa.string()}
        if self.tiling is not None:
            out.update(tile_scores=pa.list_(pa.float64()), tile_maps=TENSOR)
        if self.loads_column:
            out.update({"scorer": pa.string(), self.loads_column: pa.int64()})
        return out

    @property
    def loads_column(self) -> str | None:
        """``bank_loads`` for a few-shot scorer (with ``scorer``, the actor: run.json counts loads per actor)."""
        return "bank_loads" if self.few_shot is not None else None

    def loads(self) -> int:
        return self.bank_loads

    @property
    def produces(self) -> tuple[str, ...]:
        return tuple(self.types)

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
            model, pre = retrying(self._load, retries=r.model_load, backoff_s=r.backoff_s, max_backoff_s=r.max_backoff_s,
                                  what=f"load {self.clip.model}", log=stderr_log)
        if self.clip.activation:
            from pipeline.models.adapters import set_activation

            set_activation(model, self.clip.activation)
        if self.clip.cpu_int8 and self.device.type == "cpu":
            model = clip_models.quantise_vision_int8(model)
        self.model, self.preprocess = model, dataclasses.replace(pre, resize=self.clip.resize)
        self._check_pixel_config()
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

    def _check_pixel_config(self) -> None:
        """Settings that cannot work with this model fail the stage at start-up, not every row (the
        driver checks them first from the model's config: :mod:`pipeline.runtime.preflight`)."""
        visual = self.model.visual
        blocks = len(visual.transformer.resblocks)
        if isinstance(self.pixel, FadeZeroShot) and self.pixel.gem_depth > blocks:
            raise SpecError(f"pixel.gem_depth={self.pixel.gem_depth} exceeds the {blocks} blocks of {self.clip.model}")
        if isinstance(self.pixel, AprilGanAdapters) and self.pixel.layers[-1] > blocks:
            raise SpecError(f"pixel.layers {list(self.pixel.layers)} exceed the {blocks} blocks of {self.clip.model}")
        if isinstance(self.pixel, WinclipWindows):
            grid = self.preprocess.size // pixel_maps.vit.patch_size(visual)
            too_big = [k for k in self.pixel.window_sizes if k > grid]
            if too_big:
                raise SpecError(f"pixel.window_sizes {too_big} do not fit the {grid} x {grid} patch grid of {self.clip.model}")

    @inference_mode
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
    def score_images(self, images: list[np.ndarray], categories: list[str], map_side: int | None = None) -> dict[str, object]:
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
        merged: dict[str, object] = {k: np.full(b, np.nan) for k in _SCORE_KEYS}
        merged.update(maps=[None] * b, few_shot_k=[0] * b, reference_digest=[None] * b)
        for idx, fn in parts:
            r = fn([images[i] for i in idx], [categories[i] for i in idx])
            for j, i in enumerate(idx.tolist()):
                for key in _SCORE_KEYS:
                    merged[key][i] = r[key][j]
                if r["maps"]:
                    merged["maps"][i] = r["maps"][j]
                if fn == self._score_few_shot:
                    merged["few_shot_k"][i] = r["few_shot_k"][j]
                    merged["reference_digest"][i] = r["reference_digest"][j]
        return merged

    def _tensors(self, images: list[np.ndarray]) -> list:
        return [torch.from_numpy(img if img.flags.writeable and img.flags.c_contiguous else np.array(img)) for img in images]

    def _stored_maps(self, images, grids, map_side=None) -> tuple[list[np.ndarray], np.ndarray]:
        """Map grids (a (B, h, w) tensor, or a list of maps already at their size) -> the stored maps
        (float32, clipped to the map range) and their maxima."""
        maps: list[np.ndarray] = []
        max_pixel = np.full(len(images), np.nan)
        for i, img in enumerate(images):
            shape = (map_side, map_side) if map_side else map_shape(img.shape[0], img.shape[1], self.maps.map_size)
            grid = grids[i] if isinstance(grids, list) else grids[i : i + 1]  # a list: maps made at their size
            m = pixel_maps.upsample(grid.float(), shape)[0].clamp(*self.map_range)
            maps.append(m.cpu().numpy().astype(np.float32))
            max_pixel[i] = float(maps[-1].max())
        return maps, max_pixel

    def _score_zero_shot(self, images: list[np.ndarray], categories: list[str], map_side: int | None = None) -> dict[str, object]:
        tensors = self._tensors(images)
        tokens = None
        if self.pixel.kind == "april_gan":  # the score and the layers' tokens from one pass at the adapters' size
            from pipeline.models.adapters import layer_features

            pre = dataclasses.replace(self.preprocess, size=self.pixel.image_size)
            batch = clip_models.preprocess_images(tensors, pre, device=self.device)
            feats, tokens = layer_features(self.model.visual, batch.to(next(self.model.parameters()).dtype), self.pixel.layers)
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
        grids = None
        make_grids = _PIXEL_MAPS[self.pixel.kind]
        if make_grids is not None:
            if tokens is not None:
                batch = tokens  # APRIL-GAN's maps are made from the layers' tokens
            grids, vision_score = make_grids(self, images, tensors, batch, score, groups, map_side)
            if vision_score is not None:
                vision = vision_score
        maps: list[np.ndarray] = []
        max_pixel = np.full(b, np.nan)
        if grids is not None:
            maps, max_pixel = self._stored_maps(images, grids, map_side)
        return {"score": score, "score_language": score.copy(), "score_vision": vision, "score_fewshot": np.full(b, np.nan),
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
    def _chunks(self) -> tuple[int, int]:
        return self.few_shot.query_chunk, self.few_shot.bank_chunk

    def _fade_sizes(self, tensors) -> dict[int, "torch.Tensor"]:
        return {size: clip_models.preprocess_images(tensors, dataclasses.replace(self.preprocess, size=size), device=self.device)
                for size in self.pixel.scales}

    def _april_gan_pass(self, tensors) -> tuple["torch.Tensor", list]:
        """The class embeddings and the layers' tokens of one pass at the adapters' input size."""
        from pipeline.models.adapters import layer_features

        pre = dataclasses.replace(self.preprocess, size=self.pixel.image_size)
        batch = clip_models.preprocess_images(tensors, pre, device=self.device)
        feats, tokens = layer_features(self.model.visual, batch.to(next(self.model.parameters()).dtype), self.pixel.layers)
        return feats.float(), [t.float() for t in tokens]

    def _features(self, tensors) -> dict[str, "torch.Tensor"]:
        """The few-shot features {key: (B, N, D)} of images (bank and query side alike)."""
        visual = self.model.visual
        if self.few_shot_method == "winclip":
            batch = clip_models.preprocess_images(tensors, self.preprocess, device=self.device)
            return fewshot.winclip_features(visual, batch, self.pixel.window_sizes)
        if self.few_shot_method == "april_gan":
            return fewshot.aprilgan_features(self._april_gan_pass(tensors)[1], self.pixel.layers)
        return fewshot.fade_features(visual, self._fade_sizes(tensors), self.few_shot.vision_features, self.pixel.gem_depth)

    @model_work
    def bank_features(self, images: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Per reference image, its bank features {key: float32 (N, D)}: the same code as the query
        side of :meth:`score_images`."""
        feats = self._features(self._tensors(images))
        return [{k: v[i].float().cpu().numpy() for k, v in feats.items()} for i in range(len(images))]

    def _score_few_shot(self, images: list[np.ndarray], categories: list[str]) -> dict[str, object]:
        """Images whose categories all have banks: the method's zero-shot map and score completed by
        its nearest-neighbour vision map (pipeline.models.fewshot)."""
        tensors = self._tensors(images)
        b = len(images)
        cats = np.asarray(categories, dtype=object)
        groups = {cat: np.flatnonzero(cats == cat) for cat in dict.fromkeys(categories)}
        language = np.empty(b)
        score = np.empty(b)
        fs_score = np.empty(b)
        vision = np.full(b, np.nan)
        method, visual = self.few_shot_method, self.model.visual
        grids: object
        if method == "april_gan":
            from pipeline.models.adapters import adapter_map

            feats, tokens = self._april_gan_pass(tensors)
            queries = fewshot.aprilgan_features(tokens, self.pixel.layers)
            grids = [None] * b
            side = self.pixel.image_size
        else:
            batch = clip_models.preprocess_images(tensors, self.preprocess, device=self.device)
            feats = clip_models.encode_image(self.model, batch)
            if method == "winclip":
                queries = fewshot.winclip_features(visual, batch, self.pixel.window_sizes)
                grids = None
            else:
                lang_map, patches = pixel_maps.fade_language(visual, self._fade_sizes(tensors), self.pixel_text_classifier(),
                                                             self.pixel.temperature, self.pixel.grid, self.pixel.gem_depth)
                use = 0 if self.few_shot.vision_features == "gem" else 1
                queries = {f"scale{size}": p[use] for size, p in patches.items()}
                grids = torch.empty_like(lang_map)
        for cat, idx in groups.items():
            text = self.text_classifier(cat)
            probs = scoring.anomaly_probability(feats[idx], text, self.score.temperature).double().cpu().numpy()
            language[idx] = probs
            bank = self.bank(cat)
            q = {k: v[idx] for k, v in queries.items()}
            if method == "winclip":
                sizes = self.pixel.window_sizes
                img_scores = torch.from_numpy(probs).to(self.device) if self.pixel.fuse_image_score else None
                zs = pixel_maps.winclip_map(visual, batch[idx], text, self.score.temperature, img_scores, sizes,
                                            windows={k: q[f"window{k}"] for k in sizes})
                fs = fewshot.winclip_fewshot_map(q, bank, zs.shape[-1], sizes, self._chunks)
                if grids is None:
                    grids = torch.empty((b, *zs.shape[1:]), device=zs.device)
                grids[idx] = (zs + fs) / 2
                top = fs.amax(dim=(1, 2)).double().cpu().numpy()
                fs_score[idx] = top
                score[idx] = (probs + top) / 2
            elif method == "fade":
                v = fewshot.fade_fewshot_vision(q, bank, self.pixel.grid, self.few_shot.vision_multiplier, self._chunks)
                grids[idx] = pixel_maps.fade_fuse(lang_map[idx], v, self.few_shot.vision_weight)
                top = v.amax(dim=(1, 2)).double().cpu().numpy()
                fs_score[idx] = vision[idx] = top
                score[idx] = np.clip((probs + top) / 2, 0.0, 1.0)
            else:  # april_gan: the streaming score stays the text probability (the rescoring pass adds the map's part)
                t = torch.stack([text.normal, text.anomalous], dim=-1).to(self.device)
                for j, i in enumerate(idx.tolist()):
                    qi = {k: v[j : j + 1] for k, v in q.items()}
                    toks = [tok[i : i + 1] for tok in tokens]
                    shape = map_shape(images[i].shape[0], images[i].shape[1], self.maps.map_size)
                    dist = fewshot.aprilgan_distances(qi, bank, self.pixel.layers, self._chunks)  # searched once
                    grids[i] = adapter_map(self.adapters, toks, t, shape) + fewshot.aprilgan_upsample_sum(dist, shape)
                    # the reference takes the max of the combined map at the input size (518 x 518)
                    full = adapter_map(self.adapters, toks, t, (side, side)) + fewshot.aprilgan_upsample_sum(dist, (side, side))
                    fs_score[i] = float(full.max())
                score[idx] = probs
        maps, max_pixel = self._stored_maps(images, grids)
        return {"score": score, "score_language": language, "score_vision": vision, "score_fewshot": fs_score,
                "max_pixel_score": max_pixel, "maps": maps,
                "few_shot_k": [int(self.banks[c]["k"]) for c in categories],
                "reference_digest": [self.banks[c]["reference_digest"] for c in categories]}

    # ---------------------------------------------------------------- pixel maps, one per pixel.kind
    # Each returns the batch's map grids (B, h, w) and the vision score per image (or None).
    def _winclip_grids(self, images, tensors, batch, score, groups, map_side=None) -> tuple[torch.Tensor, None]:
        """WinCLIP windows per category (their text differs), put back in batch order."""
        parts = {}
        for cat, idx in groups.items():
            img_scores = torch.from_numpy(score[idx]).to(self.device) if self.pixel.fuse_image_score else None
            parts[cat] = pixel_maps.winclip_map(
                self.model.visual, batch[idx], self.text_classifier(cat), self.score.temperature, img_scores,
                self.pixel.window_sizes,
            )
        first = next(iter(parts.values()))
        grids = torch.empty((len(images), *first.shape[1:]), device=first.device)
        for cat, idx in groups.items():
            grids[idx] = parts[cat]
        return grids, None

    def _fade_grids(self, images, tensors, batch, score, groups, map_side=None) -> tuple[torch.Tensor, np.ndarray]:
        """FADE's language + vision maps at every scale; also the vision score (the vision map's max)."""
        p = self.pixel
        _, vis, grids = pixel_maps.fade_maps(
            self.model.visual, self._fade_sizes(tensors), self.pixel_text_classifier(), p.temperature, p.grid, p.gem_depth,
            p.vision_multiplier, p.vision_weight, p.vision_features,
        )
        return grids, vis.amax(dim=(1, 2)).double().cpu().numpy()

    def _april_gan_grids(self, images, tensors, tokens, score, groups, map_side=None) -> tuple[list[torch.Tensor], None]:
        """APRIL-GAN's summed adapter maps, made directly at each image's stored map size: the
        logits are upsampled before the softmax, so a map is not a resize of another size's map."""
        from pipeline.models.adapters import adapter_map

        maps: list[torch.Tensor | None] = [None] * len(images)
        for cat, idx in groups.items():
            t = self.text_classifier(cat)
            text = torch.stack([t.normal, t.anomalous], dim=-1).to(self.device)  # (E, 2) unit columns
            for i in idx.tolist():
                img = images[i]
                shape = (map_side, map_side) if map_side else map_shape(img.shape[0], img.shape[1], self.maps.map_size)
                maps[i] = adapter_map(self.adapters, [tok[i : i + 1].float() for tok in tokens], text, shape)
        return maps, None

    def _clipseg_grids(self, images, tensors, batch, score, groups, map_side=None) -> tuple[torch.Tensor, None]:
        from pipeline.models.clipseg import preprocess as clipseg_preprocess

        return self.localiser.maps_torch(clipseg_preprocess(images, self.localiser.image_size, self.device)), None

    # ---------------------------------------------------------------- call
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = check_columns(STAGE, batch, self.requires)
        self.setup()
        out = dict(batch)
        errors = RowErrors(batch, n)
        cols = {k: np.full(n, np.nan) for k in (*_SCORE_KEYS, "clip_score_ms")}
        few_k, ref_digest = object_column([None] * n), object_column([None] * n)
        extras = {k: object_column([None] * n) for k in self.extra_outputs}
        maps = object_column([_NO_MAP] * n)
        todo = [i for i in range(n) if errors.ok(i)]
        images = batch["image"]
        cats = [str(c) for c in batch["category"]]
        ids = [str(v) for v in batch["image_id"]] if "image_id" in batch else [None] * n

        def fail(i: int, exc: BaseException) -> None:
            errors.fail_with(i, STAGE, exc, "scoring failed")

        def store(rows: list[int], result: dict[str, object], ms: float) -> None:
            for key in _SCORE_KEYS:
                cols[key][rows] = result[key]
            cols["clip_score_ms"][rows] = ms
            for j, i in enumerate(rows):
                if result["maps"]:
                    maps[i] = result["maps"][j]
                few_k[i] = result["few_shot_k"][j]
                ref_digest[i] = result["reference_digest"][j]
                for key, col in extras.items():
                    col[i] = result[key][j]

        if todo and self.tiling is not None:
            tile_scores, tile_maps = self._call_tiles(batch, todo, cats, cols, fail)
            out.update(tile_scores=tile_scores, tile_maps=tile_maps)
        elif todo:
            def score(rows: list[int]) -> tuple[dict[str, object], float]:
                t0 = time.perf_counter()
                precision.check_injected(STAGE, [np.shape(images[i]) for i in rows])
                result = self._score_rows([images[i] for i in rows], [cats[i] for i in rows], [ids[i] for i in rows])
                return result, (time.perf_counter() - t0) * 1000.0 / len(rows)

            try:  # a batch that does not fit in the GPU's memory is split, down to single images
                for rows, done in precision.split_on_oom(score, todo, STAGE, on_split=self._log_split):
                    if isinstance(done, BaseException):
                        fail(rows[0], done)
                    else:
                        store(rows, *done)
            except Exception:  # one bad row must not sink the batch: retry one by one
                for i in todo:
                    try:
                        store([i], *score([i]))
                    except Exception as exc:
                        fail(i, precision.OutOfMemory(f"stage {STAGE}: {exc}") if precision.is_out_of_memory(exc) else exc)
            for i in todo:
                if errors.ok(i) and not np.isfinite(cols["score"][i]):
                    fail(i, FloatingPointError(f"non-finite score {cols['score'][i]}"))
                if not errors.ok(i):
                    for key in cols:
                        cols[key][i] = np.nan
                    maps[i] = _NO_MAP
                    few_k[i] = ref_digest[i] = None
                    for col in extras.values():
                        col[i] = None
        if self.tiling is not None and "tile_scores" not in out:
            out.update(_empty_tile_columns(n))
        mode = "tiles" if self.tiling is not None else "whole_image"
        scoring_mode = object_column([mode if errors.ok(i) else None for i in range(n)])
        out.update(cols, anomaly_map=maps, scoring_mode=scoring_mode, few_shot_k=few_k, reference_digest=ref_digest,
                   **extras, **errors.columns())
        if self.loads_column:
            out.update({"scorer": object_column([_actor_name()] * n), self.loads_column: np.full(n, self.loads(), np.int64)})
        return out

    def _log_split(self, size: int, half: int) -> None:
        self.oom_splits += 1
        stderr_log(f"{self.name}: out of accelerator memory on {size} images; freed the cache, retrying as {half} + {size - half}")

    def _score_rows(self, images: list[np.ndarray], categories: list[str], image_ids: list[str | None]) -> dict[str, object]:
        """The rows' results (:meth:`score_images`; a subclass may need the rows' image ids)."""
        return self.score_images(images, categories)

    def _call_tiles(self, batch, todo, cats, cols, fail):
        """Tiling mode: score every tile of each row (image score + a ``tile_map_size`` square map);
        the aggregation stage turns them into the image's score and map. ``score`` is meanwhile the
        mean tile score and ``score_vision`` the largest tile vision score."""
        if "tiles" not in batch:
            raise ValueError("stage 'clip_score' is in tiling mode but the batch has no 'tiles' column (run the tiling stage first)")
        n = len(batch["status"])
        tile_scores, tile_maps = _empty_tile_columns(n).values()
        side = self.tiling.tile_map_size
        for i in todo:
            t0 = time.perf_counter()
            try:
                image = np.asarray(batch["image"][i])
                boxes = np.asarray(batch["tiles"][i], dtype=np.int64).reshape(-1, 5)
                if not len(boxes):
                    raise ValueError("no tiles planned for this image")
                crops = [image[y0:y1, x0:x1] for _, x0, y0, x1, y1 in boxes]
                scores, maps, vision = [], [], []
                def score_tiles(ks: list[int]) -> dict[str, object]:
                    chunk = [crops[k] for k in ks]
                    precision.check_injected(STAGE, [c.shape for c in chunk])
                    return self.score_images(chunk, [cats[i]] * len(chunk), map_side=side)

                for k in range(0, len(crops), self.tile_batch_size):
                    ks = list(range(k, min(k + self.tile_batch_size, len(crops))))
                    for _, r in precision.split_on_oom(score_tiles, ks, STAGE, on_split=self._log_split):
                        if isinstance(r, BaseException):  # a tile that does not fit alone fails its image
                            raise r
                        scores.append(r["score"])
                        vision.append(r["score_vision"])
                        maps += r["maps"]
                t_scores = np.concatenate(scores)
                if not np.all(np.isfinite(t_scores)):
                    raise FloatingPointError(f"non-finite tile score in {t_scores.tolist()}")
                tile_scores[i] = t_scores
                tile_maps[i] = np.stack(maps).astype(np.float32) if maps else np.zeros((0, side, side), np.float32)
                cols["score"][i] = float(t_scores.mean())
                v = np.concatenate(vision)
                cols["score_vision"][i] = float(np.nanmax(v)) if np.isfinite(v).any() else np.nan
                cols["clip_score_ms"][i] = (time.perf_counter() - t0) * 1000.0
            except Exception as exc:  # noqa: BLE001 - one bad row must not sink the batch
                fail(i, exc)
        return tile_scores, tile_maps


_NO_MAP = np.zeros((0, 0), dtype=np.float32)
#: the float columns of a scored row (``score_images``' results)
_SCORE_KEYS = ("score", "score_language", "score_vision", "score_fewshot", "max_pixel_score")
#: pixel.kind -> the method computing the batch's map grids (None: no pixel map)
_PIXEL_MAPS = {
    "none": None,
    "winclip_windows": ClipScoreStage._winclip_grids,
    "fade_zero_shot": ClipScoreStage._fade_grids,
    "clipseg": ClipScoreStage._clipseg_grids,
    "april_gan": ClipScoreStage._april_gan_grids,
}


def _actor_name() -> str:
    """This process as run.json names a scoring actor: host:pid."""
    import os
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


def _empty_tile_columns(n: int) -> dict[str, np.ndarray]:
    return {"tile_scores": object_column([np.zeros(0, np.float64) for _ in range(n)]),
            "tile_maps": object_column([np.zeros((0, 0, 0), np.float32) for _ in range(n)])}
