"""Training FLOPs of the whole unified model per micro-batch, and MFU against a per-device peak table.

Two kinds of work, counted two ways:

* The LLM depends on how the batch was packed, so it is counted analytically per batch from the
  module shapes: every decoder layer's linear weights once per token that passes the layer
  (``tokens_per_layer``: a mixture-of-depths layer passes fewer), attention scores and values
  ``2 * heads * head_dim`` multiply-adds per attended (query, key) pair (``pairs_per_layer``: causal
  within each packed sample, n(n+1)/2 pairs for a sample of n tokens), and the LM head once per
  supervised text token (the model computes logits only there). The embedding lookup costs nothing,
  so tied embeddings are counted right: the head's matmul is counted once per logit token whether
  or not its weight is the embedding table.
* The image modules see fixed-shape inputs (an image, a latent), so their forward FLOPs per image are
  counted once at start by running each module on one fake image under ``FlopCounterMode`` (fake
  tensors: no memory, no compute). This covers any tower (open_clip, SigLIP) or VAE without a
  hand-written formula per architecture.

Backward: a module whose weights train costs one forward for weight gradients; one more when its
input needs a gradient (something before it trains). A frozen module before every trainable one
costs no backward at all; a frozen LLM between a trainable aligner and the loss costs one forward
for its linear layers and two for attention (no weights: the gradients of both operands).
``tests/test_flops.py`` checks the total against ``FlopCounterMode`` on a real training step.

Mixture-of-depths (p-MoD, ``mm/model/routing.py``): a routed layer processes only the tokens it
keeps, so its linear cost scales with the kept count and its attention with the kept queries x kept
keys (a skipped token is neither in that layer); its router scores every routable token once.
:func:`layer_counts` gives the per-layer counts from per-sample lengths; the same counts give the
KV cache (a skipped token writes no K/V in a routed layer). :func:`prefill_flops` and
:func:`kv_cache_bytes` turn them into inference figures (``scripts/flops.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mm.config import MoDConfig
from mm.model.routing import kept_count, layer_ratios, routable_mask
from mm.sequence import IGNORE

# Dense (no sparsity) peak TFLOP/s per device from the vendors' datasheets, by the precision the
# matmuls run in. H100/H200 are SXM parts; B200 is one GPU of an HGX B200 (sparse figures halved).
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "H100": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "H200": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "B200": {"bf16": 2250.0, "tf32": 1125.0, "fp32": 75.0},
}


def peak_tflops(device_name: str, precision_key: str) -> float | None:
    """The table entry whose key is the longest part of ``device_name`` (``H100 PCIe`` before ``H100``)."""
    matches = [k for k in PEAK_TFLOPS if k in device_name]
    if not matches:
        return None
    return PEAK_TFLOPS[max(matches, key=len)].get(precision_key)


def device_peak_tflops(device: torch.device, precision_key: str = "bf16") -> float | None:
    """Peak of this CUDA device for ``precision_key`` (bf16 | tf32 | fp32); None on CPU or unknown GPUs."""
    if device.type != "cuda":
        return None
    return peak_tflops(torch.cuda.get_device_name(device), precision_key)


@dataclass
class BatchShape:
    """What one packed micro-batch asks of the model (measured on the host, before it moves)."""

    tokens: int  # non-padding tokens
    tokens_per_layer: list[int]  # LLM tokens through each decoder layer
    pairs_per_layer: list[float]  # attended (query, key) pairs in each layer
    logit_tokens: int  # supervised text tokens (the LM head runs only on these)
    und_images: int
    gen_images: int
    samples: int
    router_tokens: int = 0  # mixture-of-depths: routable tokens scored, summed over the routed layers


@dataclass
class LayerCounts:
    """Per-layer work of the LLM over a set of samples (dense, or with mixture-of-depths)."""

    tokens_per_layer: list[int]  # tokens through each layer = tokens that write K/V there
    pairs_per_layer: list[float]  # attended (query, key) pairs: causal within each sample, kept tokens only
    router_tokens: int  # routable tokens scored by a router, summed over the routed layers


def layer_counts(lengths: Sequence[int], routable: Sequence[int], ratios: Sequence[float]) -> LayerCounts:
    """Per-layer counts of samples of ``lengths`` tokens, ``routable[i]`` of them routable.

    Layer l keeps ``n - r + floor(r * ratio_l)`` tokens of a sample (the exact count
    :func:`mm.model.routing.select_tokens` keeps) and attends causally among them: k(k+1)/2 pairs
    whichever tokens were kept. Dense = every ratio 1.0.
    """
    if len(lengths) != len(routable):
        raise ValueError(f"layer_counts: {len(lengths)} lengths but {len(routable)} routable counts")
    bad = [(n, r) for n, r in zip(lengths, routable) if not 0 <= r <= n]
    if bad:
        raise ValueError(f"layer_counts: routable counts must be in [0, length], got (length, routable) {bad[:3]}")
    tokens, pairs = [], []
    for ratio in ratios:
        kept = [n - r + kept_count(r, ratio) for n, r in zip(lengths, routable)]
        tokens.append(sum(kept))
        pairs.append(float(sum(k * (k + 1) / 2 for k in kept)))
    router = sum(routable) * sum(1 for ratio in ratios if ratio < 1.0)
    return LayerCounts(tokens, pairs, router)


def batch_shape(batch: dict, num_layers: int, mod: MoDConfig | None = None) -> BatchShape:
    """Causal attention within each sample; with ``mod`` enabled, routed layers count their kept tokens."""
    sid = batch["sample_ids"]
    valid = sid >= 0
    lengths = torch.bincount(sid[valid])
    ratios = layer_ratios(num_layers, mod) if mod is not None else [1.0] * num_layers
    routable = torch.zeros_like(lengths)
    if any(r < 1.0 for r in ratios):
        is_routable = routable_mask(batch["token_kinds"], sid, mod.routable_kinds)  # what the model routes
        routable = torch.bincount(sid[is_routable], minlength=len(lengths))
    present = lengths > 0  # ids may skip numbers; absent ids are not samples
    counts = layer_counts(lengths[present].tolist(), routable[present].tolist(), ratios)
    und = batch.get("und_images")
    gen = batch.get("gen_images")
    return BatchShape(
        tokens=int(lengths.sum()),
        tokens_per_layer=counts.tokens_per_layer,
        pairs_per_layer=counts.pairs_per_layer,
        logit_tokens=int((batch["targets"] != IGNORE).sum()),
        und_images=0 if und is None else len(und),
        gen_images=0 if gen is None else len(gen),
        samples=int(present.sum()),
        router_tokens=counts.router_tokens,
    )


def _linear_macs(module: nn.Module) -> int:
    """Multiply-adds per token of every nn.Linear in ``module`` (each applied once per token)."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def forward_flops(fn, *shapes: tuple[int, ...], device: str | torch.device = "cpu") -> float:
    """Forward FLOPs of ``fn`` on fake fp32 inputs of ``shapes`` (no memory, no compute).

    ``device`` is where ``fn``'s weights live: ``meta`` for a module built on the meta device.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        inputs = [torch.rand(s, device=device) for s in shapes]
        with FlopCounterMode(display=False) as counter:
            fn(*inputs)
    return float(counter.get_total_flops())


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


@dataclass(frozen=True)
class LLMShape:
    """What the LLM's FLOPs and KV cache depend on, read from any ``transformers`` causal LM (meta is fine)."""

    layer_macs: tuple[int, ...]  # linear multiply-adds per token, per decoder layer
    pair_macs: int  # multiply-adds per attended (query, key) pair: q.k and p.v over every head
    head_macs: int  # LM head multiply-adds per logit token
    kv_width: int  # K and V values one token stores per layer: 2 * kv_heads * head_dim
    hidden: int

    @classmethod
    def from_llm(cls, llm: nn.Module) -> LLMShape:
        cfg = llm.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head = llm.get_output_embeddings()
        return cls(
            layer_macs=tuple(_linear_macs(layer) for layer in llm.get_decoder().layers),
            pair_macs=2 * cfg.num_attention_heads * head_dim,
            head_macs=head.weight.numel() if head is not None else 0,
            kv_width=2 * kv_heads * head_dim,
            hidden=cfg.hidden_size,
        )

    @property
    def num_layers(self) -> int:
        return len(self.layer_macs)


