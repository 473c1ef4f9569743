"""Attention dispatch for packed rows.

A pack is described by ``sample_ids`` [B, L] (-1 = padding). Each backend gets
what it needs to keep samples apart:

* ``sdpa`` / ``eager`` (CPU and GPU): a materialised block-diagonal causal
  boolean mask [B, 1, L, L]. flex_attention has no backward on CPU, so CPU
  training uses this path.
* ``flash_attention_2`` (GPU): the batch is flattened to one row and the
  sample boundaries go in as varlen metadata (``cu_seq_lens_*``), which
  transformers forwards to flash-attn. Passing them explicitly matters:
  without them transformers infers boundaries from position-id jumps, which
  fractional (V2PE) positions break.

flash-attn is imported by transformers only when that backend is chosen, so
nothing here needs it installed.
"""

from __future__ import annotations

import torch

MASK_BACKENDS = ("sdpa", "eager")
VARLEN_BACKENDS = ("flash_attention_2", "flash_attention_3")


def block_causal_mask(sample_ids: torch.Tensor, block_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[B, L] sample ids -> [B, 1, L, L] bool: query i may see key j iff same sample and j <= i.

    ``block_ids`` [B, L] (-1 = ordinary causal token): tokens of one sample with the same block
    id >= 0 also see each other whatever their order (a full block: one NFIG stage).
    """
    L = sample_ids.shape[-1]
    same = sample_ids[:, :, None] == sample_ids[:, None, :]
    see = torch.ones(L, L, dtype=torch.bool, device=sample_ids.device).tril()
    if block_ids is not None:
        if block_ids.shape != sample_ids.shape:
            raise ValueError(f"block_ids {list(block_ids.shape)} must match sample_ids {list(sample_ids.shape)}")
        see = see | ((block_ids[:, :, None] == block_ids[:, None, :]) & (block_ids[:, :, None] >= 0))
    return (same & see).unsqueeze(1)


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


def packed_attention_inputs(
    backend: str,
    embeds: torch.Tensor,
    position_ids: torch.Tensor,
    sample_ids: torch.Tensor,
    block_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(embeds, position_ids, extra kwargs) for a transformers decoder under ``backend``."""
    if backend in MASK_BACKENDS:
        return embeds, position_ids, {"attention_mask": block_causal_mask(sample_ids, block_ids)}
    if backend in VARLEN_BACKENDS:
        if block_ids is not None and bool((block_ids >= 0).any()):
            raise ValueError(
                f"attention backend {backend!r} is causal within each varlen segment and cannot express the full "
                "blocks of block_ids (the next-frequency head's stages); use sdpa or eager"
            )
        B, L, D = embeds.shape
        cu, longest = cu_seqlens(sample_ids)
        kwargs = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
        return embeds.reshape(1, B * L, D), position_ids.reshape(1, B * L), kwargs
    raise KeyError(f"attention backend {backend!r}; known: {MASK_BACKENDS + VARLEN_BACKENDS}")
