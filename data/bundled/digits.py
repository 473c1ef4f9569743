"""Bundled real data: webdataset shards built from images that installed packages ship.

* digits: scikit-learn's 1797 handwritten 8x8 digits (16 grey levels), with
  template captions/questions. A seeded held-out split is written to its own
  shard and never enters the training shards.
* digit facts: short text documents about the digits ("the digit 7 is seven ..."),
  in the tiny tokenizer's words: an instance of the ``text`` kind.
* smoke: a handful of scikit-image sample photographs (RGB), for tests of the
  generic image path.

Image samples use the schemas of two source kinds at once (data/sources.py):
``{key}.png`` + ``{key}.txt`` (caption: a ``generation`` pair) + ``{key}.json`` (a
LLaVA-style ``conversations`` list: a ``conversation``; plus label, split and
source, which evaluation reads). Text shards hold ``{key}.txt`` documents.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

from data.shards import ShardWriter
from mm.schema import resolve_path

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
FACTS = ["the digit {d} is {name}", "the number {name} is {d}", "a handwritten {d} is the digit {name}",
         "an image of the number {name}", "write the digit {d}"]  # fmt: skip

TRAIN_SHARDS = 4
TEXT_DOCUMENTS = 600
HELDOUT_FRACTION = 0.2
SCHEMA = "digits-v2: png + txt caption + json conversations; text documents"  # written to SCHEMA_FILE
SCHEMA_FILE = "SCHEMA"


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


def conversation(question: str, answer: str, n_images: int = 1) -> list[dict]:
    """One LLaVA-style exchange about ``n_images`` images."""
    return [{"from": "human", "value": "<image>\n" * n_images + question}, {"from": "gpt", "value": answer}]


def image_sample(key: str, png: bytes, caption: str, question: str, answer: str, **meta) -> dict:
    record = {"conversations": conversation(question, answer), **meta}
    return {"__key__": key, "png": png, "txt": caption, "json": json.dumps(record)}


def _write(out_dir: Path, prefix: str, samples: list[dict], shards: int = 1) -> list[Path]:
    writer = ShardWriter(out_dir, prefix, max_count=-(-len(samples) // shards))
    for sample in samples:
        writer.write(sample)
    return writer.close()


def fact_document(rng: random.Random, n_facts: int) -> str:
    facts = []
    for _ in range(n_facts):
        d = rng.randrange(10)
        facts.append(rng.choice(FACTS).format(d=d, name=DIGIT_NAMES[d]))
    return " ".join(facts)


def build_digit_shards(out_dir: str | Path, seed: int = 0) -> list[Path]:
    """Train shards, the held-out shard and the text-document shard of the digits, with a ``sizes.json``."""
    from sklearn.datasets import load_digits

    out_dir = Path(out_dir)
    digits = load_digits()
    heldout = heldout_indices(len(digits.target), seed)
    rng = random.Random(seed)
    train, held = [], []
    for i, (img, label) in enumerate(zip(digits.images, digits.target.tolist())):
        split = "heldout" if i in heldout else "train"
        caption = digit_prompt(label, rng.choice(PROMPTS))
        question = rng.choice(QUESTIONS)
        sample = image_sample(f"digit{i:05d}", png_bytes(digit_pixels(img)), caption, question, str(label),
                              label=label, split=split, source=f"sklearn.datasets.load_digits[{i}]")  # fmt: skip
        (held if split == "heldout" else train).append(sample)
    paths = _write(out_dir, "train", train, TRAIN_SHARDS) + _write(out_dir, "heldout", held)
    text_rng = random.Random(f"{seed}-facts")
    docs = [{"__key__": f"facts{i:05d}", "txt": fact_document(text_rng, text_rng.randint(2, 12))}
            for i in range(TEXT_DOCUMENTS)]  # fmt: skip
    paths += _write(out_dir, "text", docs)
    (out_dir / SCHEMA_FILE).write_text(SCHEMA + "\n")
    return paths


def ensure_bundled_digits(out_dir: str | Path = "data/shards/digits", seed: int = 0) -> bool:
    """(Re)build the bundled digits shards when missing or written by an older schema; True if built."""
    out_dir = resolve_path(str(out_dir))
    marker = out_dir / SCHEMA_FILE
    if marker.exists() and marker.read_text().strip() == SCHEMA and (out_dir / "heldout-000000.tar").exists():
        return False
    print(f"building bundled digits shards in {out_dir}", flush=True)
    for old in out_dir.glob("*.tar"):
        old.unlink()
    build_digit_shards(out_dir, seed)
    return True


def build_smoke_shard(out_dir: str | Path, size: int = 32) -> Path:
    """scikit-image's sample photos, resized to ``size`` px RGB."""
    from skimage import data as skdata

    samples = []
    for name, caption in SMOKE_IMAGES.items():
        img = getattr(skdata, name)()
        pil = Image.fromarray(img).convert("RGB").resize((size, size), Image.BICUBIC)
        samples.append(image_sample(name, png_bytes(np.asarray(pil)), caption, SMOKE_QUESTION, caption, label=-1,
                                    split="smoke", source=f"skimage.data.{name}"))  # fmt: skip
    return _write(Path(out_dir), "smoke", samples)[0]


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