def prefill_flops(llm: LLMShape, counts: LayerCounts, logit_tokens: int) -> dict[str, float]:
    """Forward FLOPs of the LLM for a prefill: decoder layers, attention, routers, and the LM head on
    ``logit_tokens`` (1 per sample when only the next token is sampled)."""
    if len(counts.tokens_per_layer) != llm.num_layers:
        raise ValueError(
            f"prefill_flops: counts for {len(counts.tokens_per_layer)} layers, the LLM has {llm.num_layers}"
        )
    return {
        "layers": sum(2.0 * m * n for m, n in zip(llm.layer_macs, counts.tokens_per_layer)),
        "attention": sum(2.0 * llm.pair_macs * p for p in counts.pairs_per_layer),
        "router": 2.0 * llm.hidden * counts.router_tokens,  # Linear(hidden -> 1) per scored token
        "head": 2.0 * llm.head_macs * logit_tokens,
    }


def kv_cache_bytes(llm: LLMShape, counts: LayerCounts, dtype_bytes: int = 2) -> int:
    """Bytes of the KV cache after a prefill (default bf16): every layer stores K and V of the tokens it processed."""
    if len(counts.tokens_per_layer) != llm.num_layers:
        raise ValueError(
            f"kv_cache_bytes: counts for {len(counts.tokens_per_layer)} layers, the LLM has {llm.num_layers}"
        )
    return sum(counts.tokens_per_layer) * llm.kv_width * dtype_bytes


