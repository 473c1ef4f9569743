"""Long-context digits: look an image up by its label in an album, answer its digit.

An *album* is a run of real 8x8 digits, each followed by its two-digit label
(``<image> 3 7``); the question names one label (``what digit is image 3 7 ?``) and
the answer is that image's digit (``5``, the answer word of ``digits_vqa``). Labels
are two digit words because the tiny word-level tokenizer has ``0``..``9`` and no
larger numbers. The task is a lookup (match the asked label among the album's
labels, as an induction head does) followed by recognition of the image it labels,
so it is well defined at any length, and a model that learned it on short albums can
only fail on long ones by losing track of where things are: what V2PE is for.

Training samples are short windows of an album of :data:`MAX_IMAGES` images:
``TRAIN_IMAGES`` (1-4) consecutive images whose labels start at a random offset, so
every label ``00``..``63`` is seen in training while no training sample is longer
than 4 images; each training image is asked about once (one turn per image). The
benchmark asks one question about whole albums of 4 (a training length), 8, 16, 32
and 64 images labelled from ``00`` (``digits_longctx_{n}``).
Images are drawn from the pool without replacement (an album repeats digits, never images);
classes are near-balanced, so chance is ~1/10 at any length.

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
from data.shards import ShardWriter
from mm.schema import resolve_path

MAX_IMAGES = 64  # labels 00..63: the longest album the benchmark asks about
TRAIN_IMAGES = (1, 4)  # images per training sample, inclusive (4 images, 4 questions: 126 tokens)
EVAL_LENGTHS = (4, 8, 16, 32, 64)  # 4: a training length, the in-distribution reference
QUESTION = "what digit is image {label} ?"  # every word is in the tiny tokenizer
TRAIN_SAMPLES = 20000  # ~1 epoch of the recipe: albums are rarely seen twice
TRAIN_SHARDS = 4
SCHEMA = "longctx-v4: album windows of 1-4 labelled digits, each asked by label; json conversations + 0.png, 1.png, ..."
SCHEMA_FILE = "SCHEMA"


def label_text(label: int) -> str:
    """Two digit words ("3 7"): the tiny tokenizer has no words for numbers above 9."""
    if not 0 <= label < 100:
        raise ValueError(f"album labels are 0..99, got {label}")
    return f"{label // 10} {label % 10}"


def album_prompt(labels: list[int], asked: int) -> str:
    """User text with one ``<image>`` marker per image, each followed by its label, then the question.

    (Label before the image, so that image tokens could read it, learned no better: 0.22-0.26
    vs 0.29-0.33 at 4 images after the same 2500 steps.)
    """
    return "".join(f"<image> {label_text(lab)}\n" for lab in labels) + QUESTION.format(label=label_text(asked))


@dataclass
class Album:
    """One question: images (uint8 8x8) with their digits and labels; the question asks about ``index``."""

    images: list[np.ndarray]
    digits: list[int]
    labels: list[int]
    index: int  # position in the album of the image asked about
    more: tuple[int, ...] = ()  # training: positions asked about in follow-up turns

    @property
    def prompt(self) -> str:
        return album_prompt(self.labels, self.labels[self.index])

    @property
    def answer(self) -> str:
        return str(self.digits[self.index])  # the digit as digits_vqa answers it

    def conversations(self) -> list[dict]:
        """LLaVA turns: the album with the first question, then one turn per follow-up question."""
        turns = [{"from": "human", "value": self.prompt}, {"from": "gpt", "value": self.answer}]
        for i in self.more:
            turns += [{"from": "human", "value": QUESTION.format(label=label_text(self.labels[i]))},
                      {"from": "gpt", "value": str(self.digits[i])}]  # fmt: skip
        return turns


class DigitPool:
    """The real digits of one split (uint8 8x8, 0..255 as in the shards), by class."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images = np.round(np.asarray(images) * 255).astype(np.uint8)
        self.labels = np.asarray(labels).astype(int)
        self.by_digit = {d: np.flatnonzero(self.labels == d) for d in range(10)}

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

    def album(self, n_images: int, rng: np.random.Generator, first_label: int = 0) -> Album:
        """``n_images`` distinct images of the pool, labelled from ``first_label``; one of them asked about."""
        if n_images < 1 or n_images > len(self.labels):
            raise ValueError(f"a pool of {len(self.labels)} digits cannot fill an album of {n_images}")
        if not 0 <= first_label or first_label + n_images > 100:
            raise ValueError(f"album labels are 0..99, got {first_label}..{first_label + n_images - 1}")
        # distinct images drawn uniformly from the pool (classes are near-balanced: chance is ~1/10)
        picks = [int(i) for i in rng.choice(len(self.labels), size=n_images, replace=False)]
        return Album(
            images=[self.images[i] for i in picks],
            digits=[int(self.labels[i]) for i in picks],
            labels=list(range(first_label, first_label + n_images)),
            index=int(rng.integers(n_images)),
        )


def _check_images(images: tuple[int, int]) -> tuple[int, int]:
    lo, hi = (int(i) for i in images)
    if not 1 <= lo <= hi <= MAX_IMAGES:
        raise ValueError(
            f"images per training sample must be (min, max) with 1 <= min <= max <= {MAX_IMAGES}, got {images}"
        )
    return lo, hi


def training_albums(n: int, seed: int = 0, images: tuple[int, int] = TRAIN_IMAGES) -> list[Album]:
    """``n`` short album windows (``images`` = (min, max) images) from the training split, labels at random offsets.

    ``images`` other than TRAIN_IMAGES is for curricula (e.g. (1, 2) as a first stage); the draw for the
    default is unchanged, so the default shards are the same.
    """
    lo, hi = _check_images(images)
    pool = DigitPool.split("train", seed=seed)
    rng = np.random.default_rng([seed, 1])
    out = []
    for _ in range(n):
        k = int(rng.integers(lo, hi + 1))
        album = pool.album(k, rng, first_label=int(rng.integers(MAX_IMAGES - k + 1)))
        # every image is asked about once, in random order: one answer per image (not one per album)
        # is what lets the tiny model find the lookup within a few thousand steps
        album.more = tuple(int(i) for i in rng.permutation([i for i in range(k) if i != album.index]))
        out.append(album)
    return out


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def shard_sample(key: str, album: Album) -> dict:
    """A ``conversation``-kind webdataset sample: json conversations + ``0.png``, ``1.png``, ... in marker order."""
    record = {
        "conversations": album.conversations(),
        "digits": album.digits, "labels": album.labels, "index": album.index,
    }  # fmt: skip
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
                    "answer": a.answer, "index": a.index, "label": label_text(a.labels[a.index]),
                    "digits": json.dumps(a.digits),
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
