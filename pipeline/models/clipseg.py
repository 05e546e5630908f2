"""CLIPSeg pixel localiser (METHODS.md sections 1 and 5, VVV): one sigmoid map per localising prompt,
combined over prompts by the harmonic mean.

The model is ``transformers.CLIPSegForImageSegmentation`` built from a config written here in code
(no ``config.json``, tokenizer or processor files from a model hub):

- ``rd64-refined``: the architecture of the public ``CIDAS/clipseg-rd64-refined`` checkpoint, as
  transformers' own conversion script (``convert_clipseg_original_pytorch_to_hf.py``) builds it:
  ``CLIPSegTextConfig()`` defaults (CLIP text tower: vocabulary 49408, width 512, 12 layers, 8 heads,
  MLP 2048, context 77), ``CLIPSegVisionConfig(patch_size=16)`` (CLIP ViT-B/16: width 768, 12 layers,
  12 heads, MLP 3072, config image size 224, i.e. a 14 x 14 position grid that CLIPSeg interpolates
  bicubically to the 22 x 22 grid of a 352 px input), projection 512, ``reduce_dim=64``,
  ``extract_layers=(3, 6, 9)``, decoder 4 heads / MLP 2048, ``conditional_layer=0`` and
  ``use_complex_transposed_convolution=True`` ("refined"; transformers' default is False). About
  150.7 M parameters. Input: 352 x 352.
- ``tiny``: the same structure with tiny widths for tests (text and vision width 32, 2 layers each,
  context 16, vision config size 64 px, patch 16, projection 32, reduce_dim 16, extract_layers
  (0, 1)); it is run at 96 px so the position-grid interpolation (4 x 4 -> 6 x 6) is exercised as in
  the real model. The vocabulary stays CLIP's (49408) because the tokenizer is CLIP's.

Tokenisation uses open_clip's bundled CLIP BPE tokenizer (the vocabulary CLIPSeg's text tower was
trained with: 49408 tokens, start-of-text 49406, end-of-text (EOT) 49407, padding 0, lower-cased,
truncated to the context length with the last kept token replaced by EOT). The attention mask
covers the tokens up to and including the first EOT. The text tower is causal and pools the hidden
state at the EOT position (transformers pools the first ``eos_token_id`` position, or ``argmax`` of
the ids for legacy configs with ``eos_token_id == 2``; both find the EOT here because 49407 is the
largest id and padding is 0), so nothing after the EOT can change a prompt embedding.

Preprocessing (the CLIPSeg processor's, done with torch): RGB uint8 -> [0, 1] -> squash resize to
S x S (bilinear with antialias, as PIL's bilinear resize of the reference processor) -> ImageNet
mean/std. S = 352 for ``rd64-refined``.

Per image the localiser returns ``H(sigmoid(logits_1), ..., sigmoid(logits_P))`` over the P prompts,
where ``H`` is the harmonic mean :func:`harmonic_mean` (each map floored at ``eps`` = 1e-6 so that a
probability that underflows to 0 cannot divide by zero), computed at S x S and resized back to the
image's size (bilinear).

Weights: a local ``.safetensors`` file, or a ``.pt``/``.pth``/``.bin`` torch state dict read with
``torch.load(weights_only=True)``, loaded strictly by :mod:`pipeline.models.checkpoints` (checkpoint
keys ``*.position_ids``, persistent buffers in older transformers exports and not part of today's
state dict, are dropped first). Without a checkpoint the model is randomly initialised with a fixed
seed, so every actor of a pool builds the same model. ``transformers`` is imported lazily:
``pip install 'zsad[clipseg]'``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import ZsadError
from pipeline.models import checkpoints
from pipeline.models.prompts import LOCALISING_PROMPTS

if TYPE_CHECKING:  # pragma: no cover
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIPSEG_IMAGE_SIZE = 352
HARMONIC_EPS = 1e-6
SOT_TOKEN = 49406
EOT_TOKEN = 49407
CLIP_VOCAB_SIZE = 49408
#: Input side length (px) per architecture; the model built by :func:`build_clipseg` carries it as
#: ``model.zsad_image_size``.
ARCH_IMAGE_SIZE: dict[str, int] = {"rd64-refined": CLIPSEG_IMAGE_SIZE, "tiny": 96}
ARCHS: tuple[str, ...] = tuple(ARCH_IMAGE_SIZE)
_INSTALL_HINT = "pip install 'zsad[clipseg]'"


class ClipSegLoadError(ZsadError, RuntimeError):
    """A CLIPSeg model that cannot be built or whose weights do not load; the message says why."""

    exit_code = 2


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise ClipSegLoadError(f"CLIPSeg needs the transformers package ({exc}); {_INSTALL_HINT}") from exc
    return transformers


def clipseg_config(arch: str = "rd64-refined") -> CLIPSegConfig:
    """The ``transformers.CLIPSegConfig`` of ``arch`` (``rd64-refined`` or ``tiny``), built in code."""
    tf = _transformers()
    if arch == "rd64-refined":
        text = tf.CLIPSegTextConfig(
            vocab_size=CLIP_VOCAB_SIZE, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
            num_attention_heads=8, max_position_embeddings=77, eos_token_id=EOT_TOKEN, bos_token_id=SOT_TOKEN,
        )
        vision = tf.CLIPSegVisionConfig(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            image_size=224, patch_size=16,
        )
        extra = dict(projection_dim=512, reduce_dim=64, extract_layers=[3, 6, 9], decoder_num_attention_heads=4,
                     decoder_intermediate_size=2048)
    elif arch == "tiny":
        text = tf.CLIPSegTextConfig(
            vocab_size=CLIP_VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=16, eos_token_id=EOT_TOKEN, bos_token_id=SOT_TOKEN,
        )
        vision = tf.CLIPSegVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=64, patch_size=16,
        )
        extra = dict(projection_dim=32, reduce_dim=16, extract_layers=[0, 1], decoder_num_attention_heads=2,
                     decoder_intermediate_size=32)
    else:
        raise ClipSegLoadError(f"unknown CLIPSeg architecture {arch!r} (known: {', '.join(ARCHS)})")
    return tf.CLIPSegConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), conditional_layer=0,
        use_complex_transposed_convolution=True, **extra,
    )


def build_clipseg(
    checkpoint: str | None = None,
    *,
    arch: str = "rd64-refined",
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> CLIPSegForImageSegmentation:
    """A ``CLIPSegForImageSegmentation`` of ``arch`` in eval mode (float32) on ``device``.

    ``checkpoint``: a local ``.safetensors`` / ``.pt`` / ``.pth`` state dict, loaded strictly
    (:class:`ClipSegLoadError` names the file and the first missing / unexpected / mis-shaped keys).
    ``None``: random initialisation seeded with ``seed`` (the global RNG is left alone).
    ``device="meta"`` builds the structure only (no weights allocated; e.g. to count parameters).
    The model carries its input side length as ``model.zsad_image_size`` (352 for ``rd64-refined``).
    """
    tf = _transformers()
    config = clipseg_config(arch)
    if str(device) == "meta":
        if checkpoint:
            raise ClipSegLoadError("device='meta' builds an empty structure; it cannot hold a checkpoint")
        with torch.device("meta"):
            model = tf.CLIPSegForImageSegmentation(config)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = tf.CLIPSegForImageSegmentation(config)
        if checkpoint:
            sd = checkpoints.read_state_dict(checkpoint, what="CLIPSeg weights file", error=ClipSegLoadError)
            own = model.state_dict()
            sd = {k: v for k, v in sd.items() if not (k.endswith(".position_ids") and k not in own)}
            checkpoints.load_strict(model, sd, source=checkpoint, model=f"CLIPSeg {arch}", error=ClipSegLoadError)
        model = model.to(device=device, dtype=torch.float32)
    model.zsad_image_size = ARCH_IMAGE_SIZE[arch]
    return model.eval()


@functools.lru_cache(maxsize=1)
def _tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def tokenize(texts: Sequence[str], context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP BPE token ids and attention mask, both ``(N, context_length)`` int64.

    Ids: ``[SOT, tokens..., EOT, 0, 0, ...]`` (open_clip's tokenizer; a text too long for the context
    keeps its first ``context_length - 1`` tokens and ends with EOT). Mask: 1 up to and including
    the first EOT, 0 after it.
    """
    if context_length < 2:
        raise ValueError(f"context_length must be >= 2 (SOT + EOT), got {context_length}")
    ids = _tokenizer()(list(texts), context_length=context_length)
    is_eot = ids == EOT_TOKEN
    if not bool(is_eot.any(dim=1).all()):  # open_clip always writes one; guard against a changed tokenizer
        raise ValueError("tokenizer produced a sequence without an end-of-text token")
    eot_pos = is_eot.int().argmax(dim=1)  # first EOT
    mask = (torch.arange(context_length).unsqueeze(0) <= eot_pos.unsqueeze(1)).long()
    return ids, mask


