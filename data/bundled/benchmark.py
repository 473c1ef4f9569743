"""The bundled offline benchmark: datasets built from scikit-learn's real handwritten digits.

Eval datasets (``datasets.DatasetDict`` saved with ``save_to_disk``, read by the task
YAMLs in ``mm/eval/tasks`` through ``load_from_disk``) use only the held-out split of
``data.bundled.digits`` (the same split the training shards leave out); the training-data
generator at the bottom uses only the training split.

Multi-digit *canvases*: real 8x8 digits pasted into the slots of a 3x3 grid on a
32x32 black canvas (slot corners at 1, 12, 23 px: 3 px of background between
neighbours, so connected components separate the digits).

| dataset | rows | what it asks |
| --- | --- | --- |
| digits_vqa | 359 | "what digit is this ?" on each held-out digit (exact answer) |
| digits_t2i | 10 | "draw the digit d" |
| digits_mcq | 4 x 150 | which digit / how many digits, 4 options A-D, every rotation (CircularEval) |
| digits_pope | 3 splits x 360 | "Is there a d in the image?" on 3-digit canvases: 3 present, 3 absent |
| digits_mme | 4 x 40 images x 2 | yes/no pairs (one yes, one no per image): existence, count, position, recognition |
| digits_geneval | 80 prompts | GenEval metadata: single object, two objects, counting, position |
| digits_longctx | (100 val + 200 test) x 5 | "what digit is image 3 7 ?" over 4-64 labelled digits (data/longctx.py) |

POPE's absent objects: drawn at random (random), from the most frequent digits (popular)
or, for adversarial, POPE takes the objects that co-occur most with the present ones;
digits are placed independently, so co-occurrence carries no signal here and the
adversarial split takes the absent digits that look most like a present one instead
(distance between class-mean images of the training split).

    python -m data.bundled.benchmark [--out data/bench]                     # eval datasets
    python -m data.bundled.benchmark --train-out DIR --train-per-kind 500   # LLaVA-style training records
"""

from __future__ import annotations

import io
import json
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from data.bundled.digits import DIGIT_NAMES, EVAL_QUESTION, digit_prompt, load_digit_split
from data.bundled.longctx import build_longctx_bench

CANVAS = 32
SLOTS = (1, 12, 23)  # top-left corner of each grid slot along an axis (8 px digits, 3 px gaps)
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
RELATIONS = ("left of", "right of", "above", "below")

MCQ_RECOGNITION = "Which digit is shown in the image?"
MCQ_COUNT = "How many digits are in the image?"
POPE_QUESTION = "Is there a {d} in the image?"
MME_SUFFIX = " Please answer yes or no."
MME_QUESTIONS = {
    "existence": "Is there a {d} in this image?",
    "count": "Are there {n} digits in this image?",
    "position": "Is the {a} {rel} the {b}?",
    "recognition": "Is this the digit {d}?",
}
GENEVAL_PROMPTS = {
    "single_object": "draw the digit {a}",
    "two_object": "draw the digit {a} and the digit {b}",
    "counting": "draw {n} copies of the digit {a}",
    "position": "draw the digit {a} {rel} the digit {b}",
}


