"""Triton kernel of :func:`mm.kernels.rope.rotary_qk`: cos/sin from float32 positions, applied to q and k.

Imported only when the fused path runs (see ``mm/kernels/dispatch.py``). One program per token
(b, l): it computes ``angle = position * inv_freq`` for the D/2 frequencies once, in fp32, and rotates
all H query heads and Hkv key heads of that token with it, so cos/sin never exist in memory.
Everything is computed in fp32; only loads and stores use the tensors' dtypes.

LLaMA's rotate_half convention (dims i and i + D/2 pair up, ``emb = cat(freqs, freqs)``):

    out[:D/2] = x[:D/2] * cos - x[D/2:] * sin
    out[D/2:] = x[D/2:] * cos + x[:D/2] * sin

The backward is the transposed rotation, i.e. the same kernel with sin negated (``BACKWARD``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(src, dst, src_sh, dst_sh, n_heads, cos, sin, d, d_mask, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rotate the [n_heads, D] slice of one token at ``src`` into ``dst`` (cos/sin: [BLOCK_HALF] fp32)."""
    h = tl.arange(0, BLOCK_H)
    mask = (h[:, None] < n_heads) & d_mask[None, :]
    src_off = h[:, None] * src_sh + d[None, :]
    dst_off = h[:, None] * dst_sh + d[None, :]
    x1 = tl.load(src + src_off, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + src_off + HALF, mask=mask, other=0.0).to(tl.float32)
    c = cos[None, :]
    s = sin[None, :]
    out_ty = dst.dtype.element_ty
    tl.store(dst + dst_off, (x1 * c - x2 * s).to(out_ty), mask=mask)
    tl.store(dst + dst_off + HALF, (x2 * c + x1 * s).to(out_ty), mask=mask)


@triton.jit
def _rotary_qk_kernel(
    q, k, q_out, k_out, pos, inv_freq, scaling,
    seq_len, n_q_heads, n_k_heads,
    q_sb, q_sh, q_sl, k_sb, k_sh, k_sl,
    qo_sb, qo_sh, qo_sl, ko_sb, ko_sh, ko_sl,
    pos_sb, pos_sl,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    BACKWARD: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    b = token // seq_len
    l = token % seq_len  # noqa: E741
    p = tl.load(pos + b * pos_sb + l * pos_sl).to(tl.float32)
    d = tl.arange(0, BLOCK_HALF)
    d_mask = d < HALF
    angle = p * tl.load(inv_freq + d, mask=d_mask, other=0.0).to(tl.float32)  # as HF: position * inv_freq in fp32
    cos = tl.cos(angle) * scaling
    sin = tl.sin(angle) * scaling
    if BACKWARD:
        sin = -sin
    _rotate_heads(
        q + b * q_sb + l * q_sl, q_out + b * qo_sb + l * qo_sl, q_sh, qo_sh, n_q_heads, cos, sin, d, d_mask,
        HALF, BLOCK_HQ,
    )  # fmt: skip
    _rotate_heads(
        k + b * k_sb + l * k_sl, k_out + b * ko_sb + l * ko_sl, k_sh, ko_sh, n_k_heads, cos, sin, d, d_mask,
        HALF, BLOCK_HK,
    )  # fmt: skip


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def launch(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float, backward: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B, H, L, D] and k [B, Hkv, L, D] (any strides with a unit last stride) -> new tensors
    laid out like the inputs (``empty_like`` keeps the [B, L, H, D] memory order of a transposed view)."""
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    B, H, L, D = q.shape
    Hk = k.shape[1]
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    if q_out.stride(-1) != 1 or k_out.stride(-1) != 1:  # a non-dense input: empty_like fell back to contiguous
        q_out, k_out = q_out.contiguous(), k_out.contiguous()
    half = D // 2
    _rotary_qk_kernel[(B * L,)](
        q, k, q_out, k_out, positions, inv_freq, float(scaling),
        L, H, Hk,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2),
        positions.stride(0), positions.stride(1),
        HALF=half, BLOCK_HALF=triton.next_power_of_2(half), BLOCK_HQ=triton.next_power_of_2(H),
        BLOCK_HK=triton.next_power_of_2(Hk), BACKWARD=backward,
    )  # fmt: skip
    return q_out, k_out


class RotaryQK(torch.autograd.Function):
    """Autograd of the fused rotary; positions and inv_freq get no gradient (data and a fixed buffer)."""

    @staticmethod
    def forward(ctx, q, k, positions, inv_freq, scaling):  # type: ignore[override]
        ctx.save_for_backward(positions, inv_freq)
        ctx.scaling = scaling
        return launch(q, k, positions, inv_freq, scaling, backward=False)

    @staticmethod
    def backward(ctx, grad_q, grad_k):  # type: ignore[override]
        positions, inv_freq = ctx.saved_tensors
        dq, dk = launch(grad_q, grad_k, positions, inv_freq, ctx.scaling, backward=True)
        return dq, dk, None, None, None
