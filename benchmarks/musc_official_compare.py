"""zsad's MuSc (pipeline/models/mutual.py) against the OFFICIAL MuSc modules, on the same features.

Compares, on one set of CLIP ViT-B-16-plus-240 features (240 px, grid 15 x 15, width 896, blocks
3, 6, 9, 12 1-indexed = official ``feature_layers`` [2, 5, 8, 11]; degrees r 1, 3, 5; interval 0.3):

  LNAMD      zsad ``aggregate(layer_norm_map(tokens), grid, r)`` vs the official ``LNAMD._embed``
             output L2-normalised (as models/musc.py does), per (block, r)
  grid map   zsad ``mutual_map`` (N, 15, 15) vs the official per-layer ``MSM`` maps averaged over
             the layers, then over r (musc.py's flow)
  map 240    both upsampled to 240 x 240 (bilinear, align_corners=True)
  score      the image score = max of the upsampled map
  RsCIN      zsad ``rscin`` vs the official ``RsCIN`` with k_list [1, 2, 3] and [1, 8, 9] (N >= 9)

and prints the max |difference| of each, plus the per-image time of each side's mutual scoring
(for information only). Exit code 1 when a difference exceeds ``--tol``.

The official code (github xrli-U/MuSc: models/modules/_LNAMD.py, _MSM.py, _RsCIN.py) is NOT part of
this project and is never copied into it: at run time the three files are extracted with
``git show`` from a git directory (``--musc-git-dir``, default the local mirror
/work/.mirror/xrli-U+MuSc/repo, revision ``--musc-rev``) or read from a checkout
(``--musc-repo PATH``) into a temporary directory, imported from there by file path, and the
directory is deleted afterwards. They need only torch, numpy, tqdm, math and pickle.

The class token the official LNAMD expects at index 0 (it drops it) is the real one, recorded in
zsad's own ``image_features`` forward pass (vit.block_forward wrapped for that call), so both sides
get the very same tokens from one forward. The official code runs on CPU in fp32 outside
autocast. Images: generated smooth random colour fields, some with bright/dark square "defects".

THE WEIGHTS ARE RANDOM (open_clip ``pretrained=None``, fixed torch seed): the numbers only show
that the two implementations agree; they say nothing about detection quality.

    .venv/bin/python benchmarks/musc_official_compare.py [--images 12] [--tol 1e-5] [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # the official MSM wraps its loop in tqdm

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.models import mutual, vit

DEFAULT_GIT_DIR = "/work/.mirror/xrli-U+MuSc/repo"
MODULES = ("_LNAMD", "_MSM", "_RsCIN")
MODEL = "ViT-B-16-plus-240"
SIZE = 240
LAYERS = (3, 6, 9, 12)  # 1-indexed blocks; the official config's [2, 5, 8, 11]
DEGREES = (1, 3, 5)
INTERVAL = 0.3
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
BANNER = "RANDOM WEIGHTS (pretrained=None): these numbers only show that the two implementations agree."


# --------------------------------------------------------------------------------------------
# official code, read at run time
# --------------------------------------------------------------------------------------------


def load_official(tmp: Path, repo: str | None, git_dir: str, rev: str) -> tuple[dict, str]:
    """Extract models/modules/{_LNAMD,_MSM,_RsCIN}.py into ``tmp`` and import them by file path."""
    if repo:
        source = f"checkout {repo}"
        try:
            head = subprocess.run(
                ["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
            ).stdout.strip()
            source += f" @ {head}"
        except (OSError, subprocess.CalledProcessError):
            pass
    else:
        try:
            head = subprocess.run(
                ["git", f"--git-dir={git_dir}", "rev-parse", rev], capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError) as e:
            raise SystemExit(
                f"cannot read the official MuSc code from git dir {git_dir!r} ({e}); pass --musc-repo or --musc-git-dir"
            )
        source = f"git dir {git_dir} @ {head}"
    mods = {}
    for name in MODULES:
        rel = f"models/modules/{name}.py"
        dst = tmp / f"{name}.py"
        if repo:
            src = Path(repo) / rel
            if not src.is_file():
                raise SystemExit(f"{src} not found: --musc-repo must point to a checkout of xrli-U/MuSc")
            dst.write_text(src.read_text())
        else:
            out = subprocess.run(
                ["git", f"--git-dir={git_dir}", "show", f"{head}:{rel}"], capture_output=True, text=True, check=False
            )
            if out.returncode:
                raise SystemExit(f"git show {head}:{rel} failed: {out.stderr.strip()}")
            dst.write_text(out.stdout)
        spec = importlib.util.spec_from_file_location(f"musc_official{name}", dst)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mods[name] = mod
    return mods, source


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------


def make_images(n: int, seed: int) -> torch.Tensor:
    """(n, 3, 240, 240) normalised: smooth random colour fields; every second image gets 1-3
    bright or dark squares."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.uniform(0.2, 0.8, (n, 3, 4, 4)).astype(np.float32))
    x = F.interpolate(coarse, size=(SIZE, SIZE), mode="bicubic", align_corners=True)
    x = x + torch.from_numpy(rng.normal(0.0, 0.02, (n, 3, SIZE, SIZE)).astype(np.float32))
    for i in range(1, n, 2):
        for _ in range(int(rng.integers(1, 4))):
            s = int(rng.integers(12, 40))
            r0, c0 = (int(v) for v in rng.integers(0, SIZE - s, 2))
            x[i, :, r0 : r0 + s, c0 : c0 + s] = float(rng.choice([0.0, 1.0]))
    x = x.clamp(0.0, 1.0)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def features_with_class(visual: torch.nn.Module, images: torch.Tensor) -> tuple:
    """zsad's ``image_features`` in one forward pass, recording every block's full output
    (class token included) on the way: ``vit.block_forward`` is wrapped for the duration of the
    call (``forward_with_layers`` looks it up in ``vit`` at each block) and restored afterwards.
    Returns (unit embeddings, [raw tokens (B, M, C)], grid, [full outputs (B, 1 + M, C) of LAYERS])."""
    seen: list[torch.Tensor] = []
    original = vit.block_forward

    def recording(block, x):
        out = original(block, x)
        seen.append(out)
        return out

    vit.block_forward = recording
    try:
        emb, tokens, grid = mutual.image_features(visual, images, LAYERS)
    finally:
        vit.block_forward = original
    if len(seen) != len(visual.transformer.resblocks):
        raise SystemExit(f"recorded {len(seen)} block outputs for {len(visual.transformer.resblocks)} blocks")
    return emb, tokens, grid, [seen[l - 1].float() for l in LAYERS]


