import torch
from transformers import AutoConfig, AutoModelForCausalLM

from mm.train.flops import device_peak_tflops, llm_train_flops_per_token


def test_flops_are_six_per_block_parameter_plus_causal_attention():
    cfg = AutoConfig.for_model("llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=4, intermediate_size=128, vocab_size=50,
                               tie_word_embeddings=False)  # fmt: skip
    llm = AutoModelForCausalLM.from_config(cfg)
    # per layer: q,k,v,o 4*64*64 + mlp 3*64*128 + 2 norms of 64; plus the final norm
    blocks = 2 * (4 * 64 * 64 + 3 * 64 * 128 + 2 * 64) + 64
    flops = llm_train_flops_per_token(llm)
    assert flops(0) == 6 * blocks
    assert flops(100) - 6 * blocks == 12 * 2 * 64 * 100 / 2
    assert device_peak_tflops(torch.device("cpu")) is None
