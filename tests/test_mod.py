"""p-MoD and V2PE inside the model: dense equivalence, routing per sample, KV caches, cached == uncached."""

import pytest
import torch

from mm.batch import collate
from mm.config import with_overrides
from mm.kernels.attention import AttentionSpec
from mm.model.decoder import KVCache
from mm.model.unified import UnifiedModel
from mm.sequence import image_generation_sample, understanding_sample

MOD_V2PE = ["model.mod.enabled=true", "model.mod.ratio=0.5", "model.v2pe.enabled=true", "model.v2pe.infer_delta=0.25"]


def _cfg(small_cfg, overrides):
    return with_overrides(small_cfg, overrides)


def _embed(model, batch):
    """The forward pass's input embeddings of an understanding batch (tokens, then the images at their slots)."""
    return model._embed_und(model.embed_tokens(batch.input_ids), batch)


def _model(small_cfg, vocab, overrides, seed=0, router_std=0.5):
    torch.manual_seed(seed)
    model = UnifiedModel(_cfg(small_cfg, overrides).model, vocab).eval()
    if model.mod_routers is not None and router_std:  # trained-looking routers: distinct scores
        for p in model.mod_routers.parameters():
            torch.nn.init.normal_(p, std=router_std)
    return model


def _und_batch(model, vocab, n=3):
    g = torch.Generator().manual_seed(1)
    n_img = model.und.tokens_per_image
    samples = [
        understanding_sample(vocab, torch.rand(3, 8, 8, generator=g), n_img, "what digit is this ?", "3")
        for _ in range(n)
    ]
    return collate([samples], sum(len(s) for s in samples) + 4, vocab.pad)


def test_ratio_one_everywhere_is_the_dense_model_exactly(small_cfg, vocab):
    dense = _model(small_cfg, vocab, [])
    routed = _model(small_cfg, vocab, ["model.mod.enabled=true", "model.mod.ratio=0.5"], router_std=0)
    routed.load_state_dict(dense.state_dict(), strict=False)  # same weights; routers stay zero-initialised
    routed.mod_routers.ratios = [1.0] * len(routed.mod_routers.ratios)  # routed layers that keep every token
    batch = _und_batch(dense, vocab)
    a, b = dense(batch), routed(batch)
    assert torch.equal(a["text_per_token"], b["text_per_token"])


def test_routed_layers_keep_floor_ratio_per_sample_and_the_router_learns_from_kept_and_skipped(small_cfg, vocab):
    model = _model(small_cfg, vocab, ["model.mod.enabled=true", "model.mod.ratio=0.5"]).train()
    batch = _und_batch(model, vocab)
    embeds = _embed(model, batch)
    out = model.decode(embeds, batch.position_ids, batch.attention(), batch.token_kinds, spans=batch.spans)
    n_img = model.und.tokens_per_image
    for keep in out.kept:
        assert keep is not None
        for s in range(3):
            in_sample = batch.sample_ids[0] == s
            image = in_sample & (batch.token_kinds[0] == 1)
            assert int(keep[0][image].sum()) == n_img // 2  # floor(16 * 0.5) of each sample's image tokens
            assert bool(keep[0][in_sample & ~image].all())  # text always goes through
    out.last_hidden_state.pow(2).mean().backward()
    for router in model.mod_routers.routers.values():
        assert router.proj.weight.grad is not None and router.proj.weight.grad.abs().sum() > 0