class ModelFlops:
    """Per-batch training FLOPs of a :class:`mm.model.unified.UnifiedModel`; build before engines shard it."""

    def __init__(self, model: nn.Module):
        llm = model.llm
        self.llm_shape = LLMShape.from_llm(llm)
        self.num_layers = self.llm_shape.num_layers
        self.layer_macs = list(self.llm_shape.layer_macs)
        self.pair_macs = self.llm_shape.pair_macs  # q.k and p.v per (query, key) pair
        self.head_macs = self.llm_shape.head_macs

        u = model.cfg.und
        width = llm.config.hidden_size
        self.per_image = {  # forward FLOPs for one image
            "und_tower": forward_flops(model.und.features, (1, u.in_channels, u.image_size, u.image_size)),
            "und_aligner": forward_flops(model.und.aligner, (1, model.und.tokens_per_image, model.und.tower.width)),
        }
        self.has_flow = "flow" in model.heads
        if self.has_flow:
            ae = model.cfg.autoencoder
            g = model.gen_tokens_per_image
            latent = (1, *model.latent_shape)
            side = model.latent_shape[1] // model.cfg.gen.patch_size
            self.per_image |= {
                "autoencoder": forward_flops(
                    model.autoencoder.encode, (1, ae.image_channels, ae.image_size, ae.image_size)
                ),
                "time_embed": forward_flops(model.time_embed, (1,)),
                "gen_encoder": forward_flops(model.gen_encoder, latent, (1, width)),
                "gen_decoder": forward_flops(
                    model.gen_decoder, (1, g, width), (1, model.cfg.gen.channels, side, side), (1, width)
                ),
                "repa_proj": forward_flops(model.repa_proj, (1, g, width)),
            }
        else:  # no flow head: its parts cost nothing (the code heads' small projections are not counted)
            flow_parts = ("autoencoder", "time_embed", "gen_encoder", "gen_decoder", "repa_proj")
            self.per_image |= dict.fromkeys(flow_parts, 0.0)
        self.repa = self.has_flow and model.cfg.flow.repa_weight > 0
        self.bwd = self._backward_factors(model)

    @staticmethod
    def _backward_factors(model: nn.Module) -> dict[str, float]:
        """Backward cost of each part in forwards: +1 if its weights train, +1 if its input needs a gradient."""
        flow = "flow" in model.heads
        t = {
            "und_tower": _trains(model.und.tower),
            "und_aligner": _trains(model.und.aligner),
            "time_embed": flow and _trains(model.time_embed),
            "gen_encoder": flow and _trains(model.gen_encoder),
            "embeddings": _trains(model.llm.get_input_embeddings()),
            "llm": any(_trains(layer) for layer in model.llm.get_decoder().layers),
            "head": _trains(model.llm.get_output_embeddings()),
            "gen_decoder": flow and _trains(model.gen_decoder),
            "repa_proj": flow and _trains(model.repa_proj),
        }
        before_llm = t["und_tower"] or t["und_aligner"] or t["time_embed"] or t["gen_encoder"] or t["embeddings"]
        llm_out_needs_grad = t["llm"] or before_llm  # hidden states carry a gradient to something that trains
        return {
            "und_tower": 2.0 if t["und_tower"] else 0.0,
            "und_aligner": float(t["und_aligner"]) + float(t["und_tower"]),
            "time_embed": 2.0 if t["time_embed"] else 0.0,
            "gen_encoder": float(t["gen_encoder"]) + float(t["gen_encoder"] or t["time_embed"]),
            "llm": float(t["llm"]) + float(llm_out_needs_grad),
            "router": float(t["llm"]) + float(llm_out_needs_grad),  # mixture-of-depths routers train with the LLM
            "attention": 2.0 * float(llm_out_needs_grad),  # no weights: both operands' gradients, or nothing
            "head": float(t["head"]) + float(llm_out_needs_grad),
            "gen_decoder": float(t["gen_decoder"]) + float(llm_out_needs_grad or t["gen_encoder"] or t["time_embed"]),
            "repa_proj": float(t["repa_proj"]) + float(llm_out_needs_grad),
            "autoencoder": 0.0,  # frozen, under no_grad
            "repa_target": 0.0,  # the tower on clean images, under no_grad
        }

    def llm_forward(
        self, tokens_per_layer: Sequence[int], pairs_per_layer: Sequence[float], logit_tokens: int
    ) -> float:
        """Forward FLOPs of the decoder layers and the LM head; MoD passes its own per-layer counts."""
        layers = sum(2.0 * m * n for m, n in zip(self.layer_macs, tokens_per_layer))
        attention = sum(2.0 * self.pair_macs * p for p in pairs_per_layer)
        return layers + attention + 2.0 * self.head_macs * logit_tokens

    def parts(self, shape: BatchShape) -> dict[str, float]:
        """Forward FLOPs of each part for one micro-batch."""
        img = self.per_image
        llm_linear = sum(2.0 * m * n for m, n in zip(self.layer_macs, shape.tokens_per_layer))
        n_gen = shape.gen_images
        return {
            "und_tower": img["und_tower"] * shape.und_images,
            "und_aligner": img["und_aligner"] * shape.und_images,
            "autoencoder": img["autoencoder"] * n_gen,
            "time_embed": img["time_embed"] * n_gen,
            "gen_encoder": img["gen_encoder"] * n_gen,
            "llm": llm_linear,
            "router": 2.0 * self.llm_shape.hidden * shape.router_tokens,
            "attention": sum(2.0 * self.pair_macs * p for p in shape.pairs_per_layer),
            "head": 2.0 * self.head_macs * shape.logit_tokens,
            "gen_decoder": img["gen_decoder"] * n_gen,
            "repa_proj": img["repa_proj"] * n_gen if self.repa else 0.0,
            "repa_target": img["und_tower"] * n_gen if self.repa else 0.0,
        }

    def train_flops(self, shape: BatchShape) -> float:
        """Forward + backward FLOPs of one micro-batch."""
        return sum(f * (1.0 + self.bwd[k]) for k, f in self.parts(shape).items())
