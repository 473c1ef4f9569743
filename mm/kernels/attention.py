"""Attention of packed rows, described as data and computed by several backends.

A pack's attention is an :class:`AttentionSpec`: per query and per key, the sample (segment) it
belongs to, its index in sequence order and an optional block id. Query i may see key j iff

* same segment, and
* ``k_index[j] <= q_index[i]`` (causal), or both carry the same block id >= 0 (a full block, e.g. all
  tokens of one next-frequency stage see each other).

Padding has segment -1 and attends causally among padding only, so no query row is empty. Every
backend is derived from the same spec:

* ``sdpa``  - ``F.scaled_dot_product_attention``; long packed rows run per sample (see below),
  short ones under a materialised boolean mask [B, 1, Lq, Lk] (CPU training: flex_attention has no
  backward on CPU);
* ``eager`` - the same pattern as an additive float mask (0 / -inf), softmax in float32, as
  transformers' eager attention (adding a boolean mask instead of masking was a bug: it mixed
  packed samples);
* ``flex``  - a FlexAttention ``BlockMask`` from the same rule (GPU; skips fully masked tiles), built
  once per spec and reused by every layer that gets the same spec;
* ``flash_attention_2`` - flash-attn varlen with the spec's ``cu_seqlens`` where the pattern allows
  it (plain causal segments, queries == keys, no KV cache); otherwise it falls back to ``sdpa``.

Varlen metadata (:class:`Varlen`: each row's sample runs, ``cu_seqlens``, ``max_seqlen``) is computed
once per batch on the host (``mm.batch.collate``) and carried in the spec, so no backend reads a
device tensor back to the host inside the layer loop. A spec built from device tensors without it
computes it on first use (inference paths only).

Per-sample ``sdpa`` splits q/k/v into the row's runs and concatenates the outputs: slicing and
assigning into a preallocated output instead makes every slice's backward allocate a whole-row
gradient, which grew the per-token cost with the row length.

flash-attn and FlexAttention are imported only when chosen, so nothing here needs them installed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

PAD_SEGMENT = -1

Runs = tuple[tuple[tuple[int, int], ...], ...]  # per row: [start, end) of each real (non-padding) sample


@dataclass(frozen=True)
class Varlen:
    """Host-side layout of packed rows: computed once per batch, read by the backends without a sync."""

    runs: Runs
    length: int  # tokens per row
    cu_seqlens: torch.Tensor  # int32 over the flattened [B*L] rows; each padding run is a segment of its own
    max_seqlen: int

    @classmethod
    def from_runs(cls, runs: Runs, length: int) -> Varlen:
        bounds = [0]
        for r, row in enumerate(runs):
            base = r * length
            for a, b in row:
                if base + a > bounds[-1]:  # padding before this sample
                    bounds.append(base + a)
                bounds.append(base + b)
            if bounds[-1] < base + length:  # the row's padding tail
                bounds.append(base + length)
        lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        return cls(runs, length, torch.tensor(bounds, dtype=torch.int32), max(lengths, default=0))

    @classmethod
    def from_segments(cls, segments: torch.Tensor) -> Varlen:
        """From a [B, L] segment-id tensor (a host read: inference paths and tests)."""
        runs = []
        for row in segments.cpu().tolist():
            out, start = [], 0
            for i in range(1, len(row) + 1):
                if i == len(row) or row[i] != row[start]:
                    if row[start] != PAD_SEGMENT:
                        out.append((start, i))
                    start = i
            runs.append(tuple(out))
        return cls.from_runs(tuple(runs), segments.shape[1])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Varlen:
        return replace(self, cu_seqlens=self.cu_seqlens.to(device, non_blocking=non_blocking))

    def chunks(self, row: int) -> tuple[list[int], list[bool]]:
        """Chunk sizes covering row ``row`` in order (samples and padding gaps) and which are samples."""
        sizes, real, pos = [], [], 0
        for a, b in self.runs[row]:
            if a > pos:
                sizes.append(a - pos)
                real.append(False)
            sizes.append(b - a)
            real.append(True)
            pos = b
        if pos < self.length:
            sizes.append(self.length - pos)
            real.append(False)
        return sizes, real

    def density(self) -> float:
        """Share of the dense causal work [L x L per row] that lies inside samples."""
        L = self.length
        pairs = sum((b - a) * (b - a + 1) / 2 for row in self.runs for a, b in row)
        return pairs / max(1.0, len(self.runs) * L * (L + 1) / 2)


@dataclass(frozen=True)
class AttentionSpec:
    """Who attends to whom in a batch of packed rows (see the module docstring)."""

    q_segments: torch.Tensor  # [B, Lq] int64, -1 = padding
    k_segments: torch.Tensor  # [B, Lk]
    q_index: torch.Tensor  # [B, Lq] int64, sequence order (causality)
    k_index: torch.Tensor  # [B, Lk]
    q_blocks: torch.Tensor | None = None  # [B, Lq] int64, -1 = causal token; None = no blocks
    k_blocks: torch.Tensor | None = None
    self_attention: bool = False  # queries are the keys (no cache, no subset): what flash-attn varlen can take
    varlen: Varlen | None = None  # host-side runs of a self-attention spec (None: derived on first use)
    _memo: dict = field(default_factory=dict, compare=False, repr=False)  # derived objects (flex block mask)

    @classmethod
    def packed(
        cls, sample_ids: torch.Tensor, block_ids: torch.Tensor | None = None, varlen: Varlen | None = None
    ) -> AttentionSpec:
        """Self-attention of packed rows: causal within each sample (and full inside its blocks).

        ``block_ids`` all -1 is the same as None; pass None when the caller knows there are no blocks
        (checking costs a host read).
        """
        B, L = sample_ids.shape
        index = torch.arange(L, device=sample_ids.device).expand(B, L)
        seg = sample_ids.long()
        blocks = None if block_ids is None else block_ids.long()
        return cls(seg, seg, index, index, blocks, blocks, True, varlen)

    @property
    def has_blocks(self) -> bool:
        return self.q_blocks is not None

    def layout(self) -> Varlen:
        """The host-side runs (computed from the segments on first use when not given)."""
        if self.varlen is not None:
            return self.varlen
        if "varlen" not in self._memo:
            self._memo["varlen"] = Varlen.from_segments(self.q_segments)
        return self._memo["varlen"]

    def mask(self) -> torch.Tensor:
        """[B, 1, Lq, Lk] bool, True = may attend."""
        same = self.q_segments[:, :, None] == self.k_segments[:, None, :]
        allowed = self.k_index[:, None, :] <= self.q_index[:, :, None]
        if self.has_blocks:
            qb, kb = self._blocks()
            allowed = allowed | ((qb[:, :, None] == kb[:, None, :]) & (qb[:, :, None] >= 0))
        return (same & allowed).unsqueeze(1)

    def _blocks(self) -> tuple[torch.Tensor, torch.Tensor]:
        qb = self.q_blocks if self.q_blocks is not None else torch.full_like(self.q_segments, -1)
        kb = self.k_blocks if self.k_blocks is not None else torch.full_like(self.k_segments, -1)
        return qb, kb

    def additive_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """[B, 1, Lq, Lk] float: 0 where allowed, the dtype's minimum elsewhere (eager attention adds it)."""
        m = self.mask()
        return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, torch.finfo(dtype).min)

    # ---- derived specs (KV cache, mixture-of-depths) ---------------------------------------
    def with_cached_keys(
        self, segments: torch.Tensor, index: torch.Tensor, blocks: torch.Tensor | None
    ) -> AttentionSpec:
        """Keys = cached keys (their metadata given) followed by this step's queries."""
        q_blocks = k_blocks = None
        if self.has_blocks or blocks is not None:
            q_blocks = self.q_blocks if self.q_blocks is not None else torch.full_like(self.q_segments, -1)
            k_blocks = torch.cat([blocks if blocks is not None else torch.full_like(segments, -1), q_blocks], 1)
        k_segments = torch.cat([segments, self.q_segments], 1)
        return AttentionSpec(
            self.q_segments, k_segments, self.q_index, torch.cat([index, self.q_index], 1), q_blocks, k_blocks
        )

    def gather(self, idx: torch.Tensor, valid: torch.Tensor, varlen: Varlen | None = None) -> AttentionSpec:
        """Self-attention among a subset of each row's tokens (``idx`` [B, K], ``valid`` [B, K] bool).

        Kept tokens keep their segments, order indices and blocks; the filler slots of rows that keep
        fewer than K tokens become padding (segment -1) ordered after every real token, so no real
        token sees them. ``varlen``: the subset's runs when the caller knows them on the host.
        """
        seg = self.q_segments.gather(1, idx).masked_fill(~valid, PAD_SEGMENT)
        order = self.q_index.gather(1, idx)
        order = torch.where(valid, order, order.new_tensor(2**40) + torch.arange(idx.shape[1], device=idx.device))
        blocks = None
        if self.has_blocks:
            blocks = self.q_blocks.gather(1, idx).masked_fill(~valid, -1)
        return AttentionSpec(seg, seg, order, order, blocks, blocks, True, varlen)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> AttentionSpec:
        moved: dict[int, torch.Tensor] = {}  # shared tensors stay shared

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            if id(t) not in moved:
                moved[id(t)] = t.to(device, non_blocking=non_blocking)
            return moved[id(t)]

        names = ("q_segments", "k_segments", "q_index", "k_index", "q_blocks", "k_blocks")
        varlen = None if self.varlen is None else self.varlen.to(device, non_blocking)
        return replace(self, **{n: move(getattr(self, n)) for n in names}, varlen=varlen, _memo={})


