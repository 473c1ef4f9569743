"""p-MoD mixture-of-depths routing: which tokens a routed decoder layer processes, and their weights.

The math only; the decoder loop (``mm/model/decoder.py``) calls it per layer:

* :func:`layer_ratios` - the progressive ratio decay: layer l of L keeps
  ``cos(l*pi/(L-1))/2 + 0.5 (+shift)`` of each sample's routable tokens; layers above
  ``dense_above`` stay dense (1.0), the rest clamp at ``min_ratio``.
* :class:`TokenRouter` - Linear(hidden -> 1), zero-initialised, so every weight is 1 at start and the
  model begins as the dense model with tokens kept by position.
* :func:`tanh_norm` - TanhNorm: ``w = scale * tanh(r) + 1``.
* :func:`select_tokens` - per-sample top-k inside packed rows (a sort-based segmented top-k, no loop).
* :func:`string_combine` - STRing: kept tokens carry ``x + Attn + w*MLP`` (computed by the loop on the
  kept tokens only), skipped tokens become ``w*x``; the router gets gradient from both. The loop itself
  uses its sync-free form on the gathered [B, K, D] output, ``mm.kernels.mod.string_scatter`` (reference
  and Triton kernel; ``tests/test_kernels.py`` pins it to this function).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mm.kernels.attention import Varlen
from mm.schema import ConfigError
from mm.sequence import TOKEN_KINDS


@dataclass
class MoDConfig:
    """p-MoD mixture-of-depths: routed layers skip low-scoring tokens of the routable kinds.

    Layer l of L keeps ``ratio_l = cos(l*pi/(L-1))/2 + 0.5 + shift`` of each sample's routable
    tokens (shifted cosine); layers with a ratio above ``dense_above`` stay dense; ratios clamp at
    ``min_ratio``. ``enabled=False`` (or every ratio 1.0) is the dense model exactly.
    """

    enabled: bool = False
    routable_kinds: tuple[str, ...] = ("und_image",)  # keys of mm.sequence.TOKEN_KINDS
    dense_above: float = 0.85
    min_ratio: float = 0.15
    shift: float = 0.0  # added to the cosine before clamping (the paper: 0)
    ratio: float = 0.0  # > 0: one fixed ratio for every layer instead of the schedule (tests, ablations)
    tanh_scale: float = 0.2  # TanhNorm: w = tanh_scale * tanh(r) + 1

    def __post_init__(self) -> None:
        unknown = [k for k in self.routable_kinds if k not in TOKEN_KINDS]
        if unknown:
            raise ConfigError(f"model.mod.routable_kinds: unknown token kinds {unknown}; known: {sorted(TOKEN_KINDS)}")
        if not 0 < self.min_ratio <= 1 or not 0 <= self.ratio <= 1:
            raise ConfigError("model.mod.min_ratio must be in (0, 1] and model.mod.ratio in [0, 1]")


# floor(n * ratio) is computed with this slack so that ratios that are exact in decimal (0.29 * 100)
# keep the count a person expects despite binary rounding (28.999999999999996 -> 29); it is far below
# 1 / n for any sequence length, so it never adds a token otherwise. The FLOPs accounting uses the
# same :func:`kept_count`, so analytic and routed counts agree.
_FLOOR_SLACK = 1e-9


def layer_ratios(num_layers: int, cfg: MoDConfig) -> list[float]:
    """Per-layer share of each sample's routable tokens a layer keeps; 1.0 = a dense layer.

    ``cfg.enabled=False`` gives all 1.0; ``cfg.ratio > 0`` that ratio on every layer (1.0 = dense).
    Otherwise the shifted cosine of p-MoD: for 32 layers, layers 0-7 dense, then 0.844 at layer 8
    down to the 0.15 floor; mean retention 0.5375.
    """
    if num_layers < 1:
        raise ValueError(f"layer_ratios: num_layers must be >= 1, got {num_layers}")
    if not 0 < cfg.min_ratio <= 1 or not 0 <= cfg.ratio <= 1:
        raise ValueError(
            f"model.mod.min_ratio must be in (0, 1] (got {cfg.min_ratio}) and model.mod.ratio in [0, 1] "
            f"(got {cfg.ratio})"
        )
    if not cfg.enabled:
        return [1.0] * num_layers
    if cfg.ratio > 0:
        return [float(cfg.ratio)] * num_layers
    ratios = []
    for layer in range(num_layers):
        # one layer: cos(0) = 1, dense (the schedule needs L >= 2 to decay at all)
        r = math.cos(layer * math.pi / (num_layers - 1)) / 2 + 0.5 if num_layers > 1 else 1.0
        r += cfg.shift
        ratios.append(1.0 if r > cfg.dense_above else min(1.0, max(r, cfg.min_ratio)))
    return ratios


def kept_count(n_routable: int, ratio: float) -> int:
    """Routable tokens a sample keeps in a layer of ``ratio``: floor(n * ratio)."""
    return n_routable if ratio >= 1.0 else math.floor(n_routable * ratio + _FLOOR_SLACK)


def routable_kind_ids(kinds: Sequence[str]) -> list[int]:
    """``MoDConfig.routable_kinds`` (names) -> the ``TOKEN_*`` ids of ``batch["token_kinds"]``."""
    unknown = [k for k in kinds if k not in TOKEN_KINDS]
    if unknown:
        raise KeyError(f"model.mod.routable_kinds: unknown token kinds {unknown}; known: {sorted(TOKEN_KINDS)}")
    return [TOKEN_KINDS[k] for k in kinds]


def routable_mask(token_kinds: torch.Tensor, sample_ids: torch.Tensor, kinds: Sequence[str]) -> torch.Tensor:
    """[B, L] bool: tokens of the routable kinds that belong to a sample (padding never routes)."""
    mask = torch.zeros_like(sample_ids, dtype=torch.bool)
    for kind in routable_kind_ids(kinds):
        mask |= token_kinds == kind
    return mask & (sample_ids >= 0)


class TokenRouter(nn.Module):
    """Linear(hidden -> 1) scoring each token; zero-initialised so all weights start at exactly 1."""

    def __init__(self, hidden: int):
        super().__init__()
        self.proj = nn.Linear(hidden, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., D] -> float32 scores [...]. In fp32 even under autocast: the top-k compares these, and
        bf16's 8 mantissa bits would turn close scores into ties."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            w, b = self.proj.weight.float(), self.proj.bias.float()
            return torch.nn.functional.linear(x.float(), w, b).squeeze(-1)


def tanh_norm(scores: torch.Tensor, scale: float) -> torch.Tensor:
    """TanhNorm: ``w = scale * tanh(r) + 1``, in (1 - scale, 1 + scale); 1 where r = 0."""
    return scale * torch.tanh(scores) + 1.0


def select_tokens(scores: torch.Tensor, routable: torch.Tensor, sample_ids: torch.Tensor, ratio: float) -> torch.Tensor:
    """Per-sample top-k inside packed rows -> keep [B, L] bool.

    Each sample keeps its top ``floor(n_routable * ratio)`` routable tokens by score (ties: the earlier
    position first); every other token (text, generation tokens, padding with ``sample_ids == -1``)
    is kept. A sample is a run of equal ``sample_ids`` within a row, as packing lays samples out, so
    ids may repeat across rows. Vectorised: two stable sorts over the flattened batch, no host sync.
    """
    if scores.dim() != 2 or scores.shape != routable.shape or scores.shape != sample_ids.shape:
        raise ValueError(
            f"select_tokens: scores {tuple(scores.shape)}, routable {tuple(routable.shape)} and sample_ids "
            f"{tuple(sample_ids.shape)} must all be [B, L]"
        )
    if routable.dtype != torch.bool:
        raise TypeError(f"select_tokens: routable must be bool, got {routable.dtype}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"select_tokens: ratio must be in [0, 1], got {ratio}")
    if ratio >= 1.0:
        return torch.ones_like(routable)
    B, L = scores.shape
    n = B * L
    device = scores.device
    routable = routable & (sample_ids >= 0)
    # segments: a new one at each row start and wherever the sample id changes along the row
    start = torch.ones_like(routable)
    start[:, 1:] = sample_ids[:, 1:] != sample_ids[:, :-1]
    start = start.reshape(-1)
    seg = torch.cumsum(start.long(), 0) - 1  # [N] segment index, non-decreasing in flat order
    idx = torch.arange(n, device=device)
    seg_start = torch.cummax(torch.where(start, idx, torch.zeros_like(idx)), 0).values  # first flat index
    flat_routable = routable.reshape(-1)
    # routable tokens per segment and how many each keeps
    n_routable = torch.zeros(n, dtype=torch.float64, device=device).index_add_(0, seg, flat_routable.double())
    k = torch.floor(n_routable * ratio + _FLOOR_SLACK).long()
    # order: by score (descending, stable: ties keep position order), then stably by (segment,
    # routable first). A segment occupies the same index range [start, end) before and after the
    # sort, so a token's rank within its segment is its sorted index minus the segment's start.
    by_score = torch.sort(scores.reshape(-1).float(), descending=True, stable=True).indices
    group = seg * 2 + (~flat_routable).long()
    order = by_score[torch.sort(group[by_score], stable=True).indices]
    rank = torch.empty_like(idx)
    rank[order] = idx - seg_start
    keep = ~flat_routable | (rank < k[seg])
    return keep.reshape(B, L)


def string_combine(
    x_full: torch.Tensor, kept_out: torch.Tensor, keep: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """STRing output of a routed layer -> [B, L, D].

    ``kept_out`` [n_kept, D] holds the kept tokens' outputs ``x + Attn + w*MLP`` in the order of
    ``x_full[keep]``; skipped tokens become ``w * x``. ``weights`` is read here only where a token
    is skipped (always a routable one); the caller applies w to the kept tokens' MLP output, with
    w = 1 for non-routable tokens (p-MoD reweights only the routed kind).
    """
    if x_full.dim() != 3 or keep.shape != x_full.shape[:2] or weights.shape != keep.shape:
        raise ValueError(
            f"string_combine: x_full {tuple(x_full.shape)} must be [B, L, D] with keep {tuple(keep.shape)} "
            f"and weights {tuple(weights.shape)} both [B, L]"
        )
    if kept_out.dim() != 2 or kept_out.shape[1] != x_full.shape[2]:
        raise ValueError(f"string_combine: kept_out {tuple(kept_out.shape)} must be [n_kept, {x_full.shape[2]}]")
    skipped = weights.unsqueeze(-1).to(x_full.dtype) * x_full
    # index_put (out of place) writes the kept rows; the count must match keep, or it raises
    return skipped.index_put((keep,), kept_out.to(x_full.dtype))


class MoDRouters(nn.Module):
    """The routers of one decoder: a :class:`TokenRouter` per routed layer (ratio < 1), keyed by str(layer)."""

    def __init__(self, num_layers: int, hidden: int, cfg: MoDConfig):
        super().__init__()
        self.cfg = cfg
        self.ratios = layer_ratios(num_layers, cfg)
        self.routers = nn.ModuleDict({str(i): TokenRouter(hidden) for i, r in enumerate(self.ratios) if r < 1.0})

    def routed(self, layer: int) -> bool:
        if not 0 <= layer < len(self.ratios):
            raise IndexError(f"MoDRouters: layer {layer} outside 0..{len(self.ratios) - 1}")
        return str(layer) in self.routers

    def __getitem__(self, layer: int) -> TokenRouter:
        if not self.routed(layer):
            raise KeyError(f"MoDRouters: layer {layer} is dense (ratio 1.0) and has no router")
        return self.routers[str(layer)]


@dataclass(frozen=True)
class LayerPlan:
    """What a routed layer's gather needs from the host: the widest row's kept count and the kept runs."""

    width: int  # K: tokens gathered per row (the largest row's kept count)
    varlen: Varlen  # runs of the kept tokens of each sample in the gathered order


def plan_layers(
    spans: Sequence[Sequence], length: int, routable_ids: Sequence[int], ratios: Sequence[float]
) -> dict[int, LayerPlan]:
    """Per routed layer (ratio < 1): the gathered layout of packed rows, from the host-side spans.

    ``spans``: per row, the samples' ``mm.batch.Span`` s (start, length, token count per kind). A sample
    keeps its non-routable tokens and ``floor(n_routable * ratio)`` routable ones (:func:`kept_count`,
    exactly what :func:`select_tokens` keeps); padding is never routable, so it is kept in place.
    """
    plans = {}
    for layer, ratio in enumerate(ratios):
        if ratio >= 1.0:
            continue
        runs, widest = [], 0
        for row in spans:
            pos, out, cursor = 0, [], 0  # cursor: tokens of the row consumed; pos: gathered position
            for s in row:
                pos += s.start - cursor  # padding before the sample stays (it is not routable)
                n_r = sum(s.kinds[k] for k in routable_ids)
                kept = s.length - n_r + kept_count(n_r, ratio)
                out.append((pos, pos + kept))
                pos, cursor = pos + kept, s.start + s.length
            pos += length - cursor
            runs.append(tuple(out))
            widest = max(widest, pos)
        plans[layer] = LayerPlan(widest, Varlen.from_runs(tuple(runs), widest))
    return plans


@dataclass
class Routing:
    """p-MoD for one forward pass: the routers, which tokens may be routed, and (when known) the host plan."""

    routers: MoDRouters
    routable: torch.Tensor  # [B, L] bool
    plans: dict[int, LayerPlan] | None = None  # None: derived on the device with a host read per layer
