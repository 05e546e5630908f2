"""JPEG decoding inside a model actor (``decode.device: model``): bytes in, RGB uint8 arrays out.

The decode stage then only fetches each file and reads its header (:func:`pipeline.io.images.probe`:
format, size, decompression-bomb guard, truncation); the bytes travel to the model actor, which
decodes a batch of them here before its model runs:

- RGB and grey JPEGs (:attr:`~pipeline.io.images.Header.plain_jpeg`) with torchvision's
  ``decode_jpeg`` on the actor's device: nvJPEG on a GPU (one batched call), libjpeg-turbo on a CPU
  actor (the same code, which is how the tests run it). The EXIF orientation is applied as
  Pillow's ``ImageOps.exif_transpose`` does (flips and transposes of the decoded tensor), and with
  ``decode.resolution: working`` the image is resized on the device to the working size
  (:class:`~pipeline.io.images.WorkingSize`; torch's antialiased bicubic, rounded to uint8). The
  device decodes the full-size image: nvJPEG has no DCT scaling.
- Everything else (PNG, TIFF, 16-bit, CMYK JPEGs...) and any JPEG the device decoder refuses:
  :func:`pipeline.io.images.decode_working` on the actor's CPU, as the decode stage would have.

The decoded image comes back to host memory at its working size, where the scorer reads it.
Failures are :class:`~pipeline.io.images.DecodeError` values, one per image, as the decode stage's.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.io.images import DecodeError, Header, WorkingSize, decode_working, probe

#: EXIF orientation -> what makes a (C, H, W) tensor stored that way look as displayed (Pillow's
#: ``exif_transpose``: 2 mirror, 3 rotate 180, 4 flip, 5 transpose, 6 rotate 90 clockwise,
#: 7 transverse, 8 rotate 90 counter-clockwise)
ORIENTATIONS: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    2: lambda x: x.flip(-1),
    3: lambda x: x.flip(-2, -1),
    4: lambda x: x.flip(-2),
    5: lambda x: x.transpose(-2, -1),
    6: lambda x: x.transpose(-2, -1).flip(-1),
    7: lambda x: x.transpose(-2, -1).flip(-2, -1),
    8: lambda x: x.transpose(-2, -1).flip(-2),
}


def resize_uint8(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A (C, H, W) uint8 tensor resized to ``size`` (height, width), antialiased bicubic: on the CPU
    torch's uint8 kernel (:func:`pipeline.io.images.resize_rgb`'s), on a GPU on floats, rounded and
    clipped back to uint8 (both within a few grey levels of Pillow's bicubic resize)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.device.type == "cpu":
        return F.interpolate(x[None], size=size, mode="bicubic", antialias=True, align_corners=False)[0]
    y = F.interpolate(x[None].float(), size=size, mode="bicubic", antialias=True, align_corners=False)[0]
    return y.round_().clamp_(0, 255).to(torch.uint8)


class DeviceDecoder:
    """Decodes batches of encoded images on ``device`` (see the module docstring).

    ``max_pixels``: ``decode.max_pixels``; ``working``: the plan's working size (None: full size).
    Counters: ``on_device`` images decoded by the device decoder, ``on_cpu`` by Pillow (formats it
    does not take), ``refused`` JPEGs the device decoder refused (then decoded by Pillow, reason
    kept in ``last_refusal``)."""

    def __init__(self, device: torch.device | str, max_pixels: int, working: WorkingSize | None = None) -> None:
        self.device = torch.device(device)
        self.max_pixels = max_pixels
        self.working = working
        self.on_device = self.on_cpu = self.refused = 0
        self.last_refusal: str | None = None

    def decode(self, blobs: list[bytes]) -> list[np.ndarray | DecodeError]:
        """One ``(h, w, 3)`` uint8 RGB array (displayed orientation, working size) or one
        :class:`DecodeError` per encoded image, in order."""
        out: list[np.ndarray | DecodeError | None] = [None] * len(blobs)
        jpegs: dict[int, Header] = {}
        for i, data in enumerate(blobs):
            try:
                head = probe(data, self.max_pixels)
            except DecodeError as exc:
                out[i] = exc
                continue
            if head.plain_jpeg:
                jpegs[i] = head
            else:
                out[i] = self._pillow(data)
                self.on_cpu += 1
        if jpegs:
            order = list(jpegs)
            for i, decoded in zip(order, self._device_jpegs([blobs[i] for i in order])):
                if isinstance(decoded, BaseException):
                    self.refused += 1
                    self.last_refusal = f"{type(decoded).__name__}: {decoded}"
                    out[i] = self._pillow(blobs[i])
                    continue
                out[i] = self._finish(decoded, jpegs[i])
                self.on_device += 1
        return out  # type: ignore[return-value]

    def _pillow(self, data: bytes) -> np.ndarray | DecodeError:
        try:
            return decode_working(data, self.max_pixels, self.working)[0]
        except DecodeError as exc:
            return exc

    def _device_jpegs(self, blobs: list[bytes]) -> list[torch.Tensor | BaseException]:
        """The JPEGs decoded on the device, in one call; when that call fails, one at a time so a
        refused image fails alone."""
        from torchvision.io import ImageReadMode, decode_jpeg

        data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        try:
            return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
        except Exception as exc:  # noqa: BLE001 - retried one by one below
            if len(data) == 1:
                return [exc]
        out: list[torch.Tensor | BaseException] = []
        for d in data:
            try:
                out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=self.device))
            except Exception as exc:  # noqa: BLE001 - this image goes to Pillow
                out.append(exc)
        return out

    def _finish(self, x: torch.Tensor, head: Header) -> np.ndarray:
        """A decoded (3, H, W) tensor -> displayed orientation, working size, host (h, w, 3) array."""
        turn = ORIENTATIONS.get(head.orientation)
        if turn is not None:
            x = turn(x)
        h, w = int(x.shape[-2]), int(x.shape[-1])
        if self.working is not None:
            x = resize_uint8(x, self.working.size(h, w))
        return np.ascontiguousarray(x.permute(1, 2, 0).cpu().numpy())