# ---- backends ------------------------------------------------------------------------------
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionSpec, float], torch.Tensor]


def sdpa_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, scale: float) -> torch.Tensor:
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=spec.mask(), scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


def eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, scale: float) -> torch.Tensor:
    """Matmul, additive mask, float32 softmax (transformers' eager attention, with a correct mask)."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # each KV head serves ``groups`` query heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale + spec.additive_mask(q.dtype)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


# A row holding several samples computes its full L x L under a dense mask; when the allowed pairs are
# less than this share of the dense work, running each sample alone is cheaper (measured on CPU:
# scripts/bench_mod.py rows). Short rows stay dense: per-sample calls cost more than they save there.
SEGMENTED_MIN_LEN = 256
SEGMENTED_MAX_DENSITY = 0.6


def _chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: torch.Tensor | None, scale: float):
    """One sample's attention: causal, or causal plus its full blocks (a small mask)."""
    gqa = q.shape[1] != k.shape[1]
    if blocks is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    n = q.shape[2]
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    b = blocks[0]
    mask = causal | ((b[:, None] == b[None, :]) & (b[:, None] >= 0))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def sdpa_segmented(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, scale: float
) -> torch.Tensor:
    """Each sample of each row alone (split, attend, concatenate); padding outputs are 0 (nothing reads them)."""
    layout = spec.layout()
    rows = []
    for r, (qr, kr, vr) in enumerate(zip(q.split(1), k.split(1), v.split(1))):
        sizes, real = layout.chunks(r)
        qs, ks, vs = qr.split(sizes, 2), kr.split(sizes, 2), vr.split(sizes, 2)
        bs = spec.q_blocks[r : r + 1].split(sizes, 1) if spec.has_blocks else [None] * len(sizes)
        outs = [
            _chunk(qc, kc, vc, bc, scale) if is_real else torch.zeros_like(qc)
            for qc, kc, vc, bc, is_real in zip(qs, ks, vs, bs, real)
        ]
        rows.append(torch.cat(outs, 2) if len(outs) > 1 else outs[0])
    return torch.cat(rows, 0) if len(rows) > 1 else rows[0]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, scale: float) -> torch.Tensor:
    """``sdpa_dense``, or per sample when a long packed row's dense work is mostly masked."""
    L = q.shape[2]
    if not spec.self_attention or L < SEGMENTED_MIN_LEN or torch.jit.is_tracing():
        return sdpa_dense(q, k, v, spec, scale)
    if spec.layout().density() > SEGMENTED_MAX_DENSITY:
        return sdpa_dense(q, k, v, spec, scale)
    return sdpa_segmented(q, k, v, spec, scale)


