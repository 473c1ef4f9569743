"""Bundled real data: webdataset shards built from images that installed packages ship.

* digits: scikit-learn's 1797 handwritten 8x8 digits (16 grey levels), with
  template captions/questions. A seeded held-out split is written to its own
  shard and never enters the training shards.
* smoke: a handful of scikit-image sample photographs (RGB), for tests of the
  generic image path.

Each sample is ``{key}.png`` (uint8 image) + ``{key}.json`` (label, caption,
question, answer, split).
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
QUESTIONS = ["what digit is this ?", "which number is shown in the image ?", "what number is written here ?"]
PROMPTS = ["draw the digit {d}", "a handwritten {d}", "an image of the number {name}", "write the digit {name}"]
EVAL_QUESTION = QUESTIONS[0]
EVAL_PROMPT = PROMPTS[0]

SMOKE_IMAGES = {  # skimage.data name -> caption
    "astronaut": "a photo of an astronaut",
    "coffee": "a photo of a cup of coffee",
    "chelsea": "a photo of a cat",
    "rocket": "a photo of a rocket",
    "camera": "a photo of a man with a camera",
}
SMOKE_QUESTION = "what is in this photo ?"

TRAIN_SHARDS = 4
HELDOUT_FRACTION = 0.2


def digit_prompt(label: int, template: str = EVAL_PROMPT) -> str:
    return template.format(d=label, name=DIGIT_NAMES[label])


def all_texts() -> list[str]:
    """Every text the bundled data can produce: the tiny tokenizer's training corpus."""
    texts = list(QUESTIONS) + [SMOKE_QUESTION] + list(SMOKE_IMAGES.values())
    for d in range(10):
        texts += [digit_prompt(d, p) for p in PROMPTS] + [str(d)]
    return texts


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def digit_pixels(image16: np.ndarray) -> np.ndarray:
    """sklearn digits are 0..16; store them as 0..255 uint8."""
    return np.round(image16.astype(np.float64) * 255.0 / 16.0).astype(np.uint8)


def heldout_indices(n: int, seed: int = 0) -> set[int]:
    perm = np.random.default_rng(seed).permutation(n)
    return set(perm[: int(round(n * HELDOUT_FRACTION))].tolist())


def _write(path: Path, samples: list[dict]) -> None:
    import webdataset as wds

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with wds.TarWriter(str(tmp)) as sink:
        for s in samples:
            sink.write(s)
    tmp.replace(path)  # atomic: a half-written shard never has the final name


def build_digit_shards(out_dir: str | Path, seed: int = 0) -> list[Path]:
    from sklearn.datasets import load_digits

    out_dir = Path(out_dir)
    digits = load_digits()
    heldout = heldout_indices(len(digits.target), seed)
    rng = random.Random(seed)
    train, held = [], []
    for i, (img, label) in enumerate(zip(digits.images, digits.target.tolist())):
        split = "heldout" if i in heldout else "train"
        meta = {
            "label": label,
            "caption": digit_prompt(label, rng.choice(PROMPTS)),
            "question": rng.choice(QUESTIONS),
            "answer": str(label),
            "split": split,
            "source": f"sklearn.datasets.load_digits[{i}]",
        }
        sample = {"__key__": f"digit{i:05d}", "png": png_bytes(digit_pixels(img)), "json": json.dumps(meta).encode()}
        (held if split == "heldout" else train).append(sample)
    paths = []
    per_shard = -(-len(train) // TRAIN_SHARDS)
    for k in range(TRAIN_SHARDS):
        paths.append(out_dir / f"train-{k:06d}.tar")
        _write(paths[-1], train[k * per_shard : (k + 1) * per_shard])
    paths.append(out_dir / "heldout-000000.tar")
    _write(paths[-1], held)
    return paths


def build_smoke_shard(out_dir: str | Path, size: int = 32) -> Path:
    """scikit-image's sample photos, resized to ``size`` px RGB."""
    from skimage import data as skdata

    samples = []
    for name, caption in SMOKE_IMAGES.items():
        img = getattr(skdata, name)()
        pil = Image.fromarray(img).convert("RGB").resize((size, size), Image.BICUBIC)
        meta = {"label": -1, "caption": caption, "question": SMOKE_QUESTION, "answer": caption, "split": "smoke",
                "source": f"skimage.data.{name}"}  # fmt: skip
        samples.append({"__key__": name, "png": png_bytes(np.asarray(pil)), "json": json.dumps(meta).encode()})
    path = Path(out_dir) / "smoke-000000.tar"
    _write(path, samples)
    return path


def load_digit_split(split: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(images in [0,1] as [N,8,8] float32, labels) of one split, from sklearn directly.

    Uses the same quantisation as the shards so classifiers see what the model sees.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    held = heldout_indices(len(digits.target), seed)
    idx = [i for i in range(len(digits.target)) if (i in held) == (split == "heldout")]
    images = digit_pixels(digits.images[idx]).astype(np.float32) / 255.0
    return images, digits.target[idx]


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="data/shards/digits")
    ap.add_argument("--smoke-out", default="data/shards/smoke")
    args = ap.parse_args()
    for p in build_digit_shards(args.out) + [build_smoke_shard(args.smoke_out)]:
        print(p)
