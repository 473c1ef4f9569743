"""Attention of packed rows, described as data and computed by several backends.

A pack's attention is an :class:`AttentionSpec`: per query and per key, the sample (segment) it
belongs to, its index in sequence order and an optional block id. Query i may see key j iff

* same segment, and
* ``k_index[j] <= q_index[i]`` (causal), or both carry the same block id >= 0 (a full block, e.g. all
  tokens of one next-frequency stage see each other).

Padding has segment -1 and attends causally among padding only, so no query row is empty. Every
backend is derived from the same spec:

* ``sdpa``  - a materialised boolean mask [B, 1, Lq, Lk] for ``F.scaled_dot_product_attention``
  (CPU training: flex_attention has no backward on CPU);
* ``eager`` - the same pattern as an additive float mask (0 / -inf), softmax in float32, as
  transformers' eager attention (adding a boolean mask instead of masking was a bug: it mixed
  packed samples);
* ``flex``  - a FlexAttention ``BlockMask`` from the same rule (GPU; skips fully masked tiles);
* ``flash_attention_2`` - flash-attn varlen with ``cu_seqlens`` where the pattern allows it
  (plain causal segments, queries == keys, no KV cache); otherwise it falls back to ``sdpa``.

Rows that carry several samples waste most of a dense mask; :func:`attention` therefore runs ``sdpa``
per sample when a row's dense work is mostly masked (the ``sdpa`` default on long packed rows);
padding is then not attended at all (its output is 0, which nothing reads).

flash-attn and FlexAttention are imported only when chosen, so nothing here needs them installed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

PAD_SEGMENT = -1


@dataclass(frozen=True)
class AttentionSpec:
    """Who attends to whom in a batch of packed rows (see the module docstring)."""

    q_segments: torch.Tensor  # [B, Lq] int64, -1 = padding
    k_segments: torch.Tensor  # [B, Lk]
    q_index: torch.Tensor  # [B, Lq] int64, sequence order (causality)
    k_index: torch.Tensor  # [B, Lk]
    q_blocks: torch.Tensor | None = None  # [B, Lq] int64, -1 = causal token; None = no blocks
    k_blocks: torch.Tensor | None = None

    @classmethod
    def packed(cls, sample_ids: torch.Tensor, block_ids: torch.Tensor | None = None) -> AttentionSpec:
        """Self-attention of packed rows: causal within each sample (and full inside its blocks)."""
        B, L = sample_ids.shape
        index = torch.arange(L, device=sample_ids.device).expand(B, L)
        seg = sample_ids.long()
        if block_ids is not None and not bool((block_ids >= 0).any()):
            block_ids = None
        blocks = None if block_ids is None else block_ids.long()
        return cls(seg, seg, index, index, blocks, blocks)

    @property
    def self_attention(self) -> bool:
        """Queries are the keys (no cache, no subset): what flash-attn varlen can take."""
        return self.q_segments is self.k_segments and self.q_index is self.k_index

    @property
    def has_blocks(self) -> bool:
        return self.q_blocks is not None

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

    def gather(self, idx: torch.Tensor, valid: torch.Tensor) -> AttentionSpec:
        """Self-attention among a subset of each row's tokens (``idx`` [B, K], ``valid`` [B, K] bool).

        Kept tokens keep their segments, order indices and blocks; the filler slots of rows that keep
        fewer than K tokens become padding (segment -1) ordered after every real token, so no real
        token sees them.
        """
        seg = self.q_segments.gather(1, idx).masked_fill(~valid, PAD_SEGMENT)
        order = self.q_index.gather(1, idx)
        order = torch.where(valid, order, order.new_tensor(2**40) + torch.arange(idx.shape[1], device=idx.device))
        blocks = None
        if self.has_blocks:
            blocks = self.q_blocks.gather(1, idx).masked_fill(~valid, -1)
        return AttentionSpec(seg, seg, order, order, blocks, blocks)

    def to(self, device: torch.device) -> AttentionSpec:
        moved: dict[int, torch.Tensor] = {}  # shared tensors stay shared (``self_attention`` checks identity)

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            if id(t) not in moved:
                moved[id(t)] = t.to(device)
            return moved[id(t)]

        return replace(self, **{f: move(getattr(self, f)) for f in self.__dataclass_fields__})


# ---- backends ------------------------------------------------------------------------------
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionSpec, float], torch.Tensor]


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, L, D] -> [B, Hkv*groups, L, D] (each KV head serves ``groups`` query heads)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def sdpa_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, scale: float) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(
        q, _repeat_kv(k, groups), _repeat_kv(v, groups), attn_mask=spec.mask(), scale=scale
    )


def eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, scale: float) -> torch.Tensor:
    """Matmul, additive mask, float32 softmax (transformers' eager attention, with a correct mask)."""
    groups = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale + spec.additive_mask(q.dtype)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


# A row holding several samples computes its full L x L under a dense mask; when the allowed pairs are
# less than this share of the dense work, running each segment alone is cheaper (measured on CPU:
# scripts/bench_mod.py rows). Short rows stay dense: per-segment calls cost more than they save there.
SEGMENTED_MIN_LEN = 256
SEGMENTED_MAX_DENSITY = 0.6


def _segments_of_row(seg: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) runs of equal segment id in one row (samples are contiguous after packing)."""
    change = torch.nonzero(seg[1:] != seg[:-1]).flatten() + 1
    bounds = [0, *change.tolist(), seg.numel()]
    return list(zip(bounds[:-1], bounds[1:]))


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, scale: float) -> torch.Tensor:
    """``sdpa_dense``, or per segment when a long packed row's dense work is mostly masked."""
    L = q.shape[2]
    if not spec.self_attention or L < SEGMENTED_MIN_LEN or torch.jit.is_tracing():
        return sdpa_dense(q, k, v, spec, scale)
    runs = [[(a, b) for a, b in _segments_of_row(row) if int(row[a]) != PAD_SEGMENT] for row in spec.q_segments]
    pairs = sum((b - a) * (b - a + 1) / 2 for row in runs for a, b in row)
    if pairs > SEGMENTED_MAX_DENSITY * len(runs) * L * (L + 1) / 2:
        return sdpa_dense(q, k, v, spec, scale)
    out = torch.zeros_like(q)  # padding stays 0: nothing reads it, so no attention is computed for it
    for r, row in enumerate(runs):
        for a, b in row:
            sub = AttentionSpec.packed(
                spec.q_segments[r : r + 1, a:b], None if spec.q_blocks is None else spec.q_blocks[r : r + 1, a:b]
            )
            out[r : r + 1, :, a:b] = sdpa_dense(
                q[r : r + 1, :, a:b], k[r : r + 1, :, a:b], v[r : r + 1, :, a:b], sub, scale
            )
    return out


@functools.lru_cache(maxsize=1)
def _flex_fn() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_block_mask(spec: AttentionSpec, heads: int = 1):
    """A FlexAttention ``BlockMask`` of the spec's rule (no dense [Lq, Lk] mask is materialised)."""
    from torch.nn.attention.flex_attention import create_block_mask

    qs, ks, qi, ki = spec.q_segments, spec.k_segments, spec.q_index, spec.k_index
    qb, kb = spec._blocks() if spec.has_blocks else (None, None)

    def mask_mod(b, h, q_idx, kv_idx):
        ok = (qs[b, q_idx] == ks[b, kv_idx]) & (ki[b, kv_idx] <= qi[b, q_idx])
        if qb is not None:
            ok = ok | ((qs[b, q_idx] == ks[b, kv_idx]) & (qb[b, q_idx] == kb[b, kv_idx]) & (qb[b, q_idx] >= 0))
        return ok

    B, Lq = qs.shape
    return create_block_mask(mask_mod, B, None, Lq, ks.shape[1], device=qs.device)


def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, scale: float) -> torch.Tensor:
    """FlexAttention under the spec's block mask (GPU; CPU has no flex backward, use ``sdpa`` there)."""
    groups = q.shape[1] // k.shape[1]
    return _flex_fn()(q, k, v, block_mask=flex_block_mask(spec), scale=scale, enable_gqa=groups > 1)


