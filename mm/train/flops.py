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

from mm.batch import Batch
from mm.model.routing import MoDConfig, kept_count, layer_ratios, routable_kind_ids
from mm.profiling import forward_flops, trains

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
    gen_images: dict[str, int]  # image head -> images it trains on
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


def batch_shape(batch: Batch, num_layers: int, mod: MoDConfig | None = None) -> BatchShape:
    """From the batch's host-side layout: causal attention within each sample; with ``mod`` enabled, routed
    layers count their kept tokens."""
    ratios = layer_ratios(num_layers, mod) if mod is not None else [1.0] * num_layers
    spans = [s for row in batch.spans for s in row]
    routable_ids = routable_kind_ids(mod.routable_kinds) if mod is not None else []
    routable = [sum(s.kinds[k] for k in routable_ids) for s in spans] if any(r < 1.0 for r in ratios) else []
    counts = layer_counts([s.length for s in spans], routable or [0] * len(spans), ratios)
    return BatchShape(
        tokens=sum(s.length for s in spans),
        tokens_per_layer=counts.tokens_per_layer,
        pairs_per_layer=counts.pairs_per_layer,
        logit_tokens=sum(s.supervised for s in spans),
        und_images=0 if batch.und_images is None else len(batch.und_images),
        gen_images={name: len(inputs) for name, inputs in batch.images.items()},
        samples=len(spans),
        router_tokens=counts.router_tokens,
    )


def _linear_macs(module: nn.Module) -> int:
    """Multiply-adds per token of every nn.Linear in ``module`` (each applied once per token)."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


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
    """Per-batch training FLOPs of a :class:`mm.model.unified.UnifiedModel`; build before engines shard it.

    The understanding encoder and the LLM are counted here; each image head counts its own parts
    (``ImageHead.costs``: forward FLOPs per image and the backward in forwards).
    """

    def __init__(self, model: nn.Module):
        llm = model.llm
        self.llm_shape = LLMShape.from_llm(llm)
        self.num_layers = self.llm_shape.num_layers
        self.layer_macs = list(self.llm_shape.layer_macs)
        self.pair_macs = self.llm_shape.pair_macs  # q.k and p.v per (query, key) pair
        self.head_macs = self.llm_shape.head_macs
        u = model.und
        self.und_flops = {  # forward FLOPs for one image
            "und_tower": forward_flops(u.features, (1, u.channels, u.image_size, u.image_size)),
            "und_aligner": forward_flops(u.aligner, (1, u.tokens_per_image, u.tower.width)),
        }
        t = {
            "und_tower": trains(u.tower),
            "und_aligner": trains(u.aligner),
            "embeddings": trains(llm.get_input_embeddings()),
            "llm": any(trains(layer) for layer in llm.get_decoder().layers),
            "head": trains(llm.get_output_embeddings()),
        }
        heads_train = any(h.trains_before_llm() for h in model.heads.values())
        before_llm = t["und_tower"] or t["und_aligner"] or t["embeddings"] or heads_train
        llm_out_needs_grad = t["llm"] or before_llm  # hidden states carry a gradient to something that trains
        self.bwd = {
            "und_tower": 2.0 if t["und_tower"] else 0.0,
            "und_aligner": float(t["und_aligner"]) + float(t["und_tower"]),
            "llm": float(t["llm"]) + float(llm_out_needs_grad),
            "router": float(t["llm"]) + float(llm_out_needs_grad),  # mixture-of-depths routers train with the LLM
            "attention": 2.0 * float(llm_out_needs_grad),  # no weights: both operands' gradients, or nothing
            "head": float(t["head"]) + float(llm_out_needs_grad),
            "und_target": 0.0,  # the tower on clean images (REPA), under no_grad
        }
        self.head_costs = {name: h.costs(llm_out_needs_grad) for name, h in model.heads.items()}
        self.und_targets = {name: getattr(h, "und_targets_per_image", 0) for name, h in model.heads.items()}

    def llm_forward(
        self, tokens_per_layer: Sequence[int], pairs_per_layer: Sequence[float], logit_tokens: int
    ) -> float:
        """Forward FLOPs of the decoder layers and the LM head; MoD passes its own per-layer counts."""
        layers = sum(2.0 * m * n for m, n in zip(self.layer_macs, tokens_per_layer))
        attention = sum(2.0 * self.pair_macs * p for p in pairs_per_layer)
        return layers + attention + 2.0 * self.head_macs * logit_tokens

    def parts(self, shape: BatchShape) -> dict[str, tuple[float, float]]:
        """(forward FLOPs, backward in forwards) of each part for one micro-batch."""
        img = self.und_flops
        out = {
            "und_tower": (img["und_tower"] * shape.und_images, self.bwd["und_tower"]),
            "und_aligner": (img["und_aligner"] * shape.und_images, self.bwd["und_aligner"]),
            "llm": (sum(2.0 * m * n for m, n in zip(self.layer_macs, shape.tokens_per_layer)), self.bwd["llm"]),
            "router": (2.0 * self.llm_shape.hidden * shape.router_tokens, self.bwd["router"]),
            "attention": (sum(2.0 * self.pair_macs * p for p in shape.pairs_per_layer), self.bwd["attention"]),
            "head": (2.0 * self.head_macs * shape.logit_tokens, self.bwd["head"]),
        }
        for name, costs in self.head_costs.items():
            n = shape.gen_images.get(name, 0)
            out |= {f"{name}.{part}": (c.forward * n, c.backward) for part, c in costs.items()}
            out[f"{name}.und_target"] = (img["und_tower"] * n * self.und_targets[name], 0.0)
        return out

    def train_flops(self, shape: BatchShape) -> float:
        """Forward + backward FLOPs of one micro-batch."""
        return sum(f * (1.0 + b) for f, b in self.parts(shape).values())
