import pytest
import torch

from mm.sequence import IGNORE, ImageTemplate, image_generation_sample, scatter_placeholders, understanding_sample


def test_understanding_targets_only_on_answer(vocab):
    s = understanding_sample(vocab, torch.zeros(3, 8, 8), 16, "what digit is this ?", "7")
    assert s.input_ids.count(vocab.image) == 16
    supervised = [t for t in s.targets if t != IGNORE]
    assert supervised == vocab.encode("7") + [vocab.eos]
    # the position predicting the answer is the <|assistant|> token
    assert s.input_ids[s.targets.index(supervised[0])] == vocab.assistant


def test_generation_template(vocab):
    template = ImageTemplate("flow", 8, 1, (16,), begin="bog")
    s = image_generation_sample(vocab, template, torch.zeros(1, 8, 8), "draw the digit 3")
    assert s.input_ids.count(vocab.gen) == 16 and s.input_ids.count(vocab.bog) == 1
    assert all(t == IGNORE for t in s.targets)
    prompt = [t for t, m in zip(s.input_ids, s.prompt_mask) if m]
    assert prompt == vocab.encode("draw the digit 3")


def test_tokenizer_round_trip_and_no_unknowns(vocab):
    from data.bundled.digits import all_texts

    for text in all_texts():
        ids = vocab.encode(text)
        assert 1 not in ids  # <|unk|>
        assert vocab.decode(ids) == text.lower()


def test_scatter_count_mismatch_raises():
    embeds = torch.zeros(1, 5, 4)
    mask = torch.tensor([[False, True, True, False, False]])
    out = scatter_placeholders(embeds, mask, torch.ones(2, 4), "x")
    assert out[0, 1:3].eq(1).all() and out[0, 0].eq(0).all()
    with pytest.raises(ValueError, match="2 placeholder tokens but 3 feature vectors"):
        scatter_placeholders(embeds, mask, torch.ones(3, 4), "x")