def cu_seqlens(sample_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Flattened [B*L] segment boundaries (int32 cumulative lengths) and the longest segment.

    Padding runs are segments of their own; a row boundary always starts a segment.
    """
    B, L = sample_ids.shape
    flat = sample_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::L] = True
    idx = torch.nonzero(starts).flatten()
    bounds = torch.cat([idx, torch.tensor([flat.numel()], device=flat.device)]).to(torch.int32)
    return bounds, int((bounds[1:] - bounds[:-1]).max())


def flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, scale: float) -> torch.Tensor:
    """flash-attn varlen over the rows' segments; patterns it cannot express fall back to ``sdpa``."""
    if not spec.self_attention or spec.has_blocks or not q.is_cuda:
        return sdpa(q, k, v, spec, scale)
    from flash_attn import flash_attn_varlen_func  # GPU only; installed with `pip install flash-attn`

    B, H, L, D = q.shape
    cu, longest = cu_seqlens(spec.q_segments)
    flat = lambda t: t.transpose(1, 2).reshape(B * L, t.shape[1], D)  # noqa: E731
    out = flash_attn_varlen_func(flat(q), flat(k), flat(v), cu, cu, longest, longest, softmax_scale=scale, causal=True)
    return out.reshape(B, L, H, D).transpose(1, 2)


ATTENTION_BACKENDS: dict[str, AttentionFn] = {
    "sdpa": sdpa,
    "sdpa_dense": sdpa_dense,
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


# ---- compatibility helpers (masks for callers that build their own) -----------------------------
def block_causal_mask(sample_ids: torch.Tensor, block_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[B, L] sample ids -> [B, 1, L, L] bool: same sample and (j <= i, or the same block)."""
    return AttentionSpec.packed(sample_ids, block_ids).mask()
