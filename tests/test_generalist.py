"""The generalist recipe's data (data/bundled/generalist.py) and tokenizer (configs/tokenizers/generalist).

Training prompts are the benchmark's prompts exactly (the task files' doc_to_text), every word is known
to the tokenizer, images come from the digits' training split only, answers are balanced, and the
shards read through the conversation and generation source kinds into rows of the recipe.
"""

from __future__ import annotations

import io
import json
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.bundled.benchmark import BENCH_DATASETS, SLOTS, digit_pool, render_canvas, slot_relation
from data.bundled.digits import QUESTIONS
from data.bundled.generalist import (
    LIST_QUESTION,
    MULTI_QUESTION,
    ORDINALS,
    PLAN_BLANK,
    POSITION_SHARE,
    SAMPLES,
    Generator,
    build_generalist_shards,
    for_generation,
    generalist_texts,
)
from mm.config import load_config
from mm.eval.taskfile import call_doc_fn, load_tasks
from mm.sequence import load_vocab

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "tiny_generalist.yaml"
UNDERSTANDING_TASKS = ["digits_vqa", "digits_mcq", "digits_pope", "digits_mme"]


@pytest.fixture(scope="module")
def gvocab():
    return load_vocab(ROOT / "configs" / "tokenizers" / "generalist")


@pytest.fixture(scope="module")
def eval_prompts() -> list[str]:
    """Every understanding prompt of the bundled benchmark, as the task files render it (a sample per split)."""
    out = []
    for task in load_tasks(UNDERSTANDING_TASKS):
        name = task.dataset_path.rsplit("/", 1)[-1]
        rows = BENCH_DATASETS[name]()[task.test_split]
        kw = task.prompt_kwargs()
        out += [call_doc_fn(task.doc_to_text, {k: v for k, v in r.items() if k != "image"}, kw) for r in rows]
    return out


def _shape(text: str) -> str:
    """A prompt with its digits and option lines abstracted: what a template is."""
    return re.sub(r"\d", "#", text)


def _records(n: int = 300):
    gen = Generator(seed=5)
    return [f() for f in (gen.single, gen.canvas, gen.multi) for _ in range(n)]


def test_training_prompts_are_the_benchmarks_prompts(eval_prompts):
    eval_shapes = {_shape(p) for p in eval_prompts}
    own = {_shape(q) for q in QUESTIONS} | {MULTI_QUESTION.format(nth=n) for n in ORDINALS} | {LIST_QUESTION}
    seen = set()
    for _, turns in _records():
        for q, _ in turns:
            assert _shape(q) in eval_shapes | own, q
            seen.add(_shape(q))
    assert eval_shapes <= seen  # every benchmark form is trained (MME's "Please answer yes or no." is replaced)


def test_tokenizer_knows_every_word_and_keeps_letters(gvocab, eval_prompts):
    unk = gvocab.tokenizer.unk_token_id
    texts = eval_prompts + generalist_texts() + [q + " " + a for _, turns in _records(50) for q, a in turns]
    gen = Generator(seed=1)
    texts += [t for _ in range(200) for t in gen.gen_canvas()[1:]]  # prompts and layout plans
    assert not [t for t in texts if unk in gvocab.encode(t)]
    assert [gvocab.decode(gvocab.encode(x)) for x in ("A", "B", "C", "D", "yes", "no")] == ["A", "B", "C", "D", "yes",
                                                                                             "no"]  # fmt: skip
    assert gvocab.encode("A") != gvocab.encode("a")  # the option letter is not the article


def test_images_come_from_the_training_split_only():
    train = {img.tobytes() for imgs in digit_pool("train").values() for img in imgs}
    held = {img.tobytes() for imgs in digit_pool("heldout").values() for img in imgs}

    def slots(canvas):
        return [s.tobytes() for y in SLOTS for x in SLOTS if (s := canvas[y : y + 8, x : x + 8]).any()]

    gen = Generator(seed=2)
    for _ in range(100):
        (digit,), _ = gen.single()
        assert digit.shape == (8, 8) and digit.tobytes() in train
        (canvas,), _ = gen.canvas()
        assert canvas.shape == (32, 32) and slots(canvas) and all(s in train and s not in held for s in slots(canvas))
        digit, _ = gen.gen_single()
        assert digit.tobytes() in train
        canvas, _, plan = gen.gen_canvas()
        assert len(slots(canvas)) >= 2 and all(s in train for s in slots(canvas))
        # the plan names each slot's digit, in reading order, and nothing where the slot is empty
        pool = digit_pool("train")
        for word, (y, x) in zip(plan.split(" "), [(y, x) for y in SLOTS for x in SLOTS], strict=True):
            patch = canvas[y : y + 8, x : x + 8]
            assert (word == PLAN_BLANK) == (not patch.any())
            assert word == PLAN_BLANK or any(np.array_equal(patch, d) for d in pool[int(word)])