# --------------------------------------------------------------------------------------------
# the two sides
# --------------------------------------------------------------------------------------------


def run_official(
    mods: dict, full_tokens: list[torch.Tensor], emb: np.ndarray, k_lists: list[list[int]], batch: int
) -> dict:
    """models/musc.py's flow (divide_num 1), on CPU, fp32, outside autocast."""
    LNAMD, MSM, RsCIN = mods["_LNAMD"].LNAMD, mods["_MSM"].MSM, mods["_RsCIN"].RsCIN
    n, _, c = full_tokens[0].shape
    feature_layers = [l - 1 for l in LAYERS]
    features_list = [l + 1 for l in feature_layers]
    lnamd = {}
    t_lnamd = t_msm = 0.0
    maps_r = torch.tensor([]).double()
    with torch.no_grad():
        for r in DEGREES:
            t0 = time.perf_counter()
            mod = LNAMD(device="cpu", r=r, feature_dim=c, feature_layer=features_list)
            z_layers: dict[str, list[torch.Tensor]] = {}
            for b0 in range(0, n, batch):  # musc.py runs LNAMD per DataLoader batch
                feats = mod._embed([t[b0 : b0 + batch] for t in full_tokens])  # (B, M, L, C)
                feats /= feats.norm(dim=-1, keepdim=True)
                for li in range(len(features_list)):
                    z_layers.setdefault(str(li), []).append(feats[:, :, li, :])
            t_lnamd += time.perf_counter() - t0
            maps_l = torch.tensor([]).double()
            for li, parts in z_layers.items():
                z = torch.cat(parts, dim=0)
                lnamd[(LAYERS[int(li)], r)] = z
                t0 = time.perf_counter()
                m = MSM(Z=z, device="cpu", topmin_min=0, topmin_max=INTERVAL)
                t_msm += time.perf_counter() - t0
                maps_l = torch.cat((maps_l, m.unsqueeze(0).cpu()), dim=0)
            maps_r = torch.cat((maps_r, maps_l.mean(0).unsqueeze(0)), dim=0)
        grid_maps = maps_r.mean(0)  # (N, M)
        b, m_ = grid_maps.shape
        g = int(np.sqrt(m_))
        up = F.interpolate(grid_maps.view(b, 1, g, g), size=SIZE, mode="bilinear", align_corners=True)
    up_np = up.cpu().numpy()
    ac_score = up_np.reshape(b, -1).max(-1)
    class_tokens = [emb[i] for i in range(emb.shape[0])]
    rs = {str(k): np.asarray(RsCIN(ac_score, class_tokens, k_list=k)) for k in k_lists}
    return {
        "lnamd": lnamd,
        "grid": grid_maps.view(b, g, g),
        "up": up[:, 0],
        "score": torch.from_numpy(ac_score),
        "rscin": rs,
        "t_lnamd": t_lnamd,
        "t_msm": t_msm,
    }


