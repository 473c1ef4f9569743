"""Source kinds and their templates: label masks, the digits as instances, a new kind in one place."""

import json
import random

import pytest
import torch

from data.config import DataConfig
from data.loader import TrainLoader
from data.sources import SOURCE_KINDS, BuildContext, NoOptions, SourceConfig, SourceKind, build_samples
from data.stream import BadSample, read_samples
from mm.batch import SampleShapes
from mm.images import ImagePreprocess
from mm.sequence import (
    IGNORE,
    TASK_TEXT,
    TOKEN_UND_IMAGE,
    ImageTemplate,
    Sample,
    conversation_sample,
    text_document_samples,
    understanding_sample,
)

SHAPES = SampleShapes(
    und_preprocess=ImagePreprocess("pad", 8, 3), und_tokens=4,
    gen_templates={"flow": ImageTemplate("flow", 8, 1, (4,), begin="bog")},
)  # fmt: skip


def _ctx(vocab, max_tokens=256):
    return BuildContext(vocab, SHAPES, max_tokens, 10**6, random.Random(0))


def _build(kind, raw, ctx):
    return build_samples(SourceConfig(name=kind, kind=kind), raw, ctx)


def test_two_images_two_assistant_turns_get_exactly_the_right_label_mask(vocab):
    img = torch.zeros(3, 8, 8, dtype=torch.uint8)
    turns = [("user", "<image> what digit is this ? <image>"), ("assistant", "7"),
             ("user", "which number is shown in the image ?"), ("assistant", "the digit seven")]  # fmt: skip
    s = conversation_sample(vocab, turns, [img, img], 4, key="k")
    v = vocab
    expected = (
        [v.bos, v.user, v.boi, *[v.image] * 4, v.eoi, *v.encode("what digit is this ?"), v.boi, *[v.image] * 4, v.eoi,
         v.assistant, *v.encode("7"), v.eos, v.user, *v.encode("which number is shown in the image ?"), v.assistant,
         *v.encode("the digit seven"), v.eos]
    )  # fmt: skip
    assert s.input_ids == expected
    a1, a2 = expected.index(v.assistant), len(expected) - 1 - expected[::-1].index(v.assistant)
    want = [IGNORE] * len(expected)
    for i in range(a1, a1 + 2):  # "7" <eos>, predicted from <assistant> and from "7"
        want[i] = expected[i + 1]
    for i in range(a2, len(expected) - 1):  # "the digit seven" <eos>
        want[i] = expected[i + 1]
    assert s.targets == want
    assert [t for t in s.targets if t != IGNORE] == v.encode("7") + [v.eos] + v.encode("the digit seven") + [v.eos]
    assert s.kinds().count(TOKEN_UND_IMAGE) == 8 and len(s.und_images) == 2


def test_digit_conversations_build_exactly_the_understanding_template(vocab, shard_dir):
    raw = next(iter(read_samples(f"{shard_dir}/digits/heldout-000000.tar")))
    (s,) = _build("conversation", raw, _ctx(vocab))
    meta = json.loads(raw["json"])
    question = meta["conversations"][0]["value"].replace("<image>\n", "")
    ref = understanding_sample(vocab, s.und_images[0], 4, question, str(meta["label"]))
    assert (s.input_ids, s.targets, s.token_kinds) == (ref.input_ids, ref.targets, ref.token_kinds)
    assert s.und_images[0].dtype == torch.uint8 and s.und_images[0].shape == (3, 8, 8)
    (g,) = _build("generation", raw, _ctx(vocab))
    assert g.gen_images[0].shape == (1, 8, 8) and [t for t, m in zip(g.input_ids, g.prompt_mask) if m] == vocab.encode(
        raw["txt"].decode()
    )


def test_text_documents_are_cut_to_the_budget_with_next_token_targets(vocab):
    text = " ".join(["the digit 7 is seven"] * 30)  # 150 words
    chunks = text_document_samples(vocab, text, 64, key="doc")
    ids = [vocab.bos] + vocab.encode(text) + [vocab.eos]
    assert [len(c) for c in chunks] == [64, 64, 24] and all(c.task == TASK_TEXT for c in chunks)
    flat_ids = [t for c in chunks for t in c.input_ids]
    flat_targets = [t for c in chunks for t in c.targets]
    assert flat_ids == ids and flat_targets == ids[1:] + [IGNORE]  # a chunk's last token predicts the next chunk's
    assert chunks[1].key == "doc#64"


@pytest.mark.parametrize(
    "raw, kind, reason",
    [
        ({"__key__": "a", "json": b'{"conversations": []}', "png": b"x"}, "conversation", "bad_conversation"),
        ({"__key__": "b", "json": b"{not json", "png": b"x"}, "conversation", "bad_json"),
        ({"__key__": "c", "png": b"x"}, "conversation", "missing_json"),
        (
            {
                "__key__": "d",
                "json": json.dumps(
                    {"conversations": [{"from": "human", "value": "<image> <image> ?"}, {"from": "gpt", "value": "7"}]}
                ).encode(),
                "png": b"x",
            },
            "conversation",
            "not_an_image",
        ),  # fmt: skip
        (
            {"__key__": "e", "json": json.dumps({"conversations": [{"from": "gpt", "value": "7"}]}).encode()},
            "conversation",
            "bad_conversation",
        ),  # fmt: skip
        ({"__key__": "f", "txt": b"a cat"}, "generation", "missing_image"),
        ({"__key__": "g", "txt": b"   "}, "text", "empty_text"),
        ({"__key__": "h", "txt": b"\xff\xfe"}, "text", "bad_text"),
    ],
)
def test_bad_records_raise_their_reason(vocab, raw, kind, reason):
    with pytest.raises(BadSample) as e:
        _build(kind, raw, _ctx(vocab))
    assert e.value.reason == reason


def test_a_new_kind_is_one_registry_entry(vocab, shard_dir, monkeypatch):
    """A kind added in one place trains through config validation, the loader and the packer."""

    def label_only(raw: dict, ctx: BuildContext, options: NoOptions) -> list[Sample]:
        label = str(json.loads(raw["json"])["label"])
        return text_document_samples(ctx.vocab, f"the digit {label}", ctx.max_tokens, key=raw["__key__"])

    monkeypatch.setitem(SOURCE_KINDS, "digit_label", SourceKind(label_only, splittable=True))
    from mm.config import load_config

    cfg = load_config(None, ["data.sources=[{name: labels, kind: digit_label}]",
                             f"data.train_shards={shard_dir}/digits/train-000000.tar"])  # fmt: skip
    data = DataConfig(**{**cfg.data.__dict__, "num_workers": 0, "seq_len": 64, "rows_per_batch": 2})
    batch = next(iter(TrainLoader(data, vocab, SHAPES, 0, 1)))
    assert (batch.sample_ids >= 0).float().mean() > 0.9 and batch.und_images is None
    assert isinstance(cfg.data.sources[0], SourceConfig)
