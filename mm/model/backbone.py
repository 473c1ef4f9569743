"""The LLM backbone: a ``transformers`` causal LM whose layers our loop drives (``mm/model/decoder.py``)."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from mm.kernels.attention import ATTENTION_BACKENDS
from mm.kernels.dispatch import KERNEL_IMPLS
from mm.schema import ConfigError, resolve_path


@dataclass
class LLMConfig:
    """Autoregressive backbone from ``transformers``: a local ``pretrained`` directory, or the shape fields."""

    pretrained: str = ""  # local directory for from_pretrained; "" = from_config
    model_type: str = "llama"
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    vocab_size: int = 0  # embedding rows; 0 = the tokenizer's size (must be >= it otherwise)
    attn_implementation: str = "sdpa"  # key of mm.kernels.attention.ATTENTION_BACKENDS
    # "fused": liger/Triton RMSNorm, SwiGLU, rotary, p-MoD gather/scatter and LM head + loss on CUDA
    # (mm/kernels/); "torch": the HF modules. "fused" on a CPU runs the references (same numbers).
    kernels: str = "torch"
    tokenizer: str = "configs/tokenizers/digits"  # local directory (tokenizer.json)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError("model.llm.hidden_size must be divisible by model.llm.num_heads")
        if self.attn_implementation not in ATTENTION_BACKENDS:
            raise ConfigError(
                f"model.llm.attn_implementation={self.attn_implementation!r}; known: {sorted(ATTENTION_BACKENDS)}"
            )
        if self.kernels not in KERNEL_IMPLS:
            raise ConfigError(f"model.llm.kernels={self.kernels!r}; known: {list(KERNEL_IMPLS)}")


# Our decoder loop computes attention itself (mm/kernels/attention.py, chosen by llm.attn_implementation);
# the HF model is built with SDPA so that loading never needs flash-attn installed.
HF_ATTENTION = "sdpa"


def build_llm(cfg: LLMConfig, vocab_size: int) -> PreTrainedModel:
    """``from_pretrained`` a local directory, or ``from_config`` the shape fields.

    ``vocab_size`` is the tokenizer's length (special tokens included); the
    embedding table has max(vocab_size, cfg.vocab_size) rows.
    """
    if cfg.vocab_size and cfg.vocab_size < vocab_size:
        raise ValueError(f"model.llm.vocab_size={cfg.vocab_size} < tokenizer size {vocab_size}")
    vocab_size = max(vocab_size, cfg.vocab_size)
    if cfg.pretrained:
        path = resolve_path(cfg.pretrained)
        if not path.is_dir():
            raise FileNotFoundError(f"model.llm.pretrained: no such directory {path}")
        llm = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, attn_implementation=HF_ATTENTION)
    else:
        hf_cfg = AutoConfig.for_model(
            cfg.model_type, vocab_size=vocab_size, hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads, intermediate_size=cfg.intermediate_size,
            max_position_embeddings=cfg.max_position_embeddings, rope_theta=cfg.rope_theta,
            tie_word_embeddings=False,
        )  # fmt: skip
        llm = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation=HF_ATTENTION)
    if llm.get_input_embeddings().num_embeddings < vocab_size:  # special tokens were added
        llm.resize_token_embeddings(vocab_size)
    return llm
