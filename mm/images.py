"""Image tensors: the one preprocessing every layer shares, normalisation, the unit-float convention (no project
imports).

:func:`preprocess` turns an image (PIL, HxW(xC) array, [C,H,W] tensor) into the uint8 ``[C, S, S]`` square a
tower or an image head reads, as an :class:`ImagePreprocess` spec says. The training loader (``data/``), the
processor (``mm/hf.py``), eval and chat call it with the same spec (a tower's ``preprocess_spec()``, or
:func:`generation_preprocess` for generation targets), so a picture reaches the model as the same tensor on
every path. Its geometry is that of the reference processors, pixel for pixel:

==========  ====================================================  ==========================================
mode        what                                                  reference
==========  ====================================================  ==========================================
``pad``     resize the longer side to S, pad to a square (fill)   transformers ``JanusImageProcessor``; Janus's
                                                                  own ``VLMImageProcessor`` (``backend: pil``,
                                                                  ``resize_rounding: floor``: JanusFlow)
``crop``    resize the shorter side to S, centre crop             ``CLIPImageProcessor``; open_clip's eval
                                                                  transform (``backend: pil``, ``round``)
``pad_crop``  pad to a square at full size (fill), then ``crop``  ``LlavaImageProcessor(do_pad=True)``:
                                                                  LLaVA-1.5's ``expand2square``
``squash``  resize both sides to S                                ``SiglipImageProcessor``
==========  ====================================================  ==========================================

``backend: torchvision`` resizes uint8 tensors with ``torchvision.transforms.v2.functional.resize`` (antialias),
as transformers 5's default image processors do; ``backend: pil`` resizes with ``PIL.Image.resize``, as their
``*Pil`` variants and open_clip's transforms do. Images stay uint8 from the loader to the model (4x less to
copy than float32); the model normalises them (:func:`normalize`: transformers' fused rescale+normalise, so
the result equals a reference processor's ``pixel_values``). Generated images are [0,1] floats
(:func:`as_unit_float`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as tvF
from PIL import Image

PREPROCESS_MODES = ("pad", "crop", "pad_crop", "squash")
RESAMPLES = {
    "bicubic": (tvF.InterpolationMode.BICUBIC, Image.Resampling.BICUBIC),
    "bilinear": (tvF.InterpolationMode.BILINEAR, Image.Resampling.BILINEAR),
}
BACKENDS = ("torchvision", "pil")
CROP_OFFSETS = ("floor", "round")  # transformers: int((h - S) / 2); torchvision's v1 CenterCrop: round(), as open_clip
RESIZE_ROUNDINGS = ("round", "floor")  # pad, shorter side: JanusImageProcessor round(), Janus's VLMImageProcessor int()


def preprocess_problem(
    mode: str, resample: str, backend: str, crop_offset: str, min_size: int, resize_rounding: str = "round"
) -> str | None:
    """``"key=value: why"`` for the first invalid preprocessing field, or None (shared by the config classes)."""
    if mode not in PREPROCESS_MODES:
        return f"mode={mode!r}; known: {list(PREPROCESS_MODES)}"
    if resample not in RESAMPLES:
        return f"resample={resample!r}; known: {list(RESAMPLES)}"
    if backend not in BACKENDS:
        return f"backend={backend!r}; known: {list(BACKENDS)}"
    if crop_offset not in CROP_OFFSETS:
        return f"crop_offset={crop_offset!r}; known: {list(CROP_OFFSETS)}"
    if resize_rounding not in RESIZE_ROUNDINGS:
        return f"resize_rounding={resize_rounding!r}; known: {list(RESIZE_ROUNDINGS)}"
    if min_size < 1:
        return f"min_size={min_size} must be >= 1"
    return None


@dataclass(frozen=True)
class ImagePreprocess:
    """How an image becomes a uint8 ``[channels, size, size]`` square (see the module docstring)."""

    mode: str = "crop"
    size: int = 8
    channels: int = 3
    resample: str = "bicubic"
    fill: tuple[int, ...] = (127, 127, 127)  # pad colour per channel, 0-255 (transformers: int(255 * mean))
    min_size: int = 1  # pad: neither resized side below this (JanusImageProcessor's min_size, 14)
    backend: str = "torchvision"
    crop_offset: str = "floor"
    resize_rounding: str = "round"  # pad: the shorter side's size, round() or int() (see RESIZE_ROUNDINGS)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fill", tuple(int(v) for v in self.fill))
        problem = preprocess_problem(self.mode, self.resample, self.backend, self.crop_offset, self.min_size,
                                     self.resize_rounding)  # fmt: skip
        if problem is None and self.channels not in (1, 3):
            problem = f"channels={self.channels}: images have 1 or 3 channels"
        if problem is None and (self.size < 1 or self.min_size > self.size):
            problem = f"size={self.size} must be >= 1 and >= min_size={self.min_size}"
        if problem is None and (len(self.fill) != self.channels or not all(0 <= v <= 255 for v in self.fill)):
            problem = f"fill={self.fill}: one value in 0..255 per channel ({self.channels})"
        if problem:
            raise ValueError(f"image preprocessing: {problem}")

    def to_dict(self) -> dict:
        """JSON-able fields (a processor config); ``ImagePreprocess(**d)`` reads them back."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


