"""SAM (segment-anything v1) loading and an embed-once / decode-many engine (pure torch; no I/O
beyond reading a local checkpoint file).

Models: ``vit_h``, ``vit_l``, ``vit_b`` are segment-anything's own architectures (built through
``segment_anything.sam_model_registry``); ``tiny`` is a small SAM assembled from segment-anything's
own modules (256 px input, patch 16, a 16 x 16 embedding grid, 2 encoder blocks of width 64, one
with global attention) so tests and the offline demo run the real code paths in milliseconds.

Weights are given by the caller as a local checkpoint path (already fetched and hash-checked by
:mod:`pipeline.io.weights`) or nothing (random init, seeded so every actor of a pool builds the same
model). Checkpoints are read with ``torch.load(weights_only=True)`` (``.safetensors`` files with
safetensors) and loaded strictly, by :mod:`pipeline.models.checkpoints`.

Coordinate conventions (as SAM's): images are ``(H, W, 3)`` uint8 RGB; points are ``(x, y)`` in
pixels of the ORIGINAL image; boxes are ``(x0, y0, x1, y1)`` in original pixels. Internally SAM
resizes the image so its longest side is ``img_size`` (1024 for the real models, 256 for ``tiny``),
normalises with mean (123.675, 116.28, 103.53) / std (58.395, 57.12, 57.375) on 0-255 RGB and pads
to a square. Its decoder predicts low-resolution logits of ``low_res_size`` x ``low_res_size``
(4 x the embedding grid: 256 for the real models, 64 for ``tiny``) over that padded square; they are
what an earlier decode hands to a later one as ``mask_inputs``.

Usage::

    sam = build_sam("vit_b", "/cache/sam_vit_b_01ec64.pth")
    engine = SamEngine(sam, device="cuda")
    emb = engine.embed(image)                     # the image encoder runs once
    out = engine.decode(emb, points=p, labels=l)  # many prompts, one decoder call
    records = engine.automatic_masks(emb)         # reuses the same embedding
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import numpy as np
import segment_anything
import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.utils import amg
from segment_anything.utils.transforms import ResizeLongestSide
from torchvision.ops.boxes import batched_nms

from pipeline.errors import ZsadError
from pipeline.models import checkpoints
from pipeline.models.registry import ModelLoadError
from pipeline.ops.points import bounding_box

SAM_MODELS = ("vit_h", "vit_l", "vit_b", "tiny")
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
RANDOM_INIT_SEED = 0


class SamLoadError(ModelLoadError):
    """A SAM that cannot be built or whose checkpoint does not load; the message names the model or
    file and the cause (unknown name, unreadable or unsafe file, missing/unexpected keys, shapes)."""


class SamInputError(ZsadError, ValueError):
    """An image or prompt that SAM cannot take (wrong dtype, shape or batch size); the message says
    which argument and what was expected."""


# ----------------------------------------------------------------------------------------- building


@dataclass(frozen=True)
class SamArch:
    """Architecture numbers of a SAM assembled from segment-anything's modules.

    Encoder: ``img_size`` px input (square, padded), ``patch_size`` px patches, so an embedding grid
    of ``img_size // patch_size``; ``encoder_depth`` blocks of width ``encoder_embed_dim``, windowed
    attention (``window_size``) except in ``global_attn_indexes``; the neck projects to
    ``prompt_embed_dim`` channels. Decoder: a two-way transformer of ``decoder_depth`` blocks of
    width ``prompt_embed_dim`` and ``decoder_num_heads`` heads."""

    img_size: int
    patch_size: int
    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    global_attn_indexes: tuple[int, ...]
    window_size: int
    prompt_embed_dim: int
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256


TINY_ARCH = SamArch(
    img_size=256,
    patch_size=16,
    encoder_embed_dim=64,
    encoder_depth=2,
    encoder_num_heads=2,
    global_attn_indexes=(1,),
    window_size=8,
    prompt_embed_dim=32,
    mask_in_chans=8,
    decoder_depth=2,
    decoder_mlp_dim=64,
    decoder_num_heads=2,
    iou_head_hidden_dim=32,
)

#: the image encoder's width of each model (segment-anything's builders; the tiny one above): a
#: checkpoint's ``image_encoder.patch_embed.proj.weight`` has this many rows
ENCODER_WIDTHS = {"vit_h": 1280, "vit_l": 1024, "vit_b": 768, "tiny": TINY_ARCH.encoder_embed_dim}


def assemble_sam(arch: SamArch) -> Sam:
    """A randomly initialised :class:`segment_anything.modeling.Sam` with these architecture numbers
    (the same module layout as ``segment_anything.build_sam``; SAM's pixel mean/std)."""
    grid = arch.img_size // arch.patch_size
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=arch.encoder_depth,
            embed_dim=arch.encoder_embed_dim,
            img_size=arch.img_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=arch.encoder_num_heads,
            patch_size=arch.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=arch.global_attn_indexes,
            window_size=arch.window_size,
            out_chans=arch.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=arch.prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(arch.img_size, arch.img_size),
            mask_in_chans=arch.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=arch.decoder_depth,
                embedding_dim=arch.prompt_embed_dim,
                mlp_dim=arch.decoder_mlp_dim,
                num_heads=arch.decoder_num_heads,
            ),
            transformer_dim=arch.prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=arch.iou_head_hidden_dim,
        ),
        pixel_mean=list(SAM_PIXEL_MEAN),
        pixel_std=list(SAM_PIXEL_STD),
    )


