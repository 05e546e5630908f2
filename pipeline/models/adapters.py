"""APRIL-GAN linear adapters: pixel anomaly maps from intermediate ViT tokens. Pure torch.

Method (Chen et al., "APRIL-GAN: A Zero-/Few-Shot Anomaly Classification and Segmentation Method
for CVPR 2023 VAND Workshop Challenge", reference code ByChelsea/VAND-APRIL-GAN): the raw
residual-stream outputs of a few chosen vision blocks (class token dropped) are each mapped by
one trainable linear layer (width -> joint embedding size) into the text space. Per layer the
mapped tokens are L2-normalised, compared with two unit text vectors [normal, anomalous] with a
temperature of 100, reshaped to the patch grid, upsampled bilinearly (align_corners=True) to the
output size and only then turned into probabilities by a softmax over the two channels. The
anomaly map is the sum over layers of the anomalous channel (so it lies in [0, n_layers]).

Training uses, per layer, a focal loss on the two-channel probabilities plus a binary Dice loss on
the anomalous channel (the loss definitions of the reference code: focal loss with gamma 2, unit
class weights and label smoothing 1e-5; Dice with smoothing 1), summed over layers.

Activation: OpenAI CLIP weights were trained with QuickGELU, but the released adapters were
trained on a model built with ``nn.GELU`` (open_clip's default for configs without
``-quickgelu``); :func:`set_activation` switches a built model between the two.

Files: :func:`save_adapters` writes safetensors with zsad's metadata; :func:`load_adapters` reads
those, the reference code's ``torch.save({"trainable_linearlayer": state_dict})`` files and bare
state dicts of ``fc.*`` tensors, never unpickling anything but tensors and plain containers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ZsadError
from pipeline.io.atomic import local_target
from pipeline.models import checkpoints, vit
from pipeline.models.precision import forward_pass

ACTIVATIONS = ("quick_gelu", "gelu")
ZSAD_FORMAT = "zsad-adapters-1"
AUTHORS_KEY = "trainable_linearlayer"
TEMPERATURE = 100.0
_FC_KEY = re.compile(r"^fc\.(\d+)\.(weight|bias)$")


class AdapterLoadError(ZsadError, RuntimeError):
    """An adapter file that cannot be read or does not fit the backbone; the message names the
    file and the problem."""

    exit_code = 2


# --------------------------------------------------------------------------------------------
# Backbone
# --------------------------------------------------------------------------------------------


def _towers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    towers = []
    visual = getattr(model, "visual", None)
    if visual is not None and hasattr(getattr(visual, "transformer", None), "resblocks"):
        towers.append(("visual", visual.transformer))
    text = getattr(model, "transformer", None)
    if text is None and getattr(model, "text", None) is not None:  # open_clip CustomTextCLIP
        text = getattr(model.text, "transformer", None)
    if text is not None and hasattr(text, "resblocks"):
        towers.append(("text", text))
    return towers


def set_activation(model: nn.Module, activation: str) -> None:
    """Set the MLP activation (``block.mlp.gelu``) of every transformer block of the vision tower
    and of the text tower to open_clip's ``QuickGELU`` (``"quick_gelu"``) or ``nn.GELU``
    (``"gelu"``). In place; calling it again with the other name undoes it."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r} (known: {', '.join(ACTIVATIONS)})")
    from open_clip.transformer import QuickGELU

    towers = _towers(model)
    if not towers:
        raise ValueError(
            f"{type(model).__name__} has no open_clip transformer towers (model.visual.transformer, model.transformer)"
        )
    for name, tower in towers:
        for i, block in enumerate(tower.resblocks):
            mlp = getattr(block, "mlp", None)
            if mlp is None or not hasattr(mlp, "gelu"):
                raise ValueError(
                    f"{name} block {i} has no MLP activation 'mlp.gelu' to replace ({type(block).__name__})"
                )
            mlp.gelu = QuickGELU() if activation == "quick_gelu" else nn.GELU()


@forward_pass
def layer_features(
    visual: nn.Module, images: torch.Tensor, layers: tuple[int, ...]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One forward pass of an open_clip ViT at any square input size (the positional embedding is
    resized as :func:`pipeline.models.vit.embed` does).

    Returns (pooled image embedding ln_post(CLS) @ proj (B, E), equal to ``encode_image`` at the
    native size; [raw residual output of block ``l`` (1-indexed), class token dropped, (B, N, width)
    for l in ``layers``]). ``layers``: strictly increasing block numbers in 1..depth."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, S, S), got {tuple(images.shape)}")
    return vit.forward_with_layers(visual, images, tuple(layers))


