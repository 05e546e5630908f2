"""Few-shot vision maps (pipeline.models.fewshot) against references written here from the formulas of
METHODS.md section 4 and the reference code (anomalib's WinCLIP+, APRIL-GAN's test.py, FADE's
run_fade.py): features from open_clip's own forward where it offers them, distances by explicit
loops over the bank, window aggregation patch by patch. Tiny open_clip model, random weights."""

import pytest
import torch
import torch.nn.functional as F

from pipeline.models import clip as clip_models
from pipeline.models import fewshot, vit


@pytest.fixture(scope="module")
def visual():
    model, _ = clip_models.build_clip("zsad-tiny")
    return model.eval().visual


def images(seed, n=2, size=128):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def min_distance_loop(queries, bank):
    """(N, D) queries, (M, D) bank -> (N,) min over the bank of 1 - cos, one pair at a time."""
    out = torch.empty(queries.shape[0])
    for i in range(queries.shape[0]):
        best = None
        for j in range(bank.shape[0]):
            c = float(F.cosine_similarity(queries[i], bank[j], dim=0))
            best = 1 - c if best is None else min(best, 1 - c)
        out[i] = best
    return out


def library_tokens(visual, x):
    """open_clip's own forward with ``output_tokens``: (pooled @ proj, ln_post(patch tokens))."""
    visual.output_tokens = True
    try:
        pooled, tokens = visual(x)
    finally:
        visual.output_tokens = False
    return pooled, tokens


