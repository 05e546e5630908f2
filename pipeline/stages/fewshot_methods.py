"""The few-shot scorers (METHODS.md section 4): one strategy per few-shot method, registered by its
name (``winclip``, ``april_gan``, ``fade``: :meth:`pipeline.config.JobSpec.few_shot_method`).

A strategy has three steps, which :class:`pipeline.stages.clip_model.ClipScorer` calls:

- ``features(scorer, tensors)``: the few-shot features {key: (B, N, D)} of images, the same code for
  the bank (reference images) and the query side;
- ``forward(scorer, images, tensors)``: one pass over a batch of queries: its image embeddings
  (``feats``), its query features (``queries``) and what the method's maps start from;
- ``score_category(scorer, state, images, idx, probs, text, bank, q, out)``: the rows ``idx`` of
  one category, given their text probabilities ``probs``, its bank and their query features
  ``q``: fills ``out`` (``score``, ``score_fewshot``, ``score_vision``) and ``state.grids``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.ops.heatmap import map_shape
from pipeline.stages.base import LazyModule
from pipeline.stages.records import image_hw

torch = LazyModule("torch")
clip_models = LazyModule("pipeline.models.clip")
pixel_maps = LazyModule("pipeline.models.pixel")
fewshot = LazyModule("pipeline.models.fewshot")

#: few-shot method name -> its strategy
FEW_SHOT_METHODS: dict[str, "FewShotMethod"] = {}


def register(name: str):
    def add(cls):
        FEW_SHOT_METHODS[name] = cls()
        return cls

    return add


def few_shot_method(name: str) -> "FewShotMethod":
    try:
        return FEW_SHOT_METHODS[name]
    except KeyError:
        raise ValueError(f"few-shot method {name!r} is not one of {', '.join(sorted(FEW_SHOT_METHODS))}") from None


@dataclass
class QueryPass:
    """One forward pass over a batch of queries."""

    feats: Any  # (B, E) image embeddings
    queries: dict[str, Any]  # key -> (B, N, D)
    grids: Any = None  # the batch's maps, filled per category
    extra: dict[str, Any] = field(default_factory=dict)  # what the method's maps start from


class FewShotMethod:
    def features(self, s: Any, tensors) -> dict[str, Any]:
        raise NotImplementedError

    def forward(self, s: Any, images, tensors) -> QueryPass:
        raise NotImplementedError

    def score_category(self, s: Any, st: QueryPass, images, idx, probs, text, bank, q, out) -> None:
        raise NotImplementedError


@register("winclip")
class WinclipFewShot(FewShotMethod):
    """WinCLIP+: the zero-shot window map averaged with the windows' nearest-neighbour map."""

    def features(self, s: Any, tensors) -> dict[str, Any]:
        batch = clip_models.preprocess_images(tensors, s.preprocess, device=s.device)
        return fewshot.winclip_features(s.model.visual, batch, s.pixel.window_sizes)

    def forward(self, s: Any, images, tensors) -> QueryPass:
        batch = clip_models.preprocess_images(tensors, s.preprocess, device=s.device)
        feats = clip_models.encode_image(s.model, batch)
        queries = fewshot.winclip_features(s.model.visual, batch, s.pixel.window_sizes)
        return QueryPass(feats, queries, None, {"batch": batch})

    def score_category(self, s: Any, st: QueryPass, images, idx, probs, text, bank, q, out) -> None:
        sizes = s.pixel.window_sizes
        img_scores = torch.from_numpy(probs).to(s.device) if s.pixel.fuse_image_score else None
        zs = pixel_maps.winclip_map(s.model.visual, st.extra["batch"][idx], text, s.score.temperature, img_scores,
                                    sizes, windows={k: q[f"window{k}"] for k in sizes})
        fs = fewshot.winclip_fewshot_map(q, bank, zs.shape[-1], sizes, s.chunks)
        if st.grids is None:
            st.grids = torch.empty((len(images), *zs.shape[1:]), device=zs.device)
        st.grids[idx] = (zs + fs) / 2
        top = fs.amax(dim=(1, 2)).double().cpu().numpy()
        out["score_fewshot"][idx] = top
        out["score"][idx] = (probs + top) / 2


@register("fade")
class FadeFewShot(FewShotMethod):
    """FADE's few-shot: the language map fused with the patches' nearest-neighbour vision map."""

    def features(self, s: Any, tensors) -> dict[str, Any]:
        return fewshot.fade_features(s.model.visual, s.fade_sizes(tensors), s.few_shot.vision_features,
                                     s.pixel.gem_depth)

    def forward(self, s: Any, images, tensors) -> QueryPass:
        batch = clip_models.preprocess_images(tensors, s.preprocess, device=s.device)
        feats = clip_models.encode_image(s.model, batch)
        p = s.pixel
        lang_map, patches = pixel_maps.fade_language(s.model.visual, s.fade_sizes(tensors), s.pixel_text_classifier(),
                                                     p.temperature, p.grid, p.gem_depth)
        use = 0 if s.few_shot.vision_features == "gem" else 1
        queries = {f"scale{size}": v[use] for size, v in patches.items()}
        return QueryPass(feats, queries, torch.empty_like(lang_map), {"lang_map": lang_map})

    def score_category(self, s: Any, st: QueryPass, images, idx, probs, text, bank, q, out) -> None:
        v = fewshot.fade_fewshot_vision(q, bank, s.pixel.grid, s.few_shot.vision_multiplier, s.chunks)
        st.grids[idx] = pixel_maps.fade_fuse(st.extra["lang_map"][idx], v, s.few_shot.vision_weight)
        top = v.amax(dim=(1, 2)).double().cpu().numpy()
        out["score_fewshot"][idx] = out["score_vision"][idx] = top
        out["score"][idx] = np.clip((probs + top) / 2, 0.0, 1.0)


@register("april_gan")
class AprilGanFewShot(FewShotMethod):
    """APRIL-GAN's few-shot: the adapters' map plus the layers' nearest-neighbour distances. The
    streaming score stays the text probability (the re-scoring pass adds the map's part)."""

    def features(self, s: Any, tensors) -> dict[str, Any]:
        return fewshot.aprilgan_features(s.april_gan_pass(tensors)[1], s.pixel.layers)

    def forward(self, s: Any, images, tensors) -> QueryPass:
        feats, tokens = s.april_gan_pass(tensors)
        queries = fewshot.aprilgan_features(tokens, s.pixel.layers)
        return QueryPass(feats, queries, [None] * len(images), {"tokens": tokens})

    def score_category(self, s: Any, st: QueryPass, images, idx, probs, text, bank, q, out) -> None:
        from pipeline.models.adapters import adapter_map

        side = s.pixel.image_size
        tokens = st.extra["tokens"]
        t = torch.stack([text.normal, text.anomalous], dim=-1).to(s.device)
        for j, i in enumerate(idx.tolist()):
            qi = {k: v[j : j + 1] for k, v in q.items()}
            toks = [tok[i : i + 1] for tok in tokens]
            shape = map_shape(*image_hw(images[i]), s.maps.map_size)
            dist = fewshot.aprilgan_distances(qi, bank, s.pixel.layers, s.chunks)  # searched once
            st.grids[i] = adapter_map(s.adapters, toks, t, shape) + fewshot.aprilgan_upsample_sum(dist, shape)
            # the reference takes the max of the combined map at the input size (518 x 518)
            full = adapter_map(s.adapters, toks, t, (side, side)) + fewshot.aprilgan_upsample_sum(dist, (side, side))
            out["score_fewshot"][i] = float(full.max())
        out["score"][idx] = probs
