"""Our own loop over a ``transformers`` decoder's layers: packed rows, token routing, KV caches.

The HF model keeps its weights and state-dict keys (``from_pretrained`` checkpoints load unchanged);
we call its modules ourselves - embeddings are given, rotary from float32 positions (V2PE), then per
layer: input norm, q/k/v projections, rotary, attention under an :class:`AttentionSpec`, output
projection, post-attention norm, MLP - and the final norm. Owning the loop is what lets

* a routed layer (p-MoD) see only the tokens its router keeps (STRing reweighting: kept tokens
  ``x + Attn + w*MLP``, skipped ``w*x``), per sample inside packed rows;
* a KV cache hold different tokens per layer (skipped tokens write no KV), with the attention
  metadata of every cached token, so cached decoding masks exactly as the full sequence does;
* any layer's hidden state be read (REPA) and activations be recomputed in backward;
* the hot ops run fused (``kernels="fused"``, ``model.llm.kernels``): RMSNorm and SwiGLU (liger-kernel),
  rotary from the float positions applied to q and k in one pass, the p-MoD gather and STRing scatter
  (``mm/kernels/``). ``"torch"`` calls the HF modules themselves: the reference and the CPU path.

Supported: LLaMA-style layers (``self_attn.{q,k,v,o}_proj``, ``input_layernorm``,
``post_attention_layernorm``, ``mlp``, the model's ``rotary_emb``): LLaMA, Qwen2, Mistral, and
Qwen3's q/k norms. :func:`check_decoder` names what is missing for any other architecture. Parity with
the HF forward is pinned by ``tests/test_decoder.py``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from mm.kernels.attention import AttentionSpec, attention
from mm.kernels.dispatch import check_impl, use_kernels
from mm.kernels.fused import rms_norm, swiglu
from mm.kernels.mod import gather_kept, string_scatter
from mm.kernels.rope import rotary_qk
from mm.model.routing import LayerPlan, Routing, select_tokens, tanh_norm


@dataclass
class LayerCache:
    k: torch.Tensor  # [B, Hkv, Lc, D] (after rotary)
    v: torch.Tensor
    segments: torch.Tensor  # [B, Lc] the cached tokens' attention metadata
    index: torch.Tensor
    blocks: torch.Tensor | None


@dataclass
class KVCache:
    """Per-layer keys/values with their tokens' metadata; layers may hold different tokens (MoD)."""

    layers: dict[int, LayerCache] = field(default_factory=dict)

    def lengths(self) -> list[int]:
        """Cached tokens per layer (ragged under MoD: skipped tokens write no KV in routed layers)."""
        return [self.layers[i].k.shape[2] for i in sorted(self.layers)]

    def nbytes(self) -> int:
        return sum(c.k.numel() * c.k.element_size() * 2 for c in self.layers.values())

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec) -> None:
        seg, idx, blk = spec.q_segments, spec.q_index, spec.q_blocks
        old = self.layers.get(layer)
        if old is None:
            self.layers[layer] = LayerCache(k, v, seg, idx, blk)
            return
        if old.blocks is not None or blk is not None:
            ob = old.blocks if old.blocks is not None else torch.full_like(old.segments, -1)
            blk = torch.cat([ob, blk if blk is not None else torch.full_like(seg, -1)], 1)
        self.layers[layer] = LayerCache(
            torch.cat([old.k, k], 2), torch.cat([old.v, v], 2), torch.cat([old.segments, seg], 1),
            torch.cat([old.index, idx], 1), blk,
        )  # fmt: skip


@dataclass
class DecoderOutput:
    last_hidden_state: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None  # [0] = inputs, [l] = after block l (before the final norm)
    kept: list[torch.Tensor | None] | None = None  # per layer: the [B, L] tokens a routed layer kept


REQUIRED = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "input_layernorm",
    "post_attention_layernorm",
    "mlp",
)


