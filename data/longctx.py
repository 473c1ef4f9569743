"""Long-context digits: find the one image of the asked digit in an album, answer its label.

An *album* is a run of real 8x8 digits, each followed by its two-digit label
(``<image> 3 7``); the question asks which image shows digit ``d``. Exactly one
image of the album shows ``d`` (the others are drawn from the nine other digits),
so the answer is well defined at any length and needs every image looked at.
Labels are written as two digit words because the tiny word-level tokenizer has
``0``..``9`` and no larger numbers; the answer is the same two words (``3 7``).

Training samples are short windows of an album of :data:`MAX_IMAGES` images:
``TRAIN_IMAGES`` (2-4) consecutive images whose labels start at a random offset, so
every label ``00``..``63`` is seen in training while no training sample is longer
than 4 images. The benchmark asks the same question about whole albums of 8, 16, 32
and 64 images labelled from ``00`` (``digits_longctx_{n}``): up to 16x the images and
~14x the tokens of any training sample, the regime V2PE's small visual deltas are for.

Images never cross splits: training samples use ``data.digits``' training split; the
benchmark splits ``data.digits``' held-out split into two disjoint halves, ``val``
(for choosing the inference delta) and ``test`` (for reporting).

    python -m data.longctx --out data/shards/longctx    # training shards (built on first use by train.py)
    python -m data.bench_digits                         # writes data/bench/digits_longctx with the others
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from data.digits import load_digit_split
from data.shards import ShardWriter
from mm.config import resolve_path

MAX_IMAGES = 64  # labels 00..63: the longest album the benchmark asks about
TRAIN_IMAGES = (2, 4)  # images per training sample, inclusive
EVAL_LENGTHS = (8, 16, 32, 64)
QUESTION = "which image is a {d} ?"  # every word is in the tiny tokenizer
TRAIN_SAMPLES = 8000
TRAIN_SHARDS = 4
SCHEMA = "longctx-v1: album windows of 2-4 labelled digits; json conversations + 0.png, 1.png, ..."
SCHEMA_FILE = "SCHEMA"


def label_text(label: int) -> str:
    """Two digit words ("3 7"): the tiny tokenizer has no words for numbers above 9."""
    if not 0 <= label < 100:
        raise ValueError(f"album labels are 0..99, got {label}")
    return f"{label // 10} {label % 10}"


def album_prompt(labels: list[int], digit: int) -> str:
    """User text with one ``<image>`` marker per image, each followed by its label, then the question."""
    return "".join(f"<image> {label_text(lab)}\n" for lab in labels) + QUESTION.format(d=digit)


@dataclass
class Album:
    """One question: images (uint8 8x8) with their digits and labels; ``index`` shows ``digit``."""

    images: list[np.ndarray]
    digits: list[int]
    labels: list[int]
    digit: int  # the digit asked for
    index: int  # position in the album of its only image

    @property
    def prompt(self) -> str:
        return album_prompt(self.labels, self.digit)

    @property
    def answer(self) -> str:
        return label_text(self.labels[self.index])


class DigitPool:
    """The real digits of one split (uint8 8x8, 0..255 as in the shards), by class."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images = np.round(np.asarray(images) * 255).astype(np.uint8)
        self.labels = np.asarray(labels).astype(int)
        self.by_digit = {d: np.flatnonzero(self.labels == d) for d in range(10)}

    @classmethod
    def split(cls, split: str, half: str = "", seed: int = 0) -> DigitPool:
        """``split`` of ``data.digits``; ``half`` ("val"/"test") takes one seeded half of it."""
        images, labels = load_digit_split(split, seed)
        if half:
            if half not in ("val", "test"):
                raise ValueError(f"half must be 'val' or 'test', got {half!r}")
            perm = np.random.default_rng([seed, 7]).permutation(len(labels))
            keep = np.sort(perm[: len(perm) // 2] if half == "val" else perm[len(perm) // 2 :])
            images, labels = images[keep], labels[keep]
        return cls(images, labels)

    def album(self, n_images: int, rng: np.random.Generator, first_label: int = 0) -> Album:
        """``n_images`` distinct images: one of a random digit at a random place, the rest of other digits."""
        digit = int(rng.integers(10))
        others = np.flatnonzero(self.labels != digit)
        if n_images - 1 > len(others) or not len(self.by_digit[digit]):
            raise ValueError(f"a pool of {len(self.labels)} digits cannot fill an album of {n_images}")
        picks = [int(i) for i in rng.choice(others, size=n_images - 1, replace=False)]
        index = int(rng.integers(n_images))
        picks.insert(index, int(rng.choice(self.by_digit[digit])))
        return Album(
            images=[self.images[i] for i in picks],
            digits=[int(self.labels[i]) for i in picks],
            labels=list(range(first_label, first_label + n_images)),
            digit=digit,
            index=index,
        )


def training_albums(n: int, seed: int = 0) -> list[Album]:
    """``n`` short album windows (TRAIN_IMAGES images) from the training split, labels at random offsets."""
    pool = DigitPool.split("train", seed=seed)
    rng = np.random.default_rng([seed, 1])
    out = []
    for _ in range(n):
        k = int(rng.integers(TRAIN_IMAGES[0], TRAIN_IMAGES[1] + 1))
        out.append(pool.album(k, rng, first_label=int(rng.integers(MAX_IMAGES - k + 1))))
    return out


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def shard_sample(key: str, album: Album) -> dict:
    """A ``conversation``-kind webdataset sample: json conversations + ``0.png``, ``1.png``, ... in marker order."""
    record = {
        "conversations": [{"from": "human", "value": album.prompt}, {"from": "gpt", "value": album.answer}],
        "digits": album.digits, "labels": album.labels, "digit": album.digit, "index": album.index,
    }  # fmt: skip
    sample = {"__key__": key, "json": json.dumps(record)}
    sample.update({f"{i}.png": _png(img) for i, img in enumerate(album.images)})
    return sample


def build_longctx_shards(out_dir: str | Path, n: int = TRAIN_SAMPLES, seed: int = 0) -> list[Path]:
    """``train-00000{0..3}.tar`` of short album windows (+ ``sizes.json``), from the training split only."""
    out_dir = Path(out_dir)
    writer = ShardWriter(out_dir, "train", max_count=-(-n // TRAIN_SHARDS))
    for i, album in enumerate(training_albums(n, seed)):
        writer.write(shard_sample(f"album{i:06d}", album))
    paths = writer.close()
    (out_dir / SCHEMA_FILE).write_text(SCHEMA + "\n")
    return paths


def ensure_longctx_shards(out_dir: str | Path = "data/shards/longctx", seed: int = 0) -> bool:
    """(Re)build the training shards when missing or written by an older schema; True if built."""
    out_dir = resolve_path(str(out_dir))
    marker = out_dir / SCHEMA_FILE
    if marker.exists() and marker.read_text().strip() == SCHEMA:
        return False
    print(f"building long-context digit shards in {out_dir}", flush=True)
    for old in out_dir.glob("*.tar"):
        old.unlink()
    build_longctx_shards(out_dir, seed=seed)
    return True


def _png_cell(array: np.ndarray) -> dict:
    return {"bytes": _png(array), "path": None}


def build_longctx_bench(
    seed: int = 0, lengths: tuple[int, ...] = EVAL_LENGTHS, per_length: dict[str, int] | None = None
) -> dict[str, list[dict]]:
    """Splits ``{val,test}_{n}`` of whole albums of ``n`` held-out digits labelled from 00 (``datasets`` rows)."""
    per_length = per_length or {"val": 100, "test": 200}
    out: dict[str, list[dict]] = {}
    for half, count in per_length.items():
        pool = DigitPool.split("heldout", half, seed)
        for n in lengths:
            rng = np.random.default_rng([seed, 2, n, 0 if half == "val" else 1])
            rows = []
            for i in range(count):
                a = pool.album(n, rng)
                rows.append({
                    "id": i, "n_images": n, "images": [_png_cell(img) for img in a.images], "question": a.prompt,
                    "answer": a.answer, "digit": a.digit, "index": a.index, "digits": json.dumps(a.digits),
                })  # fmt: skip
            out[f"{half}_{n}"] = rows
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/shards/longctx")
    ap.add_argument("--samples", type=int, default=TRAIN_SAMPLES)
    args = ap.parse_args()
    for p in build_longctx_shards(resolve_path(args.out), args.samples):
        print(p)
