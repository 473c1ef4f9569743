"""Triton kernels of :mod:`mm.kernels.mod`: the p-MoD gather of kept tokens and the STRing scatter back.

Imported only when the fused path runs (see ``mm/kernels/dispatch.py``). Indices are read on the
device; nothing here synchronises with the host. Arithmetic is fp32; loads and stores use the
tensors' dtypes.

Precondition (true of ``argsort(...)[:, :K]`` as the decoder builds ``order``): each row of ``order``
holds distinct token indices in [0, L). The backward of the gather and the scatter's slot map write
each token at most once, so they need no atomics; duplicate indices would lose gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_MAX_BLOCK_D = 1024  # columns per program; wider rows loop (gather/scatter) or tile the grid


@triton.jit
def _copy_rows_kernel(src, dst, order, n_kept, seq_len, dim, GATHER: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (b*K + j, column tile): GATHER copies src[b, order[b, j]] -> dst[b, j]; else the reverse
    (the gather's backward into a zeroed dst)."""
    slot = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < dim
    b = slot // n_kept
    tok = tl.load(order + slot).to(tl.int64)
    kept_off = slot * dim + cols
    full_off = (b * seq_len + tok) * dim + cols
    if GATHER:
        tl.store(dst + kept_off, tl.load(src + full_off, mask=mask), mask=mask)
    else:
        tl.store(dst + full_off, tl.load(src + kept_off, mask=mask), mask=mask)


@triton.jit
def _string_fwd_kernel(x, kept, slot_map, w, out, n_kept, seq_len, dim, BLOCK_D: tl.constexpr):
    """Program (b*L + l, column tile): out = kept[b, slot] if token l is kept at slot, else w * x."""
    tok = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < dim
    b = tok // seq_len
    slot = tl.load(slot_map + tok).to(tl.int64)
    is_kept = slot >= 0
    kept_off = (b * n_kept + tl.maximum(slot, 0)) * dim + cols
    kv = tl.load(kept + kept_off, mask=mask & is_kept, other=0.0).to(tl.float32)
    xv = tl.load(x + tok * dim + cols, mask=mask & (slot < 0), other=0.0).to(tl.float32)
    wv = tl.load(w + tok).to(tl.float32)
    y = tl.where(is_kept, kv, wv * xv)
    tl.store(out + tok * dim + cols, y.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _string_bwd_kernel(
    grad, x, slot_map, w, dx, dkept, dw, n_kept, seq_len, dim, BLOCK_D: tl.constexpr
):  # fmt: skip
    """Program b*L + l: a kept token routes grad to dkept[b, slot] (dx = dw = 0 there); a skipped one
    gets dx = w * grad and dw = sum(grad * x). One program per token so dw needs no atomics."""
    tok = tl.program_id(0).to(tl.int64)
    b = tok // seq_len
    slot = tl.load(slot_map + tok).to(tl.int64)
    is_kept = slot >= 0
    wv = tl.load(w + tok).to(tl.float32)
    kept_base = (b * n_kept + tl.maximum(slot, 0)) * dim
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for start in range(0, dim, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        mask = cols < dim
        g = tl.load(grad + tok * dim + cols, mask=mask, other=0.0).to(tl.float32)
        xv = tl.load(x + tok * dim + cols, mask=mask & (slot < 0), other=0.0).to(tl.float32)
        tl.store(dkept + kept_base + cols, g.to(dkept.dtype.element_ty), mask=mask & is_kept)
        tl.store(dx + tok * dim + cols, tl.where(is_kept, 0.0, wv * g).to(dx.dtype.element_ty), mask=mask)
        acc += g * xv  # xv is 0 for a kept token
    tl.store(dw + tok, tl.sum(acc, axis=0).to(dw.dtype.element_ty))


def _block(dim: int) -> int:
    return min(_MAX_BLOCK_D, triton.next_power_of_2(dim))


def copy_rows(src: torch.Tensor, order: torch.Tensor, seq_len: int, gather: bool) -> torch.Tensor:
    """gather: src [B, L, D] -> [B, K, D]; scatter (gather's backward): src [B, K, D] -> [B, L, D] zeros
    except at the gathered tokens."""
    src, order = src.contiguous(), order.contiguous()
    B, K = order.shape
    D = src.shape[-1]
    dst = src.new_empty(B, K, D) if gather else src.new_zeros(B, seq_len, D)
    block = _block(D)
    _copy_rows_kernel[(B * K, triton.cdiv(D, block))](src, dst, order, K, seq_len, D, GATHER=gather, BLOCK_D=block)
    return dst


class GatherKept(torch.autograd.Function):
    """x [B, L, D], order [B, K] -> x[b, order[b, j]] as [B, K, D]; the gradient goes back to x."""

    @staticmethod
    def forward(ctx, x, order):  # type: ignore[override]
        ctx.save_for_backward(order)
        ctx.seq_len = x.shape[1]
        return copy_rows(x, order, x.shape[1], gather=True)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (order,) = ctx.saved_tensors
        return copy_rows(grad, order, ctx.seq_len, gather=False), None


def slot_map(order: torch.Tensor, valid: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[B, L] int32: the slot j where token l sits among the kept ones (order[b, j] = l, valid), else -1.

    Filler slots (``valid`` False) write -1 at their token, which no kept slot shares (distinct order)."""
    B, K = order.shape
    slots = torch.arange(K, device=order.device, dtype=torch.int32).expand(B, K)
    src = torch.where(valid, slots, torch.full_like(slots, -1))
    return torch.full((B, seq_len), -1, device=order.device, dtype=torch.int32).scatter_(1, order, src)


class StringScatter(torch.autograd.Function):
    """STRing combine: kept tokens take the layer output, every other token ``w * x``."""

    @staticmethod
    def forward(ctx, x, kept_out, order, valid, weights):  # type: ignore[override]
        x, kept_out, weights = x.contiguous(), kept_out.contiguous(), weights.contiguous()
        B, L, D = x.shape
        K = order.shape[1]
        slots = slot_map(order, valid, L)
        out = torch.empty_like(x)
        block = _block(D)
        _string_fwd_kernel[(B * L, triton.cdiv(D, block))](x, kept_out, slots, weights, out, K, L, D, BLOCK_D=block)
        ctx.save_for_backward(x, slots, weights)
        ctx.kept_shape, ctx.kept_dtype = kept_out.shape, kept_out.dtype
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, slots, weights = ctx.saved_tensors
        grad = grad.contiguous()
        B, L, D = x.shape
        dx = torch.empty_like(x)
        dkept = torch.zeros(ctx.kept_shape, dtype=ctx.kept_dtype, device=x.device)  # filler slots stay 0
        dw = torch.empty_like(weights)
        _string_bwd_kernel[(B * L,)](grad, x, slots, weights, dx, dkept, dw, ctx.kept_shape[1], L, D, BLOCK_D=_block(D))
        return dx, dkept, None, None, dw
