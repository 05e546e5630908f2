"""Dichotomous (foreground / background) segmentation from an ONNX model, run with onnxruntime
(METHODS.md section 5: the map SAM's automatic masks are filtered against).

The model is any ONNX export of a dichotomous image segmentation network whose first input is an
image batch ``(1, 3, S, S)`` (batch and spatial dimensions may be symbolic) and whose first output
is a foreground map ``(1, 1, S', S')`` (or ``(1, S', S')`` / ``(S', S')``); e.g. IS-Net
(Qin et al., *Highly Accurate Dichotomous Image Segmentation*, ECCV 2022) exported from its
reference code, whose first output is ``sigmoid(d1)`` at the input resolution.

Pre- and postprocessing follow IS-Net's reference inference script (``xuebinqin/DIS``,
``IS-Net/Inference.py``), with every number a parameter:

1. The RGB uint8 image is squashed to ``input_size`` x ``input_size`` (1024; no aspect keep, no
   crop) with bilinear interpolation (no antialias, ``align_corners=False``), truncated back to
   integer levels as the reference's ``.type(torch.uint8)`` does, and divided by 255.
2. Normalised per channel with ``mean`` (0.5, 0.5, 0.5) and ``std`` (1.0, 1.0, 1.0), i.e. pixels in
   [-0.5, 0.5]. (rembg's IS-Net session uses mean (0.485, 0.456, 0.406), std 1.0 and divides by the
   image maximum instead; give ``mean`` accordingly when running its export.)
3. The first output's first channel is resized back to the image's size (bilinear, no antialias),
   then min-max normalised over the image: ``(m - min) / (max - min)``. So the map spans exactly
   [0, 1] unless it is constant: a raw map whose range is within float32 rounding
   (``max - min <= 1e-6 * max(1, |min|, |max|)``) is returned resized and clipped to [0, 1]
   instead of dividing (nearly) by zero, where the reference would return NaN or stretch noise.

``onnxruntime`` is imported lazily: ``pip install 'zsad[onnx]'``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import ZsadError

DIS_INPUT_SIZE = 1024
DIS_MEAN = (0.5, 0.5, 0.5)
DIS_STD = (1.0, 1.0, 1.0)
#: A raw map whose range is at most this fraction of its magnitude (floor 1) counts as constant.
FLAT_TOLERANCE = 1e-6
_INSTALL_HINT = "pip install 'zsad[onnx]'"
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


class DisLoadError(ZsadError, RuntimeError):
    """A dichotomous segmentation model that cannot be loaded; the message names the file and why."""

    exit_code = 2


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise DisLoadError(f"the dichotomous segmentation model needs onnxruntime ({exc}); {_INSTALL_HINT}") from exc
    return onnxruntime


def default_providers(device: str = "cpu") -> list[str]:
    """onnxruntime execution providers for ``device``: CUDA first (CPU as fallback) when ``device``
    is ``cuda``/``cuda:N`` and the installed onnxruntime offers CUDA, else CPU only."""
    ort = _onnxruntime()
    if str(device).startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class DisModel:
    """An ONNX dichotomous segmentation model: ``predict(image) -> foreground map``.

    ``path``: a local ``.onnx`` file. ``input_size``: the side S the image is squashed to (must
    equal the model's input size where the ONNX graph fixes it). ``mean``/``std``: per-channel
    normalisation of [0, 1] pixels. ``providers``: onnxruntime execution providers; default
    :func:`default_providers` of ``device``. ``threads``: onnxruntime intra-op threads (default:
    onnxruntime's choice, one per physical core; set it to the CPUs a worker was given).
    """

    def __init__(
        self,
        path: str,
        *,
        input_size: int = DIS_INPUT_SIZE,
        mean: Sequence[float] = DIS_MEAN,
        std: Sequence[float] = DIS_STD,
        providers: Sequence[str] | None = None,
        device: str = "cpu",
        threads: int | None = None,
    ) -> None:
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"mean and std need 3 values each, std > 0; got mean={mean!r}, std={std!r}")
        if input_size < 1:
            raise ValueError(f"input_size must be >= 1, got {input_size}")
        ort = _onnxruntime()
        if not os.path.isfile(path):
            raise DisLoadError(f"dichotomous segmentation model {path} does not exist")
        self.path = path
        self.providers = list(providers) if providers else default_providers(device)
        try:
            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = int(threads)
            self.session = ort.InferenceSession(path, sess_options=options, providers=self.providers)
        except Exception as exc:  # not ONNX, truncated, unsupported operators...
            raise DisLoadError(
                f"dichotomous segmentation model {path} could not be loaded by onnxruntime: {exc}"
            ) from exc
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if not inputs or not outputs:
            raise DisLoadError(f"{path}: the model has no inputs or no outputs")
        first = inputs[0]
        self.input_name = first.name
        self.output_name = outputs[0].name
        shape = list(first.shape)  # ints, or str/None for symbolic dimensions
        if len(shape) != 4 or (isinstance(shape[1], int) and shape[1] != 3):
            raise DisLoadError(f"{path}: first input {first.name!r} has shape {shape}, expected (N, 3, S, S)")
        fixed = [d for d in shape[2:] if isinstance(d, int)]
        if any(d != input_size for d in fixed):
            raise DisLoadError(
                f"{path}: the model's input is {shape[2]} x {shape[3]} px but input_size is {input_size}"
            )
        if first.type not in _DTYPES:
            raise DisLoadError(f"{path}: first input has element type {first.type}, expected a float tensor")
        self.input_dtype = _DTYPES[first.type]
        self.input_size = int(input_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """uint8 ``(H, W, 3)`` RGB -> model input ``(1, 3, S, S)`` (see the module docstring)."""
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            what = (
                f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            )
            raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {what}")
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise ValueError(f"empty image of shape {image.shape}")
        s = self.input_size
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).unsqueeze(0).float()
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False).floor_()
        x = x.div_(255.0)
        x = (x - torch.tensor(self.mean).view(1, 3, 1, 1)) / torch.tensor(self.std).view(1, 3, 1, 1)
        return x.numpy().astype(self.input_dtype, copy=False)

    def raw(self, batch: np.ndarray) -> np.ndarray:
        """Run the model on a prepared input ``(1, 3, S, S)``; the first output's first channel
        ``(S', S')`` as float32 (no normalisation)."""
        out = np.asarray(self.session.run([self.output_name], {self.input_name: batch})[0])
        while out.ndim > 2:
            out = out[0]
        if out.ndim != 2:
            raise RuntimeError(f"{self.path}: first output has {out.ndim} dims after taking batch/channel 0")
        return out.astype(np.float32, copy=False)

    def predict(self, image: np.ndarray) -> np.ndarray:
        """uint8 ``(H, W, 3)`` RGB image -> float32 foreground map ``(H, W)`` in [0, 1] (1 = foreground),
        min-max normalised over the image."""
        x = self.preprocess(image)  # validates the image
        h, w = image.shape[:2]
        raw = self.raw(x)
        lo, hi = float(raw.min()), float(raw.max())
        m = torch.from_numpy(raw)[None, None]
        if m.shape[-2:] != (h, w):
            m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
        m = m[0, 0].double()
        if hi - lo <= FLAT_TOLERANCE * max(1.0, abs(lo), abs(hi)):
            return m.clamp(0.0, 1.0).float().numpy()
        lo, hi = float(m.min()), float(m.max())
        return ((m - lo) / (hi - lo)).clamp_(0.0, 1.0).float().numpy()
