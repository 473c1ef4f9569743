"""Counting a function's FLOPs without running it (no project imports).

:func:`forward_flops` runs ``fn`` on fake tensors under ``FlopCounterMode``: no memory, no compute, any
architecture (open_clip, SigLIP, a VAE) without a hand-written formula.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def forward_flops(fn: Callable, *shapes: tuple[int, ...], device: str | torch.device = "cpu") -> float:
    """Forward FLOPs of ``fn`` on fake fp32 inputs of ``shapes``.

    ``device`` is where ``fn``'s weights live: ``meta`` for a module built on the meta device.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        inputs = [torch.rand(s, device=device) for s in shapes]
        with FlopCounterMode(display=False) as counter:
            fn(*inputs)
    return float(counter.get_total_flops())


def trains(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` trains."""
    return any(p.requires_grad for p in module.parameters())
