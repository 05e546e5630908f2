"""Mutual scoring of unlabeled images (MuSc, Li et al., ICLR 2024; MUSC.md), pure torch.

Per image (:func:`image_features`): the raw residual-stream outputs of some blocks of a CLIP ViT
(class token dropped, before ln_post), and the L2-normalised image embedding ln_post(CLS) @ proj.
Per block, :func:`layer_norm_map` standardises the image's whole token map (one mean and one
variance over all H x W x C values, eps 1e-5, no affine part: MUSC.md section 2, NOT a per-token
LayerNorm); :func:`aggregate` then averages every patch with its r x r neighbours (stride 1, zero
padding counted in the mean) and L2-normalises, for each degree r.

Mutual scoring (MUSC.md section 3): for a query image, per (block, degree), the distance of each
of its patches to the nearest patch of each compared pool image, ``min_q ||z_p - z_q||`` =
``sqrt(max(0, 2 - 2 max_q <z_p, z_q>))`` on unit vectors (one matrix product and a row maximum per
block of pool images); per patch the mean of the K smallest of those per-image distances, K =
``int(interval * m)`` for m compared images (MuSc: interval 0.3, m = N - 1); the map is the mean
over blocks and degrees. :class:`MutualState` keeps the K smallest distances seen so far, so the
pool can be processed in any number of chunks or shards (:func:`merge`) with identical results.

:func:`rscin` is MuSc's image-level re-scoring (MUSC.md section 5).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from pipeline.errors import ZsadError
from pipeline.models import vit

Key = tuple[int, int]  # (block, degree)


class PoolTooSmall(ZsadError, ValueError):
    """A pool with too few images for the interval (K would be 0): MuSc's score is undefined."""


def image_features(
    visual: torch.nn.Module, images: torch.Tensor, layers: Sequence[int]
) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """(B, 3, S, S) -> (unit image embeddings (B, E), [raw block-``l`` tokens (B, G*G, C) for l in
    ``layers``], grid G). One forward pass; at a size other than the model's own, the positional
    embedding is resized with torch's plain bicubic, as MuSc's vendored open_clip 2.16 does (its
    ``resize_pos_embed`` does not pass ``antialias``), not the antialiased one of current open_clip."""
    emb, tokens = vit.forward_with_layers(visual, images, tuple(layers), pos_antialias=False)
    grid = images.shape[-1] // vit.patch_size(visual)
    return F.normalize(emb.float(), dim=-1), [t.float() for t in tokens], grid


def layer_norm_map(tokens: torch.Tensor) -> torch.Tensor:
    """(B, M, C) -> each image's map standardised over all its M x C values (biased variance,
    eps 1e-5), as ``LayerNorm([C, H, W])`` with unit weight and zero bias."""
    return F.layer_norm(tokens.float(), tuple(tokens.shape[1:]), eps=1e-5)


