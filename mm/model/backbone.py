"""The LLM backbone: a ``transformers`` causal LM whose layers our loop drives (``mm/model/decoder.py``).

``model.llm`` either names a local ``pretrained`` folder, whose ``config.json`` is the truth about the
architecture, or builds one from its fields. Every architecture field is ``None`` until set: with a
folder, unset fields are read from it and a set field that contradicts it is a one-line error naming the
key; without one, unset fields mean :data:`LLM_DEFAULTS` (the tiny default) or the model type's own
transformers default. The validated config holds what a folder says, so a run's saved ``config.yaml`` says
which LLM it trained.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel

from mm.kernels.attention import ATTENTION_BACKENDS
from mm.kernels.dispatch import KERNEL_IMPLS
from mm.schema import ConfigError, resolve_path

# Our field -> the transformers config attribute it states (rope_theta and rope_scaling live in rope_parameters).
HF_FIELDS = {
    "model_type": "model_type", "hidden_size": "hidden_size", "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads",
    "intermediate_size": "intermediate_size", "max_position_embeddings": "max_position_embeddings",
    "rms_norm_eps": "rms_norm_eps", "tie_word_embeddings": "tie_word_embeddings", "head_dim": "head_dim",
    "hidden_act": "hidden_act", "attention_bias": "attention_bias", "mlp_bias": "mlp_bias",
}  # fmt: skip
ROPE_FIELDS = ("rope_theta", "rope_scaling")
# Built without a folder: the tiny default's architecture (fields left None take the model type's own default)
LLM_DEFAULTS = {
    "model_type": "llama", "hidden_size": 128, "num_layers": 4, "num_heads": 4, "num_kv_heads": 4,
    "intermediate_size": 512, "max_position_embeddings": 4096, "rope_theta": 10000.0, "tie_word_embeddings": False,
}  # fmt: skip
DEFAULT_TOKENIZER = "configs/tokenizers/digits"


@dataclass
class LLMConfig:
    """Autoregressive backbone from ``transformers``: a local ``pretrained`` folder, or built from the fields.

    Architecture fields left unset (None) come from the folder's ``config.json`` (or :data:`LLM_DEFAULTS`);
    one that is set must agree with the folder (:meth:`effective` reads a field as built).
    """

    pretrained: str = ""  # local directory for from_pretrained; "" = from_config
    model_type: str | None = None
    hidden_size: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    intermediate_size: int | None = None
    max_position_embeddings: int | None = None
    rope_theta: float | None = None
    rope_scaling: dict[str, Any] | None = None  # rope_parameters besides rope_theta ({rope_type: linear, factor: 2})
    rms_norm_eps: float | None = None  # Vicuna/LLaMA-2: 1e-5; transformers' LLaMA default 1e-6
    tie_word_embeddings: bool | None = None
    head_dim: int | None = None  # None = hidden_size / num_heads
    hidden_act: str | None = None
    attention_bias: bool | None = None
    mlp_bias: bool | None = None
    vocab_size: int = 0  # embedding rows; 0 = the folder's rows, grown to the tokenizer's size if it has more
    attn_implementation: str = "sdpa"  # key of mm.kernels.attention.ATTENTION_BACKENDS
    # "fused": liger/Triton RMSNorm, SwiGLU, rotary, p-MoD gather/scatter and LM head + loss on CUDA
    # (mm/kernels/); "torch": the HF modules. "fused" on a CPU runs the references (same numbers).
    kernels: str = "torch"
    tokenizer: str | None = None  # local directory (tokenizer.json); None = the pretrained folder's, else digits

    def __post_init__(self) -> None:
        if self.attn_implementation not in ATTENTION_BACKENDS:
            raise ConfigError(
                f"model.llm.attn_implementation={self.attn_implementation!r}; known: {sorted(ATTENTION_BACKENDS)}"
            )
        if self.kernels not in KERNEL_IMPLS:
            raise ConfigError(f"model.llm.kernels={self.kernels!r}; known: {list(KERNEL_IMPLS)}")
        if self.tokenizer is None and self.pretrained and _has_tokenizer(self.pretrained):
            self.tokenizer = self.pretrained  # an LLM folder holds its tokenizer
        # Only a folder fills fields here: a default instance of this class is made while the config schema is
        # built, and what it filled in would then read as set. Without a folder, None means LLM_DEFAULTS.
        folder = self.folder_config()
        if folder is not None:
            self._take_from(folder)
        width, heads = self.effective("hidden_size"), self.effective("num_heads")
        if width and heads and self.head_dim is None and width % heads:  # unknown while a named folder is missing
            raise ConfigError("model.llm.hidden_size must be divisible by model.llm.num_heads (or set head_dim)")

    def effective(self, key: str) -> Any:
        """A field's value as built: set, read from the folder, or LLM_DEFAULTS' (None: the model type's default)."""
        value = getattr(self, key)
        return LLM_DEFAULTS.get(key) if value is None and not self.pretrained else value

    def tokenizer_dir(self) -> str:
        """The tokenizer's folder: ``tokenizer``, else the pretrained folder's (when it holds one), else the tiny
        digits tokenizer."""
        return self.tokenizer if self.tokenizer is not None else DEFAULT_TOKENIZER

    def folder_config(self) -> PreTrainedConfig | None:
        """The pretrained folder's transformers config, or None (no folder, or not there yet: build says so)."""
        if not self.pretrained:
            return None
        path = resolve_path(self.pretrained)
        if not (path / "config.json").is_file():
            return None
        return AutoConfig.from_pretrained(str(path), local_files_only=True)

    def _take_from(self, hf: PreTrainedConfig) -> None:
        """Fill unset fields from the folder's config; a set one that differs is an error naming the key."""
        found = stated_fields(hf)
        for key, value in found.items():
            mine = getattr(self, key)
            if mine is None:
                setattr(self, key, value)
            elif not _same(mine, value):
                raise ConfigError(
                    f"model.llm.{key}={mine!r} contradicts {self.pretrained}/config.json ({value!r}); the folder is "
                    f"the truth: drop model.llm.{key}"
                )
        if self.vocab_size and self.vocab_size < hf.vocab_size:
            raise ConfigError(f"model.llm.vocab_size={self.vocab_size} < the {hf.vocab_size} embedding rows of "
                              f"{self.pretrained}: drop model.llm.vocab_size")  # fmt: skip
        self.vocab_size = self.vocab_size or hf.vocab_size

    def hf_config(self, vocab_size: int) -> PreTrainedConfig:
        """The transformers config these fields build (no folder): unset fields keep the model type's default."""
        value = {k: self.effective(k) for k in [*HF_FIELDS, *ROPE_FIELDS]}
        kwargs = {HF_FIELDS[k]: v for k, v in value.items() if k in HF_FIELDS and k != "model_type" and v is not None}
        rope = dict(value["rope_scaling"] or {})
        if value["rope_theta"] is not None:
            rope["rope_theta"] = value["rope_theta"]
        if rope:
            rope.setdefault("rope_type", "default")
            kwargs["rope_parameters"] = rope
        kwargs.setdefault("tie_word_embeddings", False)
        return AutoConfig.for_model(value["model_type"] or "llama", vocab_size=vocab_size, **kwargs)


def _has_tokenizer(folder: str) -> bool:
    path = resolve_path(folder)
    return any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def stated_fields(hf: PreTrainedConfig) -> dict[str, Any]:
    """The ``model.llm`` fields a transformers LLM config states (what a folder makes true, what a release records)."""
    out = {k: getattr(hf, attr) for k, attr in HF_FIELDS.items() if getattr(hf, attr, None) is not None}
    if "num_kv_heads" not in out and "num_heads" in out:
        out["num_kv_heads"] = out["num_heads"]
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    theta = rope.pop("rope_theta", None) or getattr(hf, "rope_theta", None)
    if theta is not None:
        out["rope_theta"] = float(theta)
    if rope.get("rope_type", "default") != "default" or set(rope) - {"rope_type"}:
        out["rope_scaling"] = rope
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, int | float) and isinstance(b, int | float) and abs(a - b) <= 1e-12 * max(1.0, abs(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def field_names() -> list[str]:
    """Every architecture field of ``model.llm`` (those a folder fills)."""
    return [f.name for f in fields(LLMConfig) if f.name in HF_FIELDS or f.name in ROPE_FIELDS]


# Our decoder loop computes attention itself (mm/kernels/attention.py, chosen by llm.attn_implementation);
# the HF model is built with SDPA so that loading never needs flash-attn installed.
HF_ATTENTION = "sdpa"


def build_llm(cfg: LLMConfig, vocab_size: int) -> PreTrainedModel:
    """``from_pretrained`` a local directory, or ``from_config`` the fields.

    ``vocab_size`` is the tokenizer's length (special tokens included); the embedding table has
    max(vocab_size, cfg.vocab_size, the folder's rows) rows.
    """
    if cfg.vocab_size and cfg.vocab_size < vocab_size and not cfg.pretrained:
        raise ValueError(f"model.llm.vocab_size={cfg.vocab_size} < tokenizer size {vocab_size}")
    vocab_size = max(vocab_size, cfg.vocab_size)
    if cfg.pretrained:
        path = resolve_path(cfg.pretrained)
        if not path.is_dir():
            raise FileNotFoundError(f"model.llm.pretrained: no such directory {path}")
        llm = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, attn_implementation=HF_ATTENTION)
    else:
        llm = AutoModelForCausalLM.from_config(cfg.hf_config(vocab_size), attn_implementation=HF_ATTENTION)
    if llm.get_input_embeddings().num_embeddings < vocab_size:  # special tokens were added, or more rows asked
        llm.resize_token_embeddings(vocab_size)
    return llm