_BUILDERS: dict[str, Callable[[], Sam]] = {
    "vit_h": lambda: segment_anything.sam_model_registry["vit_h"](checkpoint=None),
    "vit_l": lambda: segment_anything.sam_model_registry["vit_l"](checkpoint=None),
    "vit_b": lambda: segment_anything.sam_model_registry["vit_b"](checkpoint=None),
    "tiny": lambda: assemble_sam(TINY_ARCH),
}


def build_sam(
    model: str,
    checkpoint: str | None = None,
    *,
    seed: int = RANDOM_INIT_SEED,
    device: str | torch.device = "cpu",
) -> Sam:
    """Build a SAM (one of :data:`SAM_MODELS`) in eval mode on ``device``.

    ``checkpoint``: a local state-dict file (resolve URIs first with :mod:`pipeline.io.weights`),
    read with ``torch.load(weights_only=True)`` (or safetensors for ``.safetensors``), optionally
    wrapped as ``{"model": ...}`` / ``{"state_dict": ...}`` and/or with ``module.`` prefixes, and
    loaded strictly: every key and shape must match. ``None``: random init under
    ``torch.manual_seed(seed)`` so every actor builds the same model (the caller's global RNG state is
    left untouched).

    Raises :class:`SamLoadError` for an unknown model name, an unreadable or unsafe file, and a
    checkpoint whose keys or shapes do not fit the architecture.
    """
    if model not in _BUILDERS:
        raise SamLoadError(f"unknown SAM model {model!r}; valid: {', '.join(SAM_MODELS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = _BUILDERS[model]()
    if checkpoint is not None:
        sd = checkpoints.read_state_dict(str(checkpoint), what="SAM checkpoint", error=SamLoadError)
        checkpoints.load_strict(
            sam, sd, source=f"SAM checkpoint {checkpoint}", model=model, error=SamLoadError, counted=True
        )
    return sam.to(device).eval()


# ----------------------------------------------------------------------------------------- engine


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> bool:
    """Make glibc's allocator keep freed memory in this process instead of handing it back to the
    kernel (``mallopt``: no trimming, and no separate ``mmap`` for large blocks: both thresholds set
    to -1, which glibc reads as the largest size). SAM on a CPU allocates and frees large temporary
    tensors in every call; with the defaults each one is a fresh ``mmap`` whose pages fault in
    again, which dominated its time (BENCHMARKS.md). The price is a higher resident size. The effect
    of starting the process with ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``, from inside a
    worker that is already running. Returns False where there is no glibc (nothing changed)."""
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, -1)) and bool(mallopt(_M_TRIM_THRESHOLD, -1))


@dataclass(frozen=True)
class SamEmbedding:
    """One image's SAM embedding: ``features`` (1, C, g, g) float32 (C = 256, g = 64 for the real
    models), the ``original_size`` (H, W) of the image and the ``input_size`` (h, w) it was resized
    to (longest side ``img_size``) before padding to ``img_size`` x ``img_size``."""

    features: torch.Tensor
    original_size: tuple[int, int]
    input_size: tuple[int, int]


