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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

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


def batch_shape(batch: dict, num_layers: int) -> BatchShape:
    """Dense layers: every non-padding token in every layer, causal attention within each sample."""
    sid = batch["sample_ids"]
    lengths = torch.bincount(sid[sid >= 0]).double()
    tokens = int(lengths.sum())
    pairs = float((lengths * (lengths + 1) / 2).sum())
    und = batch.get("und_images")
    gen = batch.get("gen_images")
    return BatchShape(
        tokens=tokens,
        tokens_per_layer=[tokens] * num_layers,
        pairs_per_layer=[pairs] * num_layers,
        logit_tokens=int((batch["targets"] != IGNORE).sum()),
        und_images=0 if und is None else len(und),
        gen_images=0 if gen is None else len(gen),
        samples=int((lengths > 0).sum()),
    )


def _linear_macs(module: nn.Module) -> int:
    """Multiply-adds per token of every nn.Linear in ``module`` (each applied once per token)."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def _forward_flops(fn, *shapes: tuple[int, ...]) -> float:
    """Forward FLOPs of ``fn`` on fake fp32 inputs of ``shapes`` (no memory, no compute)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        inputs = [torch.rand(s) for s in shapes]
        with FlopCounterMode(display=False) as counter:
            fn(*inputs)
    return float(counter.get_total_flops())


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


class ModelFlops:
    """Per-batch training FLOPs of a :class:`mm.model.unified.UnifiedModel`; build before engines shard it."""

    def __init__(self, model: nn.Module):
        llm = model.llm
        layers = llm.get_decoder().layers
        self.num_layers = len(layers)
        self.layer_macs = [_linear_macs(layer) for layer in layers]
        cfg = llm.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.pair_macs = 2 * cfg.num_attention_heads * head_dim  # q.k and p.v per (query, key) pair
        head = llm.get_output_embeddings()
        self.head_macs = head.weight.numel() if head is not None else 0

        u = model.cfg.und
        width = llm.config.hidden_size
        self.per_image = {  # forward FLOPs for one image
            "und_tower": _forward_flops(model.und.features, (1, u.in_channels, u.image_size, u.image_size)),
            "und_aligner": _forward_flops(model.und.aligner, (1, model.und.tokens_per_image, model.und.tower.width)),
        }
        self.has_flow = "flow" in model.heads
        if self.has_flow:
            ae = model.cfg.autoencoder
            g = model.gen_tokens_per_image
            latent = (1, *model.latent_shape)
            side = model.latent_shape[1] // model.cfg.gen.patch_size
            self.per_image |= {
                "autoencoder": _forward_flops(
                    model.autoencoder.encode, (1, ae.image_channels, ae.image_size, ae.image_size)
                ),
                "time_embed": _forward_flops(model.time_embed, (1,)),
                "gen_encoder": _forward_flops(model.gen_encoder, latent, (1, width)),
                "gen_decoder": _forward_flops(
                    model.gen_decoder, (1, g, width), (1, model.cfg.gen.channels, side, side), (1, width)
                ),
                "repa_proj": _forward_flops(model.repa_proj, (1, g, width)),
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
            "attention": sum(2.0 * self.pair_macs * p for p in shape.pairs_per_layer),
            "head": 2.0 * self.head_macs * shape.logit_tokens,
            "gen_decoder": img["gen_decoder"] * n_gen,
            "repa_proj": img["repa_proj"] * n_gen if self.repa else 0.0,
            "repa_target": img["und_tower"] * n_gen if self.repa else 0.0,
        }

    def train_flops(self, shape: BatchShape) -> float:
        """Forward + backward FLOPs of one micro-batch."""
        return sum(f * (1.0 + self.bwd[k]) for k, f in self.parts(shape).items())
