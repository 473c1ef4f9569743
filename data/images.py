"""Image bytes -> uint8 tensors of the model's sizes, with bad images turned into counted skips.

Decoding happens in the DataLoader workers. Images stay uint8 ``[C,H,W]`` until
they reach the model (``mm.model.unified.as_unit_float``): 4x less to copy
between processes and to the device than float32.

Per-kind preprocessing:

* understanding: resize the longer side to the encoder size and pad to a square
  (the whole image stays visible, as LLaVA's ``expand2square``);
* generation: resize the shorter side and centre-crop (the target fills the canvas).

A decompression bomb is refused from the header alone, before any pixel is
decoded: PIL's own ``MAX_IMAGE_PIXELS`` only warns between 1x and 2x its cap.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from data.stream import BadSample

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


def _load(img: Image.Image, channels: int, need_w: int, need_h: int) -> Image.Image:
    """Decode (JPEG at a reduced scale when that still covers need_w x need_h) and convert channels."""
    if img.format == "JPEG":
        img.draft("RGB" if channels == 3 else "L", (need_w, need_h))  # DCT-domain downscale: much less work
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        reason = "truncated_image" if "truncated" in str(e) else "undecodable_image"
        raise BadSample(reason, repr(e)) from None
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")  # transparent pixels over white, not over whatever colour they hide
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    mode = "RGB" if channels == 3 else "L"
    if channels not in (1, 3):
        raise ValueError(f"images have 1 or 3 channels, not {channels}")
    return img if img.mode == mode else img.convert(mode)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL (L or RGB) -> uint8 [C,H,W]."""
    arr = np.asarray(img, dtype=np.uint8)
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def resize_pad(data: bytes, size: int, channels: int, fill: int, max_pixels: int) -> torch.Tensor:
    """Understanding preprocessing: longer side -> ``size``, centred on a ``fill``-grey square."""
    img = open_image(data, max_pixels)
    w, h = img.size
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    img = _load(img, channels, nw, nh)
    if img.size != (nw, nh):
        img = img.resize((nw, nh), Image.BICUBIC)
    if (nw, nh) != (size, size):
        canvas = Image.new(img.mode, (size, size), fill if channels == 1 else (fill,) * 3)
        canvas.paste(img, ((size - nw) // 2, (size - nh) // 2))
        img = canvas
    return to_tensor(img)


def resize_crop(data: bytes, size: int, channels: int, max_pixels: int) -> torch.Tensor:
    """Generation preprocessing: shorter side -> ``size``, centre crop to ``size`` x ``size``."""
    img = open_image(data, max_pixels)
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, math.ceil(w * scale - 1e-6)), max(size, math.ceil(h * scale - 1e-6))
    img = _load(img, channels, nw, nh)
    if img.size != (nw, nh):
        img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    if (nw, nh) != (size, size):
        img = img.crop((left, top, left + size, top + size))
    return to_tensor(img)