def generation_preprocess(size: int, channels: int) -> ImagePreprocess:
    """Generation targets: shorter side to ``size``, centre crop (the target fills the canvas; CLIP's geometry)."""
    return ImagePreprocess(mode="crop", size=size, channels=channels, fill=(0,) * channels)


# ---- one image in: PIL, array or tensor -> a PIL image of the spec's channels ------------------------------------
def as_pil(image: Any) -> Image.Image:
    """A PIL image of ``image``: PIL as is; HxW, HxWxC (C = 1, 3, 4) arrays and [C,H,W]/[H,W] tensors, uint8
    (or bool, or floats in [0,1], rounded to the nearest of 256 levels)."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        image = (t.permute(1, 2, 0) if t.ndim == 3 else t).numpy()
    a = np.asarray(image)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        if a.size and (a.min() < 0 or a.max() > 1):
            raise ValueError(f"a {a.dtype} image must hold values in [0, 1] (got {a.min()}..{a.max()}); pass uint8")
        a = np.rint(a.astype(np.float64) * 255).astype(np.uint8)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise ValueError(f"an image is HxW, HxWx3 or HxWx4 (or [C,H,W] as a tensor), got shape {a.shape}")
    return Image.fromarray(np.ascontiguousarray(a))


def to_channels(img: Image.Image, channels: int) -> Image.Image:
    """RGB (or L) of ``img``: transparency composited over white, as transformers' ``convert_to_rgb`` does."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    mode = "RGB" if channels == 3 else "L"
    return img if img.mode == mode else img.convert(mode)


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL (L or RGB) -> uint8 [C,H,W]."""
    t = torch.from_numpy(np.array(img, dtype=np.uint8))
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


# ---- geometry ---------------------------------------------------------------------------------------------------
def resized_size(h: int, w: int, spec: ImagePreprocess) -> tuple[int, int]:
    """(height, width) after the resize step (the reference processors' arithmetic, rounding included)."""
    s = spec.size
    if spec.mode == "squash":
        return s, s
    if spec.mode == "pad":  # at least min_size; each reference's own float expression (it decides int()'s result)
        m = max(h, w)
        if spec.resize_rounding == "floor":  # VLMImageProcessor: int(h / max * S)
            return max(int(h / m * s), spec.min_size), max(int(w / m * s), spec.min_size)
        d = s / m  # JanusImageProcessor: round(h * (S / max))
        return max(round(h * d), spec.min_size), max(round(w * d), spec.min_size)
    # shortest edge (transformers' get_resize_output_image_size, torchvision's Resize): the long side truncated
    return (int(s * h / w), s) if w <= h else (s, int(s * w / h))


def _crop_offset(extent: int, size: int, how: str) -> int:
    return int(round((extent - size) / 2.0)) if how == "round" else int((extent - size) / 2.0)


def _pad_box(h: int, w: int) -> tuple[int, int, int]:
    """(side, top, left) of a ``h`` x ``w`` image centred on a square (transformers' pad_to_square: floor)."""
    side = max(h, w)
    return side, (side - h) // 2, (side - w) // 2


def _geometry_tensor(t: torch.Tensor, spec: ImagePreprocess) -> torch.Tensor:
    """The spec's steps on a uint8 [C,H,W] tensor with torchvision's resize (transformers' default processors)."""
    interp = RESAMPLES[spec.resample][0]
    fill = torch.tensor(spec.fill, dtype=t.dtype).view(-1, 1, 1)
    if spec.mode == "pad_crop":
        side, top, left = _pad_box(*t.shape[-2:])
        canvas = fill.expand(-1, side, side).clone()
        canvas[:, top : top + t.shape[1], left : left + t.shape[2]] = t
        t = canvas
    h, w = resized_size(*t.shape[-2:], spec)
    t = tvF.resize(t, [h, w], interpolation=interp, antialias=True)
    if spec.mode == "pad" and h != w:
        side, top, left = _pad_box(h, w)
        canvas = fill.expand(-1, side, side).clone()
        canvas[:, top : top + h, left : left + w] = t
        t = canvas
    elif spec.mode in ("crop", "pad_crop"):
        top, left = _crop_offset(h, spec.size, spec.crop_offset), _crop_offset(w, spec.size, spec.crop_offset)
        t = t[:, top : top + spec.size, left : left + spec.size]
    return t.contiguous()


def _geometry_pil(img: Image.Image, spec: ImagePreprocess) -> Image.Image:
    """The same steps with ``PIL.Image.resize`` (transformers' ``*Pil`` processors, open_clip's transforms)."""
    resample = RESAMPLES[spec.resample][1]
    fill = spec.fill[0] if spec.channels == 1 else spec.fill
    if spec.mode == "pad_crop":
        side, top, left = _pad_box(img.height, img.width)
        canvas = Image.new(img.mode, (side, side), fill)
        canvas.paste(img, (left, top))
        img = canvas
    h, w = resized_size(img.height, img.width, spec)
    img = img.resize((w, h), resample)
    if spec.mode == "pad" and h != w:
        side, top, left = _pad_box(h, w)
        canvas = Image.new(img.mode, (side, side), fill)
        canvas.paste(img, (left, top))
        img = canvas
    elif spec.mode in ("crop", "pad_crop"):
        top, left = _crop_offset(h, spec.size, spec.crop_offset), _crop_offset(w, spec.size, spec.crop_offset)
        img = img.crop((left, top, left + spec.size, top + spec.size))
    return img


def preprocess(image: Any, spec: ImagePreprocess) -> torch.Tensor:
    """An image (PIL, array, tensor; see :func:`as_pil`) -> uint8 ``[spec.channels, spec.size, spec.size]``."""
    img = to_channels(as_pil(image), spec.channels)
    if spec.backend == "pil":
        return pil_to_tensor(_geometry_pil(img, spec))
    return _geometry_tensor(pil_to_tensor(img), spec)


# ---- normalisation and the [0,1] convention ----------------------------------------------------------------------
def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Model input of [N,C,H,W] images: uint8 as transformers' fused rescale+normalise computes it in float32,
    ``(x - 255 mean) / (255 std)`` (equal to a reference processor's ``pixel_values`` bit for bit); [0,1] floats
    (generated images) as ``(x - mean) / std``."""
    if images.is_floating_point():
        m, s = images.new_tensor(mean).view(1, -1, 1, 1), images.new_tensor(std).view(1, -1, 1, 1)
        return (images - m) / s
    scale = 1.0 / (1 / 255)  # transformers: mean * (1 / rescale_factor), rescale_factor = 1 / 255
    m = torch.tensor(mean, dtype=torch.float32, device=images.device) * scale
    s = torch.tensor(std, dtype=torch.float32, device=images.device) * scale
    return (images.to(torch.float32) - m.view(1, -1, 1, 1)) / s.view(1, -1, 1, 1)


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
    """[N,C,H,W] [0,1] generated images -> ``size`` x ``size`` with ``channels`` channels (bilinear, grey <-> RGB):
    REPA's tower features of a generation target, not the preprocessing of an input picture."""
    if images.shape[-1] != size or images.shape[-2] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
    if images.shape[1] != channels:
        images = images.mean(1, keepdim=True).expand(-1, channels, -1, -1)
    return images
