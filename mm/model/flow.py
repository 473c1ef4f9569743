"""Rectified flow, written down once.

Convention (JanusFlow): t=0 is noise x0, t=1 is data x1,
z_t = t*x1 + (1-t)*x0, target velocity v = x1 - x0, t ~ logit-normal.
(REPA's repository uses the opposite direction; do not mix them.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def sample_t(n: int, mean: float, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Logit-normal times: sigmoid(N(mean, std))."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator))


def interpolate(x1: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.view(-1, *([1] * (x1.ndim - 1))).to(x1.dtype)
    return t * x1 + (1 - t) * x0


def target_velocity(x1: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    return x1 - x0


def cfg_combine(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """JanusFlow's guidance: v = w*v_c - (w-1)*v_u (w=1 is no guidance)."""
    return scale * v_cond - (scale - 1) * v_uncond


def euler_sample(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor, steps: int
) -> torch.Tensor:
    """Integrate dz/dt = velocity(z, t) from t=0 (x0, noise) to t=1 with ``steps`` Euler steps."""
    z = x0
    dt = 1.0 / steps
    for i in range(steps):
        t = torch.full((z.shape[0],), i * dt, dtype=torch.float32, device=z.device)
        z = z + dt * velocity(z, t)
    return z