def test_skipped_tokens_write_no_kv_in_routed_layers(small_cfg, vocab):
    model = _model(small_cfg, vocab, MOD_V2PE)
    batch = _und_batch(model, vocab, n=1)
    cache = KVCache()
    with torch.no_grad():
        embeds = _embed(model, batch)
        model.decode(embeds, batch.position_ids, AttentionSpec.packed(batch.sample_ids), batch.token_kinds, cache)
    L, n_img = batch.input_ids.shape[1], model.und.tokens_per_image
    assert cache.lengths() == [L - n_img + n_img // 2] * len(cache.lengths())
    # the KV accounting of scripts/flops.py counts exactly what the cache holds
    from mm.train.flops import LLMShape, kv_cache_bytes, layer_counts

    counts = layer_counts([L], [n_img], model.mod_routers.ratios)  # the row's padding is cached too
    assert cache.nbytes() == kv_cache_bytes(LLMShape.from_llm(model.llm), counts, dtype_bytes=4)


def _lm_head_logits(model, images, questions, use_cache):
    seen = []
    hook = model.llm.get_output_embeddings().register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    try:
        answers = model.answer(images, questions, max_new_tokens=4, use_cache=use_cache)
    finally:
        hook.remove()
    return answers, seen


@pytest.mark.parametrize("overrides", [[], MOD_V2PE], ids=["dense", "mod+v2pe"])
def test_cached_answers_equal_uncached(small_cfg, vocab, overrides):
    model = _model(small_cfg, vocab, overrides)
    torch.nn.init.normal_(model.llm.get_output_embeddings().weight, std=2.0)  # no early end of text
    g = torch.Generator().manual_seed(3)
    images = torch.rand(3, 3, 8, 8, generator=g)
    questions = ["what digit is this ?", "what is this ?", "digit ?"]  # different lengths: left padding
    a, la = _lm_head_logits(model, images, questions, True)
    b, lb = _lm_head_logits(model, images, questions, False)
    assert a == b and len(la) == len(lb)
    for x, y in zip(la, lb):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides", [[], MOD_V2PE], ids=["dense", "mod+v2pe"])
def test_cached_flow_images_equal_uncached(small_cfg, vocab, overrides):
    model = _model(small_cfg, vocab, overrides)
    prompts = ["draw the digit 3", "draw the digit 7 please"]
    noise = torch.randn(2, *model.heads["flow"].latent_shape, generator=torch.Generator().manual_seed(0))
    a = model.generate(prompts, steps=3, noise=noise, use_cache=True)
    b = model.generate(prompts, steps=3, noise=noise, use_cache=False)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_v2pe_inference_positions_use_the_fixed_delta(small_cfg, vocab):
    model = _model(small_cfg, vocab, MOD_V2PE)
    policy = model.position_policy
    s = image_generation_sample(vocab, model.heads["flow"].template, None, "draw the digit 3")
    assert policy.enabled and policy.infer_delta == 0.25
    und = understanding_sample(vocab, torch.rand(3, 8, 8), model.und.tokens_per_image, "what digit is this ?", None)
    pos = policy.positions(und.kinds())
    image = torch.tensor(und.kinds()) == 1
    steps = pos[image].diff()
    assert torch.allclose(steps, torch.full_like(steps, 0.25)) and len(s) > 0


def test_routers_run_on_every_rank_even_without_routable_tokens(small_cfg, vocab):
    """ZeRO-3 (every_module): a batch with no image tokens still calls every router, and the
    result is the dense one exactly (non-routable tokens are always kept with weight 1)."""
    model = _model(small_cfg, vocab, ["model.mod.enabled=true", "model.mod.ratio=0.5"])
    s = image_generation_sample(vocab, model.heads["flow"].template, torch.rand(1, 8, 8), "draw the digit 3")
    batch = collate([[s]], len(s), vocab.pad)
    embeds = model.embed_tokens(batch.input_ids)
    spec, spans = batch.attention(), batch.spans
    calls = []
    hooks = [r.register_forward_hook(lambda *a: calls.append(1)) for r in model.mod_routers.routers.values()]
    with torch.no_grad():
        plain = model.decode(embeds, batch.position_ids, spec, batch.token_kinds, spans=spans).last_hidden_state
        assert not calls  # nothing routable: the routers are skipped
        model.require_every_module()
        forced = model.decode(embeds, batch.position_ids, spec, batch.token_kinds, spans=spans).last_hidden_state
    for h in hooks:
        h.remove()
    assert len(calls) == len(model.mod_routers.routers) and torch.equal(plain, forced)