def window_embedding_loop(visual, x, k):
    """Each k x k window (row-major by its top-left patch) as its own sequence through open_clip's
    Transformer: class token + the window's patch tokens with their positional embeddings."""
    b = x.shape[0]
    conv = visual.conv1(x)
    g = conv.shape[-1]
    tok = conv.reshape(b, conv.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.view(1, 1, -1).expand(b, 1, -1)
    tok = torch.cat([cls, tok], dim=1) + visual.positional_embedding
    out = []
    for r in range(g - k + 1):
        for c in range(g - k + 1):
            idx = [0] + [1 + (r + i) * g + (c + j) for i in range(k) for j in range(k)]
            seq = visual.ln_pre(tok[:, idx])
            y = visual.transformer(seq)  # open_clip >= 2.26: batch-first
            out.append(visual.ln_post(y[:, 0]) @ visual.proj)
    return torch.stack(out, dim=1)


def harmonic_loop(window_scores, g, k):
    """Per patch: number of windows covering it / sum of 1/score over them (0 if one scores 0)."""
    b = window_scores.shape[0]
    out = torch.zeros(b, g, g)
    for n in range(b):
        for pr in range(g):
            for pc in range(g):
                vals = []
                w = 0
                for r in range(g - k + 1):
                    for c in range(g - k + 1):
                        if r <= pr < r + k and c <= pc < c + k:
                            vals.append(float(window_scores[n, w]))
                        w += 1
                out[n, pr, pc] = 0.0 if min(vals) == 0 else len(vals) / sum(1 / v for v in vals)
    return out


def _aprilgan_map(queries, bank, layers, size):
    """APRIL-GAN's few-shot map (B, H, W): the layers' distance grids, upsampled and summed."""
    return fewshot.aprilgan_upsample_sum(fewshot.aprilgan_distances(queries, bank, layers), size)


@torch.no_grad()
def test_winclip_plus_equals_the_formula(visual):
    refs, query = images(1), images(2, n=1)
    sizes = (2, 3)
    bank_feats = fewshot.winclip_features(visual, refs, sizes)
    bank = {k: v.reshape(-1, v.shape[-1]) for k, v in bank_feats.items()}
    q = fewshot.winclip_features(visual, query, sizes)
    got = fewshot.winclip_fewshot_map(q, bank, 8, sizes)

    # features from the library itself
    _, ref_tokens = library_tokens(visual, refs)
    _, q_tokens = library_tokens(visual, query)
    torch.testing.assert_close(bank_feats["patch"], ref_tokens, atol=1e-5, rtol=1e-5)
    maps = [(min_distance_loop(q_tokens[0], ref_tokens.reshape(-1, ref_tokens.shape[-1])) / 2).reshape(1, 8, 8)]
    for k in sizes:
        qw = window_embedding_loop(visual, query, k)
        rw = window_embedding_loop(visual, refs, k)
        torch.testing.assert_close(q[f"window{k}"], qw, atol=1e-5, rtol=1e-5)
        scores = (min_distance_loop(qw[0], rw.reshape(-1, rw.shape[-1])) / 2).reshape(1, -1)
        maps.append(harmonic_loop(scores, 8, k))
    want = torch.stack(maps).mean(0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert float(got.min()) > 0  # the query is not among the references


@torch.no_grad()
def test_harmonic_aggregation_with_a_zero_window():
    scores = torch.tensor([[0.4, 0.0, 0.2, 0.8]])  # 2 x 2 windows of size 2 on a 3 x 3 grid
    got = fewshot.harmonic_patch_scores_safe(scores, 3, 2)
    torch.testing.assert_close(got, harmonic_loop(scores, 3, 2))
    assert got[0, 0, 0] == pytest.approx(0.4) and got[0, 1, 1] == 0 and not torch.isnan(got).any()


def layer_outputs_by_hooks(visual, x, layers):
    """The residual-stream output of each block (1-indexed), class token dropped, captured with
    forward hooks during open_clip's own forward."""
    kept = {}
    hooks = [visual.transformer.resblocks[l - 1].register_forward_hook(
        lambda _m, _i, out, l=l: kept.__setitem__(l, out[:, 1:])) for l in layers]
    try:
        visual(x)
    finally:
        for h in hooks:
            h.remove()
    return [kept[l] for l in layers]


@torch.no_grad()
def test_april_gan_few_shot_equals_the_formula(visual):
    layers = (2, 5, 8)
    refs, query = images(3), images(4, n=1)
    _, ref_tokens = vit.forward_with_layers(visual, refs, layers)
    _, q_tokens = vit.forward_with_layers(visual, query, layers)
    bank = {k: v.reshape(-1, v.shape[-1]) for k, v in fewshot.aprilgan_features(ref_tokens, layers).items()}
    got = _aprilgan_map(fewshot.aprilgan_features(q_tokens, layers), bank, layers, (50, 37))

    want = torch.zeros(1, 50, 37)
    lib_refs = layer_outputs_by_hooks(visual, refs, layers)
    lib_q = layer_outputs_by_hooks(visual, query, layers)
    for r, q in zip(lib_refs, lib_q):
        d = min_distance_loop(q[0], r.reshape(-1, r.shape[-1])).reshape(1, 1, 8, 8)
        want += F.interpolate(d, size=(50, 37), mode="bilinear", align_corners=True)[:, 0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_fade_few_shot_equals_the_formula(visual):
    refs, query = images(5), images(6, n=1)
    by_size = {128: refs, 96: F.interpolate(refs, size=(96, 96), mode="bilinear")}
    q_by_size = {128: query, 96: F.interpolate(query, size=(96, 96), mode="bilinear")}
    bank = {k: v.reshape(-1, v.shape[-1]) for k, v in fewshot.fade_features(visual, by_size).items()}
    q = fewshot.fade_features(visual, q_by_size)
    got = fewshot.fade_fewshot_vision(q, bank, grid=10, multiplier=3.5)

    # the native size from the library's own forward: ln_post(tokens) @ proj
    _, lib_q = library_tokens(visual, query)
    _, lib_r = library_tokens(visual, refs)
    torch.testing.assert_close(q["scale128"], lib_q @ visual.proj, atol=1e-5, rtol=1e-5)
    maps = []
    for size, (qq, rr) in {
        128: (lib_q @ visual.proj, lib_r @ visual.proj),
        96: (q["scale96"], bank["scale96"]),
    }.items():
        g = size // 16
        d = (0.5 * min_distance_loop(qq[0], rr.reshape(-1, rr.shape[-1]))).reshape(1, 1, g, g)
        maps.append(F.interpolate(d, size=(10, 10), mode="bilinear", align_corners=False)[:, 0])
    want = 3.5 * (maps[0] + maps[1]) / 2
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_chunked_search_equals_unchunked(visual):
    refs, query = images(7, n=3), images(8)
    sizes = (2, 3)
    bank = {k: v.reshape(-1, v.shape[-1]) for k, v in fewshot.winclip_features(visual, refs, sizes).items()}
    q = fewshot.winclip_features(visual, query, sizes)
    whole = fewshot.winclip_fewshot_map(q, bank, 8, sizes)
    for chunks in ((1, 1), (7, 13), (64, 5)):
        torch.testing.assert_close(fewshot.winclip_fewshot_map(q, bank, 8, sizes, chunks), whole, atol=1e-6, rtol=0)


@torch.no_grad()
def test_a_reference_scores_zero_and_a_defect_scores_highest(visual):
    """A query that is one of the references has a vision map of 0; the same image with a pasted
    defect has its highest few-shot distance on the defect, for every method's features."""
    refs = images(9)
    query = refs[:1].clone()
    query[:, :, 80:112, 16:48] = torch.tensor([3.0, -3.0, 3.0]).view(1, 3, 1, 1)  # a 2 x 2 patch defect
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[5:7, 1:3] = True
    sizes = (2, 3)
    bank = {k: v.reshape(-1, v.shape[-1]) for k, v in fewshot.winclip_features(visual, refs, sizes).items()}
    same = fewshot.winclip_fewshot_map(fewshot.winclip_features(visual, refs[:1], sizes), bank, 8, sizes)
    assert float(same.abs().max()) <= 1e-6
    patch_only = {"patch": bank["patch"]}
    d = fewshot.winclip_fewshot_map(fewshot.winclip_features(visual, query, ()), patch_only, 8, ())[0]
    assert bool(inside.flatten()[d.flatten().argmax()]) and float(d.max()) > 1e-3

    layers = (2, 4)
    _, rt = vit.forward_with_layers(visual, refs, layers)
    abank = {k: v.reshape(-1, v.shape[-1]) for k, v in fewshot.aprilgan_features(rt, layers).items()}
    _, qt = vit.forward_with_layers(visual, refs[:1], layers)
    assert float(_aprilgan_map(fewshot.aprilgan_features(qt, layers), abank, layers, (8, 8)).abs().max()) <= 1e-6
    _, qt = vit.forward_with_layers(visual, query, layers)
    a = _aprilgan_map(fewshot.aprilgan_features(qt, layers), abank, layers, (8, 8))[0]
    assert bool(inside.flatten()[a.flatten().argmax()])

    fbank = {k: v.reshape(-1, v.shape[-1]) for k, v in fewshot.fade_features(visual, {128: refs}).items()}
    zero = fewshot.fade_fewshot_vision(fewshot.fade_features(visual, {128: refs[:1]}), fbank, grid=8)
    assert float(zero.abs().max()) <= 1e-6
    v = fewshot.fade_fewshot_vision(fewshot.fade_features(visual, {128: query}), fbank, grid=8)[0]
    assert bool(inside.flatten()[v.flatten().argmax()])


def test_a_bank_of_another_method_is_named():
    with pytest.raises(ValueError, match="no 'scale128' features .* another method"):
        fewshot.fade_fewshot_vision({"scale128": torch.ones(1, 4, 3)}, {"layer6": torch.ones(2, 3)}, grid=2)
