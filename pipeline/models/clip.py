"""CLIP loading and preprocessing (pure torch + open_clip; no I/O beyond reading a local file).

``zsad-tiny`` is a tiny open_clip config (128 px, patch 16 like ViT-B-16, 8 blocks of width 64,
embed 32; text: 2 blocks of width 64) that the registry registers with open_clip when it first uses
open_clip (:func:`pipeline.models.registry.register_configs`), so tests and the offline demo build
a real open_clip model in milliseconds. Real models come from open_clip's registry (e.g. ``ViT-B-16-plus-240``).

Weights are given by the caller as one of: an open_clip pretrained tag, a local checkpoint path
(already fetched and hash-checked by :mod:`pipeline.io.weights`; read and loaded strictly by
:mod:`pipeline.models.checkpoints`), or nothing (random init, seeded so every actor of a pool builds
the same model). :func:`check_model` (:mod:`pipeline.models.registry`, which knows open_clip's
registry without importing it) is the one check of a model name and pretrained tag (the CLI, the
run's preflight and :func:`build_clip` use it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.models import checkpoints
from pipeline.models.precision import forward_pass
from pipeline.models.registry import (  # noqa: F401 (the names callers use)
    CONFIG_DIR,
    TINY_MODEL,
    ModelLoadError,
    check_model,
    register_configs,
)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
RANDOM_INIT_SEED = 0


def tokenizer(model_name: str):
    """open_clip's tokenizer for ``model_name``."""
    return register_configs().get_tokenizer(model_name)


@dataclass(frozen=True)
class Preprocess:
    """How images become model input: squash to ``size`` x ``size`` (no aspect keep, no crop, as in
    the reference code), bicubic, then normalise with ``mean``/``std`` on [0, 1].

    ``resize``: ``torch`` (torch's antialiased bicubic on float pixels, clamped to [0, 1]) or ``pil``
    (PIL's bicubic on the uint8 image, whose result is rounded to uint8: what torchvision's
    ``Resize(BICUBIC)`` does to a PIL image, as in FADE's data loader)."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "torch"


def build_clip(
    model_name: str,
    *,
    tag: str | None = None,
    checkpoint: str | None = None,
    cache_dir: str | None = None,
    image_size: int | None = None,
    precision: str = "fp32",
    device: str | torch.device = "cpu",
) -> tuple[torch.nn.Module, Preprocess]:
    """Build an open_clip model in eval mode plus its preprocessing.

    ``tag``: open_clip pretrained tag (downloaded by open_clip into ``cache_dir``). ``checkpoint``:
    a local state-dict file loaded strictly. Neither: random initialisation with a fixed seed.
    """
    check_model(model_name, tag)
    open_clip = register_configs()
    if tag and checkpoint:
        raise ModelLoadError("give either a pretrained tag or a checkpoint, not both")
    kwargs = {}
    if image_size:
        kwargs["force_image_size"] = image_size
    if tag:
        try:
            model = open_clip.create_model(
                model_name, pretrained=tag, cache_dir=cache_dir, require_pretrained=True, weights_only=True, **kwargs
            )
        except Exception as exc:
            raise ModelLoadError(
                f"could not load open_clip pretrained weights {model_name}/{tag}: {exc}. Without access to the "
                "model hub, fetch the checkpoint once and give it as clip.weights: /path/to/file.pt or s3://..."
            ) from exc
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = open_clip.create_model(model_name, pretrained=None, **kwargs)
        if checkpoint:
            sd = checkpoints.read_state_dict(checkpoint, what="weights file", error=ModelLoadError)
            if image_size and "visual.positional_embedding" in sd:
                own = model.visual.positional_embedding
                if sd["visual.positional_embedding"].shape != own.shape:
                    raise ModelLoadError(
                        f"{checkpoint}: positional embedding {tuple(sd['visual.positional_embedding'].shape)} does not "
                        f"match image_size {image_size} ({tuple(own.shape)}); leave clip.image_size unset"
                    )
            checkpoints.load_strict(model, sd, source=checkpoint, model=model_name, error=ModelLoadError)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    model = model.to(device=device, dtype=dtype).eval()
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", model.visual.image_size)
    size = size[0] if isinstance(size, (tuple, list)) else size
    pre = Preprocess(
        size=int(size), mean=tuple(cfg.get("mean", OPENAI_MEAN)), std=tuple(cfg.get("std", OPENAI_STD))
    )
    return model, pre


def preprocess_images(
    images: list[torch.Tensor], pre: Preprocess, device: str | torch.device | None = None
) -> torch.Tensor:
    """uint8 images (each (H, W, 3), any size) -> normalised float batch (B, 3, S, S) on ``device``
    (default: where the images are).

    Each image is squashed to S x S (bicubic: torch's antialiased one on [0, 1] floats, clamped, or
    PIL's on the uint8 image, see :class:`Preprocess`), then normalised. The uint8 pixels travel to
    the device (pinned, non-blocking from the host to a GPU) and are resized and normalised there,
    images of one size in one call.
    """
    from pipeline.models.precision import to_device

    if pre.resize not in ("torch", "pil"):
        raise ValueError(f"unknown resize {pre.resize!r} (torch, pil)")
    if not images:
        raise ValueError("no images to preprocess")
    device = torch.device(device) if device is not None else images[0].device
    mean = torch.tensor(pre.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, device=device).view(1, 3, 1, 1)
    pixels = []
    for img in images:
        if pre.resize == "pil" and tuple(img.shape[:2]) != (pre.size, pre.size):
            from PIL import Image

            small = Image.fromarray(img.cpu().numpy()).resize((pre.size, pre.size), Image.BICUBIC)
            img = torch.from_numpy(np.asarray(small).copy())
        pixels.append(to_device(img, device))
    out = torch.empty((len(images), 3, pre.size, pre.size), device=device)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, img in enumerate(pixels):
        groups.setdefault(tuple(img.shape), []).append(i)
    for shape, idx in groups.items():
        x = torch.stack([pixels[i] for i in idx]).permute(0, 3, 1, 2).float().div_(255.0)
        if tuple(shape[:2]) != (pre.size, pre.size):
            x = F.interpolate(x, size=(pre.size, pre.size), mode="bicubic", antialias=True, align_corners=False)
        out[torch.as_tensor(idx, device=device)] = (x.clamp_(0.0, 1.0) - mean) / std
    return out


def _truncatable(model: torch.nn.Module) -> bool:
    """True for open_clip ``CLIP`` text towers whose output depends only on the tokens up to the
    end-of-text token: causal attention mask and argmax/eos pooling. Padding after the longest
    prompt can then be cut without changing any embedding."""
    import open_clip  # already imported by build_clip; only its classes are needed here

    return (
        type(model) is open_clip.model.CLIP
        and getattr(model, "attn_mask", None) is not None
        and getattr(model, "text_pool_type", None) in ("argmax", "eos")
    )


def _encode_text_truncated(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text`` on tokens cut after the longest sequence (same result, less work:
    prompts are ~20 tokens of the 77-token context)."""
    import open_clip

    length = int((tokens != 0).int().cumsum(-1).argmax(-1).max()) + 1
    tokens = tokens[:, :length]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast) + model.positional_embedding[:length].to(cast)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = open_clip.transformer.text_global_pool(
        x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None)
    )
    proj = model.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
    return x