def run_zsad(tokens: list[torch.Tensor], emb: torch.Tensor, grid: int, k_lists: list[list[int]]) -> dict:
    n = emb.shape[0]
    with torch.inference_mode():
        t0 = time.perf_counter()
        queries = mutual.query_features(tokens, LAYERS, DEGREES, grid)
        pool = {l: mutual.layer_norm_map(t) for l, t in zip(LAYERS, tokens)}
        t1 = time.perf_counter()
        k = mutual.interval_k(n - 1, INTERVAL)
        grid_maps = mutual.mutual_map(queries, pool, grid, k, exclude=torch.eye(n, dtype=torch.bool))
        t2 = time.perf_counter()
        up = mutual.upsample(grid_maps, (SIZE, SIZE))
        score = up.reshape(n, -1).amax(1)
        rs = {str(kl): mutual.rscin(score, emb, kl).numpy() for kl in k_lists}
    return {
        "lnamd": queries,
        "grid": grid_maps,
        "up": up,
        "score": score,
        "rscin": rs,
        "t_features": t1 - t0,
        "t_mutual": t2 - t1,
        "k": k,
    }


def maxdiff(a, b) -> float:
    a = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a).double()
    b = torch.as_tensor(np.asarray(b) if not isinstance(b, torch.Tensor) else b).double()
    if a.shape != b.shape:
        raise SystemExit(f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a - b).abs().max())


