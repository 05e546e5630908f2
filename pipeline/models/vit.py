"""Walking an open_clip VisionTransformer by hand: positional-embedding resize, token embeddings,
GEM (dual-stream self-self attention) and WinCLIP window embeddings. Pure torch.

Conventions: images are (B, 3, S, S) normalised tensors; tokens are batch-first (B, 1 + N, D) with
the class token first and patches in row-major order (row, col) of the G x G grid, N = G * G.
open_clip >= 2.26 runs its Transformer batch-first; older versions are sequence-first. Blocks run
through :func:`block_forward` (batch-first by construction) or :func:`run_blocks_single`, which
follows the block's own convention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.errors import ZsadError
from pipeline.models.precision import forward_pass


class UnsupportedModel(ZsadError, ValueError):
    """A vision tower these walkers do not handle (attention pooling, no class token...)."""

    exit_code = 2


def check_visual(visual: torch.nn.Module) -> None:
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "final_ln_after_pool", False):
        raise UnsupportedModel("pixel maps need a CLIP ViT with class-token pooling (no attention pooling)")
    if getattr(visual, "pool_type", "tok") != "tok":
        raise UnsupportedModel(f"pixel maps need class-token pooling, this model pools with {visual.pool_type!r}")


def patch_size(visual: torch.nn.Module) -> int:
    p = visual.patch_size
    return int(p[0] if isinstance(p, (tuple, list)) else p)


def resize_pos_embed(pos: torch.Tensor, grid: int, antialias: bool = True) -> torch.Tensor:
    """(1 + G*G, D) positional embedding -> (1 + grid*grid, D): class token kept, grid resized
    bicubic with antialias (current open_clip's ``resize_pos_embed``), or ``antialias=False``: torch's
    plain bicubic (a = -0.75), which open_clip 2.16 (vendored by MuSc) used; the two differ even when
    upsampling. At the native grid the tensor is returned unchanged."""
    n = pos.shape[0] - 1
    g = int(round(n**0.5))
    if g * g != n:
        raise UnsupportedModel(f"positional embedding of {n} patches is not a square grid")
    if g == grid:
        return pos
    cls, patches = pos[:1], pos[1:]
    patches = patches.reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", antialias=antialias, align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(pos.dtype)
    return torch.cat([cls, patches], dim=0)


@forward_pass
def embed(visual: torch.nn.Module, images: torch.Tensor, pos_antialias: bool = True) -> tuple[torch.Tensor, int]:
    """Images (B, 3, S, S) -> tokens after ln_pre (B, 1 + G*G, D) and the grid G = S / patch.
    The positional embedding is resized on the fly when S is not the model's native size
    (:func:`resize_pos_embed` with ``antialias=pos_antialias``)."""
    check_visual(visual)
    x = visual.conv1(images.to(visual.conv1.weight.dtype))
    b, d, gh, gw = x.shape
    if gh != gw:
        raise UnsupportedModel(f"square inputs only, got a {gh} x {gw} patch grid")
    x = x.reshape(b, d, gh * gw).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype).view(1, 1, d).expand(b, 1, d)
    x = torch.cat([cls, x], dim=1) + resize_pos_embed(visual.positional_embedding, gh, pos_antialias).to(x.dtype)
    return visual.ln_pre(x), gh


def project(visual: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """ln_post then proj, on any token tensor (..., D) -> (..., E)."""
    x = visual.ln_post(tokens)
    return x @ visual.proj if visual.proj is not None else x


def _qkv(block: torch.nn.Module, y: torch.Tensor) -> torch.Tensor:
    """The block's q, k, v in-projection of (B, L, D) -> (B, L, 3D) (int8 twin when present)."""
    twin = getattr(block, "zsad_qkv", None)
    if twin is not None:
        return twin(y)
    return F.linear(y, block.attn.in_proj_weight, block.attn.in_proj_bias)


def _out(block: torch.nn.Module, a: torch.Tensor) -> torch.Tensor:
    twin = getattr(block, "zsad_out", None)
    return twin(a) if twin is not None else block.attn.out_proj(a)


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = t.shape
    return t.reshape(b, n, heads, d // heads).transpose(1, 2)


def block_forward(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One residual block on batch-first tokens (B, L, D), equal to the block's own forward, with
    the attention computed by scaled-dot-product attention so the L x L attention matrix is not
    materialised (nn.MultiheadAttention's CPU path builds it: 3137^2 x heads floats at 896 px)."""
    attn = block.attn
    if not getattr(attn, "_qkv_same_embed_dim", True) or attn.in_proj_weight is None:
        return run_blocks_single(block, x)
    b, n, d = x.shape
    q, k, v = (_heads(t, attn.num_heads) for t in _qkv(block, block.ln_1(x)).split(d, dim=-1))
    a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
    x = x + block.ls_1(_out(block, a))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def run_blocks_single(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``block(x)`` for batch-first x whatever the block's own convention."""
    if getattr(block.attn, "batch_first", False):
        return block(x)
    return block(x.transpose(0, 1)).transpose(0, 1)


# --------------------------------------------------------------------------------------------
# GEM
# --------------------------------------------------------------------------------------------


def _self_self(z: torch.Tensor, values: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """softmax(s * norm(z) norm(z)^T) @ values, per head. z, values: (B, H, N, hd); s: (B,).

    Computed with scaled-dot-product attention (q = s * norm(z), k = norm(z), scale 1), which does
    not materialise the N x N matrix on backends with a fused kernel; memory stays bounded."""
    zn = F.normalize(z, dim=-1)
    q = zn * s.view(-1, 1, 1, 1).to(zn.dtype)
    return F.scaled_dot_product_attention(q, zn, values, scale=1.0)


def gem_attention(block: torch.nn.Module, x_ori: torch.Tensor) -> torch.Tensor:
    """GEM output of one residual block (before the residual add): (B, L, D) -> (B, L, D).

    a = ln_1(x_ori); q, k, v from the block's own in-projection; s = mean over tokens of ||a_n||
    times head_dim^-0.5; for p in (v, k, q): one self-self pass that propagates the NORMALISED
    tokens, z = softmax(s * norm(p) norm(p)^T) @ norm(p), then out_p = softmax(s * norm(z)
    norm(z)^T) @ v (the original v); the output projection is applied to the mean of the three
    outputs, then the block's layer scale ``ls_1``. This is what the official GEM code computes
    (WalBouss/GEM, ``gem_utils.SelfSelfAttention`` with one iteration); propagating the raw p
    in the first pass instead drifts from it by up to 4e-2 after six blocks."""
    attn = block.attn
    a = block.ln_1(x_ori)
    b, n, d = a.shape
    heads = attn.num_heads
    hd = d // heads
    qkv = F.linear(a, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = (t.reshape(b, n, heads, hd).transpose(1, 2) for t in qkv.split(d, dim=-1))
    s = a.norm(dim=-1).mean(dim=1) * hd**-0.5
    out = 0
    for p in (v, k, q):
        pn = F.normalize(p, dim=-1)
        out = out + _self_self(_self_self(pn, pn, s), v, s)
    out = (out / 3.0).transpose(1, 2).reshape(b, n, d)
    return block.ls_1(attn.out_proj(out))


@forward_pass
def gem_forward(
    visual: torch.nn.Module, images: torch.Tensor, depth: int = 6
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Dual-stream forward. Returns (class embedding of the normal stream (B, E), GEM patch
    embeddings (B, G*G, E) in the joint space, the normal stream's final patch embeddings
    (B, G*G, E), grid G).

    The normal stream runs every block; from the first of the last ``depth`` blocks a GEM stream
    starts from the normal stream's tokens and adds each block's GEM output (no MLP)."""
    x, grid = embed(visual, images)
    blocks = list(visual.transformer.resblocks)
    if not 1 <= depth <= len(blocks):
        raise ValueError(f"GEM depth {depth} must be between 1 and the model's {len(blocks)} blocks")
    start = len(blocks) - depth
    for block in blocks[:start]:
        x = block_forward(block, x)
    x_gem = x
    for block in blocks[start:]:
        x_gem = x_gem + gem_attention(block, x)  # x is batch-first here whatever the convention
        x = block_forward(block, x)
    return project(visual, x[:, 0]), project(visual, x_gem[:, 1:]), project(visual, x[:, 1:]), grid


@forward_pass
def clip_forward(visual: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Plain forward at any input size: (class embedding (B, E), final patch embeddings (B, N, E), G)."""
    x, grid = embed(visual, images)
    for block in visual.transformer.resblocks:
        x = block_forward(block, x)
    return project(visual, x[:, 0]), project(visual, x[:, 1:]), grid


# --------------------------------------------------------------------------------------------
# WinCLIP windows
# --------------------------------------------------------------------------------------------


def window_indices(grid: int, k: int) -> torch.Tensor:
    """(W, k*k) patch indices (row-major in the grid) of every k x k window at stride 1, windows
    ordered row-major by their top-left patch; W = (grid - k + 1) ** 2."""
    if not 1 <= k <= grid:
        raise ValueError(f"window size {k} does not fit a {grid} x {grid} grid")
    rows = torch.arange(grid - k + 1)
    tl = (rows.view(-1, 1) * grid + rows.view(1, -1)).reshape(-1)  # top-left index of each window
    offs = (torch.arange(k).view(-1, 1) * grid + torch.arange(k).view(1, -1)).reshape(-1)
    return tl.view(-1, 1) + offs.view(1, -1)


@forward_pass
def window_embeddings(
    visual: torch.nn.Module, tokens: torch.Tensor, grid: int, k: int, chunk: int = 1024
) -> torch.Tensor:
    """Embeddings of every k x k window: (B, W, E).

    Each window is its own sequence (class token + its k*k patch tokens, all with their original
    positional embeddings, taken from ``tokens`` after ln_pre) run through every block; the window
    embedding is ln_post(class token) @ proj. All windows of all images go through the blocks as one
    batch (split into chunks of ``chunk`` sequences to bound memory)."""
    b = tokens.shape[0]
    patches = window_indices(grid, k)
    idx = torch.cat([torch.zeros(patches.shape[0], 1, dtype=torch.long), patches + 1], dim=1).to(tokens.device)
    w, length = idx.shape
    seqs = tokens[:, idx.reshape(-1)].reshape(b * w, length, tokens.shape[-1])
    blocks = list(visual.transformer.resblocks)
    outs = []
    for i in range(0, seqs.shape[0], chunk):
        x = seqs[i : i + chunk]
        for block in blocks[:-1]:
            # short sequences: open_clip's own block (fused MHA fast path) unless int8 twins exist
            x = block_forward(block, x) if hasattr(block, "zsad_qkv") else run_blocks_single(block, x)
        outs.append(class_token_block(blocks[-1], x))
    return project(visual, torch.cat(outs)).reshape(b, w, -1)


def class_token_block(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The class token's output of one residual block, (B, L, D) -> (B, D), without computing the
    other tokens' outputs (only their keys and values are needed). Equal to ``block(x)[:, 0]``; used
    for the last block when only the class token is read."""
    attn = block.attn
    b, n, d = x.shape
    qkv = _qkv(block, block.ln_1(x))
    q = _heads(qkv[:, :1, :d], attn.num_heads)
    k, v = (_heads(t, attn.num_heads) for t in qkv[:, :, d:].split(d, dim=-1))
    a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, 1, d)
    h = x[:, :1] + block.ls_1(_out(block, a))
    h = h + block.ls_2(block.mlp(block.ln_2(h)))
    return h[:, 0]


def window_coverage(grid: int, k: int) -> torch.Tensor:
    """(W, G*G) 0/1 matrix: window w covers patch p."""
    idx = window_indices(grid, k)
    cover = torch.zeros(idx.shape[0], grid * grid)
    cover.scatter_(1, idx, 1.0)
    return cover


def harmonic_patch_scores(window_scores: torch.Tensor, grid: int, k: int) -> torch.Tensor:
    """Per-patch harmonic mean of the scores of the windows covering it: (B, W) -> (B, G, G)."""
    cover = window_coverage(grid, k).to(window_scores)
    inv = (1.0 / window_scores) @ cover
    return (cover.sum(0) / inv).reshape(-1, grid, grid)


# --------------------------------------------------------------------------------------------
# Intermediate block outputs (APRIL-GAN adapters)
# --------------------------------------------------------------------------------------------


@forward_pass
def forward_with_layers(
    visual: torch.nn.Module, images: torch.Tensor, layers: tuple[int, ...], pos_antialias: bool = True
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One plain forward at any square input size that also keeps intermediate block outputs.

    Returns (class embedding ln_post(CLS) @ proj (B, E), [the raw residual-stream output of block
    ``l`` (1-indexed) with the class token dropped, (B, N, D), for l in ``layers``]). ``layers``
    must be strictly increasing block numbers between 1 and the model's depth."""
    blocks = list(visual.transformer.resblocks)
    layers = tuple(layers)
    if not layers:
        raise ValueError("layers is empty: give at least one block number (1-indexed)")
    if any(isinstance(l, bool) or not isinstance(l, int) for l in layers):
        raise ValueError(f"layers {layers} must be integers (1-indexed block numbers)")
    if any(not 1 <= l <= len(blocks) for l in layers):
        raise ValueError(f"layers {layers} must lie between 1 and the model's {len(blocks)} blocks")
    if any(a >= b for a, b in zip(layers, layers[1:])):
        raise ValueError(f"layers {layers} must be sorted and unique")
    wanted = set(layers)
    x, _ = embed(visual, images, pos_antialias)
    kept = []
    for i, block in enumerate(blocks, start=1):
        x = block_forward(block, x)
        if i in wanted:
            kept.append(x[:, 1:])
    return project(visual, x[:, 0]), kept