@dataclass(frozen=True)
class SamDecoded:
    """Decoder output for B prompts with K masks each (K = 3 multimask, else 1), on the engine's device.

    - ``masks``: (B, K, H, W) bool at the original image size (logits > 0);
    - ``iou_predictions``: (B, K) float32, SAM's predicted IoU of each mask;
    - ``low_res_logits``: (B, K, L, L) float32 logits over the padded ``img_size`` square
      (L = ``SamEngine.low_res_size``); slice ``[:, k : k + 1]`` to feed one back as ``mask_inputs``.
    """

    masks: torch.Tensor
    iou_predictions: torch.Tensor
    low_res_logits: torch.Tensor

    def best(self) -> SamDecoded:
        """Keep, per prompt, the mask with the highest predicted IoU (K becomes 1)."""
        idx = self.iou_predictions.argmax(dim=1)
        rows = torch.arange(idx.shape[0], device=idx.device)
        return SamDecoded(
            masks=self.masks[rows, idx].unsqueeze(1),
            iou_predictions=self.iou_predictions[rows, idx].unsqueeze(1),
            low_res_logits=self.low_res_logits[rows, idx].unsqueeze(1),
        )


@dataclass(frozen=True)
class CascadeStep:
    """One decoder step of :meth:`SamEngine.cascade`: ``mask`` (H, W) bool at the original size,
    SAM's predicted ``iou``, the ``low_res_logits`` (1, 1, L, L) the next step takes as mask input,
    and the ``box`` (x0, y0, x1, y1) the step was given (None before step 3)."""

    mask: torch.Tensor
    iou: float
    low_res_logits: torch.Tensor
    box: np.ndarray | None