@torch.inference_mode()
def encode_prompts(model: CLIPSegForImageSegmentation, prompts: Sequence[str]) -> torch.Tensor:
    """Conditional embeddings ``(P, projection_dim)`` float32 of ``prompts``: the text tower's
    hidden state at the EOT token, projected (``clip.get_text_features``)."""
    device = next(model.parameters()).device
    ids, mask = tokenize(prompts, int(model.config.text_config.max_position_embeddings))
    out = model.clip.get_text_features(input_ids=ids.to(device), attention_mask=mask.to(device))
    return out.pooler_output.float()


def preprocess(images: Sequence[np.ndarray], size: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 RGB images (each ``(H, W, 3)``, any size) -> normalised float32 batch ``(B, 3, size, size)``.

    Squash resize (no aspect keep, no crop), bilinear with antialias, on [0, 1] pixels; then
    ImageNet mean/std.
    """
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(3, 1, 1)
    out = []
    for i, img in enumerate(images):
        _check_image(img, i)
        x = torch.from_numpy(np.ascontiguousarray(img)).to(device).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append((x[0].clamp_(0.0, 1.0) - mean) / std)
    return torch.stack(out)


def _check_image(img: np.ndarray, index: int) -> None:
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        what = f"{img.dtype} array of shape {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
        raise ValueError(f"image {index}: expected an (H, W, 3) uint8 RGB array, got {what}")
    if img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"image {index}: empty image of shape {img.shape}")


def harmonic_mean(
    maps: torch.Tensor | np.ndarray, eps: float = HARMONIC_EPS, dim: int = 0
) -> torch.Tensor | np.ndarray:
    """Harmonic mean over axis ``dim``: ``n / sum_i 1 / max(p_i, eps)``.

    ``maps``: probabilities in [0, 1] (e.g. ``(P, H, W)`` sigmoid maps, one per prompt). Each value
    is floored at ``eps`` (> 0) before inversion, so the result lies in ``[eps, 1]``, equals ``p``
    where all maps agree on ``p >= eps`` and is dominated by the smallest map: a pixel is high only
    where every prompt finds it. Returns the input's type (tensor or numpy array), the axis removed.
    """
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    as_numpy = isinstance(maps, np.ndarray)
    t = torch.from_numpy(maps) if as_numpy else maps
    n = t.shape[dim]
    if n == 0:
        raise ValueError("harmonic_mean of zero maps")
    out = n / torch.reciprocal(t.clamp_min(eps)).sum(dim=dim)
    return out.numpy() if as_numpy else out


class ClipSegLocaliser:
    """Pixel maps from CLIPSeg and a fixed list of prompts (default: VVV's 18 localising prompts).

    The prompt embeddings are computed once here and reused for every batch (CLIPSeg accepts them
    as ``conditional_embeddings``). Per batch the CLIP vision tower runs once per image and the
    light decoder once per (image, prompt) pair (in chunks of at most ``max_decoder_rows`` pairs).

    ``image_size``: model input side length; default ``model.zsad_image_size`` (set by
    :func:`build_clipseg`), else 352. Must be a multiple of the patch size. ``eps``: the floor of
    the harmonic mean (:func:`harmonic_mean`).
    """

    def __init__(
        self,
        model: CLIPSegForImageSegmentation,
        *,
        prompts: Sequence[str] | None = None,
        image_size: int | None = None,
        device: str | torch.device | None = None,
        eps: float = HARMONIC_EPS,
        max_decoder_rows: int = 144,
    ) -> None:
        prompts = tuple(LOCALISING_PROMPTS if prompts is None else prompts)
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ValueError(f"prompts must be a non-empty list of non-empty strings, got {prompts!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if max_decoder_rows < 1:
            raise ValueError(f"max_decoder_rows must be >= 1, got {max_decoder_rows}")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.prompts = prompts
        size = int(image_size or getattr(model, "zsad_image_size", CLIPSEG_IMAGE_SIZE))
        patch = int(model.config.vision_config.patch_size)
        if size <= 0 or size % patch:
            raise ValueError(f"image_size {size} must be a positive multiple of the patch size {patch}")
        self.image_size = size
        self.eps = float(eps)
        self.max_decoder_rows = int(max_decoder_rows)
        self.text_embeddings = encode_prompts(self.model, prompts)  # (P, D)

    @torch.inference_mode()
    def prompt_logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised batch ``(B, 3, S, S)`` -> CLIPSeg logits ``(B, P, S, S)``, one map per prompt.

        Same numbers as ``model(pixel_values=x.repeat_interleave(P, 0), conditional_embeddings=
        e.repeat(B, 1)).logits`` but the vision tower runs on B images, not B * P.
        """
        model = self.model
        x = pixel_values.to(self.device, torch.float32)
        b, p = x.shape[0], len(self.prompts)
        vision = model.clip.get_image_features(pixel_values=x, output_hidden_states=True, interpolate_pos_encoding=True)
        # hidden_states[0] is the embedding output, so layer i's output is hidden_states[i + 1]
        acts = [vision.hidden_states[i + 1] for i in model.extract_layers]
        per = max(1, self.max_decoder_rows // p)  # images per decoder call
        out = []
        for s in range(0, b, per):
            n = min(per, b - s)
            rows = [a[s : s + n].repeat_interleave(p, dim=0) for a in acts]
            cond = self.text_embeddings.repeat(n, 1)
            logits = model.decoder(rows, cond).logits
            out.append(logits.reshape(n, p, *logits.shape[-2:]))
        return torch.cat(out)

    @torch.inference_mode()
    def maps_torch(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised batch ``(B, 3, S, S)`` -> combined maps ``(B, S, S)`` in [eps, 1]: the harmonic
        mean over prompts of the per-prompt sigmoid maps."""
        return harmonic_mean(torch.sigmoid(self.prompt_logits(pixel_values)), self.eps, dim=1)

    @torch.inference_mode()
    def maps(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """uint8 RGB images (each ``(H_i, W_i, 3)``) -> float32 maps ``(H_i, W_i)`` in [0, 1].

        One batched forward for all images; each map is computed at S x S and resized back to its
        image's size (bilinear, antialiased when shrinking).
        """
        if len(images) == 0:
            return []
        combined = self.maps_torch(preprocess(images, self.image_size, self.device))
        out = []
        for img, m in zip(images, combined):
            h, w = img.shape[:2]
            m = m[None, None]
            if (h, w) != tuple(m.shape[-2:]):
                m = F.interpolate(m, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
            out.append(m[0, 0].clamp(0.0, 1.0).cpu().numpy().astype(np.float32, copy=False))
        return out
