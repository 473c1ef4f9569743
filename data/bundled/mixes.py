"""Shared pieces of the data benchmark (scripts/bench_data.py) and its tests: the realistic length
mix, the packing baselines it is compared with, and photo shards for the loader benchmark.

Realistic mix (per the data issue): 50% understanding samples (576 image tokens + text with a
lognormal length, median 60), 40% generation samples (576 image tokens + a 10-80 token prompt),
10% text-only documents (lognormal, median 400; cut to the row budget as the text kind does).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from data.pack import PACKERS
from mm.batch import PackItem

IMAGE_TOKENS = 576
TEXT_SIGMA = 1.0  # lognormal shape: the issue gives medians only; 1.0 reproduces its baseline numbers


def realistic_mix(n: int, budget: int = 4096, seed: int = 0, sigma: float = TEXT_SIGMA) -> list[PackItem]:
    """``n`` length-only items (documents longer than ``budget`` become several, as the text kind cuts them)."""
    rng = np.random.default_rng(seed)
    items: list[PackItem] = []
    while len(items) < n:
        u = rng.random()
        if u < 0.5:
            items.append(PackItem(IMAGE_TOKENS + max(1, round(rng.lognormal(np.log(60), sigma)))))
        elif u < 0.9:
            items.append(PackItem(IMAGE_TOKENS + int(rng.integers(10, 81))))
        else:
            doc = max(2, round(rng.lognormal(np.log(400), sigma)))
            for a in range(0, doc, budget):
                items.append(PackItem(min(budget, doc - a), splittable=True))
    return items[:n]


def _lengths(items: list[PackItem]) -> list[int]:
    return [i.length for i in items]


def padding_efficiency(items: list[PackItem], batch: int = 8, seed: int = 0) -> float:
    """Random batches padded to their longest sample."""
    lengths = _lengths(items)
    random.Random(seed).shuffle(lengths)
    chunks = [lengths[i : i + batch] for i in range(0, len(lengths), batch)]
    return sum(lengths) / sum(len(c) * max(c) for c in chunks)


def group_by_length_efficiency(items: list[PackItem], batch: int = 8, mega: int = 50, seed: int = 0) -> float:
    """HF ``group_by_length``: shuffled megabatches of ``mega * batch`` sorted by length, cut into batches."""
    lengths = _lengths(items)
    random.Random(seed).shuffle(lengths)
    padded = 0
    for m in range(0, len(lengths), mega * batch):
        block = sorted(lengths[m : m + mega * batch], reverse=True)
        padded += sum(len(block[i : i + batch]) * block[i] for i in range(0, len(block), batch))
    return sum(lengths) / padded


def first_fit_efficiency(items: list[PackItem], budget: int) -> float:
    """Online first fit with every row kept open."""
    rows: list[int] = []
    for n in _lengths(items):
        for r, used in enumerate(rows):
            if used + n <= budget:
                rows[r] += n
                break
        else:
            rows.append(n)
    return sum(rows) / (len(rows) * budget)


def ffd_efficiency(items: list[PackItem], budget: int, window: int = 256) -> float:
    """First-fit decreasing over consecutive windows of ``window`` samples."""
    total_rows = 0
    for w in range(0, len(items), window):
        rows: list[int] = []
        for n in sorted(_lengths(items[w : w + window]), reverse=True):
            for r, used in enumerate(rows):
                if used + n <= budget:
                    rows[r] += n
                    break
            else:
                rows.append(n)
        total_rows += len(rows)
    return sum(_lengths(items)) / (total_rows * budget)


def packer_efficiency(items: list[PackItem], budget: int, packer: str = "best_fit", lookahead: int = 64) -> float:
    """A streaming packer of data/pack.py, fed in order and drained at the end."""
    p = PACKERS[packer](budget, lookahead)
    rows = []
    for item in items:
        p.add(item)
        while p.ready():
            rows.append(p.pop_row())
    while p.buffer:
        rows.append(p.pop_row())
    assert all(sum(i.length for i in row) <= budget for row in rows)
    return sum(i.length for row in rows for i in row) / (len(rows) * budget)


# ---- photo shards for the loader benchmark ------------------------------------------
SKIMAGE_PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field",
                  "colorwheel", "retina", "stereo_motorcycle", "camera", "brick", "coins", "grass", "gravel",
                  "moon", "page", "text", "clock", "cell"]  # fmt: skip


def photo_sources() -> list[tuple[str, np.ndarray]]:
    """(name, HxWx3 uint8) of the sample photos scikit-image and scikit-learn ship (no download)."""
    from skimage import data as skdata
    from sklearn.datasets import load_sample_images

    out = []
    for name in SKIMAGE_PHOTOS:
        img = getattr(skdata, name)()
        img = img[0] if isinstance(img, tuple) else img
        img = np.stack([img] * 3, -1) if img.ndim == 2 else img[..., :3]
        out.append((name, img.astype(np.uint8)))
    sk = load_sample_images()
    out += [(Path(f).stem, img) for f, img in zip(sk.filenames, sk.images)]
    return out


def write_photo_folder(out: Path, n: int, seed: int = 0, size: int = 512) -> Path:
    """``n`` distinct crops (random scale, aspect, position, flip) of the sample photos as PNG files +
    a captions JSONL, the input ``make_shards.py generation`` takes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = photo_sources()
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        name, img = photos[i % len(photos)]
        h, w = img.shape[:2]
        scale = rng.uniform(0.5, 1.0)
        ch = max(16, int(h * scale * rng.uniform(0.8, 1.0)))
        cw = max(16, int(w * scale * rng.uniform(0.8, 1.0)))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = img[y : y + ch, x : x + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        pil = Image.fromarray(np.ascontiguousarray(crop))
        s = size / min(pil.size)
        pil = pil.resize((max(size, round(pil.width * s)), max(size, round(pil.height * s))), Image.BICUBIC)
        pil.save(out / "images" / f"{i:06d}.png")
        lines.append({"image": f"images/{i:06d}.png", "caption": f"a photo of {name.replace('_', ' ')} number {i}"})
    (out / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return out / "captions.jsonl"