def _rng(name: str, seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def digit_pool(split: str) -> dict[int, list[np.ndarray]]:
    """label -> uint8 8x8 images of one split of data.bundled.digits (same quantisation as the shards)."""
    images, labels = load_digit_split(split)
    pool: dict[int, list[np.ndarray]] = {d: [] for d in range(10)}
    for img, y in zip(images, labels.tolist()):
        pool[int(y)].append(np.round(img * 255).astype(np.uint8))
    return pool


def render_canvas(items: list[tuple[np.ndarray, int, int]], size: int = CANVAS) -> np.ndarray:
    """[(8x8 uint8 digit, slot row, slot col)] -> size x size uint8 canvas."""
    canvas = np.zeros((size, size), dtype=np.uint8)
    for img, r, c in items:
        y, x = SLOTS[r], SLOTS[c]
        canvas[y : y + 8, x : x + 8] = np.maximum(canvas[y : y + 8, x : x + 8], img)
    return canvas


def slot_relation(a: tuple[int, int], b: tuple[int, int]) -> str | None:
    """Relation of slot a to slot b when they share a row or a column ("left of" = a's column < b's)."""
    if a[0] == b[0]:
        return "left of" if a[1] < b[1] else "right of"
    if a[1] == b[1]:
        return "above" if a[0] < b[0] else "below"
    return None


def relation_slots(rel: str, rng: np.random.Generator) -> tuple[tuple[int, int], tuple[int, int]]:
    """Two slots (a, b) such that a is ``rel`` b."""
    i, j = sorted(rng.choice(3, size=2, replace=False).tolist())
    k = int(rng.integers(3))
    first, second = ((k, i), (k, j)) if rel in ("left of", "right of") else ((i, k), (j, k))
    return (first, second) if rel in ("left of", "above") else (second, first)


class Sampler:
    """Seeded draws of real digits and canvas layouts from one split."""

    def __init__(self, split: str, name: str, seed: int = 0):
        self.pool = digit_pool(split)
        self.rng = _rng(name, seed)

    def digit(self, label: int) -> np.ndarray:
        imgs = self.pool[label]
        return imgs[int(self.rng.integers(len(imgs)))]

    def slots(self, n: int) -> list[tuple[int, int]]:
        return [divmod(int(s), 3) for s in self.rng.choice(9, size=n, replace=False)]

    def canvas(self, labels: list[int], slots: list[tuple[int, int]] | None = None) -> np.ndarray:
        slots = slots or self.slots(len(labels))
        return render_canvas([(self.digit(d), r, c) for d, (r, c) in zip(labels, slots)])


def class_similarity_order() -> dict[int, list[int]]:
    """For each digit, the other digits from most to least similar-looking (class-mean image distance)."""
    pool = digit_pool("train")
    means = np.stack([np.mean(pool[d], axis=0) for d in range(10)]).reshape(10, -1).astype(np.float64)
    dist = ((means[:, None] - means[None]) ** 2).sum(-1)
    return {d: [int(o) for o in np.argsort(dist[d]) if o != d] for d in range(10)}


def png(array: np.ndarray) -> dict:
    """An image cell for ``datasets.Image``."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


# ---------------------------------------------------------------------------------
# Eval datasets
# ---------------------------------------------------------------------------------


def build_vqa(seed: int = 0) -> dict[str, list[dict]]:
    images, labels = load_digit_split("heldout", seed)
    rows = [
        {"id": i, "image": png(np.round(img * 255).astype(np.uint8)), "question": EVAL_QUESTION, "answer": str(y),
         "label": int(y)}
        for i, (img, y) in enumerate(zip(images, labels.tolist()))
    ]  # fmt: skip
    return {"test": rows}


def build_t2i(seed: int = 0) -> dict[str, list[dict]]:
    return {"test": [{"id": d, "name": f"digit_{d}", "prompt": digit_prompt(d), "label": d} for d in range(10)]}


def _mcq_options(correct: str, pool: list[str], rng: np.random.Generator) -> list[str]:
    others = [o for o in pool if o != correct]
    opts = [correct] + [others[i] for i in rng.choice(len(others), size=3, replace=False)]
    return [opts[i] for i in rng.permutation(4)]


def build_mcq(seed: int = 0, n_recognition: int = 100, n_count: int = 50) -> dict[str, list[dict]]:
    """MMBench-style single-answer questions; each expanded into its 4 option rotations."""
    s = Sampler("heldout", "digits_mcq", seed)
    base = []
    for _ in range(n_recognition):
        d = int(s.rng.integers(10))
        base.append(("recognition", MCQ_RECOGNITION, s.digit(d), str(d), [str(k) for k in range(10)]))
    for _ in range(n_count):
        n = int(s.rng.integers(1, 5))
        labels = [int(x) for x in s.rng.integers(10, size=n)]
        base.append(("counting", MCQ_COUNT, s.canvas(labels), str(n), ["1", "2", "3", "4", "5"]))
    rows = []
    for g, (category, question, image, correct, pool) in enumerate(base):
        opts = _mcq_options(correct, pool, s.rng)
        img = png(image)
        for shift in range(4):
            rot = opts[shift:] + opts[:shift]
            rows.append({
                "index": g * 4 + shift, "circular_group": g, "category": category, "question": question,
                "hint": "", "A": rot[0], "B": rot[1], "C": rot[2], "D": rot[3], "answer": "ABCD"[rot.index(correct)],
                "image": img,
            })  # fmt: skip
    return {"test": rows}


def build_pope(seed: int = 0, n_canvases: int = 60, per_canvas: int = 3) -> dict[str, list[dict]]:
    """Three splits over the same canvases; each canvas gets ``per_canvas`` yes and no questions."""
    s = Sampler("heldout", "digits_pope", seed)
    # a skewed digit frequency, so that "popular" names something (POPE: the most frequent objects)
    weights = 1.0 / np.sqrt(1 + np.arange(10))
    weights = weights[s.rng.permutation(10)]
    weights /= weights.sum()
    canvases = []
    for _ in range(n_canvases):
        present = [int(d) for d in s.rng.choice(10, size=3, replace=False, p=weights)]
        canvases.append((present, s.canvas(present)))
    freq = np.bincount([d for p, _ in canvases for d in p], minlength=10)
    popular_order = [int(d) for d in np.argsort(-freq, kind="stable")]
    similar = class_similarity_order()
    splits: dict[str, list[dict]] = {"random": [], "popular": [], "adversarial": []}
    for split in splits:
        rng = _rng(f"digits_pope_{split}", seed)
        for c, (present, canvas) in enumerate(canvases):
            absent = [d for d in range(10) if d not in present]
            if split == "random":
                neg = [int(d) for d in rng.choice(absent, size=per_canvas, replace=False)]
            elif split == "popular":
                neg = [d for d in popular_order if d in absent][:per_canvas]
            else:  # round-robin over the present digits' most similar absent digits
                ranked = [d for rank in range(9) for p in present for d in similar[p][rank : rank + 1]]
                neg = list(dict.fromkeys(d for d in ranked if d in absent))[:per_canvas]
            img = png(canvas)
            qs = [(d, "yes") for d in present[:per_canvas]] + [(d, "no") for d in neg]
            for d, ans in qs:
                splits[split].append({
                    "question_id": len(splits[split]), "image_id": c, "image": img, "category": split,
                    "question": POPE_QUESTION.format(d=d), "answer": ans, "digit": d,
                })  # fmt: skip
    return splits


def build_mme(seed: int = 0, per_category: int = 40) -> dict[str, list[dict]]:
    """MME-style pairs: every image has one question answered yes and one answered no."""
    s = Sampler("heldout", "digits_mme", seed)
    rows: list[dict] = []

    def add(category: str, image: np.ndarray, yes_q: str, no_q: str) -> None:
        img, image_id = png(image), f"{category}_{len(rows) // 2:04d}"
        for q, a in ((yes_q, "yes"), (no_q, "no")):
            rows.append({"question_id": image_id, "category": category, "image": img,
                         "question": q + MME_SUFFIX, "answer": a})  # fmt: skip

    t = MME_QUESTIONS
    for _ in range(per_category):
        present = [int(d) for d in s.rng.choice(10, size=int(s.rng.integers(1, 4)), replace=False)]
        absent = int(s.rng.choice([d for d in range(10) if d not in present]))
        add("existence", s.canvas(present), t["existence"].format(d=present[0]), t["existence"].format(d=absent))
    for _ in range(per_category):
        n = int(s.rng.integers(1, 5))
        wrong = n + 1 if n == 1 or s.rng.random() < 0.5 else n - 1
        img = s.canvas([int(x) for x in s.rng.integers(10, size=n)])
        add("count", img, t["count"].format(n=n), t["count"].format(n=wrong))
    for _ in range(per_category):
        a, b = [int(d) for d in s.rng.choice(10, size=2, replace=False)]
        rel = RELATIONS[int(s.rng.integers(4))]
        sa, sb = relation_slots(rel, s.rng)
        opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[rel]
        img = s.canvas([a, b], [sa, sb])
        add("position", img, t["position"].format(a=a, rel=rel, b=b), t["position"].format(a=a, rel=opposite, b=b))
    for _ in range(per_category):
        d = int(s.rng.integers(10))
        other = int(s.rng.choice([k for k in range(10) if k != d]))
        add("recognition", s.digit(d), t["recognition"].format(d=d), t["recognition"].format(d=other))
    return {"test": rows}


def geneval_metadata(seed: int = 0, per_tag: int = 20) -> list[dict]:
    """GenEval prompt metadata (tag, include/exclude with class and count, position) over digit classes."""
    rng = _rng("digits_geneval", seed)
    out = []
    for i in range(per_tag):
        a = i % 10
        out.append({"tag": "single_object", "include": [{"class": str(a), "count": 1}],
                    "prompt": GENEVAL_PROMPTS["single_object"].format(a=a)})  # fmt: skip
    for _ in range(per_tag):
        a, b = [int(d) for d in rng.choice(10, size=2, replace=False)]
        out.append({"tag": "two_object", "include": [{"class": str(a), "count": 1}, {"class": str(b), "count": 1}],
                    "prompt": GENEVAL_PROMPTS["two_object"].format(a=a, b=b)})  # fmt: skip
    for _ in range(per_tag):
        a, n = int(rng.integers(10)), int(rng.integers(2, 5))
        out.append({"tag": "counting", "include": [{"class": str(a), "count": n}],
                    "exclude": [{"class": str(a), "count": n + 1}],
                    "prompt": GENEVAL_PROMPTS["counting"].format(n=NUMBER_WORDS[n], a=a)})  # fmt: skip
    for _ in range(per_tag):
        a, b = [int(d) for d in rng.choice(10, size=2, replace=False)]
        rel = RELATIONS[int(rng.integers(4))]
        # GenEval: the positioned object (a) is described relative to include[0] (b)
        out.append({"tag": "position",
                    "include": [{"class": str(b), "count": 1}, {"class": str(a), "count": 1, "position": [rel, 0]}],
                    "prompt": GENEVAL_PROMPTS["position"].format(a=a, rel=rel, b=b)})  # fmt: skip
    return out


def geneval_layout(metadata: dict, sampler: Sampler) -> tuple[list[int], list[tuple[int, int]]]:
    """A layout that satisfies one GenEval prompt: its digits and their slots (row, column), drawn at random."""
    inc = metadata["include"]
    if metadata["tag"] == "position":
        rel = inc[1]["position"][0]
        sa, sb = relation_slots(rel, sampler.rng)
        return [int(inc[1]["class"]), int(inc[0]["class"])], [sa, sb]
    labels = [int(r["class"]) for r in inc for _ in range(r["count"])]
    return labels, sampler.slots(len(labels))


def render_geneval(metadata: dict, sampler: Sampler) -> np.ndarray:
    """A real canvas that satisfies one GenEval prompt (the judge's ceiling)."""
    return sampler.canvas(*geneval_layout(metadata, sampler))


def build_geneval(seed: int = 0) -> dict[str, list[dict]]:
    rows = [
        {"id": i, "name": f"{i:05d}", "tag": m["tag"], "prompt": m["prompt"], "metadata": json.dumps(m)}
        for i, m in enumerate(geneval_metadata(seed))
    ]
    return {"test": rows}


BENCH_DATASETS: dict[str, Callable[..., dict[str, list[dict]]]] = {
    "digits_vqa": build_vqa,
    "digits_t2i": build_t2i,
    "digits_mcq": build_mcq,
    "digits_pope": build_pope,
    "digits_mme": build_mme,
    "digits_geneval": build_geneval,
    "digits_longctx": build_longctx_bench,
}


def _features(rows: list[dict]):
    import datasets

    feats = {}
    for k, v in rows[0].items():
        if k == "image":
            feats[k] = datasets.Image()
        elif k == "images":  # several images per row (digits_longctx)
            feats[k] = datasets.List(datasets.Image())
        elif isinstance(v, bool):
            feats[k] = datasets.Value("bool")
        elif isinstance(v, int):
            feats[k] = datasets.Value("int64")
        else:
            feats[k] = datasets.Value("string")
    return datasets.Features(feats)


def build_bench(
    out_dir: str | Path, names: list[str] | None = None, seed: int = 0, replace: bool = False
) -> list[Path]:
    """Write each dataset to ``out_dir/<name>`` (``DatasetDict.save_to_disk``).

    Each is written to a private temporary folder and renamed into place, so concurrent
    builders (parallel test runs) never see half a dataset; an existing one is kept
    unless ``replace``.
    """
    import os
    import shutil

    import datasets

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    quiet = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        for name in names or list(BENCH_DATASETS):
            final, tmp = out_dir / name, out_dir / f".tmp_{name}_{os.getpid()}"
            paths.append(final)
            if final.exists() and not replace:
                continue
            splits = BENCH_DATASETS[name](seed)
            dd = datasets.DatasetDict(
                {k: datasets.Dataset.from_list(rows, features=_features(rows)) for k, rows in splits.items()}
            )
            shutil.rmtree(tmp, ignore_errors=True)
            dd.save_to_disk(str(tmp))
            if replace:
                shutil.rmtree(final, ignore_errors=True)
            try:
                tmp.rename(final)
            except OSError:  # another process put it there first: theirs is identical
                shutil.rmtree(tmp)
    finally:
        if quiet:
            datasets.enable_progress_bars()
    return paths


# ---------------------------------------------------------------------------------
# Training data in the same formats (training split only)
# ---------------------------------------------------------------------------------

MCQ_POST = "\nAnswer with the option's letter from the given choices directly."
SHORT_POST = "\nAnswer the question using a single word or phrase."


def _mcq_text(question: str, options: list[str]) -> str:
    return question + "".join(f"\n{'ABCD'[i]}. {o}" for i, o in enumerate(options)) + MCQ_POST


def training_records(per_kind: int = 500, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(conversations, generation pairs) in the benchmark's formats, from the training split.

    Conversations are LLaVA-style: ``{"id", "image": "<id>.png", "conversations": [{"from": "human",
    "value": "<image>\\n..."}, {"from": "gpt", "value": ...}], "image_array": uint8}``; generation
    pairs are ``{"id", "caption", "image_array"}`` with GenEval-style prompts and matching canvases.
    """
    s = Sampler("train", "bench_train", seed)
    conv: list[dict] = []

    def add(kind: str, image: np.ndarray, question: str, answer: str) -> None:
        cid = f"{kind}_{len(conv):06d}"
        conv.append({"id": cid, "image": f"{cid}.png", "image_array": image, "conversations": [
            {"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}]})  # fmt: skip

    for _ in range(per_kind):  # MCQ, recognition and counting
        d = int(s.rng.integers(10))
        opts = _mcq_options(str(d), [str(k) for k in range(10)], s.rng)
        add("mcq", s.digit(d), _mcq_text(MCQ_RECOGNITION, opts), "ABCD"[opts.index(str(d))])
        n = int(s.rng.integers(1, 5))
        opts = _mcq_options(str(n), ["1", "2", "3", "4", "5"], s.rng)
        add("mcq", s.canvas([int(x) for x in s.rng.integers(10, size=n)]), _mcq_text(MCQ_COUNT, opts),
            "ABCD"[opts.index(str(n))])  # fmt: skip
    for _ in range(per_kind):  # POPE-style presence, yes and no
        present = [int(d) for d in s.rng.choice(10, size=int(s.rng.integers(1, 5)), replace=False)]
        img = s.canvas(present)
        absent = int(s.rng.choice([d for d in range(10) if d not in present]))
        add("pope", img, POPE_QUESTION.format(d=present[0]) + SHORT_POST, "yes")
        add("pope", img, POPE_QUESTION.format(d=absent) + SHORT_POST, "no")
    for _ in range(per_kind):  # MME-style count and position, yes and no
        n = int(s.rng.integers(1, 5))
        img = s.canvas([int(x) for x in s.rng.integers(10, size=n)])
        add("mme", img, MME_QUESTIONS["count"].format(n=n) + MME_SUFFIX, "yes")
        add("mme", img, MME_QUESTIONS["count"].format(n=n % 4 + 1) + MME_SUFFIX, "no")
        a, b = [int(d) for d in s.rng.choice(10, size=2, replace=False)]
        rel = RELATIONS[int(s.rng.integers(4))]
        sa, sb = relation_slots(rel, s.rng)
        img = s.canvas([a, b], [sa, sb])
        add("mme", img, MME_QUESTIONS["position"].format(a=a, rel=rel, b=b) + MME_SUFFIX, "yes")
        wrong = RELATIONS[(RELATIONS.index(rel) + 1 + int(s.rng.integers(3))) % 4]
        add("mme", img, MME_QUESTIONS["position"].format(a=a, rel=wrong, b=b) + MME_SUFFIX, "no")
    pairs = []
    meta = geneval_metadata(seed + 1, per_tag=per_kind)
    for i, m in enumerate(meta):
        pairs.append({"id": f"gen_{i:06d}", "caption": m["prompt"], "image_array": render_geneval(m, s)})
    return conv, pairs


def write_training_data(out_dir: str | Path, per_kind: int = 500, seed: int = 0) -> dict[str, int]:
    """``out_dir/conversations.jsonl`` + ``out_dir/generation.jsonl`` + PNGs under ``out_dir/images``."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    conv, pairs = training_records(per_kind, seed)
    with open(out_dir / "conversations.jsonl", "w") as f:
        for r in conv:
            Image.fromarray(r.pop("image_array")).save(out_dir / "images" / r["image"])
            r["image"] = f"images/{r['image']}"
            f.write(json.dumps(r) + "\n")
    with open(out_dir / "generation.jsonl", "w") as f:
        for r in pairs:
            Image.fromarray(r.pop("image_array")).save(out_dir / "images" / f"{r['id']}.png")
            f.write(json.dumps({"id": r["id"], "image": f"images/{r['id']}.png", "caption": r["caption"]}) + "\n")
    return {"conversations": len(conv), "generation": len(pairs)}


def bench_texts() -> list[str]:
    """Every question, answer and prompt text of the benchmark (a tokenizer's corpus for these formats)."""
    texts = [MCQ_RECOGNITION, MCQ_COUNT, MCQ_POST, SHORT_POST, MME_SUFFIX, "yes", "no", "A", "B", "C", "D"]
    for d in range(10):
        texts += [POPE_QUESTION.format(d=d), MME_QUESTIONS["existence"].format(d=d)]
        texts += [MME_QUESTIONS["recognition"].format(d=d), f"A. {d}", DIGIT_NAMES[d]]
        for rel in RELATIONS:
            texts.append(MME_QUESTIONS["position"].format(a=d, rel=rel, b=(d + 1) % 10))
            texts.append(GENEVAL_PROMPTS["position"].format(a=d, rel=rel, b=(d + 1) % 10))
        texts.append(GENEVAL_PROMPTS["two_object"].format(a=d, b=(d + 1) % 10))
    for n in range(1, 6):
        texts += [MME_QUESTIONS["count"].format(n=n), GENEVAL_PROMPTS["counting"].format(n=NUMBER_WORDS[n], a=0)]
    return texts


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/bench", help="eval datasets go to OUT/<name>")
    ap.add_argument("--train-out", default=None, help="also write LLaVA-style training records here")
    ap.add_argument("--train-per-kind", type=int, default=500)
    args = ap.parse_args()
    for p in build_bench(args.out, replace=True):
        print(p)
    if args.train_out:
        print(write_training_data(args.train_out, args.train_per_kind))