def aggregate(normed: torch.Tensor, grid: int, degree: int) -> torch.Tensor:
    """(B, M, C) standardised tokens -> the r x r neighbourhood means (zero padding counted, so a
    border patch is a scaled mean; the scale vanishes in the normalisation), L2-normalised."""
    if degree < 1 or degree % 2 == 0:
        raise ValueError(f"aggregation degree {degree} must be an odd number >= 1")
    b, m, c = normed.shape
    if m != grid * grid:
        raise ValueError(f"{m} tokens are not a {grid} x {grid} grid")
    if degree == 1:
        return F.normalize(normed, dim=-1)
    x = normed.transpose(1, 2).reshape(b, c, grid, grid)
    x = F.avg_pool2d(x, degree, stride=1, padding=degree // 2, count_include_pad=True)
    return F.normalize(x.reshape(b, c, m).transpose(1, 2), dim=-1)


def query_features(
    tokens: Sequence[torch.Tensor], layers: Sequence[int], degrees: Sequence[int], grid: int
) -> dict[Key, torch.Tensor]:
    """The raw block tokens of images -> {(block, degree): unit features (B, M, C)}."""
    out = {}
    for layer, tok in zip(layers, tokens):
        normed = layer_norm_map(tok)
        for r in degrees:
            out[(layer, r)] = aggregate(normed, grid, r)
    return out


def interval_k(compared: int, interval: float) -> int:
    """K for ``compared`` pool images: ``int(interval * compared)``, as MuSc's code computes it."""
    return int(compared * interval)


@dataclass
class MutualState:
    """The K smallest nearest-patch distances per query patch seen so far, per (block, degree):
    {key: (B, M, <=K)} (+inf where fewer than K pool images were compared yet)."""

    k: int
    smallest: dict[Key, torch.Tensor] = field(default_factory=dict)
    compared: torch.Tensor | None = None  # (B,) pool images compared so far per query

    def _push(self, key: Key, d: torch.Tensor) -> None:
        prev = self.smallest.get(key)
        both = d if prev is None else torch.cat([prev, d], dim=-1)
        if both.shape[-1] > self.k:
            both = both.topk(self.k, dim=-1, largest=False, sorted=False).values
        self.smallest[key] = both


def update(
    state: MutualState,
    queries: Mapping[Key, torch.Tensor],
    pool: Mapping[int, torch.Tensor],
    grid: int,
    exclude: torch.Tensor | None = None,
    query_chunk: int = 4096,
    pool_chunk: int = 16384,
) -> MutualState:
    """Compare the queries with pool images: ``queries`` {(block, degree): (B, M, C) unit}, ``pool``
    {block: (J, M, C) standardised tokens (:func:`layer_norm_map`)}; ``exclude`` (B, J) bool: pool
    images a query is not compared with (itself). Memory per matrix product: at most
    ``query_chunk`` x ``pool_chunk`` floats (whole images either way)."""
    first = next(iter(queries.values()))
    b, m, _ = first.shape
    n_pool = next(iter(pool.values())).shape[0]
    device = first.device
    if exclude is None:
        exclude = torch.zeros(b, n_pool, dtype=torch.bool, device=device)
    exclude = exclude.to(device)
    per_pool = max(1, pool_chunk // m)
    per_query = max(1, query_chunk // m)
    counted = (~exclude).sum(1)
    state.compared = counted if state.compared is None else state.compared + counted
    degrees: dict[int, list[int]] = {}
    for layer, r in queries:
        degrees.setdefault(layer, []).append(r)
    for j0 in range(0, n_pool, per_pool):
        j1 = min(n_pool, j0 + per_pool)
        skip = exclude[:, j0:j1]
        for layer, rs in degrees.items():
            normed = pool[layer][j0:j1].to(device=device, dtype=torch.float32)  # float16 pools: computed in float32
            for r in rs:
                ref = aggregate(normed, grid, r).reshape(-1, normed.shape[-1])  # ((j1-j0) * M, C)
                q = queries[(layer, r)]
                parts = []
                for i0 in range(0, b, per_query):
                    sims = q[i0 : i0 + per_query].reshape(-1, q.shape[-1]) @ ref.T
                    parts.append(sims.reshape(-1, m, j1 - j0, m).amax(dim=-1))  # (b', M, J')
                best = torch.cat(parts)
                dist = (2.0 - 2.0 * best).clamp_min_(0.0).sqrt_()
                dist = dist.masked_fill(skip[:, None, :], float("inf"))
                state._push((layer, r), dist)
    return state


def merge(a: MutualState, b: MutualState) -> MutualState:
    """The state of the union of two disjoint parts of the pool (shards): exact."""
    if a.k != b.k or set(a.smallest) != set(b.smallest):
        raise ValueError("states of different K or keys cannot be merged")
    out = MutualState(a.k, compared=None if a.compared is None else a.compared + b.compared)
    for key in a.smallest:
        out._push(key, a.smallest[key])
        out._push(key, b.smallest[key])
    return out


def finish(state: MutualState, grid: int) -> torch.Tensor:
    """The mutual map (B, G, G): per (block, degree) the mean of the K smallest distances, then
    the mean over blocks and degrees. Raises :class:`PoolTooSmall` for a query compared with
    fewer than K pool images."""
    if state.compared is not None and bool((state.compared < state.k).any()):
        raise PoolTooSmall(
            f"a query was compared with {int(state.compared.min())} pool images, fewer than K = {state.k}"
        )
    maps = [v.mean(dim=-1) for v in state.smallest.values()]
    out = torch.stack(maps).mean(0)
    return out.reshape(out.shape[0], grid, grid)


def mutual_map(
    queries: Mapping[Key, torch.Tensor],
    pool: Mapping[int, torch.Tensor],
    grid: int,
    k: int,
    exclude: torch.Tensor | None = None,
    query_chunk: int = 4096,
    pool_chunk: int = 16384,
) -> torch.Tensor:
    """Queries against one whole pool: (B, G, G) mutual maps."""
    if k < 1:
        raise PoolTooSmall(f"K = {k}: the pool is too small for the interval")
    state = update(MutualState(k), queries, pool, grid, exclude, query_chunk, pool_chunk)
    return finish(state, grid)


def upsample(grids: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, G, G) -> (B, H, W), bilinear with align_corners=True (MuSc's upsampling)."""
    return F.interpolate(grids[:, None].float(), size=tuple(size), mode="bilinear", align_corners=True)[:, 0]


# --------------------------------------------------------------------------------------------
# RsCIN (MUSC.md section 5)
# --------------------------------------------------------------------------------------------


def rscin(
    scores: torch.Tensor,
    embeddings: torch.Tensor,
    k_list: Sequence[int] = (1, 2, 3),
    chunk: int = 4096,
    rows: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Re-score N images of one category from their raw scores (N,) and unit image embeddings (N, E).

    The scores are min-max normalised over the category (all equal: 0); per window k in ``k_list``
    each image gets the mean of the normalised scores of its k most cosine-similar images (itself
    included), weighted by those similarities; the result is the mean over the windows. A k larger
    than N is N. Exact k nearest neighbours, ``chunk`` query rows at a time. ``rows`` ``(i0, i1)``:
    only those images' values (the normalisation and the neighbours still span all N), so a large
    category can be split into query chunks computed apart; each row's value is the same."""
    if not len(k_list) or any(k < 1 for k in k_list):
        raise ValueError(f"k_list {list(k_list)} needs window sizes >= 1")
    s = scores.double()
    n = s.shape[0]
    span = s.max() - s.min() if n else s.new_zeros(())
    c = (s - s.min()) / span if n and span > 0 else torch.zeros_like(s)
    e = embeddings.double()
    kmax = min(max(k_list), n)
    lo, hi = rows if rows is not None else (0, n)
    out = torch.empty(hi - lo, dtype=torch.float64, device=s.device)
    for i0 in range(lo, hi, chunk):
        i1 = min(hi, i0 + chunk)
        w, idx = (e[i0:i1] @ e.T).topk(kmax, dim=1, largest=True, sorted=True)
        parts = []
        for k in k_list:
            kk = min(k, n)
            wk = w[:, :kk]
            parts.append((wk * c[idx[:, :kk]]).sum(1) / wk.sum(1))
        out[i0 - lo : i1 - lo] = torch.stack(parts).mean(0)
    return out
