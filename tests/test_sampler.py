"""The KV-cached Euler/CFG sampler draws the same images as full recomputation."""

from dataclasses import replace

import pytest
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


def test_one_time_per_slot_with_equal_times_is_one_time_per_image(small_cfg, vocab):
    """Diffusion Forcing's per-slot times generalise the per-image time: equal slot times change nothing."""
    torch.manual_seed(0)
    head = _trained_looking(UnifiedModel(small_cfg.model, vocab)).heads["flow"]
    for block in [*head.gen_encoder.blocks, *head.gen_decoder.blocks]:
        torch.nn.init.normal_(block.film.weight, std=0.05)  # zero-initialised FiLM would hide the time
    m = head.grid**2
    z, t = torch.randn(3, *head.latent_shape), torch.tensor([0.1, 0.5, 0.9])
    tokens, temb, skip = head.codec.embed(z, t)
    tokens_s, temb_s, skip_s = head.codec.embed(z, t[:, None].expand(3, m))
    torch.testing.assert_close(tokens_s, tokens)
    torch.testing.assert_close(skip_s, skip)
    hidden = torch.randn(3, m, tokens.shape[-1])
    torch.testing.assert_close(head.codec.velocity(hidden, skip_s, temb_s), head.codec.velocity(hidden, skip, temb))
    t_mixed = t[:, None].expand(3, m).clone()
    t_mixed[:, -1] = 0.0  # the last slot still noise: the other slots' tokens move through the codec's convs only
    assert (head.codec.embed(z, t_mixed)[0] - tokens).abs().max() > 1e-4


def test_slot_times_draws_one_time_per_slot_and_keeps_the_plain_stream(small_cfg, vocab):
    from mm.batch import ImageInputs

    inputs = ImageInputs(torch.rand(5, 1, 8, 8), torch.zeros(5, dtype=torch.long))
    plain = UnifiedModel(small_cfg.model, vocab).heads["flow"].draw(inputs, torch.Generator().manual_seed(0))
    small_cfg.model.heads["flow"].slot_times = 1.0
    head = UnifiedModel(small_cfg.model, vocab).heads["flow"]
    own = head.draw(inputs, torch.Generator().manual_seed(0))
    assert plain["t"].shape == (5,) and own["t"].shape == (5, head.grid**2)
    assert torch.equal(own["noise"], plain["noise"])  # the per-slot times are drawn after the noise
    assert own["t"].std(dim=1).min() > 0  # every image's slots have different times


def test_staggered_sampler_cached_equals_uncached(small_cfg, vocab):
    """Slot by slot (stagger 1) and overlapping (0.5): the KV-cached sampler draws what recomputation draws,
    in the schedule's number of passes, and differently from all slots together."""
    small_cfg.model.heads["flow"].slot_times = 0.5
    torch.manual_seed(0)
    model = _trained_looking(UnifiedModel(small_cfg.model, vocab))
    head = model.heads["flow"]
    prompts = ["draw the digit 3", "an image of the number seven"]
    noise = torch.randn(len(prompts), *head.latent_shape, generator=torch.Generator().manual_seed(1))
    together = model.generate(prompts, noise=noise, steps=2, cfg_scale=2.0)
    for stagger, passes in ((1.0, 2 * 16), (0.5, 17)):
        head.cfg.stagger = stagger
        a = model.generate(prompts, noise=noise, steps=2, cfg_scale=2.0, use_cache=True)
        b = model.generate(prompts, noise=noise, steps=2, cfg_scale=2.0, use_cache=False)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert (a - together).abs().max() > 1e-3
        assert head.euler_steps(2) == passes


def test_slot_times_train_and_equal_slot_times_give_the_per_image_loss(small_cfg, vocab):
    from mm.batch import collate

    small_cfg.model.heads["flow"].slot_times = 1.0
    torch.manual_seed(0)
    model = _trained_looking(UnifiedModel(small_cfg.model, vocab)).train()
    head = model.heads["flow"]
    prompts = ["draw the digit 3", "an image of the number seven", "a handwritten 1"]
    samples = [image_generation_sample(vocab, head.template, torch.rand(1, 8, 8), p) for p in prompts]
    batch = model.add_draws(collate([[s] for s in samples], 40, vocab.pad), torch.Generator().manual_seed(0))
    t = batch.draws["flow"]["t"]
    assert t.shape == (3, head.grid**2)
    out = model(batch)
    out["loss"].backward()
    assert torch.isfinite(out["flow"]) and head.time_embed.mlp[0].weight.grad.abs().sum() > 0
    per_image = dict(batch.draws["flow"], t=t[:, 0])  # one time per image vs that time in every slot
    equal = dict(batch.draws["flow"], t=t[:, :1].expand_as(t))
    with torch.no_grad():
        a = model(replace(batch, draws={"flow": per_image}))["flow_per_image"]
        b = model(replace(batch, draws={"flow": equal}))["flow_per_image"]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_slot_times_need_a_codec_with_one_time_per_slot(small_cfg):
    from mm.model.heads.flow import FlowHeadConfig
    from mm.schema import ConfigError

    cfg = small_cfg.model.heads["flow"]
    with pytest.raises(ConfigError, match=r"codec.kind='uvit'.*convnext"):
        FlowHeadConfig(autoencoder=cfg.autoencoder, codec=replace(cfg.codec, kind="uvit", channels=64,
                       time_freq_dim=64), slot_times=0.5)  # fmt: skip
    with pytest.raises(ConfigError, match=r"stagger=1.5 must be in \[0, 1\]"):
        replace(cfg, stagger=1.5)
