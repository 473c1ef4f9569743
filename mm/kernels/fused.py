"""Fused ops for fast packed training, each beside its pure-PyTorch reference, behind one switch.

``impl`` is ``"torch"`` (reference) or ``"fused"`` (see ``mm/kernels/dispatch.py``: fused on CUDA or
under the Triton interpreter, the reference otherwise, so ``"fused"`` also runs on a CPU):

=====================  ==========================================  ======================================
op                     reference (CPU path, what tests compare to)  fused
=====================  ==========================================  ======================================
rms_norm               HF ``LlamaRMSNorm.forward``                  liger ``LigerRMSNormFunction`` (llama)
swiglu                 ``F.silu(gate) * up`` (LLaMA's MLP)          liger ``LigerSiLUMulFunction``
linear_cross_entropy   ``lm_head`` + ``F.cross_entropy`` as         liger's chunked fused linear CE, with
                       ``mm/model/unified.py`` computes text loss   our per-token weights folded in
rotary_qk              ``mm/kernels/rope.py``                        our Triton kernel
gather_kept            ``mm/kernels/mod.py``                         our Triton kernel
string_scatter         ``mm/kernels/mod.py``                         our Triton kernel
=====================  ==========================================  ======================================

:data:`OPS` lists every op's reference and fused callables (the benchmark and tests use it).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from mm.kernels.dispatch import kernel_module, use_kernels
from mm.kernels.mod import gather_kept, gather_kept_reference, string_scatter, string_scatter_reference
from mm.kernels.rope import rotary_qk, rotary_qk_reference

IGNORE_INDEX = -100


def _liger_elementwise_ok(*tensors: torch.Tensor) -> bool:
    """liger's RMSNorm / SwiGLU kernels multiply bf16 by bf16, which the Triton interpreter gets wrong
    (``mm/kernels/interpreter.py``): on CPU (interpreted) only fp32 takes the fused path."""
    return all(t.is_cuda or t.dtype == torch.float32 for t in tensors)


# ---- RMSNorm ------------------------------------------------------------------------------------
def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm (also Qwen2/Qwen3's): normalise in fp32, cast back, then scale by the weight."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, impl: str = "torch") -> torch.Tensor:
    """RMSNorm over the last dim: x [..., D], weight [D] -> [..., D].

    Fused only when x and weight share a dtype (HF promotes ``weight * h`` to the wider one, liger keeps
    x's) and, on CPU under the interpreter, are fp32; otherwise the reference runs. The fused backward
    does not overwrite the incoming gradient (liger's ``in_place=False``): the decoder's norm outputs
    may feed more than one consumer.
    """
    if x.dtype != weight.dtype or not use_kernels(impl, x, weight) or not _liger_elementwise_ok(x):
        return rms_norm_reference(x, weight, eps)
    liger = kernel_module("liger_kernel.ops.rms_norm", x.device)
    return liger.LigerRMSNormFunction.apply(x, weight, eps, 0.0, "llama", False)


# ---- SwiGLU -------------------------------------------------------------------------------------
def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """LLaMA's MLP activation: ``act_fn(gate_proj(x)) * up_proj(x)`` with act_fn = SiLU."""
    return F.silu(gate) * up


def swiglu(gate: torch.Tensor, up: torch.Tensor, impl: str = "torch") -> torch.Tensor:
    """silu(gate) * up for gate, up [..., I] of one dtype -> [..., I].

    Fused: liger's kernel, whose backward writes the gradients into the storage of the saved ``gate``
    and ``up`` (memory saving). That is safe for what LLaMA's MLP passes (fresh ``gate_proj`` /
    ``up_proj`` outputs that nothing else saves); do not pass tensors that are read again after the
    backward (or saved by another op for its backward).
    """
    if gate.dtype != up.dtype or not use_kernels(impl, gate, up) or not _liger_elementwise_ok(gate):
        return swiglu_reference(gate, up)
    liger = kernel_module("liger_kernel.ops.swiglu", gate.device)
    return liger.LigerSiLUMulFunction.apply(gate, up)


# ---- linear cross-entropy -----------------------------------------------------------------------
class LinearCEOutput(NamedTuple):
    loss_sum: torch.Tensor  # [] fp32, differentiable: sum_i w_i * CE_i over supervised rows (unified's text_sum)
    per_token: torch.Tensor  # [N] fp32, detached: CE_i, 0 at ignored rows (unified's text_per_token, unmasked)
    weight_sum: torch.Tensor  # [] fp32, detached: sum_i w_i over supervised rows (this batch's own text count)


def _row_weights(targets: torch.Tensor, token_weights: torch.Tensor | None, ignore_index: int) -> torch.Tensor:
    """[N] fp32 per-row loss weights, 0 at ignored rows (whatever the caller's weights hold there)."""
    supervised = targets != ignore_index
    if token_weights is None:
        return supervised.float()
    return torch.where(supervised, token_weights.float(), torch.zeros((), device=targets.device))


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_weights: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> LinearCEOutput:
    """The unfused text loss of ``mm/model/unified.py``: fp32 logits [N, V] materialised, per-token CE."""
    logits = F.linear(hidden, weight, bias).float()
    per_token = F.cross_entropy(logits, targets, reduction="none", ignore_index=ignore_index)
    w = _row_weights(targets, token_weights, ignore_index)
    return LinearCEOutput((per_token * w).sum(), per_token.detach(), w.sum())


@functools.cache
def _liger_flce_forward() -> Callable:
    from liger_kernel.ops.fused_linear_cross_entropy import fused_linear_cross_entropy_forward as fn

    if "token_grad_output" not in inspect.signature(fn).parameters:
        raise ImportError("the fused linear cross-entropy needs liger-kernel >= 0.8.5 (per-token gradient weights)")
    return fn


class _LigerWeightedLinearCE(torch.autograd.Function):
    """sum_i w_i * CE(hidden_i @ weight.T + bias, target_i) with liger's chunked forward.

    liger's public reduction="none" path would recompute the logits in backward to apply per-token
    upstream gradients; since our output is one weighted sum, the per-token weights are known in
    forward, so we hand them to liger's forward as ``token_grad_output``: it folds them into each
    chunk's logits gradient before projecting, and the gradients are complete after one pass (the
    compute-in-forward design of liger's mean/sum path). Backward only scales them by the upstream
    scalar (e.g. 1 / global count). Weights are not differentiable (data, as in unified.py).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, row_w, ignore_index):  # type: ignore[override]
        needs = ctx.needs_input_grad
        grads = any(needs[:3])
        per_token, _, _, _, g_hidden, g_weight, g_bias = _liger_flce_forward()(
            _input=hidden, weight=weight, target=targets, bias=bias, ignore_index=ignore_index, reduction="none",
            token_grad_output=row_w if grads else None, compute_gradients=grads, weight_requires_grad=needs[1],
            accum_dtype=torch.float32,  # fp32 accumulation of the weight/bias gradients over chunks
        )  # fmt: skip
        ctx.grads = (g_hidden if needs[0] else None, g_weight, g_bias if needs[2] else None) if grads else None
        ctx.mark_non_differentiable(per_token)
        return (per_token * row_w).sum(), per_token

    @staticmethod
    def backward(ctx, grad_sum, _grad_per_token):  # type: ignore[override]
        if ctx.grads is None:
            raise RuntimeError("fused linear cross-entropy: its gradients were computed in forward and used once")
        g_hidden, g_weight, g_bias = ctx.grads
        ctx.grads = None  # they are scaled in place below: a second backward must not see them
        scaled = [g.mul_(grad_sum.to(g.dtype)) if g is not None else None for g in (g_hidden, g_weight, g_bias)]
        return scaled[0], scaled[1], scaled[2], None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_weights: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    impl: str = "torch",
) -> LinearCEOutput:
    """LM head + weighted cross-entropy without materialising the [N, V] logits (fused path).

    ``hidden`` [N, D] and ``weight`` [V, D] (the LM head's, same dtype), ``bias`` [V] or None,
    ``targets`` [N] int64 with ``ignore_index`` rows unsupervised, ``token_weights`` [N] float or None
    (1 per supervised row; e.g. ``batch["loss_weights"]`` for token/sample/square reduction). Returns
    :class:`LinearCEOutput`; gradients flow from ``loss_sum`` to hidden, weight and bias. Divide
    ``loss_sum`` by the global count yourself (``loss_sum / global_count``): the fused gradients are
    scaled by exactly that upstream factor.

    Rows may be pre-selected (``hidden[text_mask]`` as unified.py does: a host sync) or all rows with
    ignored targets (no mask indexing, but the LM head then runs on every row); both give the same sum.
    The fused path computes its gradients during forward (under grad mode) and keeps them until
    backward: one backward per forward. liger calls ``.item()`` once per forward (a host sync).
    """
    shapes_ok = hidden.dim() == 2 and weight.dim() == 2 and hidden.shape[1] == weight.shape[1]
    if not shapes_ok or targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"linear_cross_entropy: hidden {tuple(hidden.shape)} must be [N, D], weight {tuple(weight.shape)} "
            f"[V, D] and targets {tuple(targets.shape)} [N]"
        )
    if token_weights is not None and (token_weights.shape != targets.shape or token_weights.requires_grad):
        raise ValueError("linear_cross_entropy: token_weights must be [N] and not require grad (they are data)")
    tensors = [t for t in (hidden, weight, targets, bias, token_weights) if t is not None]
    if not use_kernels(impl, *tensors):
        return linear_cross_entropy_reference(hidden, weight, targets, token_weights, bias, ignore_index)
    kernel_module("liger_kernel.ops.fused_linear_cross_entropy", hidden.device)  # on CPU: the interpreter check
    row_w = _row_weights(targets, token_weights, ignore_index)
    loss_sum, per_token = _LigerWeightedLinearCE.apply(
        hidden.contiguous(), weight, bias, targets.contiguous(), row_w, ignore_index
    )
    return LinearCEOutput(loss_sum, per_token, row_w.sum())


# ---- the registry -------------------------------------------------------------------------------
@dataclass(frozen=True)
class FusedOp:
    reference: Callable  # pure PyTorch
    dispatch: Callable  # the switch: (..., impl=...) -> reference or fused


OPS: dict[str, FusedOp] = {
    "rms_norm": FusedOp(rms_norm_reference, rms_norm),
    "swiglu": FusedOp(swiglu_reference, swiglu),
    "linear_cross_entropy": FusedOp(linear_cross_entropy_reference, linear_cross_entropy),
    "rotary_qk": FusedOp(rotary_qk_reference, rotary_qk),
    "gather_kept": FusedOp(gather_kept_reference, gather_kept),
    "string_scatter": FusedOp(string_scatter_reference, string_scatter),
}
