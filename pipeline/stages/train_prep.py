"""Training-sample stage of ``zsad train``: a decoded image and its ground truth -> the image at the
adapters' input size and its binary mask at the same size.

Requires the decode stage's ``image`` and the manifest's ``gt_label`` and ``mask_uri``. Produces
``pixels`` ((S, S, 3) uint8: squashed to S x S like the scoring path, with ``clip.resize``) and
``mask`` ((S, S) uint8 0/1): an anomalous image's mask file read (any non-zero pixel), resized
bilinearly and thresholded at 0.5 (as APRIL-GAN resizes its masks); a normal image's mask is zeros.
A row without a label, an anomalous row without a mask file, or a mask that cannot be read becomes an
error row (stage ``train_prep``) and is left out of training (``zsad train`` counts them).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from pipeline.io.fs import StorageOptions
from pipeline.models import clip as clip_models
from pipeline.stages.base import check_columns
from pipeline.stages.evaluate import read_mask
from pipeline.stages.records import TENSOR, RowErrors, each_row, object_column

STAGE = "train_prep"


def _empty(n: int, shape: tuple[int, ...]) -> np.ndarray:
    return object_column([np.zeros(shape, np.uint8) for _ in range(n)])


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """A bool (H, W) mask -> (size, size) uint8 0/1: bilinear on 0/255, then > 127.5."""
    img = Image.fromarray(mask.astype(np.uint8) * 255)
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return (np.asarray(img) > 127.5).astype(np.uint8)


class TrainPrepStage:
    name = STAGE
    section = "decode"
    kind = "task"
    requires = ("image", "gt_label", "mask_uri", "status")
    types = {"pixels": TENSOR, "mask": TENSOR, "status": pa.string(), "error_stage": pa.string(),
             "error_type": pa.string(), "error_message": pa.string()}
    produces = tuple(types)
    drops = ("image",)

    def __init__(self, size: int, resize: str = "torch", storage: StorageOptions | None = None) -> None:
        self.size = size
        self.resize = resize
        self.storage = storage

    def setup(self) -> None:
        """Nothing to build."""

    def _pixels(self, image: np.ndarray) -> np.ndarray:
        if self.resize == "pil":
            return np.asarray(Image.fromarray(image).resize((self.size, self.size), Image.BICUBIC))
        pre = clip_models.Preprocess(self.size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        x = clip_models.preprocess_images([torch.from_numpy(np.ascontiguousarray(image))], pre)[0]
        return (x.permute(1, 2, 0).numpy() * 255.0).round().clip(0, 255).astype(np.uint8)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = check_columns(STAGE, batch, self.requires)
        errors = RowErrors(batch, n)
        pixels = _empty(n, (0, 0, 3))
        masks = _empty(n, (0, 0))

        def row(i: int) -> None:
            label, mask_uri = batch["gt_label"][i], batch["mask_uri"][i]
            if label is None or (isinstance(label, float) and np.isnan(label)):
                errors.fail(i, STAGE, "NoLabel", "no ground-truth label: training needs a layout with labels and masks")
                return
            if int(label) == 1 and not mask_uri:
                errors.fail(i, STAGE, "NoMask", "an anomalous image without a mask file cannot be trained on")
                return
            image = np.asarray(batch["image"][i])
            if int(label) == 1:
                mask = resize_mask(read_mask(str(mask_uri), self.storage), self.size)
            else:
                mask = np.zeros((self.size, self.size), np.uint8)
            pixels[i] = self._pixels(image)
            masks[i] = mask

        each_row(errors.status, row, errors=errors, stage=STAGE, what=lambda i: f"mask {batch['mask_uri'][i]}")
        out = {k: v for k, v in batch.items() if k not in self.drops}
        out.update(pixels=pixels, mask=masks, **errors.columns())
        return out
