"""p-MoD inside packed rows: gather each row's kept tokens to the front, scatter the layer's output back.

A routed layer (``_routed_layer`` in ``mm/model/decoder.py``) builds, without host synchronisation::

    keep  = select_tokens(...)                                   # [B, L] bool
    K     = plan.width  (else int(keep.sum(1).max()))          # from the host plan: no sync
    order = argsort((~keep).to(int8), dim=1, stable=True)[:, :K] # [B, K] kept tokens first, in order
    valid = arange(K)[None] < keep.sum(1)[:, None]               # [B, K] False = filler slot

then runs the layer on ``x`` gathered by ``order`` and combines (STRing): kept tokens carry the layer's
output ``x + Attn + w*MLP`` (w applied by the layer), every other token becomes ``w * x`` (w is the
TanhNorm weight of a routable token, 1 for the others).

* :func:`gather_kept` - x [B, L, D] -> [B, K, D] (``x.gather`` by ``order``); gradient back to x.
* :func:`string_scatter` - (x [B, L, D], kept_out [B, K, D], order, valid, w [B, L]) -> [B, L, D]:
  ``w * x`` everywhere, ``kept_out[b, j]`` at token ``order[b, j]`` for valid j; gradients to x,
  kept_out (0 at filler slots) and w. ``routing.string_combine(x, out[valid], keep, w)`` needs
  ``out[valid]`` and ``index_put`` with a bool mask, both host syncs; this takes the [B, K, D]
  output as it comes out of the layer.

Each has a pure-PyTorch reference (``*_reference``, also sync-free) and a Triton kernel (fused path).
Precondition of both: each row of ``order`` holds distinct indices in [0, L) (an argsort prefix does).
"""

from __future__ import annotations

import torch

from mm.kernels.dispatch import kernel_module, use_kernels


def gather_kept_reference(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """x [B, L, D], order [B, K] int64 -> x[b, order[b, j]] [B, K, D] (the decoder's reference path)."""
    return x.gather(1, order.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def string_scatter_reference(
    x: torch.Tensor, kept_out: torch.Tensor, order: torch.Tensor, valid: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """STRing combine in pure PyTorch, equal to ``string_combine(x, kept_out[valid], keep, weights)``.

    Filler slots scatter back the value already at their token (``w * x``), so no mask indexing is needed.
    """
    idx = order.unsqueeze(-1).expand(-1, -1, x.shape[-1])
    skipped = weights.unsqueeze(-1).to(x.dtype) * x
    src = torch.where(valid.unsqueeze(-1), kept_out.to(x.dtype), skipped.gather(1, idx))
    return skipped.scatter(1, idx, src)


def _check_order(x: torch.Tensor, order: torch.Tensor) -> None:
    if x.dim() != 3 or order.dim() != 2 or order.shape[0] != x.shape[0] or order.shape[1] > x.shape[1]:
        raise ValueError(f"p-MoD: x {tuple(x.shape)} must be [B, L, D] and order {tuple(order.shape)} [B, K<=L]")
    if order.dtype != torch.int64:
        raise TypeError(f"p-MoD: order must be int64 (argsort's indices), got {order.dtype}")


def gather_kept(x: torch.Tensor, order: torch.Tensor, impl: str = "torch") -> torch.Tensor:
    """Each row's kept tokens to the front: x [B, L, D] (float), order [B, K] int64 -> [B, K, D] (x's dtype).

    Filler slots (past a row's kept count) gather whatever token ``order`` names there, as today.
    ``impl``: see ``mm/kernels/dispatch.py``.
    """
    _check_order(x, order)
    if not use_kernels(impl, x, order):
        return gather_kept_reference(x, order)
    return kernel_module("mm.kernels._mod_triton", x.device).GatherKept.apply(x, order)


def string_scatter(
    x: torch.Tensor,
    kept_out: torch.Tensor,
    order: torch.Tensor,
    valid: torch.Tensor,
    weights: torch.Tensor,
    impl: str = "torch",
) -> torch.Tensor:
    """STRing output of a routed layer -> [B, L, D] in x's dtype.

    ``x`` [B, L, D] the layer's input; ``kept_out`` [B, K, D] the layer's output on ``gather_kept(x,
    order)`` (x's dtype; filler slots ignored); ``order`` [B, K] int64 and ``valid`` [B, K] bool as the
    decoder builds them; ``weights`` [B, L] float (fp32 from the router: TanhNorm w for routable tokens,
    1 elsewhere; read only where a token is not kept). Gradients: x, kept_out, weights.

    The decoder's routed layer calls ``string_scatter(x, out, order, valid, w, impl)`` (its reference is
    ``string_combine(x, out[valid], keep, w)`` without the host syncs).
    """
    _check_order(x, order)
    B, L, D = x.shape
    if kept_out.shape != (*order.shape, D) or valid.shape != order.shape or weights.shape != (B, L):
        raise ValueError(
            f"string_scatter: kept_out {tuple(kept_out.shape)} must be [B, K, D] = {(*order.shape, D)}, valid "
            f"{tuple(valid.shape)} [B, K] and weights {tuple(weights.shape)} [B, L] = {(B, L)}"
        )
    if valid.dtype != torch.bool:
        raise TypeError(f"string_scatter: valid must be bool, got {valid.dtype}")
    if not use_kernels(impl, x, kept_out, order, valid, weights):
        return string_scatter_reference(x, kept_out, order, valid, weights)
    fn = kernel_module("mm.kernels._mod_triton", x.device).StringScatter
    return fn.apply(x, kept_out, order, valid, weights)
