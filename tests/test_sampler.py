"""The KV-cached Euler/CFG sampler draws the same images as full recomputation."""

import torch

from mm.model.unified import UnifiedModel
from mm.sequence import TOKEN_GEN_IMAGE, image_generation_sample


def _trained_looking(model):
    # zero-initialised output convs make v=0; perturb so the test compares real velocities
    torch.manual_seed(3)
    for p in model.heads["flow"].gen_decoder.out.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def test_cached_sampler_equals_uncached(small_cfg, vocab):
    torch.manual_seed(0)
    model = _trained_looking(UnifiedModel(small_cfg.model, vocab))
    prompts = ["draw the digit 3", "an image of the number seven", "a handwritten 1"]  # different lengths
    noise = torch.randn(len(prompts), *model.heads["flow"].latent_shape, generator=torch.Generator().manual_seed(1))
    a = model.generate(prompts, noise=noise, steps=6, cfg_scale=2.0, use_cache=True)
    b = model.generate(prompts, noise=noise, steps=6, cfg_scale=2.0, use_cache=False)
    assert a.shape == (3, 1, 8, 8)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (a[0] - a[1]).abs().max() > 1e-3  # prompts change the image


def test_left_padding_does_not_change_a_prompts_image(small_cfg, vocab):
    torch.manual_seed(0)
    model = _trained_looking(UnifiedModel(small_cfg.model, vocab))
    noise = torch.randn(2, *model.heads["flow"].latent_shape, generator=torch.Generator().manual_seed(2))
    alone = model.generate(["draw the digit 3"], noise=noise[:1], steps=4)
    batched = model.generate(["draw the digit 3", "an image of the number seven"], noise=noise, steps=4)
    torch.testing.assert_close(alone[0], batched[0], rtol=1e-4, atol=1e-5)


def test_answer_is_batch_invariant(small_cfg, vocab):
    torch.manual_seed(0)
    model = UnifiedModel(small_cfg.model, vocab).eval()
    images = torch.rand(3, 3, 8, 8)
    questions = ["what digit is this ?", "which number is shown in the image ?", "what digit is this ?"]
    together = model.answer(images, questions)
    alone = [model.answer(images[i : i + 1], questions[i : i + 1])[0] for i in range(3)]
    assert together == alone


def test_full_image_attention_cached_equals_uncached(small_cfg, vocab):
    """With ``full_attention`` an image's slots see each other in training and in both sampling paths."""
    torch.manual_seed(0)
    causal = _trained_looking(UnifiedModel(small_cfg.model, vocab))
    small_cfg.model.heads["flow"].full_attention = True
    full = _trained_looking(UnifiedModel(small_cfg.model, vocab))
    full.load_state_dict(causal.state_dict())  # same weights: only the attention pattern differs
    prompts = ["draw the digit 3", "an image of the number seven"]
    noise = torch.randn(len(prompts), *full.heads["flow"].latent_shape, generator=torch.Generator().manual_seed(1))
    a = full.generate(prompts, noise=noise, steps=4, cfg_scale=2.0, use_cache=True)
    b = full.generate(prompts, noise=noise, steps=4, cfg_scale=2.0, use_cache=False)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    c = causal.generate(prompts, noise=noise, steps=4, cfg_scale=2.0)
    assert (a - c).abs().max() > 1e-3  # earlier slots now read later ones
    s = image_generation_sample(vocab, full.heads["flow"].template, torch.rand(1, 8, 8), "draw the digit 3")
    slots = [k == TOKEN_GEN_IMAGE for k in s.token_kinds]
    assert {b for b, is_slot in zip(s.block_ids, slots) if is_slot} == {0}  # one full block: the image
    assert all(b == -1 for b, is_slot in zip(s.block_ids, slots) if not is_slot)


def test_unguided_sampling_skips_the_unconditional_rows_and_draws_the_same(small_cfg, vocab):
    """At w = 1 guidance is the conditional velocity: running the unconditional rows changes nothing."""
    torch.manual_seed(0)
    model = _trained_looking(UnifiedModel(small_cfg.model, vocab))
    prompts = ["draw the digit 3", "an image of the number seven"]
    noise = torch.randn(len(prompts), *model.heads["flow"].latent_shape, generator=torch.Generator().manual_seed(1))
    skipped = model.generate(prompts, noise=noise, steps=4, cfg_scale=1.0)
    run = model.generate(prompts, noise=noise, steps=4, cfg_scale=1.0 + 1e-9)  # guided path, same weights
    torch.testing.assert_close(skipped, run, rtol=1e-5, atol=1e-5)
    assert (skipped - model.generate(prompts, noise=noise, steps=4, cfg_scale=2.0)).abs().max() > 1e-3