# --------------------------------------------------------------------------------------------
# Adapters and maps
# --------------------------------------------------------------------------------------------


class Adapters(nn.Module):
    """One ``nn.Linear(width, embed)`` per chosen layer, held in ``self.fc`` so the state-dict
    keys are ``fc.0.weight``, ``fc.0.bias``, ... as in the reference code's linear layer."""

    def __init__(self, width: int, embed: int, n_layers: int):
        super().__init__()
        for name, value in (("width", width), ("embed", embed), ("n_layers", n_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Adapters {name} must be a positive integer, got {value!r}")
        self.width, self.embed, self.n_layers = width, embed, n_layers
        self.fc = nn.ModuleList([nn.Linear(width, embed) for _ in range(n_layers)])

    def forward(self, tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per layer: (B, N, width) -> (B, N, embed). The input list is not modified."""
        if len(tokens) != self.n_layers:
            raise ValueError(f"adapters for {self.n_layers} layers got tokens of {len(tokens)} layers")
        out = []
        for i, (fc, t) in enumerate(zip(self.fc, tokens)):
            if t.dim() != 3 or t.shape[-1] != self.width:
                raise ValueError(f"tokens of layer {i} must be (B, N, {self.width}), got {tuple(t.shape)}")
            out.append(fc(t.to(fc.weight.dtype)))
        return out


def _size(out_size) -> tuple[int, int]:
    if isinstance(out_size, int):
        out_size = (out_size, out_size)
    out_size = tuple(out_size)
    if len(out_size) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in out_size):
        raise ValueError(f"out_size must be (H, W) positive integers, got {out_size!r}")
    return out_size


def _layer_probs(adapters: Adapters, tokens: list[torch.Tensor], text: torch.Tensor, out_size):
    """Yield the (B, 2, H, W) probabilities layer by layer (one layer's maps alive at a time)."""
    size = _size(out_size)
    embed = getattr(adapters, "module", adapters).embed  # a DistributedDataParallel wrapper forwards, its module knows
    if text.dim() not in (2, 3) or text.shape[-1] != 2 or text.shape[-2] != embed:
        raise ValueError(
            f"text must be (embed, 2) or (B, embed, 2) columns [normal, anomalous] with embed {embed}, "
            f"got {tuple(text.shape)}"
        )
    for i, z in enumerate(adapters(tokens)):
        b, n, _ = z.shape
        g = round(n**0.5)
        if g * g != n:
            raise ValueError(f"tokens of layer {i} hold {n} patches, not a square grid (class token must be dropped)")
        if text.dim() == 3 and text.shape[0] != b:
            raise ValueError(f"text holds {text.shape[0]} per-image pairs for a batch of {b}")
        z = F.normalize(z, dim=-1)
        logits = TEMPERATURE * (z @ text.to(z.dtype))  # (B, N, 2)
        logits = logits.transpose(1, 2).reshape(b, 2, g, g)
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=True)
        yield logits.softmax(dim=1)


def layer_probabilities(
    adapters: Adapters, tokens: list[torch.Tensor], text: torch.Tensor, out_size: tuple[int, int]
) -> list[torch.Tensor]:
    """Per layer softmax probabilities (B, 2, H, W), channels [normal, anomalous].

    ``tokens``: per layer (B, N, width) with N = g * g patches in row-major order; ``text``: unit
    columns [normal, anomalous], (embed, 2) shared or (B, embed, 2) per image. Logits
    100 * normalise(linear(tokens)) @ text are upsampled bilinearly (align_corners=True) to
    ``out_size`` before the softmax, as in APRIL-GAN."""
    return list(_layer_probs(adapters, tokens, text, out_size))


def adapter_map(
    adapters: Adapters, tokens: list[torch.Tensor], text: torch.Tensor, out_size: tuple[int, int]
) -> torch.Tensor:
    """Anomaly map (B, H, W): the sum over layers of the anomalous channel, in [0, n_layers]."""
    total = None
    for probs in _layer_probs(adapters, tokens, text, out_size):
        total = probs[:, 1] if total is None else total + probs[:, 1]
    return total


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def _check_target(target: torch.Tensor, shape: tuple[int, ...], classes: int, what: str) -> torch.Tensor:
    if tuple(target.shape) != tuple(shape):
        raise ValueError(f"{what} target must be {tuple(shape)}, got {tuple(target.shape)}")
    if bool(((target != target.round()) | (target < 0) | (target >= classes)).any()):
        raise ValueError(f"{what} target must hold class indices 0..{classes - 1}")
    return target.long()


def focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> torch.Tensor:
    """Focal loss (Lin et al. 2017) with label smoothing, as APRIL-GAN trains it.

    ``probs``: (B, C, H, W) probabilities; ``target``: (B, H, W) class indices. Per pixel the
    one-hot target is clamped to [smooth / (C - 1), 1 - smooth], pt = sum_c onehot_c * p_c + smooth
    and the loss is -(1 - pt)^gamma * log(pt) (unit class weights); the mean over all pixels."""
    if probs.dim() != 4 or probs.shape[1] < 2:
        raise ValueError(f"focal_loss probs must be (B, C >= 2, H, W), got {tuple(probs.shape)}")
    if not 0.0 <= smooth <= 1.0:
        raise ValueError(f"focal_loss smooth must be in [0, 1], got {smooth}")
    c = probs.shape[1]
    idx = _check_target(target, (probs.shape[0], *probs.shape[2:]), c, "focal_loss")
    onehot = F.one_hot(idx, c).permute(0, 3, 1, 2).to(probs.dtype)
    if smooth:
        onehot = onehot.clamp(smooth / (c - 1), 1.0 - smooth)
    pt = (onehot * probs).sum(dim=1) + smooth
    return (-((1.0 - pt) ** gamma) * pt.log()).mean()


def dice_loss(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary Dice loss with smoothing 1: per image 1 - (2 sum(p t) + 1) / (sum p + sum t + 1),
    averaged over the batch. ``prob`` and ``target``: (B, H, W)."""
    if prob.dim() < 2:
        raise ValueError(f"dice_loss prob must be (B, H, W), got {tuple(prob.shape)}")
    if tuple(target.shape) != tuple(prob.shape):
        raise ValueError(f"dice_loss target must be {tuple(prob.shape)}, got {tuple(target.shape)}")
    p = prob.reshape(prob.shape[0], -1)
    t = target.reshape(target.shape[0], -1).to(p.dtype)
    dice = (2.0 * (p * t).sum(1) + 1.0) / (p.sum(1) + t.sum(1) + 1.0)
    return 1.0 - dice.mean()


def adapter_loss(probs_per_layer: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """Sum over layers of focal_loss(probs, target) + dice_loss(probs[:, 1], target); ``target``
    (B, H, W) in {0, 1}."""
    if not probs_per_layer:
        raise ValueError("adapter_loss got no layers")
    total = 0.0
    for probs in probs_per_layer:
        if probs.dim() != 4 or probs.shape[1] != 2:
            raise ValueError(f"adapter_loss probs must be (B, 2, H, W), got {tuple(probs.shape)}")
        total = total + focal_loss(probs, target) + dice_loss(probs[:, 1], target)
    return total


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def save_adapters(adapters: Adapters, path: str, metadata: dict[str, object]) -> str:
    """Write the adapter tensors as a safetensors file whose header metadata holds ``metadata``
    (every value JSON-encoded; tuples come back as lists) plus ``"format": ZSAD_FORMAT``.

    The file is written under a temporary name beside ``path`` and renamed onto it
    (:func:`pipeline.io.atomic.local_target`), so nothing half-written ever carries the final name.
    Returns the sha256 hex digest of the written file."""
    from safetensors.torch import save_file

    header = {}
    for key, value in dict(metadata).items():
        if not isinstance(key, str):
            raise ValueError(f"adapter metadata keys must be strings, got {key!r}")
        if key == "format" and value != ZSAD_FORMAT:
            raise ValueError(f"adapter metadata 'format' is set by save_adapters ({ZSAD_FORMAT!r}), got {value!r}")
        try:
            header[key] = json.dumps(value, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"adapter metadata {key!r} is not JSON-serialisable: {exc}") from exc
    header["format"] = json.dumps(ZSAD_FORMAT)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapters.state_dict().items()}
    with local_target(os.fspath(path)) as tmp:
        save_file(tensors, tmp, metadata=header)
        digest = hashlib.sha256()
        with open(tmp, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
            os.fsync(f.fileno())
    return digest.hexdigest()


def _interpret(obj: object, raw: dict[str, str] | None, label: str) -> tuple[dict, dict[str, object]]:
    """(state dict, metadata) from a file's content (:func:`checkpoints.read_checkpoint`): a zsad
    safetensors file's JSON metadata, another safetensors file, the reference code's torch file or a
    bare torch state dict."""
    if raw is not None:  # safetensors
        fmt = raw.get("format")
        try:
            fmt = json.loads(fmt) if fmt is not None else None
        except ValueError:
            pass  # e.g. Hugging Face's plain "pt"
        if not (isinstance(fmt, str) and fmt.startswith("zsad-adapters-")):
            return obj, {"format": "safetensors"}
        if fmt != ZSAD_FORMAT:
            raise AdapterLoadError(f"{label} is in format {fmt!r}, this zsad reads {ZSAD_FORMAT!r}")
        meta = {}
        for key, value in raw.items():
            try:
                meta[key] = json.loads(value)
            except ValueError as exc:
                raise AdapterLoadError(f"{label} metadata {key!r} is not valid JSON: {exc}") from exc
        return obj, meta
    if not isinstance(obj, dict):
        raise AdapterLoadError(f"{label} holds a {type(obj).__name__}, not a dict of adapter tensors")
    if AUTHORS_KEY in obj:
        sd = obj[AUTHORS_KEY]
        if not isinstance(sd, dict):
            raise AdapterLoadError(f"{label}: {AUTHORS_KEY!r} holds a {type(sd).__name__}, not a state dict")
        return sd, {"format": "april_gan"}
    return obj, {"format": "state_dict"}


def _names(keys: list[str], n: int = 5) -> str:
    more = f" ... ({len(keys)} in all)" if len(keys) > n else ""
    return f"{keys[:n]}{more}"


def _check_fit(sd: dict, label: str, width: int, embed: int, n_layers: int) -> dict[str, torch.Tensor]:
    if not sd:
        raise AdapterLoadError(f"{label} holds no adapter tensors")
    sd = {str(k): v for k, v in sd.items()}
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor) or not v.is_floating_point()]
    if bad:
        raise AdapterLoadError(f"{label} is not a state dict of float tensors: entries {_names(bad)}")
    unexpected = [k for k in sd if not _FC_KEY.match(k)]
    if unexpected:
        raise AdapterLoadError(
            f"{label} does not hold APRIL-GAN adapters: unexpected keys {_names(unexpected)} "
            "(expected fc.<i>.weight and fc.<i>.bias)"
        )
    count = max(int(_FC_KEY.match(k).group(1)) for k in sd) + 1
    if count != n_layers:
        raise AdapterLoadError(
            f"{label} holds adapters for {count} layers (fc.0 .. fc.{count - 1}), "
            f"the backbone setup uses {n_layers} layers"
        )
    need = {}
    for i in range(n_layers):
        need[f"fc.{i}.weight"] = (embed, width)
        need[f"fc.{i}.bias"] = (embed,)
    missing = [k for k in need if k not in sd]
    if missing:
        raise AdapterLoadError(f"{label} is missing keys {_names(missing)}")
    for key, shape in need.items():
        if tuple(sd[key].shape) != shape:
            raise AdapterLoadError(
                f"{label}: tensor {key} has shape {tuple(sd[key].shape)} in the file, the backbone needs {shape} "
                f"(width {width} -> embed {embed}); the adapters were trained for another backbone"
            )
    return sd


def read_adapter_file(path: str) -> tuple[dict[str, object], dict[str, object]]:
    """(tensors, metadata) of an adapter file in any of :func:`load_adapters`' formats, without
    checking them against a backbone (a cheap check on the driver before a run). Raises
    :class:`AdapterLoadError` naming the file."""
    path = os.fspath(path)
    obj, raw = checkpoints.read_checkpoint(path, what="adapter file", error=AdapterLoadError)
    return _interpret(obj, raw, f"adapter file {path}")


def load_adapters(path: str, *, width: int, embed: int, n_layers: int) -> tuple[Adapters, dict[str, object]]:
    """Read adapters for a backbone of transformer ``width``, joint ``embed`` size and
    ``n_layers`` chosen layers. Returns (Adapters in eval mode on the CPU, metadata).

    Formats, detected from the content: zsad safetensors (metadata as saved, ``"format"``
    included); the reference code's ``{"trainable_linearlayer": state_dict}`` torch file (metadata
    ``{"format": "april_gan"}``; other top-level entries are ignored); a bare state dict of
    ``fc.*`` tensors, torch or safetensors (``{"format": "state_dict"}`` / ``"safetensors"``).
    Torch files are read with ``weights_only=True``. Anything unreadable, or keys, layer count or
    shapes that do not fit the backbone, raise :class:`AdapterLoadError` naming the file."""
    path = os.fspath(path)
    label = f"adapter file {path}"
    sd, meta = read_adapter_file(path)
    sd = _check_fit(sd, label, width, embed, n_layers)
    adapters = Adapters(width, embed, n_layers)
    checkpoints.load_strict(
        adapters, sd, source=path, model=f"adapters {width} -> {embed} x {n_layers}", error=AdapterLoadError
    )
    return adapters.eval(), meta
