"""Our decoder loop == the HF model's forward (LLaMA and Qwen2; training, gradients, KV cache)."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from mm.kernels.attention import ATTENTION_BACKENDS, AttentionSpec
from mm.model.decoder import KVCache, check_decoder, run_layers

CPU_BACKENDS = ("sdpa", "sdpa_dense", "sdpa_segmented", "eager")


def _hf(model_type: str, seed: int = 0, attn: str = "sdpa"):
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(
        model_type, vocab_size=64, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512, rope_theta=10000.0,
        tie_word_embeddings=False,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
    if model_type == "qwen2":  # Qwen2 has q/k/v biases: make them non-zero so they are exercised
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    return model


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_loop_equals_hf_forward_and_gradients(model_type, backend):
    # the reference: the HF model with its own attention of the same kind (eager vs SDPA round differently)
    model = _hf(model_type, attn="eager" if backend == "eager" else "sdpa").train()  # dropout 0: deterministic
    ids = torch.randint(0, 64, (2, 24))
    embeds = model.get_input_embeddings()(ids)
    ref = model.model(inputs_embeds=embeds, use_cache=False).last_hidden_state
    ref.pow(2).sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    pos = torch.arange(24, dtype=torch.float32).expand(2, 24)
    spec = AttentionSpec.packed(torch.zeros(2, 24, dtype=torch.long))
    ours = run_layers(model.model, model.get_input_embeddings()(ids), pos, spec, backend).last_hidden_state
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    ours.pow(2).sum().backward()
    for n, p in model.named_parameters():
        if n in ref_grads:
            torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_kv_cached_decoding_equals_the_full_sequence_and_hf_cache(model_type):
    model = _hf(model_type).eval()
    ids = torch.randint(0, 64, (2, 20))
    embeds = model.get_input_embeddings()(ids)
    pos = torch.arange(20, dtype=torch.float32).expand(2, 20)
    with torch.no_grad():
        full = run_layers(model.model, embeds, pos, AttentionSpec.packed(torch.zeros(2, 20, dtype=torch.long)))
        hf = model.model(inputs_embeds=embeds, use_cache=False).last_hidden_state
        cache = KVCache()
        outs = [
            run_layers(
                model.model,
                embeds[:, :12],
                pos[:, :12],
                AttentionSpec.packed(torch.zeros(2, 12, dtype=torch.long)),
                cache=cache,
            ).last_hidden_state
        ]
        for i in range(12, 20):  # one token at a time
            seg = torch.zeros(2, 1, dtype=torch.long)
            idx = torch.full((2, 1), i)
            step = AttentionSpec(seg, seg, idx, idx)
            outs.append(
                run_layers(model.model, embeds[:, i : i + 1], pos[:, i : i + 1], step, cache=cache).last_hidden_state
            )
    torch.testing.assert_close(torch.cat(outs, 1), full.last_hidden_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full.last_hidden_state, hf, rtol=1e-5, atol=1e-5)
    assert cache.lengths() == [20, 20, 20]


def test_hf_checkpoint_keys_are_unchanged(small_cfg, vocab):
    """The loop drives the HF modules: the model's state dict still has the HF decoder's keys."""
    from mm.model.unified import UnifiedModel

    model = UnifiedModel(small_cfg.model, vocab)
    keys = {k.removeprefix("llm.") for k in model.state_dict() if k.startswith("llm.")}
    assert keys == set(model.llm.state_dict())


def test_unsupported_decoder_is_named():
    with pytest.raises(TypeError, match="LLaMA-style"):
        check_decoder(torch.nn.Module())


def test_sliding_window_layers_are_refused_with_the_fix():
    """Qwen2 with use_sliding_window: our loop would attend beyond the window, so it refuses and names the key."""
    from transformers import Qwen2Config, Qwen2Model

    common = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, sliding_window=8, max_window_layers=1)  # fmt: skip
    with pytest.raises(NotImplementedError, match=r"use_sliding_window=True \(sliding_window=8\).*set use_sliding_w"):
        check_decoder(Qwen2Model(Qwen2Config(use_sliding_window=True, **common)))
    check_decoder(Qwen2Model(Qwen2Config(use_sliding_window=False, **common)))  # the same model without it runs


def test_every_listed_backend_is_a_function():
    assert set(CPU_BACKENDS) <= set(ATTENTION_BACKENDS) and {"flex", "flash_attention_2"} <= set(ATTENTION_BACKENDS)
