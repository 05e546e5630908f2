"""GEM, WinCLIP windows and positional-embedding resizing against straightforward references."""

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.models import clip as clip_models
from pipeline.models import vit


@pytest.fixture(scope="module")
def model():
    m, _ = clip_models.build_clip("zsad-tiny")
    with torch.no_grad():  # make the random model less symmetric so the checks have teeth
        g = torch.Generator().manual_seed(7)
        for p in m.visual.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return m


def _images(n, size, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_pos_embed_resize_identity_at_native_grid(model):
    pos = model.visual.positional_embedding
    assert vit.resize_pos_embed(pos, model.visual.grid_size[0]) is pos
    bigger = vit.resize_pos_embed(pos, 12)
    assert bigger.shape == (1 + 144, pos.shape[1]) and torch.equal(bigger[0], pos[0])
    # resizing to a bigger grid and back keeps a smooth embedding close
    smooth = torch.cat([pos[:1], torch.linspace(0, 1, 64).view(64, 1).expand(64, pos.shape[1])])
    back = vit.resize_pos_embed(vit.resize_pos_embed(smooth, 16), 8)
    assert torch.allclose(back, smooth, atol=0.05)


def test_clip_forward_matches_open_clip_at_native_size(model):
    x = _images(2, 128)
    cls, patches, grid = vit.clip_forward(model.visual, x)
    assert grid == 8 and patches.shape == (2, 64, 32)
    assert torch.allclose(cls, model.encode_image(x), atol=1e-5)


def _ref_tokens(visual, img, grid):
    """Independent token embedding: conv, class token, bicubic-resized positional embedding, ln_pre."""
    x = visual.conv1(img).flatten(2).transpose(1, 2)
    pos = visual.positional_embedding
    g = int(math.isqrt(pos.shape[0] - 1))
    grid_pos = pos[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    if grid != g:
        grid_pos = F.interpolate(grid_pos, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    grid_pos = grid_pos.permute(0, 2, 3, 1).reshape(grid * grid, -1)
    x = torch.cat([visual.class_embedding.view(1, 1, -1) + pos[0], x + grid_pos], dim=1)
    return visual.ln_pre(x)


def _ref_gem(visual, img, depth):
    """GEM as the official code computes it (WalBouss/GEM gem_utils.py, one self-self iteration),
    one image, explicit loops over heads and paths: the first pass propagates the NORMALISED tokens."""
    grid = img.shape[-1] // 16
    x = _ref_tokens(visual, img, grid)
    blocks = list(visual.transformer.resblocks)
    start = len(blocks) - depth
    x_gem = None
    for i, blk in enumerate(blocks):
        if i == start:
            x_gem = x.clone()
        if i >= start:
            a = blk.ln_1(x)[0]  # (L, D)
            L, D = a.shape
            H = blk.attn.num_heads
            hd = D // H
            W, bias = blk.attn.in_proj_weight, blk.attn.in_proj_bias
            q, k, v = a @ W[:D].T + bias[:D], a @ W[D : 2 * D].T + bias[D : 2 * D], a @ W[2 * D :].T + bias[2 * D :]
            s = torch.stack([a[n].norm() for n in range(L)]).mean() * hd**-0.5
            heads = []
            for h in range(H):
                sl = slice(h * hd, (h + 1) * hd)
                vh = v[:, sl]
                outs = []
                for p in (v[:, sl], k[:, sl], q[:, sl]):
                    zn = p / p.norm(dim=-1, keepdim=True)
                    z = torch.softmax(s * zn @ zn.T, dim=-1) @ zn
                    zn = z / z.norm(dim=-1, keepdim=True)
                    outs.append(torch.softmax(s * zn @ zn.T, dim=-1) @ vh)
                heads.append((outs[0] + outs[1] + outs[2]) / 3)
            out = torch.cat(heads, dim=-1) @ blk.attn.out_proj.weight.T + blk.attn.out_proj.bias
            x_gem = x_gem + out.unsqueeze(0)
        x = blk(x)
    proj = lambda t: visual.ln_post(t) @ visual.proj  # noqa: E731
    return proj(x[:, 0]), proj(x_gem[:, 1:])


@pytest.mark.parametrize("size,depth", [(128, 3), (192, 6)])
def test_gem_equals_reference(model, size, depth):
    imgs = _images(2, size, seed=size)
    with torch.no_grad():
        cls, patches, plain_gem, grid = vit.gem_forward(model.visual, imgs, depth=depth)
        for i in range(2):
            ref_cls, ref_patches = _ref_gem(model.visual, imgs[i : i + 1], depth=depth)
            assert torch.allclose(cls[i], ref_cls[0], atol=1e-5)
            assert torch.allclose(patches[i], ref_patches[0], atol=1e-5), (patches[i] - ref_patches[0]).abs().max()
    assert grid == size // 16
    # the GEM stream really differs from the plain final tokens
    _, plain, _ = vit.clip_forward(model.visual, imgs)
    assert torch.allclose(plain, plain_gem, atol=1e-5)  # the normal stream is the plain forward
    assert not torch.allclose(plain, patches, atol=1e-3)


def test_window_indices_and_coverage():
    idx = vit.window_indices(4, 2)
    assert idx.shape == (9, 4) and idx[0].tolist() == [0, 1, 4, 5] and idx[-1].tolist() == [10, 11, 14, 15]
    assert vit.window_indices(15, 2).shape[0] == 196 and vit.window_indices(15, 3).shape[0] == 169
    cover = vit.window_coverage(4, 2)
    assert cover.sum(0).reshape(4, 4).tolist() == [[1, 2, 2, 1], [2, 4, 4, 2], [2, 4, 4, 2], [1, 2, 2, 1]]


def test_window_embeddings_equal_separate_sequences(model):
    visual = model.visual
    imgs = _images(2, 128, seed=3)
    with torch.no_grad():
        tokens, grid = vit.embed(visual, imgs)
        for k in (2, 3):
            emb = vit.window_embeddings(visual, tokens, grid, k, chunk=7)  # odd chunk: chunking must not matter
            idx = vit.window_indices(grid, k)
            for b in range(2):
                ref_tokens = _ref_tokens(visual, imgs[b : b + 1], grid)
                for w in (0, 5, idx.shape[0] - 1):
                    seq = torch.cat([ref_tokens[:, :1], ref_tokens[:, 1 + idx[w]]], dim=1)
                    ref = visual.ln_post(visual.transformer(seq)[:, 0]) @ visual.proj
                    assert torch.allclose(emb[b, w], ref[0], atol=1e-5)


def test_harmonic_aggregation_on_4x4_grid():
    scores = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]])  # 3 x 3 windows of size 2
    out = vit.harmonic_patch_scores(scores, 4, 2)[0]
    assert out[0, 0].item() == pytest.approx(0.1)
    assert out[0, 1].item() == pytest.approx(2 / (1 / 0.1 + 1 / 0.2))
    assert out[1, 1].item() == pytest.approx(4 / (1 / 0.1 + 1 / 0.2 + 1 / 0.4 + 1 / 0.5))
    assert out[3, 3].item() == pytest.approx(0.9)
    assert out[2, 1].item() == pytest.approx(4 / (1 / 0.4 + 1 / 0.5 + 1 / 0.7 + 1 / 0.8))


def test_class_token_block_equals_full_block(model):
    x = torch.randn(3, 10, 64, generator=torch.Generator().manual_seed(4))
    block = model.visual.transformer.resblocks[-1]
    with torch.no_grad():
        assert torch.allclose(vit.class_token_block(block, x), block(x)[:, 0], atol=1e-5)


def test_block_forward_equals_open_clip_block(model):
    x = torch.randn(2, 17, 64, generator=torch.Generator().manual_seed(5))
    for block in model.visual.transformer.resblocks[:2]:
        with torch.no_grad():
            assert torch.allclose(vit.block_forward(block, x), block(x), atol=1e-5)