def check_decoder(decoder: nn.Module) -> None:
    """Raise naming what our loop needs and this HF decoder lacks."""
    for name in ("layers", "norm", "rotary_emb"):
        if not hasattr(decoder, name):
            raise TypeError(f"{type(decoder).__name__} has no .{name}: the decoder loop supports LLaMA-style models")
    layer = decoder.layers[0]
    for path in REQUIRED:
        obj = layer
        for part in path.split("."):
            if not hasattr(obj, part):
                raise TypeError(f"{type(layer).__name__} has no .{path}: the decoder loop supports LLaMA-style layers")
            obj = getattr(obj, part)
    window = getattr(decoder.config, "sliding_window", None)
    if getattr(decoder.config, "use_sliding_window", False) and window:
        # a refusal, not a stub: every attention backend here (sdpa masks, flex, flash varlen, the KV cache) sees
        # whole samples; a window would be one more per-layer term in AttentionSpec (README, Known limits)
        raise NotImplementedError(
            f"{type(decoder).__name__}: use_sliding_window=True (sliding_window={window}) is not supported by the "
            "decoder loop, which attends over whole samples; set use_sliding_window=false in the LLM config "
            "(Qwen2 checkpoints train and run with full attention) or use a model without sliding-window layers"
        )


def _rotary_fn(attn: nn.Module):
    """The model file's own ``apply_rotary_pos_emb`` (LLaMA-style models each define one)."""
    fn = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
    if fn is None:
        raise TypeError(f"{type(attn).__module__} defines no apply_rotary_pos_emb")
    return fn


# ---- the fused ops' drop-in points ------------------------------------------------------------------
# Modules whose forward is exactly the fused op's reference (mm/kernels/fused.py pins LlamaRMSNorm and
# LLaMA's MLP); any other module runs itself.
FUSED_NORMS = ("LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm")
FUSED_MLPS = ("LlamaMLP", "Qwen2MLP", "Qwen3MLP", "MistralMLP")
# rope types that are default RoPE with another inv_freq / attention_scaling; "dynamic" and "longrope"
# change inv_freq inside rotary_emb.forward by sequence length, so they keep the module (mm/kernels/rope.py)
FUSED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _direct(p: torch.Tensor) -> bool:
    """Whether a weight may be read outside its module's forward: not partitioned by DeepSpeed ZeRO-3
    (whose hooks gather a module's weights only around its own forward/backward) or persistent there."""
    return not hasattr(p, "ds_id") or bool(getattr(p, "ds_persist", False))


def norm(module: nn.Module, x: torch.Tensor, impl: str) -> torch.Tensor:
    """An RMSNorm module on x: fused (liger) for LLaMA-style norms, else the module itself."""
    if impl == "torch" or type(module).__name__ not in FUSED_NORMS or not _direct(module.weight):
        return module(x)
    return rms_norm(x, module.weight, module.variance_epsilon, impl)


def mlp(module: nn.Module, x: torch.Tensor, impl: str) -> torch.Tensor:
    """LLaMA's MLP ``down(silu(gate(x)) * up(x))`` with the fused SwiGLU; other MLPs run themselves.

    The projections stay module calls (ZeRO-3 gathers their weights); liger's backward writes into the
    storage of the fresh gate/up outputs, which nothing else saves.
    """
    silu = getattr(getattr(module, "config", None), "hidden_act", None) in ("silu", "swish")
    if impl == "torch" or type(module).__name__ not in FUSED_MLPS or not silu:
        return module(x)
    return module.down_proj(swiglu(module.gate_proj(x), module.up_proj(x), impl))


