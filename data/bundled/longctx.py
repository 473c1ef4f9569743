"""Long-context digits: find the marked image of an album, answer its digit.

An *album* is a run of real 8x8 digits, one image per ``<image>`` line; exactly one of them is
followed by the word ``marked`` (``<image> marked``) and the question is ``what digit is the marked
image ?``; the answer is that image's digit (``5``, the answer word of ``digits_vqa``). The task is a
needle retrieval (MM-NIAH's shape): find the marker anywhere in the album, read the image just before
it. It is well defined at any length, so a model that learned it on short albums can only fail on long
ones by losing track of where things are over distances it never saw: what V2PE is for.

The task it replaces asked for an image by a two-digit label (``<image> 3 7``, ``what digit is image
3 7 ?``); the tiny model never learned that lookup, not even at its training length (it answered the digit
of a random image of the album, 0.33-0.38 at 4 images: ``configs/tiny_longctx.yaml`` lists the
attempts). A marker is one fixed word the question can attend to by content, and the image it marks
is always the one right before it; what is left to positions is the distance between the question
and the marker, which grows with the album.

Training samples are albums of ``TRAIN_IMAGES`` (1-4) images with the marker on a uniformly drawn
image; the benchmark asks about whole albums of 4 (the trained number), 8, 16, 32 and 64 images
(2x..16x, ``digits_longctx_{n}``). Images are drawn from the pool without replacement (an album
repeats digits, never images); classes are near-balanced, so chance is ~1/10 at any length.

Images never cross splits: training samples use ``data.bundled.digits``' training split; the
benchmark splits ``data.bundled.digits``' held-out split into two disjoint halves, ``val``
(for choosing the inference delta) and ``test`` (for reporting).

    python -m data.bundled.longctx --out data/shards/longctx    # training shards (built on first use by train.py)
    python -m data.bundled.benchmark                         # writes data/bench/digits_longctx with the others
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from data.bundled.digits import load_digit_split
from data.shards import ShardWriter, rebuild_if_stale
from mm.schema import resolve_path

MAX_IMAGES = 64  # the longest album the benchmark asks about
TRAIN_IMAGES = (1, 4)  # images per training sample, inclusive: the trained number is 4
EVAL_LENGTHS = (4, 8, 16, 32, 64)  # 4: the trained number, then 2x, 4x, 8x, 16x
MARKER = "marked"
QUESTION = "what digit is the marked image ?"  # words of configs/tokenizers/generalist
TRAIN_SAMPLES = 40000  # ~1 epoch of the recipe: albums are rarely seen twice
TRAIN_SHARDS = 4
SCHEMA = "longctx-v5: albums of 1-4 digits, one marked, 'what digit is the marked image ?'; json + 0.png, 1.png, ..."
SCHEMA_FILE = "SCHEMA"


def album_prompt(n_images: int, marked: int) -> str:
    """User text: one ``<image>`` line per image, the marked one followed by the marker, then the question."""
    if not 0 <= marked < n_images:
        raise ValueError(f"the marked image {marked} is not in an album of {n_images}")
    return "".join(f"<image> {MARKER}\n" if i == marked else "<image>\n" for i in range(n_images)) + QUESTION


@dataclass
class Album:
    """One question: images (uint8 8x8) with their digits; ``index`` is the marked image."""

    images: list[np.ndarray]
    digits: list[int]
    index: int

    @property
    def prompt(self) -> str:
        return album_prompt(len(self.images), self.index)

    @property
    def answer(self) -> str:
        return str(self.digits[self.index])  # the digit as digits_vqa answers it

    def conversations(self) -> list[dict]:
        return [{"from": "human", "value": self.prompt}, {"from": "gpt", "value": self.answer}]


class DigitPool:
    """The real digits of one split (uint8 8x8, 0..255 as in the shards), by class."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images = np.round(np.asarray(images) * 255).astype(np.uint8)
        self.labels = np.asarray(labels).astype(int)

    @classmethod
    def split(cls, split: str, half: str = "", seed: int = 0) -> DigitPool:
        """``split`` of ``data.bundled.digits``; ``half`` ("val"/"test") takes one seeded half of it."""
        images, labels = load_digit_split(split, seed)
        if half:
            if half not in ("val", "test"):
                raise ValueError(f"half must be 'val' or 'test', got {half!r}")
            perm = np.random.default_rng([seed, 7]).permutation(len(labels))
            keep = np.sort(perm[: len(perm) // 2] if half == "val" else perm[len(perm) // 2 :])
            images, labels = images[keep], labels[keep]
        return cls(images, labels)

    def album(self, n_images: int, rng: np.random.Generator) -> Album:
        """``n_images`` distinct images of the pool, one of them (uniformly) marked."""
        if n_images < 1 or n_images > len(self.labels):
            raise ValueError(f"a pool of {len(self.labels)} digits cannot fill an album of {n_images}")
        # distinct images drawn uniformly from the pool (classes are near-balanced: chance is ~1/10)
        picks = [int(i) for i in rng.choice(len(self.labels), size=n_images, replace=False)]
        return Album([self.images[i] for i in picks], [int(self.labels[i]) for i in picks], int(rng.integers(n_images)))


def _check_images(images: tuple[int, int]) -> tuple[int, int]:
    lo, hi = (int(i) for i in images)
    if not 1 <= lo <= hi <= MAX_IMAGES:
        raise ValueError(
            f"images per training sample must be (min, max) with 1 <= min <= max <= {MAX_IMAGES}, got {images}"
        )
    return lo, hi


def training_albums(n: int, seed: int = 0, images: tuple[int, int] = TRAIN_IMAGES) -> list[Album]:
    """``n`` albums of ``images`` = (min, max) images from the training split (a curriculum may ask other sizes)."""
    lo, hi = _check_images(images)
    pool = DigitPool.split("train", seed=seed)
    rng = np.random.default_rng([seed, 1])
    return [pool.album(int(rng.integers(lo, hi + 1)), rng) for _ in range(n)]


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def shard_sample(key: str, album: Album) -> dict:
    """A ``conversation``-kind webdataset sample: json conversations + ``0.png``, ``1.png``, ... in marker order."""
    record = {"conversations": album.conversations(), "digits": album.digits, "index": album.index}
    sample = {"__key__": key, "json": json.dumps(record)}
    sample.update({f"{i}.png": _png(img) for i, img in enumerate(album.images)})
    return sample


def build_longctx_shards(
    out_dir: str | Path, n: int = TRAIN_SAMPLES, seed: int = 0, images: tuple[int, int] = TRAIN_IMAGES
) -> list[Path]:
    """``train-00000{0..3}.tar`` of short album windows (+ ``sizes.json``), from the training split only."""
    out_dir = Path(out_dir)
    writer = ShardWriter(out_dir, "train", max_count=-(-n // TRAIN_SHARDS))
    for i, album in enumerate(training_albums(n, seed, images)):
        writer.write(shard_sample(f"album{i:06d}", album))
    paths = writer.close()
    # other album sizes get another schema line, so the default folder is rebuilt if they were written there
    schema = SCHEMA if tuple(images) == TRAIN_IMAGES else f"{SCHEMA} (images {images[0]}-{images[1]})"
    (out_dir / SCHEMA_FILE).write_text(schema + "\n")
    return paths


def ensure_longctx_shards(out_dir: str | Path = "data/shards/longctx", seed: int = 0) -> bool:
    """(Re)build the training shards when missing or written by an older schema; True if built."""
    out_dir = resolve_path(str(out_dir))
    return rebuild_if_stale(
        out_dir, SCHEMA, "long-context digit shards", lambda: build_longctx_shards(out_dir, seed=seed)
    )


def _png_cell(array: np.ndarray) -> dict:
    return {"bytes": _png(array), "path": None}


def build_longctx_bench(
    seed: int = 0, lengths: tuple[int, ...] = EVAL_LENGTHS, per_length: dict[str, int] | None = None
) -> dict[str, list[dict]]:
    """Splits ``{val,test}_{n}`` of albums of ``n`` held-out digits, one marked (``datasets`` rows)."""
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
                    "answer": a.answer, "index": a.index, "digits": json.dumps(a.digits),
                })  # fmt: skip
            out[f"{half}_{n}"] = rows
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/shards/longctx")
    ap.add_argument("--samples", type=int, default=TRAIN_SAMPLES)
    ap.add_argument(
        "--images", type=int, nargs=2, default=TRAIN_IMAGES, metavar=("MIN", "MAX"), help="images per sample"
    )
    args = ap.parse_args()
    for p in build_longctx_shards(resolve_path(args.out), args.samples, images=tuple(args.images)):
        print(p)
