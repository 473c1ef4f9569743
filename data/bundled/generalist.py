"""Training data of the generalist recipe: every format of the bundled benchmark, from the training split only.

The bundled benchmark (``data.bundled.benchmark``) asks open questions, yes/no questions (existence,
count, position, recognition), lettered multiple choice and GenEval-style prompts about real digits
and 32x32 canvases of them. This module writes training samples in exactly those formats (the same
question templates and the same post-prompts the task files append), drawn only from
``data.bundled.digits``' training split, as webdataset shards of two source kinds
(``data/sources.py``), one shard set per source so a config mixes them by weight:

| source | kind | what a sample is |
| --- | --- | --- |
| und_single | conversation | one digit, 1-3 turns: "what digit is this ?", lettered choice, "Is this the digit d?" |
| und_canvas | conversation | a canvas, 1-5 turns: POPE and MME existence, MME count, MME position, lettered count, |
| | | and "What digits are in the image?" (its digits in reading order: one answer per slot) |
| und_multi | conversation | 2-3 digits, one image each: "What digit is the second image?" |
| gen_single | generation | "draw the digit d" (and the digits' other prompts) -> the digit filling the frame |
| gen_canvas | generation | two digits, n copies, "a left of b" -> a canvas that satisfies the prompt |

Turns of one image share its image tokens (the benchmark asks one question per image; several per
training image are cheaper per answer); their order is random and yes/no answers are drawn
independently, so no answer tells another.

Understanding images are stored as the benchmark holds them (8x8 digits, 32 px canvases): the loader
resizes them with the tower's preprocessing, the function the eval processor calls (``mm.images.preprocess``),
so training sees what eval sees by construction. The recipe works at :data:`SIZE` (33 px: the canvases' 3x3
slots, corners at 1, 12, 23 px, each fall inside one 11 px patch of a 3x3 grid); generation targets are drawn
at 33 px directly: a single digit fills the frame by pixel repetition (area-downscaling, as the
``digits_t2i`` judge reads a generated image, gives the digit back), a canvas keeps its slots and gains
one empty row and column.

    python -m data.bundled.generalist --out data/shards/generalist   # built on first use by train.py
    python -m data.bundled.generalist --texts                        # the tokenizer's corpus, one text a line
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from data.bundled.benchmark import (
    GENEVAL_PROMPTS,
    MCQ_COUNT,
    MCQ_POST,
    MCQ_RECOGNITION,
    MME_QUESTIONS,
    NUMBER_WORDS,
    POPE_QUESTION,
    RELATIONS,
    SHORT_POST,
    Sampler,
    bench_texts,
    class_similarity_order,
    geneval_layout,
    relation_slots,
)
from data.bundled.digits import DIGIT_NAMES, PROMPTS, QUESTIONS, all_texts
from data.bundled.longctx import album_prompt
from data.shards import ShardWriter, rebuild_if_stale
from mm.schema import resolve_path

ORDINALS = ("first", "second", "third")
MULTI_QUESTION = "What digit is the {nth} image?"
LIST_QUESTION = "What digits are in the image?"  # not a benchmark form: every slot's digit, in reading order
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
PLAN_BLANK = "."  # an empty slot in a layout plan (a word the tokenizer has)
SIZE = 33  # the recipe's image size: a 3x3 grid of 11 px patches, one canvas slot per patch
POSITION_SHARE = 0.5  # of und_canvas: two digits in one row or column and questions about their relation
SAMPLES = {"und_single": 15000, "und_canvas": 50000, "und_multi": 5000, "gen_single": 15000, "gen_canvas": 40000}
SHARDS_PER_SOURCE = 4
SCHEMA = (
    "generalist-v6: 33 px, canvas lists, raw understanding images, half the canvases about positions; und_single, "
    "und_canvas, und_multi (conversation), gen_single, gen_canvas (generation, layout plans)"
)
SCHEMA_FILE = "SCHEMA"

Turn = tuple[str, str]  # (question, answer)


def for_generation(image: np.ndarray, size: int = SIZE) -> np.ndarray:
    """A generation target at ``size`` px: an 8x8 digit fills the frame (pixel repetition); a canvas is padded.

    Repetition maps target pixel i to digit pixel floor(i * 8 / size), so an area downscale to 8x8 (the
    ``digits_t2i`` judge's) gives the digit back; a canvas keeps its slots where GenEval's judge reads them.
    """
    h = image.shape[0]
    if h == 8:
        idx = np.arange(size) * 8 // size
        return image[idx][:, idx]
    out = np.zeros((size, size), dtype=np.uint8)
    out[:h, :h] = image
    return out


def mcq(question: str, correct: str, pool: list[str], rng: np.random.Generator) -> Turn:
    """A lettered question in the benchmark's layout (4 options, one right) and its letter."""
    others = [o for o in pool if o != correct]
    opts = [correct] + [others[i] for i in rng.choice(len(others), size=3, replace=False)]
    opts = [opts[i] for i in rng.permutation(4)]
    text = question + "".join(f"\n{'ABCD'[i]}. {o}" for i, o in enumerate(opts)) + MCQ_POST
    return text, "ABCD"[opts.index(correct)]


def yes_no(rng: np.random.Generator, yes: str, no: str) -> Turn:
    """One yes/no question, yes or no with equal chance (answers independent across turns)."""
    return (yes, "yes") if rng.random() < 0.5 else (no, "no")


class Generator:
    """Seeded draws of every format from the training split, at the benchmark's sizes (8x8 digits, 32 px canvases)."""

    def __init__(self, seed: int = 0):
        self.s = Sampler("train", "generalist", seed)
        self.rng = self.s.rng
        self.similar = class_similarity_order()

    def absent_digit(self, present: list[int]) -> int:
        """An absent digit: at random, or (as POPE's adversarial split) one that looks like a present one."""
        absent = [d for d in range(10) if d not in present]
        if self.rng.random() < 0.5:
            return int(self.rng.choice(absent))
        p = present[int(self.rng.integers(len(present)))]
        return next(d for d in self.similar[p] if d in absent)

    # ---- understanding -----------------------------------------------------------
    def single(self) -> tuple[list[np.ndarray], list[Turn]]:
        d = int(self.rng.integers(10))
        other = int(self.rng.choice([k for k in range(10) if k != d]))
        turns = [
            (QUESTIONS[int(self.rng.integers(len(QUESTIONS)))], str(d)),
            mcq(MCQ_RECOGNITION, str(d), [str(k) for k in range(10)], self.rng),
            yes_no(self.rng, MME_QUESTIONS["recognition"].format(d=d) + SHORT_POST,
                   MME_QUESTIONS["recognition"].format(d=other) + SHORT_POST),
        ]  # fmt: skip
        return [self.s.digit(d)], self._some(turns)

    def canvas(self) -> tuple[list[np.ndarray], list[Turn]]:
        if self.rng.random() < POSITION_SHARE:
            return self._position_canvas()
        n = int(self.rng.integers(1, 5))
        distinct = self.rng.random() < 0.6
        draw = self.rng.choice(10, n, replace=False) if distinct else self.rng.integers(10, size=n)
        labels, slots = [int(x) for x in draw], self.s.slots(n)
        present = sorted(set(labels))
        d_yes, d_no = int(self.rng.choice(present)), self.absent_digit(present)
        wrong_n = int(self.rng.choice([k for k in range(1, 6) if k != n]))
        if self.rng.random() < 0.7:  # mostly off by one, as MME's count pairs are
            wrong_n = n + 1 if n == 1 or self.rng.random() < 0.5 else n - 1
        turns = [
            yes_no(self.rng, POPE_QUESTION.format(d=d_yes) + SHORT_POST, POPE_QUESTION.format(d=d_no) + SHORT_POST),
            yes_no(self.rng, MME_QUESTIONS["existence"].format(d=d_yes) + SHORT_POST,
                   MME_QUESTIONS["existence"].format(d=d_no) + SHORT_POST),
            yes_no(self.rng, MME_QUESTIONS["count"].format(n=n) + SHORT_POST,
                   MME_QUESTIONS["count"].format(n=wrong_n) + SHORT_POST),
            mcq(MCQ_COUNT, str(n), ["1", "2", "3", "4", "5"], self.rng),
        ]  # fmt: skip
        return [self.s.canvas(labels, slots)], self._with_list(self._some(turns), labels, slots)

    def _position_canvas(self) -> tuple[list[np.ndarray], list[Turn]]:
        a, b = [int(d) for d in self.rng.choice(10, size=2, replace=False)]
        rel = RELATIONS[int(self.rng.integers(4))]
        sa, sb = relation_slots(rel, self.rng)
        # Mostly the opposite relation as the "no" (MME's pairs); the rest ask across the axis
        wrong = OPPOSITE[rel] if self.rng.random() < 0.8 else str(self.rng.choice([r for r in RELATIONS if r != rel]))
        q = MME_QUESTIONS["position"]
        turns = [
            yes_no(self.rng, q.format(a=a, rel=rel, b=b) + SHORT_POST, q.format(a=a, rel=wrong, b=b) + SHORT_POST),
            yes_no(self.rng, q.format(a=b, rel=OPPOSITE[rel], b=a) + SHORT_POST,
                   q.format(a=b, rel=rel, b=a) + SHORT_POST),
        ]  # fmt: skip
        if self.rng.random() < 0.5:
            turns.append(yes_no(self.rng, POPE_QUESTION.format(d=a) + SHORT_POST,
                                POPE_QUESTION.format(d=self.absent_digit([a, b])) + SHORT_POST))  # fmt: skip
        # Both position questions every time: comparing two slots appears late (a step change after thousands of
        # steps) and is the last skill of the mix to appear; other turns of a canvas are learned early
        turns = [turns[i] for i in self.rng.permutation(len(turns))]
        return [self.s.canvas([a, b], [sa, sb])], self._with_list(turns, [a, b], [sa, sb])

    def multi(self) -> tuple[list[np.ndarray], list[Turn]]:
        k = int(self.rng.integers(2, 4))
        digits = [int(d) for d in self.rng.integers(10, size=k)]
        turns = [(MULTI_QUESTION.format(nth=ORDINALS[i]), str(d)) for i, d in enumerate(digits)]
        return [self.s.digit(d) for d in digits], self._some(turns)

    def _with_list(self, turns: list[Turn], labels: list[int], slots: list[tuple[int, int]]) -> list[Turn]:
        """Half the canvases also list their digits (dense supervision of what each slot holds), at a random turn."""
        if self.rng.random() < 0.5:
            listed = " ".join(str(d) for _, d in sorted(zip(slots, labels)))
            turns.insert(int(self.rng.integers(len(turns) + 1)), (LIST_QUESTION, listed))
        return turns

    def _some(self, turns: list[Turn]) -> list[Turn]:
        """1..all of ``turns`` in random order."""
        k = int(self.rng.integers(1, len(turns) + 1))
        return [turns[i] for i in self.rng.permutation(len(turns))[:k]]

    # ---- generation ----------------------------------------------------------------
    def gen_single(self) -> tuple[np.ndarray, str]:
        d = int(self.rng.integers(10))
        prompt = PROMPTS[int(self.rng.integers(len(PROMPTS)))].format(d=d, name=DIGIT_NAMES[d])
        return self.s.digit(d), prompt

    def gen_canvas(self) -> tuple[np.ndarray, str, str]:
        """A canvas, its prompt, and its layout plan (:func:`slot_plan`)."""
        tag = ("two_object", "counting", "position")[int(self.rng.integers(3))]
        a, b = [int(d) for d in self.rng.choice(10, size=2, replace=False)]
        if tag == "two_object":
            meta = {"tag": tag, "include": [{"class": str(a), "count": 1}, {"class": str(b), "count": 1}]}
            prompt = GENEVAL_PROMPTS[tag].format(a=a, b=b)
        elif tag == "counting":
            n = int(self.rng.integers(2, 5))
            meta = {"tag": tag, "include": [{"class": str(a), "count": n}]}
            prompt = GENEVAL_PROMPTS[tag].format(n=NUMBER_WORDS[n], a=a)
        else:
            rel = RELATIONS[int(self.rng.integers(4))]
            meta = {"tag": tag, "include": [{"class": str(b), "count": 1}, {"class": str(a), "count": 1,
                                                                          "position": [rel, 0]}]}  # fmt: skip
            prompt = GENEVAL_PROMPTS[tag].format(a=a, rel=rel, b=b)
        labels, slots = geneval_layout(meta, self.s)
        return self.s.canvas(labels, slots), prompt, slot_plan(labels, slots)


def slot_plan(labels: list[int], slots: list[tuple[int, int]]) -> str:
    """A canvas layout as the text the model writes before drawing it: the 3x3 slots in reading order, each its
    digit or :data:`PLAN_BLANK` (". 3 . . . . . 7 ." = a 3 top middle, a 7 bottom middle). One word per slot: the
    image token that draws slot k reads word k, always the same distance back."""
    words = [PLAN_BLANK] * 9
    for d, (r, c) in zip(labels, slots):
        words[3 * r + c] = str(d)
    return " ".join(words)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def conversation_record(images: list[np.ndarray], turns: list[Turn]) -> dict:
    """LLaVA turns; the images open the first question, one ``<image>`` line each."""
    convs = []
    for i, (q, a) in enumerate(turns):
        convs += [{"from": "human", "value": ("<image>\n" * len(images) if i == 0 else "") + q},
                  {"from": "gpt", "value": a}]  # fmt: skip
    return {"conversations": convs}


def _conversation_sample(key: str, images: list[np.ndarray], turns: list[Turn]) -> dict:
    sample = {"__key__": key, "json": json.dumps(conversation_record(images, turns))}
    if len(images) == 1:
        sample["png"] = _png(images[0])
    else:
        sample.update({f"{i}.png": _png(img) for i, img in enumerate(images)})
    return sample


def _generation_sample(key: str, image: np.ndarray, prompt: str, plan: str = "") -> dict:
    """A generation sample; ``plan`` (a canvas's layout) goes in ``plan.txt``, read by sources with options.plan."""
    sample = {"__key__": key, "png": _png(for_generation(image)), "txt": prompt}
    return sample | ({"plan.txt": plan} if plan else {})


def source_builders(gen: Generator) -> dict[str, Callable[[str], dict]]:
    """Source name -> (key -> one webdataset sample)."""
    return {
        "und_single": lambda key: _conversation_sample(key, *gen.single()),
        "und_canvas": lambda key: _conversation_sample(key, *gen.canvas()),
        "und_multi": lambda key: _conversation_sample(key, *gen.multi()),
        "gen_single": lambda key: _generation_sample(key, *gen.gen_single()),
        "gen_canvas": lambda key: _generation_sample(key, *gen.gen_canvas()),
    }


def build_generalist_shards(out_dir: str | Path, samples: dict[str, int] | None = None, seed: int = 0) -> list[Path]:
    """``<source>-00000{0..3}.tar`` per source (+ ``sizes.json``), from the training split only."""
    out_dir = Path(out_dir)
    samples = samples or SAMPLES
    paths = []
    for name, build in source_builders(Generator(seed)).items():
        n = samples.get(name, 0)
        if n <= 0:
            continue
        writer = ShardWriter(out_dir, name, max_count=-(-n // SHARDS_PER_SOURCE))
        for i in range(n):
            writer.write(build(f"{name}{i:06d}"))
        paths += writer.close()
    (out_dir / SCHEMA_FILE).write_text(SCHEMA + "\n")
    return paths


def ensure_generalist_shards(out_dir: str | Path = "data/shards/generalist", seed: int = 0) -> bool:
    """(Re)build the shards when missing or written by an older schema; True if built."""
    out_dir = resolve_path(str(out_dir))
    return rebuild_if_stale(
        out_dir, SCHEMA, "the generalist recipe's shards", lambda: build_generalist_shards(out_dir, seed=seed)
    )


def generalist_texts() -> list[str]:
    """Every text of the generalist's data, the bundled benchmark's prompts and the long-context albums.

    (The tokenizer's corpus: ``python scripts/build_tokenizer.py generalist``.)
    """
    texts = bench_texts() + all_texts() + [SHORT_POST, MCQ_POST, "yes", "no", "A", "B", "C", "D"]
    texts.append(album_prompt(2, 0).replace("<image>", ""))
    # LIST_QUESTION is made of known words
    texts += [MULTI_QUESTION.format(nth=n) for n in ORDINALS] + [str(n) for n in range(10)]
    for n in range(1, 6):
        texts.append(MME_QUESTIONS["count"].format(n=n))
    for w in NUMBER_WORDS:
        texts.append(GENEVAL_PROMPTS["counting"].format(n=w, a=0))
    return texts


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/shards/generalist")
    ap.add_argument("--texts", action="store_true", help="print the tokenizer corpus and exit")
    args = ap.parse_args()
    if args.texts:
        print("\n".join(generalist_texts()))
    else:
        for p in build_generalist_shards(resolve_path(args.out)):
            print(p)