@dataclass
class Rotary:
    """One pass's rotary embedding: the HF module's cos/sin (reference) or, fused, the float positions
    that :func:`mm.kernels.rope.rotary_qk` turns into angles inside its kernel (cos/sin never exist)."""

    module: nn.Module  # the decoder's rotary_emb
    positions: torch.Tensor  # [B, L] float32 (V2PE: fractional)
    impl: str  # the kernel switch the pass asked for
    cos: torch.Tensor | None = None  # [B, L, D]: the reference path (None: the fused kernel applies it)
    sin: torch.Tensor | None = None

    @classmethod
    def of(cls, module: nn.Module, x: torch.Tensor, positions: torch.Tensor, impl: str) -> Rotary:
        positions = positions.float()
        fused = getattr(module, "rope_type", "default") in FUSED_ROPE_TYPES and use_kernels(impl, x, positions)
        if fused:
            return cls(module, positions, impl)
        cos, sin = module(x, positions)
        return cls(module, positions, impl, cos, sin)

    def gather(self, x: torch.Tensor, order: torch.Tensor) -> Rotary:
        """The kept tokens of a routed layer (``x`` gathered by ``order``) keep their positions."""
        return Rotary.of(self.module, x, self.positions.gather(1, order), self.impl)

    def apply(self, attn: nn.Module, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [B, H, L, D], k [B, Hkv, L, D] -> rotated, in one kernel when fused."""
        if self.cos is not None:
            return _rotary_fn(attn)(q, k, self.cos, self.sin)
        m = self.module
        return rotary_qk(q, k, self.positions, m.inv_freq, m.attention_scaling, self.impl)


def attention_block(
    layer: nn.Module,
    x: torch.Tensor,
    rope: Rotary,
    spec: AttentionSpec,
    backend: str,
    cache: KVCache | None,
    layer_idx: int,
    write_cache: bool,
    impl: str = "torch",
) -> torch.Tensor:
    """x + Attn(norm(x)) for one layer; reads and (optionally) extends the layer's cache."""
    attn = layer.self_attn
    h = norm(layer.input_layernorm, x, impl)
    heads = lambda t: rearrange(t, "b l (h d) -> b l h d", d=attn.head_dim)  # noqa: E731
    q, k = heads(attn.q_proj(h)), heads(attn.k_proj(h))
    v = rearrange(attn.v_proj(h), "b l (h d) -> b h l d", d=attn.head_dim)
    if hasattr(attn, "q_norm"):  # Qwen3-style per-head norms before rotary
        q, k = norm(attn.q_norm, q, impl), norm(attn.k_norm, k, impl)
    q, k = rope.apply(attn, q.transpose(1, 2), k.transpose(1, 2))
    spec_l, k_all, v_all = spec, k, v
    cached = cache.layers.get(layer_idx) if cache is not None else None
    if cached is not None:
        spec_l = spec.with_cached_keys(cached.segments, cached.index, cached.blocks)
        k_all, v_all = torch.cat([cached.k, k], 2), torch.cat([cached.v, v], 2)
    if cache is not None and write_cache:
        cache.append(layer_idx, k, v, spec)
    out = attention(backend, q, k_all, v_all, spec_l, attn.scaling)
    return x + attn.o_proj(rearrange(out, "b h l d -> b l (h d)"))


def layer_forward(
    layer: nn.Module,
    x: torch.Tensor,
    rope: Rotary,
    spec: AttentionSpec,
    backend: str,
    cache: KVCache | None,
    layer_idx: int,
    write_cache: bool,
    mlp_weight: torch.Tensor | None = None,
    impl: str = "torch",
) -> torch.Tensor:
    """One decoder layer: x + Attn, then + MLP (times ``mlp_weight`` per token: STRing's w).

    ``impl``: the kernel switch (``mm/kernels/dispatch.py``) for its norms and MLP; rotary follows ``rope``.
    """
    h = attention_block(layer, x, rope, spec, backend, cache, layer_idx, write_cache, impl)
    m = mlp(layer.mlp, norm(layer.post_attention_layernorm, h, impl), impl)
    return h + (m if mlp_weight is None else mlp_weight.unsqueeze(-1).to(m.dtype) * m)


def run_layers(
    decoder: nn.Module,
    embeds: torch.Tensor,
    positions: torch.Tensor,
    spec: AttentionSpec,
    backend: str = "sdpa",
    cache: KVCache | None = None,
    write_cache: bool = True,
    routing: Routing | None = None,
    output_hidden_states: bool = False,
    checkpointing: bool = False,
    kernels: str = "torch",
) -> DecoderOutput:
    """The decoder on ``embeds`` [B, L, D] at float ``positions`` [B, L] under ``spec``.

    ``cache``: keys/values of earlier tokens (their metadata inside), extended unless
    ``write_cache=False`` (a step that must not stay in the cache, e.g. one flow step).
    ``routing``: p-MoD; routed layers keep, per sample, the top share of its routable tokens (others
    pass as ``w*x``); None = every layer dense. With the routing's host plan (and the spec's host
    varlen) nothing here reads a device tensor back to the host.
    ``kernels``: ``"torch"`` (the HF modules) or ``"fused"`` (see the module docstring; on a CPU without
    Triton's interpreter the references run).
    """
    check_impl(kernels)
    rope = Rotary.of(decoder.rotary_emb, embeds, positions, kernels)
    h = embeds
    hidden = [h] if output_hidden_states else None
    kept: list[torch.Tensor | None] = []
    for i, layer in enumerate(decoder.layers):
        if routing is not None and routing.routers.routed(i):
            plan = routing.plans.get(i) if routing.plans is not None else None
            h, keep = _routed_layer(layer, h, rope, spec, backend, cache, i, write_cache, routing, plan, checkpointing)
            kept.append(keep)
        else:
            h = _run(checkpointing, layer, h, rope, spec, backend, cache, i, write_cache, None, kernels)
            kept.append(None)
        if hidden is not None:
            hidden.append(h)
    # the final norm stays a module call whatever ``kernels`` says: once per pass (a 2L+1-th of the norm
    # work), and its forward is the pass's observable end (hooks count LLM passes there: bench_gen.py)
    return DecoderOutput(decoder.norm(h), tuple(hidden) if hidden is not None else None, kept)


def _run(checkpointing: bool, *args) -> torch.Tensor:
    """:func:`layer_forward`, recomputed in backward when checkpointing under grad mode."""
    if checkpointing and torch.is_grad_enabled():
        return checkpoint(layer_forward, *args, use_reentrant=False)
    return layer_forward(*args)


def _routed_layer(
    layer: nn.Module,
    x: torch.Tensor,
    rope: Rotary,
    spec: AttentionSpec,
    backend: str,
    cache: KVCache | None,
    i: int,
    write_cache: bool,
    routing: Routing,
    plan: LayerPlan | None,
    checkpointing: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A p-MoD layer: the kept tokens of every row gathered to the front, run, scattered back (STRing).

    The gathered width and runs come from ``plan`` (host); without one they are read from the device.
    The gather and the scatter are ``mm/kernels/mod.py``'s (fused under ``rope.impl == "fused"``).
    """
    routers, routable, impl = routing.routers, routing.routable, rope.impl
    scores = routers[i](x)
    keep = select_tokens(scores, routable, spec.q_segments, routers.ratios[i])
    w = torch.where(routable, tanh_norm(scores, routers.cfg.tanh_scale), torch.ones_like(scores))
    counts = keep.sum(1)
    K = plan.width if plan is not None else int(counts.max())
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :K]  # kept first, in sequence order
    valid = torch.arange(K, device=x.device)[None, :] < counts[:, None]
    sub_x = gather_kept(x, order, impl)
    sub_spec = spec.gather(order, valid, plan.varlen if plan is not None else None)
    sub_rope = rope.gather(sub_x, order)  # kept tokens keep their positions
    sub_w = w.gather(1, order)
    out = _run(checkpointing, layer, sub_x, sub_rope, sub_spec, backend, cache, i, write_cache, sub_w, impl)
    return string_scatter(x, out, order, valid, w, impl), keep
