"""Rotary position embedding from float32 (V2PE, fractional) positions, applied to q and k in one pass.

The decoder loop's reference path (``mm/model/decoder.py``, ``Rotary``) does, per forward (and per routed layer)::

    cos, sin = decoder.rotary_emb(embeds, positions.float())     # [B, L, D] each, in embeds' dtype
    q, k = apply_rotary_pos_emb(q, k, cos, sin)                   # the model file's own function

:func:`rotary_qk` computes the same from ``positions`` and the rotary module's ``inv_freq`` buffer and
``attention_scaling``; its fused path never materialises cos/sin (each token's angles are computed once
in the kernel and applied to all its query and key heads). The reference, :func:`rotary_qk_reference`,
is transformers' LLaMA code path step by step (``tests/test_kernels.py`` pins it against the HF
modules), including its rounding of cos/sin to the activations' dtype; the kernel keeps them in fp32,
which differs from it by bf16 rounding only.

Covered: every rope type that is "default" RoPE with another ``inv_freq`` / ``attention_scaling``
(default, linear, llama3, yarn, longrope with a fixed factor). Not covered: ``dynamic`` rope (HF updates
``inv_freq`` inside ``rotary_emb.forward`` by sequence length: read the buffer after that update) and
multimodal rope (Qwen2-VL mrope: 3-D positions).
"""

from __future__ import annotations

import torch

from mm.kernels.dispatch import kernel_module, use_kernels


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """LLaMA's rotate_half: (x1, x2) -> (-x2, x1) over the last dim."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def rotary_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF ``LlamaRotaryEmbedding.forward``: cos, sin [B, L, D] in ``dtype`` from positions [B, L]."""
    freqs = positions[..., None].float() * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * attention_scaling).to(dtype), (emb.sin() * attention_scaling).to(dtype)


def rotary_qk_reference(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pure-PyTorch reference: HF's cos/sin, then ``apply_rotary_pos_emb`` (unsqueeze_dim=1)."""
    cos, sin = rotary_cos_sin(positions, inv_freq, attention_scaling, q.dtype)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def _check(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"rotary_qk: q {tuple(q.shape)} must be [B, H, L, D] and k {tuple(k.shape)} [B, Hkv, L, D]")
    B, _, L, D = q.shape
    if D % 2 or positions.shape != (B, L) or inv_freq.shape != (D // 2,):
        raise ValueError(
            f"rotary_qk: head dim {D} must be even, positions {tuple(positions.shape)} [B, L] = {(B, L)} and "
            f"inv_freq {tuple(inv_freq.shape)} [D/2] = {(D // 2,)}"
        )


def rotary_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float = 1.0,
    impl: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B, H, L, D] and k [B, Hkv, L, D] by the angles ``positions[b, l] * inv_freq`` -> (q', k').

    ``positions``: [B, L], any dtype, used as float32 (fractional V2PE positions are kept exactly as the
    decoder passes them today: ``positions.float()``); ``inv_freq``: [D/2] float32, the rotary module's
    buffer; ``attention_scaling``: its float attribute (1.0 for default rope). q and k: same float dtype
    (fp32/bf16/fp16), any strides (the decoder's ``view(B, L, H, D).transpose(1, 2)`` is fine), outputs
    in the same dtype and memory layout. Gradients flow to q and k (not to positions or inv_freq).
    ``impl``: see ``mm/kernels/dispatch.py``.

    In the decoder (``mm/model/decoder.py: Rotary``) under ``kernels="fused"``: ``rotary_qk(q, k, positions,
    decoder.rotary_emb.inv_freq, decoder.rotary_emb.attention_scaling, impl)`` in place of ``rotary_emb`` +
    ``apply_rotary_pos_emb`` (a routed layer passes its gathered positions).
    """
    _check(q, k, positions, inv_freq)
    if not use_kernels(impl, q, k, positions, inv_freq):
        return rotary_qk_reference(q, k, positions, inv_freq, attention_scaling)
    fn = kernel_module("mm.kernels._rope_triton", q.device).RotaryQK
    return fn.apply(q, k, positions.float(), inv_freq.float().contiguous(), float(attention_scaling))