@functools.lru_cache(maxsize=1)
def _flex_fn() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_block_mask(spec: AttentionSpec, heads: int = 1):
    """A FlexAttention ``BlockMask`` of the spec's rule (no dense [Lq, Lk] mask is materialised); built
    once per spec object and reused by every layer that receives the same spec."""
    if "flex" in spec._memo:
        return spec._memo["flex"]
    from torch.nn.attention.flex_attention import create_block_mask

    qs, ks, qi, ki = spec.q_segments, spec.k_segments, spec.q_index, spec.k_index
    qb, kb = spec._blocks() if spec.has_blocks else (None, None)

    def mask_mod(b, h, q_idx, kv_idx):
        ok = (qs[b, q_idx] == ks[b, kv_idx]) & (ki[b, kv_idx] <= qi[b, q_idx])
        if qb is not None:
            ok = ok | ((qs[b, q_idx] == ks[b, kv_idx]) & (qb[b, q_idx] == kb[b, kv_idx]) & (qb[b, q_idx] >= 0))
        return ok

    B, Lq = qs.shape
    spec._memo["flex"] = create_block_mask(mask_mod, B, None, Lq, ks.shape[1], device=qs.device)
    return spec._memo["flex"]


def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, scale: float) -> torch.Tensor:
    """FlexAttention under the spec's block mask (GPU; CPU has no flex backward, use ``sdpa`` there)."""
    groups = q.shape[1] // k.shape[1]
    return _flex_fn()(q, k, v, block_mask=flex_block_mask(spec), scale=scale, enable_gqa=groups > 1)


