"""The unified model's training-time behaviour: prompt dropout, REPA, local LLM weights."""

from dataclasses import replace

import pytest
import torch

from mm.batch import collate
from mm.model.unified import UnifiedModel
from mm.sequence import image_generation_sample, understanding_sample


def _flow(cfg, **changes):
    """The model config with the flow head's config changed."""
    return replace(cfg, heads={"flow": replace(cfg.heads["flow"], **changes)})


def _batch(model, vocab, n_gen=40, n_und=2):
    t = model.heads["flow"].template
    gen = [image_generation_sample(vocab, t, torch.rand(1, 8, 8), "draw the digit 3") for _ in range(n_gen)]
    und = [understanding_sample(vocab, torch.rand(3, 8, 8), model.und.tokens_per_image, "what digit is this ?", "3")
           for _ in range(n_und)]  # fmt: skip
    return collate([[s] for s in gen + und], 40, vocab.pad)


def test_prompt_dropout_masks_only_prompts_of_about_ten_percent(small_cfg, vocab):
    model = UnifiedModel(small_cfg.model, vocab)
    batch = _batch(model, vocab, n_gen=400, n_und=0)
    out = model.add_draws(batch, torch.Generator().manual_seed(0))
    changed = out.input_ids != batch.input_ids
    assert (out.input_ids[changed] == vocab.pad).all()
    assert not (changed & ~batch.prompt_mask).any()  # only prompt tokens
    dropped_rows = changed.any(1).float().mean().item()
    assert 0.06 < dropped_rows < 0.14  # prompt_dropout = 0.1
    assert out.draws["flow"]["t"].shape == (400,) and out.draws["flow"]["noise"].shape == (400, 1, 8, 8)


def test_repa_pulls_gradient_into_early_llm_layers_but_not_the_encoder(small_cfg, vocab):
    torch.manual_seed(0)
    cfg = replace(_flow(small_cfg.model, loss_weight=0.0), text_loss_weight=0.0)
    model = UnifiedModel(cfg, vocab)
    batch = model.add_draws(_batch(model, vocab, n_gen=3, n_und=0), torch.Generator().manual_seed(0))
    out = model(batch)
    assert -1 <= out["repa"].item() <= 1
    out["loss"].backward()
    layers = model.llm.get_decoder().layers
    assert layers[0].mlp.up_proj.weight.grad.abs().sum() > 0  # before the REPA layer (1)
    g = layers[1].mlp.up_proj.weight.grad
    assert g is None or g.abs().sum() == 0  # after it: REPA does not reach it
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.und.tower.parameters())  # stop-grad


def test_repa_weight_zero_skips_it(small_cfg, vocab):
    model = UnifiedModel(_flow(small_cfg.model, repa_weight=0.0), vocab)
    batch = model.add_draws(_batch(model, vocab, n_gen=2), torch.Generator().manual_seed(0))
    out = model(batch)
    assert out["repa"].item() == 0.0 and out["flow"].item() > 0 and out["text"].item() > 0


def test_gen_placeholders_without_images_raise(small_cfg, vocab):
    model = UnifiedModel(small_cfg.model, vocab)
    batch = replace(_batch(model, vocab, n_gen=1, n_und=0), images={})
    with pytest.raises(ValueError, match="generation placeholders but its images fill 0"):
        model(batch)


def test_understanding_placeholders_without_images_raise(small_cfg, vocab):
    model = UnifiedModel(small_cfg.model, vocab)
    batch = replace(_batch(model, vocab, n_gen=0, n_und=1), und_images=None)
    with pytest.raises(ValueError, match="understanding placeholders for 0 image"):
        model(batch)


def test_llm_and_tokenizer_load_from_local_directories(small_cfg, vocab, tmp_path):
    torch.manual_seed(0)
    a = UnifiedModel(small_cfg.model, vocab)
    a.llm.save_pretrained(tmp_path / "llm")
    vocab.tokenizer.save_pretrained(tmp_path / "llm")
    llm_cfg = replace(small_cfg.model.llm, pretrained=str(tmp_path / "llm"), tokenizer=str(tmp_path / "llm"))
    from mm.sequence import load_vocab

    b = UnifiedModel(replace(small_cfg.model, llm=llm_cfg), load_vocab(tmp_path / "llm"))
    for (ka, va), (kb, vb) in zip(a.llm.state_dict().items(), b.llm.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert b.vocab.tokenizer.get_vocab() == vocab.tokenizer.get_vocab()


def test_missing_local_llm_is_named(small_cfg, vocab, tmp_path):
    llm_cfg = replace(small_cfg.model.llm, pretrained=str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match="model.llm.pretrained"):
        UnifiedModel(replace(small_cfg.model, llm=llm_cfg), vocab)
