"""Image bytes -> uint8 tensors of the model's sizes, with bad images turned into counted skips.

Decoding happens in the DataLoader workers; the geometry is ``mm.images.preprocess`` with the spec the
model states (``SampleShapes``): the understanding tower's own (its reference processor's: Janus pads,
LLaVA pads then crops, CLIP crops, SigLIP squashes), and :func:`mm.images.generation_preprocess` for
generation targets (shorter side, centre crop: the target fills the canvas). The processor
(``mm.hf.UnifiedMMProcessor``) calls the same function with the same spec, so an image reaches the model
as the same tensor in training and at inference. Images stay uint8 ``[C,H,W]`` until they reach the model:
4x less to copy between processes and to the device than float32.

A JPEG is decoded at full size (no draft-mode DCT downscale), as the reference processors decode it.
A decompression bomb is refused from the header alone, before any pixel is decoded: PIL's own
``MAX_IMAGE_PIXELS`` only warns between 1x and 2x its cap.
"""

from __future__ import annotations

import io
import warnings

import torch
from PIL import Image, UnidentifiedImageError

from data.stream import BadSample
from mm.images import ImagePreprocess, preprocess

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


def set_pixel_cap(max_pixels: int) -> None:
    """PIL raises DecompressionBombError above 2x this (process-wide; set in each loader worker)."""
    Image.MAX_IMAGE_PIXELS = max_pixels


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Identify an image from its bytes (header only) or raise :class:`BadSample` naming why not."""
    if not data:
        raise BadSample("empty_file", "image member has 0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadSample("decompression_bomb", str(e)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:  # HTML saved as .jpg, garbage
        raise BadSample("not_an_image", f"{e!r} (starts with {data[:16]!r})") from None
    if img.width * img.height > max_pixels:
        raise BadSample("decompression_bomb", f"{img.width}x{img.height} > {max_pixels} pixels (data.max_image_pixels)")
    return img


def decode(data: bytes, max_pixels: int) -> Image.Image:
    """Image bytes -> a decoded PIL image (any mode), or :class:`BadSample` naming why not."""
    img = open_image(data, max_pixels)
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        reason = "truncated_image" if "truncated" in str(e) else "undecodable_image"
        raise BadSample(reason, repr(e)) from None
    return img


def load_image(data: bytes, spec: ImagePreprocess, max_pixels: int) -> torch.Tensor:
    """Image bytes -> uint8 ``[spec.channels, spec.size, spec.size]`` (``mm.images.preprocess``)."""
    return preprocess(decode(data, max_pixels), spec)
