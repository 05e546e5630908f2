"""APRIL-GAN adapters: block outputs, maps, losses and adapter files against explicit references."""

import hashlib
import math
import os

import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU
from safetensors.torch import save_file

from pipeline.models import adapters as ad
from pipeline.models import clip as clip_models
from pipeline.models import vit

LAYERS = (2, 4, 6, 8)
WIDTH, EMBED = 64, 32


@pytest.fixture(scope="module")
def model():
    m, _ = clip_models.build_clip("zsad-tiny")
    with torch.no_grad():  # break the symmetry of the random init so the checks have teeth
        g = torch.Generator().manual_seed(11)
        for p in m.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return m


def _images(n, size, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _adapters(seed=3, n_layers=4, width=WIDTH, embed=EMBED):
    torch.manual_seed(seed)
    return ad.Adapters(width, embed, n_layers).eval()


def _text(seed=5, batch=None):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*(() if batch is None else (batch,)), EMBED, 2, generator=g)
    return t / t.norm(dim=-2, keepdim=True)


def _ref_tokens(visual, img):
    """conv patches, class token, positional embedding (bicubic-resized off the native grid), ln_pre."""
    x = visual.conv1(img).flatten(2).transpose(1, 2)
    grid = math.isqrt(x.shape[1])
    pos = visual.positional_embedding
    g = math.isqrt(pos.shape[0] - 1)
    grid_pos = pos[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    if grid != g:
        grid_pos = F.interpolate(grid_pos, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    grid_pos = grid_pos.permute(0, 2, 3, 1).reshape(grid * grid, -1)
    cls = (visual.class_embedding + pos[0]).view(1, 1, -1).expand(x.shape[0], 1, -1)
    return visual.ln_pre(torch.cat([cls, x + grid_pos], dim=1))


def _ref_blocks(visual, img, layers):
    """Every block run one by one with open_clip's own block forward; outputs kept after block l."""
    x = _ref_tokens(visual, img)
    kept = {}
    for i, blk in enumerate(visual.transformer.resblocks, start=1):
        x = vit.run_blocks_single(blk, x)
        kept[i] = x[:, 1:]
    return [kept[l] for l in layers]


# ------------------------------------------------------------------------------------------------
# (1) block outputs and pooled embedding
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_layer_features_pooled_matches_encode_image(model):
    x = _images(2, 128)
    pooled, tokens = ad.layer_features(model.visual, x, LAYERS)
    assert pooled.shape == (2, EMBED)
    assert torch.allclose(pooled, model.encode_image(x), atol=1e-5)
    assert [t.shape for t in tokens] == [(2, 64, WIDTH)] * len(LAYERS)


@pytest.mark.parametrize("size", [128, 192])
@torch.no_grad()
def test_layer_features_match_open_clip_blocks(model, size):
    x = _images(2, size, seed=size)
    _, tokens = ad.layer_features(model.visual, x, LAYERS)
    refs = _ref_blocks(model.visual, x, LAYERS)
    grid = size // 16
    for t, r in zip(tokens, refs):
        assert t.shape == (2, grid * grid, WIDTH)
        assert torch.allclose(t, r, atol=1e-5), (t - r).abs().max()
    # the layers differ from each other (the right blocks are read, not one of them four times)
    assert not torch.allclose(tokens[0], tokens[1], atol=1e-3)


@pytest.mark.parametrize(
    "layers, words",
    [
        ((), "empty"),
        ((0, 2), "between 1 and"),
        ((2, 9), "between 1 and"),
        ((4, 2), "sorted"),
        ((2, 2), "unique"),
        ((2.0,), "integers"),
    ],
)
def test_layer_features_validates_layers(model, layers, words):
    with pytest.raises(ValueError, match=words):
        ad.layer_features(model.visual, _images(1, 128), layers)


# ------------------------------------------------------------------------------------------------
# (2) maps against the formula
# ------------------------------------------------------------------------------------------------


def _ref_map(adapters, tokens, text, size):
    """APRIL-GAN's map written out: per layer linear, normalise, 100 z @ text, grid, bilinear
    (align_corners=True) upsampling, softmax over the two channels, anomalous channel; sum."""
    total = 0
    for i in range(len(tokens)):
        w, b = adapters.fc[i].weight, adapters.fc[i].bias
        z = tokens[i] @ w.T + b
        z = z / z.norm(dim=-1, keepdim=True)
        if text.dim() == 2:
            logits = 100.0 * z @ text
        else:
            logits = torch.stack([100.0 * z[k] @ text[k] for k in range(z.shape[0])])
        bsz, n, _ = logits.shape
        g = math.isqrt(n)
        grid = torch.zeros(bsz, 2, g, g)
        for k in range(n):
            grid[:, :, k // g, k % g] = logits[:, k, :]
        up = F.interpolate(grid, size=size, mode="bilinear", align_corners=True)
        e = torch.exp(up - up.max(dim=1, keepdim=True).values)
        total = total + e[:, 1] / (e[:, 0] + e[:, 1])
    return total


@torch.no_grad()
def test_adapter_map_matches_formula(model):
    x = _images(2, 128, seed=1)
    _, tokens = ad.layer_features(model.visual, x, LAYERS)
    adapters, text = _adapters(), _text()
    amap = ad.adapter_map(adapters, tokens, text, (128, 128))
    ref = _ref_map(adapters, tokens, text, (128, 128))
    assert amap.shape == (2, 128, 128)
    assert torch.allclose(amap, ref, atol=1e-5), (amap - ref).abs().max()
    assert 0 <= amap.min() and amap.max() <= len(LAYERS)
    assert amap.std() > 1e-3  # a map with structure, not a constant
    probs = ad.layer_probabilities(adapters, tokens, text, (128, 128))
    assert len(probs) == len(LAYERS) and probs[0].shape == (2, 2, 128, 128)
    assert torch.allclose(probs[0].sum(1), torch.ones(2, 128, 128), atol=1e-6)
    # non-square output and per-image text
    per_image = _text(seed=9, batch=2)
    amap2 = ad.adapter_map(adapters, tokens, per_image, (96, 160))
    assert torch.allclose(amap2, _ref_map(adapters, tokens, per_image, (96, 160)), atol=1e-5)


@torch.no_grad()
def test_adapter_map_batch_independent(model):
    x = _images(2, 192, seed=2)
    adapters, text = _adapters(), _text()
    _, both = ad.layer_features(model.visual, x, LAYERS)
    _, one = ad.layer_features(model.visual, x[1:], LAYERS)
    m_both = ad.adapter_map(adapters, both, text, (192, 192))
    m_one = ad.adapter_map(adapters, one, text, (192, 192))
    assert torch.allclose(m_both[1:], m_one, atol=1e-5)
    assert not torch.allclose(m_both[0], m_both[1], atol=1e-3)


def test_adapter_map_rejects_bad_inputs():
    adapters = _adapters()
    tokens = [torch.randn(1, 64, WIDTH) for _ in LAYERS]
    with pytest.raises(ValueError, match="text must be"):
        ad.adapter_map(adapters, tokens, torch.randn(EMBED, 3), (32, 32))
    with pytest.raises(ValueError, match="3 layers"):
        ad.adapter_map(adapters, tokens[:3], _text(), (32, 32))
    with pytest.raises(ValueError, match="square grid"):
        ad.adapter_map(adapters, [torch.randn(1, 65, WIDTH) for _ in LAYERS], _text(), (32, 32))
    with pytest.raises(ValueError, match="tokens of layer 0"):
        ad.adapter_map(adapters, [torch.randn(1, 64, 48) for _ in LAYERS], _text(), (32, 32))


# ------------------------------------------------------------------------------------------------
# (3) losses against per-pixel loops
# ------------------------------------------------------------------------------------------------


def _small_probs(seed=0, shape=(2, 2, 5, 4)):
    g = torch.Generator().manual_seed(seed)
    probs = torch.randn(*shape, generator=g).mul(2).softmax(dim=1)
    target = (torch.rand(shape[0], *shape[2:], generator=g) > 0.6).float()
    return probs, target


def _ref_focal(probs, target, gamma=2.0, smooth=1e-5):
    b, c, h, w = probs.shape
    total, count = 0.0, 0
    for i in range(b):
        for y in range(h):
            for x in range(w):
                pt = smooth
                for k in range(c):
                    hot = 1.0 if int(target[i, y, x]) == k else 0.0
                    hot = min(max(hot, smooth / (c - 1)), 1.0 - smooth)
                    pt += hot * float(probs[i, k, y, x])
                total += -((1.0 - pt) ** gamma) * math.log(pt)
                count += 1
    return total / count


def _ref_dice(prob, target):
    losses = []
    for i in range(prob.shape[0]):
        inter = sp = st = 0.0
        for y in range(prob.shape[1]):
            for x in range(prob.shape[2]):
                p, t = float(prob[i, y, x]), float(target[i, y, x])
                inter += p * t
                sp += p
                st += t
        losses.append((2 * inter + 1) / (sp + st + 1))
    return 1.0 - sum(losses) / len(losses)


def test_focal_loss_matches_loop():
    probs, target = _small_probs()
    assert abs(float(ad.focal_loss(probs, target)) - _ref_focal(probs, target)) < 1e-6
    assert abs(float(ad.focal_loss(probs, target, gamma=0.5)) - _ref_focal(probs, target, gamma=0.5)) < 1e-6
    # three classes: the smoothed one-hot floor is smooth / (C - 1)
    p3, _ = _small_probs(seed=1, shape=(1, 3, 3, 3))
    t3 = torch.tensor([[[0, 1, 2], [2, 1, 0], [1, 1, 2]]])
    assert abs(float(ad.focal_loss(p3, t3, smooth=0.1)) - _ref_focal(p3, t3, smooth=0.1)) < 1e-6


def test_dice_loss_matches_loop():
    probs, target = _small_probs(seed=2)
    assert abs(float(ad.dice_loss(probs[:, 1], target)) - _ref_dice(probs[:, 1], target)) < 1e-6
    empty = torch.zeros_like(target)
    assert abs(float(ad.dice_loss(probs[:, 1], empty)) - _ref_dice(probs[:, 1], empty)) < 1e-6


def test_adapter_loss_sums_layers_and_trains():
    layers = [_small_probs(seed=s)[0] for s in (3, 4)]
    _, target = _small_probs(seed=3)
    want = sum(_ref_focal(p, target) + _ref_dice(p[:, 1], target) for p in layers)
    assert abs(float(ad.adapter_loss(layers, target)) - want) < 1e-5
    # gradients reach every adapter
    adapters = _adapters()
    tokens = [torch.randn(2, 16, WIDTH, generator=torch.Generator().manual_seed(i)) for i in range(len(LAYERS))]
    target = torch.zeros(2, 8, 8)
    target[:, 2:5, 3:6] = 1
    ad.adapter_loss(ad.layer_probabilities(adapters, tokens, _text(), (8, 8)), target).backward()
    assert all(fc.weight.grad is not None and fc.weight.grad.abs().sum() > 0 for fc in adapters.fc)


def test_losses_reject_bad_targets():
    probs, target = _small_probs()
    with pytest.raises(ValueError, match="class indices"):
        ad.focal_loss(probs, target * 0.5 + 0.25)
    with pytest.raises(ValueError, match="target must be"):
        ad.focal_loss(probs, target[:, :3])
    with pytest.raises(ValueError, match="target must be"):
        ad.dice_loss(probs[:, 1], target[:1])


# ------------------------------------------------------------------------------------------------
# (4) + (7) files: formats, metadata, atomic write
# ------------------------------------------------------------------------------------------------

META = {
    "backbone": "zsad-tiny",
    "image_size": 128,
    "layers": [2, 4, 6, 8],
    "width": WIDTH,
    "embed": EMBED,
    "activation": "gelu",
    "prompt_set": {"name": "april_gan", "n": 35},
    "train_digest": "ab" * 32,
}


def _sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@torch.no_grad()
def test_formats_load_to_identical_maps(model, tmp_path):
    adapters = _adapters(seed=21)
    sd = adapters.state_dict()
    authors = tmp_path / "epoch_15.pth"
    torch.save({"trainable_linearlayer": sd}, authors)
    bare = tmp_path / "bare.pt"
    torch.save(sd, bare)
    ours = tmp_path / "adapters.safetensors"
    digest = ad.save_adapters(adapters, str(ours), META)

    _, tokens = ad.layer_features(model.visual, _images(1, 128, seed=4), LAYERS)
    want = ad.adapter_map(adapters, tokens, _text(), (64, 64))
    maps, metas = [], []
    for path in (authors, bare, ours):
        loaded, meta = ad.load_adapters(str(path), width=WIDTH, embed=EMBED, n_layers=4)
        assert not loaded.training
        maps.append(ad.adapter_map(loaded, tokens, _text(), (64, 64)))
        metas.append(meta)
    for m in maps:
        assert torch.equal(m, want)
    assert metas[0] == {"format": "april_gan"} and metas[1] == {"format": "state_dict"}
    assert metas[2] == {**META, "format": ad.ZSAD_FORMAT}
    assert digest == _sha256(ours)
    assert not os.path.exists(str(ours) + ".tmp")
    assert sorted(os.listdir(tmp_path)) == ["adapters.safetensors", "bare.pt", "epoch_15.pth"]


def test_save_adapters_overwrites_atomically_and_rejects_bad_metadata(tmp_path):
    path = tmp_path / "sub" / "a.safetensors"
    first = ad.save_adapters(_adapters(seed=1), str(path), {"n": 1})
    second = ad.save_adapters(_adapters(seed=2), str(path), {"n": 2})
    assert first != second and second == _sha256(path)
    assert os.listdir(path.parent) == ["a.safetensors"]
    _, meta = ad.load_adapters(str(path), width=WIDTH, embed=EMBED, n_layers=4)
    assert meta == {"n": 2, "format": ad.ZSAD_FORMAT}
    with pytest.raises(ValueError, match="'bad' is not JSON-serialisable"):
        ad.save_adapters(_adapters(), str(tmp_path / "b.safetensors"), {"bad": object()})
    with pytest.raises(ValueError, match="'format' is set by save_adapters"):
        ad.save_adapters(_adapters(), str(tmp_path / "b.safetensors"), {"format": "other"})
    assert sorted(os.listdir(tmp_path)) == ["sub"]


# ------------------------------------------------------------------------------------------------
# (5) files that do not fit or cannot be read
# ------------------------------------------------------------------------------------------------


class _NotATensor:
    pass


def _load_error(path, **kw):
    kw = {"width": WIDTH, "embed": EMBED, "n_layers": 4, **kw}
    with pytest.raises(ad.AdapterLoadError) as err:
        ad.load_adapters(str(path), **kw)
    msg = str(err.value)
    assert str(path) in msg
    return msg


def test_load_errors_shapes_and_layers(tmp_path):
    # adapters of another backbone (ViT-B-like 48 -> 24 here) on this one (64 -> 32)
    other = tmp_path / "other.pth"
    torch.save({"trainable_linearlayer": ad.Adapters(48, 24, 4).state_dict()}, other)
    msg = _load_error(other)
    assert "fc.0.weight" in msg and "(24, 48)" in msg and "(32, 64)" in msg
    msg = _load_error(other, width=48)  # right width, wrong embed
    assert "fc.0.weight" in msg and "(24, 48)" in msg and "(32, 48)" in msg
    ours = tmp_path / "ours.safetensors"
    ad.save_adapters(_adapters(), str(ours), {})
    msg = _load_error(ours, n_layers=3)
    assert "4 layers" in msg and "uses 3 layers" in msg
    msg = _load_error(ours, n_layers=5)
    assert "4 layers" in msg and "uses 5 layers" in msg


def test_load_errors_keys(tmp_path):
    sd = _adapters().state_dict()
    missing = tmp_path / "missing.pth"
    torch.save({"trainable_linearlayer": {k: v for k, v in sd.items() if k != "fc.2.bias"}}, missing)
    assert "missing keys ['fc.2.bias']" in _load_error(missing)
    extra = tmp_path / "extra.pt"
    torch.save({**sd, "head.weight": torch.zeros(2)}, extra)
    assert "unexpected keys ['head.weight']" in _load_error(extra)
    stray = tmp_path / "stray.safetensors"
    save_file({**sd, "fc.0.scale": torch.ones(1)}, str(stray))
    assert "unexpected keys ['fc.0.scale']" in _load_error(stray)
    ints = tmp_path / "ints.pt"
    torch.save({**sd, "fc.1.bias": torch.zeros(EMBED, dtype=torch.long)}, ints)
    assert "fc.1.bias" in _load_error(ints)


def test_load_errors_unreadable(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(os.urandom(300))
    assert "could not be loaded safely" in _load_error(garbage)
    assert "does not exist" in _load_error(tmp_path / "nope.pth")
    assert "is a directory" in _load_error(tmp_path)
    # a pickle holding an arbitrary object is refused, never unpickled
    pickled = tmp_path / "object.pth"
    torch.save({"trainable_linearlayer": _adapters().state_dict(), "extra": _NotATensor()}, pickled)
    msg = _load_error(pickled)
    assert "weights_only=True" in msg and "_NotATensor" in msg
    # allowed containers with a non-tensor value
    strings = tmp_path / "strings.pth"
    torch.save({"trainable_linearlayer": {"fc.0.weight": "weights"}}, strings)
    assert "not a state dict of float tensors" in _load_error(strings)
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listed)
    assert "holds a list" in _load_error(listed)
    # a truncated safetensors file
    whole = tmp_path / "whole.safetensors"
    ad.save_adapters(_adapters(), str(whole), {"a": 1})
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size - 100])
    assert "could not be loaded safely (safetensors)" in _load_error(cut)


# ------------------------------------------------------------------------------------------------
# (6) activation
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_set_activation_changes_outputs_and_is_reversible():
    m, _ = clip_models.build_clip("zsad-tiny")
    x = _images(1, 128, seed=6)
    tokens = torch.tensor([[49406, 320, 1125, 49407] + [0] * 73])

    def outputs():
        pooled, feats = ad.layer_features(m.visual, x, (2, 8))
        return pooled, feats[1], m.encode_text(tokens)

    def kinds(cls):
        blocks = list(m.visual.transformer.resblocks) + list(m.transformer.resblocks)
        return all(type(b.mlp.gelu) is cls for b in blocks)

    ad.set_activation(m, "gelu")
    gelu = outputs()
    assert kinds(torch.nn.GELU)
    ad.set_activation(m, "quick_gelu")
    quick = outputs()
    assert kinds(QuickGELU)
    for a, b in zip(gelu, quick):
        assert not torch.allclose(a, b, atol=1e-4)
    ad.set_activation(m, "gelu")
    for a, b in zip(gelu, outputs()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        ad.set_activation(m, "relu")
    with pytest.raises(ValueError, match="no open_clip transformer towers"):
        ad.set_activation(torch.nn.Linear(2, 2), "gelu")
