"""Rectified flow, written down once.

Convention (JanusFlow): t=0 is noise x0, t=1 is data x1,
z_t = t*x1 + (1-t)*x0, target velocity v = x1 - x0, t ~ logit-normal.
(REPA's repository uses the opposite direction; do not mix them.)

Times are one per image ([N]) or, as in Diffusion Forcing (Chen et al. 2024), one per slot of the
token grid ([N, m], expanded over each slot's latent cells): a staggered sampler then finishes the
first slots while the later ones are still noise, so a causal model draws them one after another.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def sample_t(n: int, mean: float, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Logit-normal times: sigmoid(N(mean, std))."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator))


def interpolate(x1: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``t`` [N] (one time per image) or a map that broadcasts against x1 (:func:`slot_map`)."""
    t = (t.view(-1, *([1] * (x1.ndim - 1))) if t.ndim == 1 else t).to(x1.dtype)
    return t * x1 + (1 - t) * x0


def slot_map(t: torch.Tensor, grid: int, cell: int) -> torch.Tensor:
    """Per-slot values [N, grid*grid] (row-major, the token order) -> [N, 1, grid*cell, grid*cell]."""
    m = t.view(-1, 1, grid, grid)
    return m.repeat_interleave(cell, dim=2).repeat_interleave(cell, dim=3)


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


def staggered_times(steps: int, slots: int, stagger: float) -> torch.Tensor:
    """[K+1, slots] times of a staggered schedule: slot k runs from 0 to 1 in one unit, starting ``stagger * k``
    units after slot 0 (0: all together, the plain sampler; 1: one slot after another). The span is cut into
    K = ceil(steps * span) equal Euler steps, so every slot moves over about ``steps`` of them."""
    if not 0.0 <= stagger <= 1.0:
        raise ValueError(f"stagger={stagger} must be in [0, 1]")
    span = 1.0 + stagger * (slots - 1)
    tau = torch.linspace(0.0, span, math.ceil(steps * span - 1e-9) + 1, dtype=torch.float64)
    return (tau[:, None] - stagger * torch.arange(slots, dtype=torch.float64)).clamp(0.0, 1.0).float()


def euler_sample_slots(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    times: torch.Tensor,
    expand: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Euler steps along per-slot ``times`` [K+1, m] (:func:`staggered_times`); ``velocity(z, t [N, m])``;
    ``expand`` maps [N, m] per-slot values onto the latent (:func:`slot_map`)."""
    z, n = x0, x0.shape[0]
    times = times.to(x0.device)
    for i in range(times.shape[0] - 1):
        t, dt = times[i].expand(n, -1), (times[i + 1] - times[i]).expand(n, -1)
        z = z + expand(dt).to(z.dtype) * velocity(z, t)
    return z