def cu_seqlens(sample_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Flattened [B*L] segment boundaries (int32 cumulative lengths) and the longest segment.

    Padding runs are segments of their own; a row boundary always starts a segment.
    """
    v = Varlen.from_segments(sample_ids)
    return v.cu_seqlens.to(sample_ids.device), v.max_seqlen


def flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, scale: float) -> torch.Tensor:
    """flash-attn varlen over the rows' segments; patterns it cannot express fall back to ``sdpa``."""
    if not spec.self_attention or spec.has_blocks or not q.is_cuda:
        return sdpa(q, k, v, spec, scale)
    from flash_attn import flash_attn_varlen_func  # GPU only; installed with `pip install flash-attn`

    B, H, L, D = q.shape
    layout = spec.layout()
    cu = layout.cu_seqlens.to(q.device, non_blocking=True)
    flat = lambda t: t.transpose(1, 2).reshape(B * L, t.shape[1], D)  # noqa: E731
    longest = layout.max_seqlen
    out = flash_attn_varlen_func(flat(q), flat(k), flat(v), cu, cu, longest, longest, softmax_scale=scale, causal=True)
    return out.reshape(B, L, H, D).transpose(1, 2)


ATTENTION_BACKENDS: dict[str, AttentionFn] = {
    "sdpa": sdpa,
    "sdpa_dense": sdpa_dense,
    "sdpa_segmented": sdpa_segmented,
    "eager": eager,
    "flex": flex,
    "flash_attention_2": flash_varlen,
}


def attention(
    backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, scale: float
) -> torch.Tensor:
    """[B, H, Lq, D] queries against [B, Hkv, Lk, D] keys/values under ``spec`` -> [B, H, Lq, D]."""
    try:
        fn = ATTENTION_BACKENDS[backend]
    except KeyError:
        raise KeyError(f"attention backend {backend!r}; known: {sorted(ATTENTION_BACKENDS)}") from None
    return fn(q, k, v, spec, scale)


def block_causal_mask(sample_ids: torch.Tensor, block_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[B, L] sample ids -> [B, 1, L, L] bool: same sample and (j <= i, or the same block)."""
    return AttentionSpec.packed(sample_ids, block_ids).mask()
