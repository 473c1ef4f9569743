"""Our own loop over a ``transformers`` decoder's layers: packed rows, token routing, KV caches.

The HF model keeps its weights and state-dict keys (``from_pretrained`` checkpoints load unchanged);
we call its modules ourselves - embeddings are given, rotary from float32 positions (V2PE), then per
layer: input norm, q/k/v projections, rotary, attention under an :class:`AttentionSpec`, output
projection, post-attention norm, MLP - and the final norm. Owning the loop is what lets

* a routed layer (p-MoD) see only the tokens its router keeps (STRing reweighting: kept tokens
  ``x + Attn + w*MLP``, skipped ``w*x``), per sample inside packed rows;
* a KV cache hold different tokens per layer (skipped tokens write no KV), with the attention
  metadata of every cached token, so cached decoding masks exactly as the full sequence does;
* any layer's hidden state be read (REPA) and activations be recomputed in backward.

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
from mm.model.routing import LayerPlan, Routing, select_tokens, string_scatter, tanh_norm


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
        raise NotImplementedError("sliding-window attention layers are not supported by the decoder loop")


def _rotary_fn(attn: nn.Module):
    """The model file's own ``apply_rotary_pos_emb`` (LLaMA-style models each define one)."""
    fn = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
    if fn is None:
        raise TypeError(f"{type(attn).__module__} defines no apply_rotary_pos_emb")
    return fn


def attention_block(
    layer: nn.Module,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    spec: AttentionSpec,
    backend: str,
    cache: KVCache | None,
    layer_idx: int,
    write_cache: bool,
) -> torch.Tensor:
    """x + Attn(norm(x)) for one layer; reads and (optionally) extends the layer's cache."""
    attn = layer.self_attn
    h = layer.input_layernorm(x)
    heads = lambda t: rearrange(t, "b l (h d) -> b l h d", d=attn.head_dim)  # noqa: E731
    q, k = heads(attn.q_proj(h)), heads(attn.k_proj(h))
    v = rearrange(attn.v_proj(h), "b l (h d) -> b h l d", d=attn.head_dim)
    if hasattr(attn, "q_norm"):  # Qwen3-style per-head norms before rotary
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = _rotary_fn(attn)(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
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
    cos: torch.Tensor,
    sin: torch.Tensor,
    spec: AttentionSpec,
    backend: str,
    cache: KVCache | None,
    layer_idx: int,
    write_cache: bool,
    mlp_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decoder layer: x + Attn, then + MLP (times ``mlp_weight`` per token: STRing's w)."""
    h = attention_block(layer, x, cos, sin, spec, backend, cache, layer_idx, write_cache)
    m = layer.mlp(layer.post_attention_layernorm(h))
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
) -> DecoderOutput:
    """The decoder on ``embeds`` [B, L, D] at float ``positions`` [B, L] under ``spec``.

    ``cache``: keys/values of earlier tokens (their metadata inside), extended unless
    ``write_cache=False`` (a step that must not stay in the cache, e.g. one flow step).
    ``routing``: p-MoD; routed layers keep, per sample, the top share of its routable tokens (others
    pass as ``w*x``); None = every layer dense. With the routing's host plan (and the spec's host
    varlen) nothing here reads a device tensor back to the host.
    """
    rotary = decoder.rotary_emb
    cos, sin = rotary(embeds, positions.float())
    h = embeds
    hidden = [h] if output_hidden_states else None
    kept: list[torch.Tensor | None] = []
    for i, layer in enumerate(decoder.layers):
        if routing is not None and routing.routers.routed(i):
            plan = routing.plans.get(i) if routing.plans is not None else None
            h, keep = _routed_layer(layer, h, positions, spec, backend, cache, i, write_cache, routing, plan, rotary,
                                    checkpointing)  # fmt: skip
            kept.append(keep)
        else:
            args = (layer, h, cos, sin, spec, backend, cache, i, write_cache)
            h = (
                checkpoint(layer_forward, *args, use_reentrant=False)
                if checkpointing and torch.is_grad_enabled()
                else layer_forward(*args)
            )
            kept.append(None)
        if hidden is not None:
            hidden.append(h)
    return DecoderOutput(decoder.norm(h), tuple(hidden) if hidden is not None else None, kept)


def _routed_layer(
    layer: nn.Module,
    x: torch.Tensor,
    positions: torch.Tensor,
    spec: AttentionSpec,
    backend: str,
    cache: KVCache | None,
    i: int,
    write_cache: bool,
    routing: Routing,
    plan: LayerPlan | None,
    rotary: nn.Module,
    checkpointing: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A p-MoD layer: the kept tokens of every row gathered to the front, run, scattered back (STRing).

    The gathered width and runs come from ``plan`` (host); without one they are read from the device.
    """
    routers, routable = routing.routers, routing.routable
    scores = routers[i](x)
    keep = select_tokens(scores, routable, spec.q_segments, routers.ratios[i])
    w = torch.where(routable, tanh_norm(scores, routers.cfg.tanh_scale), torch.ones_like(scores))
    counts = keep.sum(1)
    K = plan.width if plan is not None else int(counts.max())
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :K]  # kept first, in sequence order
    valid = torch.arange(K, device=x.device)[None, :] < counts[:, None]
    sub_x = x.gather(1, order.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    sub_pos = positions.gather(1, order)
    sub_spec = spec.gather(order, valid, plan.varlen if plan is not None else None)
    cos, sin = rotary(sub_x, sub_pos.float())  # kept tokens keep their positions
    args = (layer, sub_x, cos, sin, sub_spec, backend, cache, i, write_cache, w.gather(1, order))
    out = (
        checkpoint(layer_forward, *args, use_reentrant=False)
        if checkpointing and torch.is_grad_enabled()
        else layer_forward(*args)
    )
    return string_scatter(x, out, order, valid, w), keep
