"""Image tensors: the unit-float convention and the resizes every layer shares (no project imports).

Images travel as uint8 ``[C,H,W]`` from the loader to the model (4x less to copy than float32) and
the model works on ``[0,1]`` floats (:func:`as_unit_float`).
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def as_unit_float(images: torch.Tensor | None) -> torch.Tensor | None:
    """uint8 images -> [0,1] float; float images pass unchanged."""
    if images is None or images.is_floating_point():
        return images
    return images.float() / 255.0


def zero_images(n: int, channels: int, size: int, like: torch.Tensor) -> torch.Tensor:
    """``n`` black [0,1] images on ``like``'s device.

    The device comes from a tensor at hand, not from a weight: under ZeRO-3 reading a module's weight
    outside its forward gathers it with a collective that only this rank would run.
    """
    return torch.zeros(n, channels, size, size, device=like.device)


def match_images(images: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """[N,C,H,W] [0,1] images -> ``size`` x ``size`` with ``channels`` channels (bilinear, grey <-> RGB)."""
    if images.shape[-1] != size or images.shape[-2] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
    if images.shape[1] != channels:
        images = images.mean(1, keepdim=True).expand(-1, channels, -1, -1)
    return images


def decode_image(data: bytes) -> torch.Tensor:
    """PNG/JPEG bytes -> [C,H,W] float in [0,1] (C=1 for grey, 3 for colour)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        mode = "L" if img.mode in ("L", "1", "I;16", "I") else "RGB"
        arr = np.asarray(img.convert(mode), dtype=np.float32) / 255.0
    t = torch.from_numpy(arr)
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def fit_image(image: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """Centre-crop a [0,1] float image to square, resize to ``size`` and convert grey<->RGB."""
    c, h, w = image.shape
    s = min(h, w)
    image = image[:, (h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    if s != size:
        image = F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    if c == channels:
        return image.clamp(0, 1)
    if channels == 3 and c == 1:
        return image.expand(3, -1, -1).clamp(0, 1)
    if channels == 1 and c == 3:
        return image.mean(0, keepdim=True).clamp(0, 1)
    raise ValueError(f"cannot convert a {c}-channel image to {channels} channels")
