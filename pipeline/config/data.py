"""How the input is reached, listed and decoded: the ``storage``, ``data`` and ``decode`` sections."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.config.base import SpecModel


class StorageSpec(SpecModel):
    """Object-storage access. Unset fields fall back to the standard AWS environment variables
    (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION), then to the
    usual botocore chain (instance profile...). ``anon`` reads public buckets without credentials."""

    endpoint_url: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    region: str | None = None
    anon: bool = False


class DataSpec(SpecModel):
    """How the input is listed.

    ``layout``: ``auto`` (detect), ``folder``, ``mvtec`` or ``manifest``. ``category``: force one
    category for every image of a ``folder`` input (default: the first sub-folder under the input,
    or the input folder's own name for files directly in it). ``extensions``: image file endings
    listed by ``folder``/``mvtec`` (case-insensitive). ``categories``: keep only the images of these
    categories (an unknown one is an error listing the available ones). ``max_images``: keep only the first N listed
    images (sorted by URI), for trials."""

    layout: Literal["auto", "folder", "mvtec", "manifest", "visa", "visa_1cls", "mpdd", "btad"] = "auto"
    category: str | None = None
    categories: tuple[str, ...] | None = None  # keep only these categories (after listing); None = all
    extensions: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
    max_images: int | None = Field(default=None, ge=1)


class DecodeSpec(SpecModel):
    """Decode stage: bytes -> RGB uint8. ``max_pixels`` guards against decompression bombs (an image
    whose header declares more pixels fails with error_type ``DecompressionBomb`` before any pixel
    is decoded). Default: Pillow's own limit, 89,478,485 pixels (about 9459 x 9459).

    ``resolution``: ``exact`` (default) decodes every image at its full size and the model stages
    resize it; ``working`` decodes it straight to the smallest size the plan's models need (the
    largest CLIP input among the scales, SAM's 1024-px long side, a dichotomous model's input, and
    with tiling a scale: the smallest tile, ``tiling.min_tile`` original pixels, keeps as many pixels
    as its largest model input; :func:`pipeline.stages.decode.working_size`; JPEGs with libjpeg's DCT
    scaling, then one bicubic resize), so a fraction of the bytes travels between the stages. The
    rows keep the original height and width, and everything stored at the image's resolution is
    still made at the original size: the maps at the size the original gives (``maps.map_size``),
    the foreground mask, component boxes and areas, the tiles and sam_refine's mask and prompts in
    the original's pixels. Scores and maps then differ slightly from ``exact`` (BENCHMARKS.md
    "Feeding the GPUs"). An image already at or below the working size decodes as it is; with
    ``vvv``'s own tiling (352-px tiles, inputs up to 448 px) that is every image: its tiles need
    every original pixel, and only a larger ``min_tile`` lets it decode smaller.

    ``device``: where the pixels are decoded. ``cpu`` (default): in the decode stage's CPU tasks.
    ``model``: the decode stage only fetches each file and reads its header (format, size, the
    ``max_pixels`` guard, truncation); the encoded bytes travel to the first model actor, which
    decodes them before its model runs: RGB and grey JPEGs with nvJPEG on its GPU
    (``torchvision.io.decode_jpeg``; on an actor without a GPU the same code on its CPU), then the
    EXIF orientation and the resize to the working size on the device; other formats, and JPEGs
    the device decoder refuses, with Pillow on the actor's CPU. It pays where CPU cores, not the
    network, limit the feed (BENCHMARKS.md "Feeding the GPUs"); the first stage after decode must
    be a model actor (CLIP scoring or SAM foreground). The passes before the plan (few-shot banks,
    mutual pools) and ``zsad train`` decode on the CPU in either case."""

    max_pixels: int = Field(default=89_478_485, ge=1)
    resolution: Literal["exact", "working"] = "exact"
    device: Literal["cpu", "model"] = "cpu"