def encode_text(
    model: torch.nn.Module, tokenizer, texts: list[str], device: torch.device, chunk: int = 256
) -> torch.Tensor:
    """Raw (unnormalised) text embeddings (N, D) in float32."""
    parts = []
    for i in range(0, len(texts), chunk):
        tokens = tokenizer(texts[i : i + chunk]).to(device)
        out = _encode_text_truncated(model, tokens) if _truncatable(model) else model.encode_text(tokens)
        parts.append(out.float())
    return torch.cat(parts)


@forward_pass
def encode_image(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Raw image embeddings (B, D) in float32: ln_post(CLS) @ proj for open_clip ViTs."""
    dtype = next(model.parameters()).dtype
    return model.encode_image(batch.to(dtype)).float()


def quantise_vision_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Dynamic int8 quantisation of the vision tower's linear layers for CPU inference: the MLPs,
    and int8 twins (``zsad_qkv``, ``zsad_out``) of each block's attention in/out projections, used
    by zsad's own block walkers (:mod:`pipeline.models.vit`). open_clip's own forward keeps using
    the fp32 attention projections."""
    import warnings

    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for block in model.visual.transformer.resblocks:
            attn = block.attn
            if not getattr(attn, "_qkv_same_embed_dim", True) or attn.in_proj_weight is None:
                continue
            d = attn.embed_dim
            qkv = torch.nn.Linear(d, 3 * d, bias=attn.in_proj_bias is not None)
            out = torch.nn.Linear(d, d, bias=attn.out_proj.bias is not None)
            with torch.no_grad():
                qkv.weight.copy_(attn.in_proj_weight)
                out.weight.copy_(attn.out_proj.weight)
                if qkv.bias is not None:
                    qkv.bias.copy_(attn.in_proj_bias)
                if out.bias is not None:
                    out.bias.copy_(attn.out_proj.bias)
            block.zsad_qkv = quantize_dynamic(torch.nn.Sequential(qkv), {torch.nn.Linear}, dtype=torch.qint8)
            block.zsad_out = quantize_dynamic(torch.nn.Sequential(out), {torch.nn.Linear}, dtype=torch.qint8)
        model.visual = quantize_dynamic(model.visual, {torch.nn.Linear}, dtype=torch.qint8)
    return model