def _as_tensor(x: Any, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(device=device, dtype=dtype)
    try:
        return torch.as_tensor(np.asarray(x), dtype=dtype, device=device)
    except (TypeError, ValueError) as exc:
        raise SamInputError(f"{name} must be an array or tensor: {exc}") from None


class SamEngine:
    """Embed an image once with SAM's image encoder, then decode any number of prompts against that
    embedding in batches (what :class:`segment_anything.SamPredictor` does, without its hidden
    per-image state: the embedding is a value the caller holds).

    ``device``: where the model runs (``"cuda"``, ``"cpu"``, a torch.device); ``None`` keeps the
    model's current device. Nothing is probed: pass ``"cuda"`` to use a GPU. All calls run under
    ``torch.no_grad()`` and return ordinary tensors on that device.
    """

    def __init__(self, sam: Sam, device: str | torch.device | None = None, precision: str = "fp32") -> None:
        from pipeline.models.precision import resolve

        if device is not None:
            sam = sam.to(device)
        self.sam = sam.eval()
        self.device = torch.device(sam.device)
        #: the image encoder's autocast precision (resolved for the device); the decoders run fp32
        self.precision = resolve(precision, self.device)
        self.img_size = int(sam.image_encoder.img_size)
        self.transform = ResizeLongestSide(self.img_size)
        grid = sam.prompt_encoder.image_embedding_size
        self.low_res_size = int(sam.prompt_encoder.mask_input_size[0])
        self.embedding_size = (int(grid[0]), int(grid[1]))

    # ------------------------------------------------------------------ embedding
    @torch.no_grad()
    def embed(self, image: np.ndarray) -> SamEmbedding:
        """Run the image encoder once on ``image`` (H, W, 3) uint8 RGB.

        The image is resized so its longest side is ``img_size`` (SAM's ``ResizeLongestSide``,
        bilinear via PIL), normalised with SAM's pixel mean/std and zero-padded to a square, exactly
        as ``SamPredictor.set_image`` does."""
        if not isinstance(image, np.ndarray):
            raise SamInputError(f"image must be a numpy array (H, W, 3) uint8 RGB, got {type(image).__name__}")
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise SamInputError(f"image must be (H, W, 3) uint8 RGB, got shape {image.shape} dtype {image.dtype}")
        if min(image.shape[:2]) < 1:
            raise SamInputError(f"image is empty: shape {image.shape}")
        from pipeline.models.precision import autocast, to_device

        resized = self.transform.apply_image(np.ascontiguousarray(image))
        x = to_device(torch.from_numpy(resized), self.device).permute(2, 0, 1).contiguous()[None].float()
        x = self.sam.preprocess(x)
        with autocast(self.device, self.precision):
            features = self.sam.image_encoder(x)
        features = features.float()
        return SamEmbedding(
            features=features,
            original_size=(int(image.shape[0]), int(image.shape[1])),
            input_size=(int(resized.shape[0]), int(resized.shape[1])),
        )

    # ------------------------------------------------------------------ decoding (batched core)
    def _prompts(
        self, emb: SamEmbedding, points: Any, labels: Any, boxes: Any, mask_inputs: Any
    ) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor | None, torch.Tensor | None]:
        """Validate prompts and move them into the resized-input frame (what SAM's prompt encoder takes)."""
        if points is None and boxes is None and mask_inputs is None:
            raise SamInputError("decode needs at least one prompt: points (+ labels), boxes or mask_inputs")
        sizes: dict[str, int] = {}
        pts = None
        if points is not None or labels is not None:
            if points is None or labels is None:
                raise SamInputError("points and labels go together: give both or neither")
            p = _as_tensor(points, "points", torch.float32, self.device)
            lab = _as_tensor(labels, "labels", torch.int64, self.device)
            if p.ndim != 3 or p.shape[2] != 2 or p.shape[1] < 1:
                raise SamInputError(f"points must be (B, N, 2) xy pixels with N >= 1, got {tuple(p.shape)}")
            if lab.shape != p.shape[:2]:
                raise SamInputError(
                    f"labels must be (B, N) = {tuple(p.shape[:2])} to match points, got {tuple(lab.shape)}"
                )
            if not bool(((lab == 1) | (lab == 0) | (lab == -1)).all()):
                raise SamInputError("labels must be 1 (positive), 0 (negative) or -1 (padding point, ignored)")
            pts = (self.transform.apply_coords_torch(p, emb.original_size), lab.to(torch.int32))
            sizes["points"] = p.shape[0]
        box = None
        if boxes is not None:
            b = _as_tensor(boxes, "boxes", torch.float32, self.device)
            if b.ndim != 2 or b.shape[1] != 4:
                raise SamInputError(f"boxes must be (B, 4) xyxy pixels, got {tuple(b.shape)}")
            box = self.transform.apply_boxes_torch(b, emb.original_size)
            sizes["boxes"] = b.shape[0]
        masks = None
        if mask_inputs is not None:
            masks = _as_tensor(mask_inputs, "mask_inputs", torch.float32, self.device)
            want = (1, self.low_res_size, self.low_res_size)
            if masks.ndim != 4 or tuple(masks.shape[1:]) != want:
                raise SamInputError(
                    f"mask_inputs must be (B, {want[0]}, {want[1]}, {want[2]}) low-res logits from an earlier decode, "
                    f"got {tuple(masks.shape)}"
                )
            sizes["mask_inputs"] = masks.shape[0]
        if len(set(sizes.values())) > 1:
            raise SamInputError(f"prompt batch sizes differ: {sizes}")
        if next(iter(sizes.values())) < 1:
            raise SamInputError(f"empty prompt batch: {sizes}")
        return pts, box, masks

    @torch.no_grad()
    def decode_logits(
        self,
        emb: SamEmbedding,
        points: Any = None,
        labels: Any = None,
        boxes: Any = None,
        mask_inputs: Any = None,
        multimask: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The batched core: one prompt-encoder + mask-decoder call for B prompts.

        Arguments as :meth:`decode`. Returns ``(low_res_logits (B, K, L, L), iou_predictions (B, K))``;
        :meth:`upscale` turns the logits into original-size logits."""
        pts, box, masks = self._prompts(emb, points, labels, boxes, mask_inputs)
        features = emb.features.to(self.device)
        sparse, dense = self.sam.prompt_encoder(points=pts, boxes=box, masks=masks)
        low_res, iou = self.sam.mask_decoder(
            image_embeddings=features,
            image_pe=self.sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )
        return low_res, iou

    @torch.no_grad()
    def upscale(self, emb: SamEmbedding, low_res_logits: torch.Tensor) -> torch.Tensor:
        """Low-res logits (B, K, L, L) -> logits (B, K, H, W) at the original image size (SAM's
        ``postprocess_masks``: bilinear to the padded square, crop the padding, bilinear to (H, W))."""
        return self.sam.postprocess_masks(low_res_logits, emb.input_size, emb.original_size)

    def decode(
        self,
        emb: SamEmbedding,
        points: Any = None,
        labels: Any = None,
        boxes: Any = None,
        mask_inputs: Any = None,
        multimask: bool = True,
    ) -> SamDecoded:
        """Decode B prompts against one embedding in a single decoder call.

        - ``points``: (B, N, 2) float (x, y) in ORIGINAL image pixels, with ``labels`` (B, N):
          1 = positive, 0 = negative, -1 = padding (SAM's "not a point" token; lets prompts with
          different point counts share a batch);
        - ``boxes``: (B, 4) float (x0, y0, x1, y1) in original pixels;
        - ``mask_inputs``: (B, 1, L, L) low-res logits from an earlier decode (L = ``low_res_size``);
        - ``multimask``: K = 3 masks per prompt (SAM's ambiguity outputs) if true, else K = 1.

        Any combination works; given prompts must agree on B. numpy arrays or tensors are accepted.
        Returns a :class:`SamDecoded` (masks at the original size, IoU predictions, low-res logits).
        """
        low_res, iou = self.decode_logits(emb, points, labels, boxes, mask_inputs, multimask)
        masks = self.upscale(emb, low_res) > self.sam.mask_threshold
        return SamDecoded(masks=masks, iou_predictions=iou, low_res_logits=low_res)

    # ------------------------------------------------------------------ the CLIP-SAM cascade
    def cascade(
        self, emb: SamEmbedding, points: Any, labels: Any, steps: int = 3, multimask: bool = True
    ) -> list[CascadeStep]:
        """The CLIP-SAM prompt cascade on ONE embedding (METHODS.md section 6): (1) the points ->
        the best of SAM's three masks by predicted IoU and its low-res logits L1; (2) the points with
        L1 as mask input -> M2, L2; (3) the points, the bounding box of M2 and L2 -> M3. ``steps``
        (1, 2 or 3) stops earlier, for the paper's ablation. ``points`` (N, 2) xy original pixels,
        ``labels`` (N,) 1/0. Returns one :class:`CascadeStep` per step run; a step-3 box cannot be
        made from an empty M2, and then the cascade ends at step 2. ``multimask`` (default): steps 2
        and 3 also ask SAM for its three masks and keep the one with the highest predicted IoU (the
        paper's "highest-scored mask output", as PerSAM's cascaded post-refinement); False: SAM's
        single-mask output at steps 2 and 3."""
        if steps not in (1, 2, 3):
            raise SamInputError(f"cascade steps must be 1, 2 or 3, got {steps!r}")
        p = np.asarray(points, dtype=np.float32).reshape(-1, 2)[None]
        lab = np.asarray(labels, dtype=np.int64).reshape(1, -1)
        first = self.decode(emb, points=p, labels=lab, multimask=True).best()
        out = [CascadeStep(first.masks[0, 0], float(first.iou_predictions[0, 0]), first.low_res_logits[:, 0:1], None)]
        if steps >= 2:
            second = self.decode(emb, points=p, labels=lab, mask_inputs=out[-1].low_res_logits, multimask=multimask)
            second = second.best() if multimask else second
            out.append(
                CascadeStep(
                    second.masks[0, 0], float(second.iou_predictions[0, 0]), second.low_res_logits[:, 0:1], None
                )
            )
        if steps >= 3:
            box = bounding_box(out[-1].mask.detach().cpu().numpy())
            if box is not None:
                third = self.decode(
                    emb, points=p, labels=lab, boxes=box[None], mask_inputs=out[-1].low_res_logits, multimask=multimask
                )
                third = third.best() if multimask else third
                out.append(
                    CascadeStep(
                        third.masks[0, 0], float(third.iou_predictions[0, 0]), third.low_res_logits[:, 0:1], box
                    )
                )
        return out

    # ------------------------------------------------------------------ automatic masks
    @torch.no_grad()
    def automatic_masks(
        self,
        image: np.ndarray | SamEmbedding,
        *,
        points_per_side: int = 16,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        min_mask_area: int = 0,
    ) -> list[dict[str, Any]]:
        """SAM's automatic mask generation (``SamAutomaticMaskGenerator`` without crops and without
        hole/island removal) on ONE embedding: a ``points_per_side`` x ``points_per_side`` grid of
        positive points (cell centres) is decoded ``points_per_batch`` at a time with 3 masks per
        point; masks are kept when predicted IoU > ``pred_iou_thresh`` and stability score (IoU of the
        masks thresholded at +/- ``stability_score_offset``) >= ``stability_score_thresh`` (a threshold
        of 0 disables its filter, as in SAM); empty masks and masks under ``min_mask_area`` pixels are
        dropped; duplicates are removed by box NMS at ``box_nms_thresh``.

        ``image``: (H, W, 3) uint8 RGB (embedded here, once) or a :class:`SamEmbedding`.
        ``points_per_batch`` sets memory and speed: SAM's decoder repeats the image embedding for
        every prompt (tens of MiB per prompt for the real models on CPU, where batches of about 16
        ran faster per prompt than 64).

        Returns records sorted by predicted IoU (descending), each with ``segmentation`` (H, W) bool
        numpy, ``area`` (int pixels), ``bbox`` (x0, y0, x1, y1) ints with x1/y1 EXCLUSIVE, in
        original pixels, ``predicted_iou``, ``stability_score`` (floats) and ``point_coords``
        (x, y) of the grid point that produced the mask.
        """
        if points_per_side < 1 or points_per_batch < 1:
            raise SamInputError(
                f"points_per_side ({points_per_side}) and points_per_batch ({points_per_batch}) must be >= 1"
            )
        emb = image if isinstance(image, SamEmbedding) else self.embed(image)
        h, w = emb.original_size
        grid = amg.build_point_grid(points_per_side) * np.array([[w, h]], dtype=np.float64)
        grid = torch.as_tensor(grid, dtype=torch.float32, device=self.device)
        threshold = self.sam.mask_threshold

        boxes, scores, stabilities, points, areas, packed = [], [], [], [], [], []
        for start in range(0, grid.shape[0], points_per_batch):
            pts = grid[start : start + points_per_batch]
            low_res, iou = self.decode_logits(
                emb, points=pts[:, None, :], labels=torch.ones(pts.shape[0], 1, device=self.device), multimask=True
            )
            k = low_res.shape[1]
            low_res, iou = low_res.flatten(0, 1), iou.flatten(0, 1)
            pts = pts.repeat_interleave(k, dim=0)
            keep = iou > pred_iou_thresh if pred_iou_thresh > 0.0 else torch.ones_like(iou, dtype=torch.bool)
            low_res, iou, pts = low_res[keep], iou[keep], pts[keep]
            # upscale only the survivors, points_per_batch masks at a time (bounds the memory of
            # SAM's upscaling, which goes through the img_size x img_size square)
            for c in range(0, low_res.shape[0], points_per_batch):
                logits = self.upscale(emb, low_res[c : c + points_per_batch, None])[:, 0]  # (M, H, W)
                stability = amg.calculate_stability_score(logits, threshold, stability_score_offset)
                masks = logits > threshold
                del logits
                area = masks.sum(-1, dtype=torch.int16).sum(-1, dtype=torch.int32)  # as SAM: rows < 32768 px
                keep = area >= max(1, min_mask_area)
                if stability_score_thresh > 0.0:
                    keep &= stability >= stability_score_thresh
                if not bool(keep.any()):
                    continue
                masks = masks[keep]
                boxes.append(amg.batched_mask_to_box(masks))  # inclusive x1, y1 (SAM's convention for NMS)
                scores.append(iou[c : c + points_per_batch][keep])
                stabilities.append(stability[keep])
                points.append(pts[c : c + points_per_batch][keep])
                areas.append(area[keep])
                # 1 bit per pixel until the survivors of NMS are known (SAM's RLE loop is far slower)
                packed.append(np.packbits(masks.flatten(1).cpu().numpy(), axis=1))
                del masks
        if not packed:
            return []
        box = torch.cat(boxes)
        score = torch.cat(scores)
        order = batched_nms(box.float(), score, torch.zeros(len(box), device=box.device), iou_threshold=box_nms_thresh)
        box, score = box[order].cpu(), score[order].cpu()
        stab = torch.cat(stabilities)[order].cpu()
        pts = torch.cat(points)[order].cpu()
        area = torch.cat(areas)[order].cpu()
        bits = np.concatenate(packed)
        records = []
        for i, j in enumerate(order.tolist()):
            x0, y0, x1, y1 = (int(v) for v in box[i])
            records.append(
                {
                    "segmentation": np.unpackbits(bits[j], count=h * w).reshape(h, w).view(bool),
                    "area": int(area[i]),
                    "bbox": (x0, y0, x1 + 1, y1 + 1),
                    "predicted_iou": float(score[i]),
                    "stability_score": float(stab[i]),
                    "point_coords": (float(pts[i, 0]), float(pts[i, 1])),
                }
            )
        return records