def test_position_answers_match_the_canvas():
    """Every position question's answer is what the canvas shows: each digit's slot found by its pixels (the
    training image in it), the relation read off the slots; and position questions make up the share they should."""
    pool = digit_pool("train")
    question = re.compile(r"^Is the (\d) (left of|right of|above|below) the (\d)\?")
    gen, asked, canvases = Generator(seed=3), 0, 400
    for _ in range(canvases):
        (canvas,), turns = gen.canvas()
        where = {}
        for r, y in enumerate(SLOTS):
            for c, x in enumerate(SLOTS):
                patch = canvas[y : y + 8, x : x + 8]
                for d in range(10) if patch.any() else ():
                    if any(np.array_equal(patch, img) for img in pool[d]):
                        where.setdefault(d, []).append((r, c))
        for q, answer in turns:
            if m := question.match(q):
                (sa,), (sb,) = where[int(m[1])], where[int(m[3])]
                assert answer == ("yes" if slot_relation(sa, sb) == m[2] else "no"), (q, sa, sb)
                asked += 1
    assert 0.8 * POSITION_SHARE * 2 * canvases < asked < 1.2 * POSITION_SHARE * 2 * canvases  # both questions each


def test_generation_targets_keep_digits_and_slots():
    digit = digit_pool("train")[3][0]
    canvas = render_canvas([(digit, 0, 0), (digit, 2, 1)])
    big = for_generation(digit)
    first = np.ceil(np.arange(8) * 33 / 8).astype(int)  # the first target pixel of each digit pixel
    assert big.shape == (33, 33) and np.array_equal(big[first][:, first], digit)
    assert np.array_equal(for_generation(canvas)[:32, :32], canvas) and not for_generation(canvas)[32:].any()


def test_answers_are_balanced():
    answers = Counter(a for _, turns in _records(400) for _, a in turns)
    yes, no = answers["yes"], answers["no"]
    assert 0.45 < yes / (yes + no) < 0.55
    letters = [answers[c] for c in "ABCD"]
    assert min(letters) > 0.7 * max(letters)
    assert all(answers[str(d)] > 0 for d in range(10))


def test_shards_read_into_rows_of_the_recipe(tmp_path, gvocab):
    import torch

    from data.sources import BuildContext, build_samples
    from mm.hf import UnifiedMMProcessor
    from mm.model.unified import UnifiedModel

    cfg = load_config(CONFIG)
    tower, flow = cfg.model.und.tower, cfg.model.heads["flow"]
    assert tower.image_size == flow.autoencoder.image_size == 33  # a 32 px canvas fits
    assert 33 // tower.patch_size == 33 // flow.codec.patch_size == 3  # one patch per slot, for both
    build_generalist_shards(tmp_path, {k: 8 for k in SAMPLES})
    model = UnifiedModel(cfg.model, gvocab)
    processor = UnifiedMMProcessor.from_model(model)
    ctx = BuildContext(gvocab, model.sample_shapes(), cfg.data.seq_len, 1 << 20, random.Random(0))
    import webdataset as wds

    for source in cfg.data.sources:
        path = source.shards.replace("data/shards/generalist", str(tmp_path))
        for raw in wds.WebDataset(path, shardshuffle=False):
            (s,) = build_samples(source, raw, ctx)
            assert len(s) <= cfg.data.seq_len and gvocab.tokenizer.unk_token_id not in s.input_ids
            if source.kind == "conversation":
                meta = json.loads(raw["json"])
                assert len(s.und_images) == meta["conversations"][0]["value"].count("<image>") >= 1
                stored = [Image.open(io.BytesIO(v)) for k, v in sorted(raw.items()) if k.endswith("png")]
                assert all(im.size in ((8, 8), (32, 32)) for im in stored)  # the benchmark's images, as they are
                seen = processor.und_images([np.asarray(im) for im in stored])  # what eval feeds the tower
                assert torch.equal(torch.stack(list(s.und_images)), seen) and seen.shape[-2:] == (33, 33)
            else:
                assert tuple(s.gen_images[0].shape) == (1, 33, 33)
                assert Image.open(io.BytesIO(raw["png"])).size == (33, 33)