# --------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=12, help="N images in the pool (>= 5 so that K >= 1)")
    ap.add_argument("--tol", type=float, default=1e-5, help="largest max |diff| that passes")
    ap.add_argument("--json", help="write the figures to this JSON file")
    ap.add_argument("--musc-repo", help="a checkout of github xrli-U/MuSc (instead of the git mirror)")
    ap.add_argument("--musc-git-dir", default=DEFAULT_GIT_DIR, help="a (bare) git directory of xrli-U/MuSc")
    ap.add_argument("--musc-rev", default="HEAD", help="revision to read from --musc-git-dir")
    ap.add_argument("--seed", type=int, default=0, help="torch seed of the weights; numpy seed of the images")
    ap.add_argument("--batch-size", type=int, default=4, help="official LNAMD batch (musc.py's batch_size)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.images < 5:
        ap.error("--images must be >= 5 (K = int(0.3 * (N - 1)) must be >= 1)")
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    print("=" * 100)
    print(BANNER)
    print("=" * 100)

    with tempfile.TemporaryDirectory(prefix="musc_official_") as tmp:
        mods, source = load_official(Path(tmp), args.musc_repo, args.musc_git_dir, args.musc_rev)
    print(f"official MuSc modules {', '.join(MODULES)} from {source} (temporary copy, deleted)")

    import open_clip

    torch.manual_seed(args.seed)
    model = open_clip.create_model(MODEL, pretrained=None).eval()
    visual = model.visual
    images = make_images(args.images, args.seed)
    n = args.images
    k_lists = [[1, 2, 3]] + ([[1, 8, 9]] if n >= 9 else [])

    t0 = time.perf_counter()
    with torch.inference_mode():
        emb, tokens, grid, full = features_with_class(visual, images)
        emb_check = F.normalize(vit.project(visual, full[-1][:, 0]).float(), dim=-1)  # block 12 is the last block
    t_forward = time.perf_counter() - t0
    sanity = {
        "patch tokens (recorded block outputs vs image_features)": max(
            maxdiff(f[:, 1:], t) for f, t in zip(full, tokens)
        ),
        "embedding (ln_post(recorded CLS) @ proj vs image_features)": maxdiff(emb_check, emb),
    }
    full = [f.clone() for f in full]  # out of inference mode for the official modules
    tokens = [t.clone() for t in tokens]
    emb = emb.clone()
    c = tokens[0].shape[-1]
    print(
        f"{MODEL} {SIZE} px, grid {grid} x {grid} = {grid * grid} patches, width {c}, blocks {list(LAYERS)} "
        f"(official feature_layers {[l - 1 for l in LAYERS]}), r {list(DEGREES)}, N = {n}, "
        f"K = {mutual.interval_k(n - 1, INTERVAL)}; forward {t_forward:.1f} s"
    )
    print("official LNAMD input: each block's real class token at index 0 (recorded in the same forward pass)")

    off = run_official(mods, full, emb.numpy().astype(np.float32), k_lists, args.batch_size)
    zs = run_zsad(tokens, emb, grid, k_lists)

    rows: list[tuple[str, float]] = []
    for layer in LAYERS:
        for r in DEGREES:
            rows.append((f"LNAMD block {layer} r {r}", maxdiff(zs["lnamd"][(layer, r)], off["lnamd"][(layer, r)])))
    rows.append(("grid map (N, 15, 15)", maxdiff(zs["grid"], off["grid"])))
    rows.append((f"map {SIZE} x {SIZE}", maxdiff(zs["up"], off["up"])))
    rows.append(("image score (max)", maxdiff(zs["score"], off["score"])))
    for kl in k_lists:
        rows.append((f"RsCIN {kl}", maxdiff(zs["rscin"][str(kl)], off["rscin"][str(kl)])))
    if n < 9:
        print("RsCIN [1, 8, 9] skipped: needs N >= 9 (the official code fails with an index error below)")

    scale = {
        "grid map range": (float(off["grid"].min()), float(off["grid"].max())),
        "image score range": (float(off["score"].min()), float(off["score"].max())),
    }
    print("\nfeature sanity (not compared with the official code):")
    for k, v in sanity.items():
        print(f"  {k}: max |diff| {v:.2e}")
    print(
        f"  official grid map values in [{scale['grid map range'][0]:.4f}, {scale['grid map range'][1]:.4f}], "
        f"image scores in [{scale['image score range'][0]:.4f}, {scale['image score range'][1]:.4f}]"
    )

    print(f"\n| quantity | max abs diff (zsad - official) | <= tol {args.tol:g} |")
    print("|---|---|---|")
    failed = []
    for name, v in rows:
        ok = v <= args.tol
        if not ok:
            failed.append(name)
        print(f"| {name} | {v:.3e} | {'yes' if ok else 'NO'} |")

    timing = {
        "official LNAMD ms/image": 1000 * off["t_lnamd"] / n,
        "official MSM ms/image": 1000 * off["t_msm"] / n,
        "zsad query_features + pool layer_norm_map ms/image": 1000 * zs["t_features"] / n,
        "zsad mutual_map ms/image (aggregates the pool itself)": 1000 * zs["t_mutual"] / n,
    }
    print(f"\ntiming on CPU, {args.threads} threads, N = {n} (information only):")
    for k, v in timing.items():
        print(f"  {k}: {v:.1f}")
    total = time.perf_counter() - t_start
    print(f"total {total:.1f} s")
    print("\n" + BANNER)
    print("PASS" if not failed else f"FAIL: {', '.join(failed)} exceed tol {args.tol:g}")

    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "random_weights": True,
                    "model": MODEL,
                    "image_size": SIZE,
                    "layers": list(LAYERS),
                    "degrees": list(DEGREES),
                    "images": n,
                    "k": mutual.interval_k(n - 1, INTERVAL),
                    "official_source": source,
                    "tol": args.tol,
                    "max_abs_diff": dict(rows),
                    "sanity": sanity,
                    "official_ranges": scale,
                    "timing_ms_per_image": timing,
                    "total_s": total,
                    "passed": not failed,
                },
                fh,
                indent=2,
            )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
