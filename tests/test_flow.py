"""The rectified-flow sampler on an analytic case, and the loss's conventions."""

import torch

from mm.model.flow import cfg_combine, euler_sample, interpolate, sample_t, target_velocity


def gaussian_velocity(mu: float, s: float):
    """Exact marginal velocity of z_t = t*x1 + (1-t)*x0, x0 ~ N(0,1), x1 ~ N(mu, s^2).

    z_t ~ N(t*mu, var_t) with var_t = t^2 s^2 + (1-t)^2, and
    E[x1 - x0 | z_t = z] = mu + (t s^2 - (1-t)) / var_t * (z - t*mu).
    """

    def v(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.view(-1, *([1] * (z.ndim - 1))).double()
        var = t**2 * s**2 + (1 - t) ** 2
        return mu + (t * s**2 - (1 - t)) / var * (z - t * mu)

    return v


def test_euler_sampler_transports_gaussian_to_target():
    mu, s = 3.0, 0.5
    x0 = torch.randn(200_000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = euler_sample(gaussian_velocity(mu, s), x0, steps=200)
    assert abs(x.mean().item() - mu) < 0.01
    assert abs(x.std().item() - s) < 0.01


def test_euler_error_shrinks_with_steps():
    mu, s = -2.0, 2.0
    x0 = torch.randn(100_000, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    err = [abs(euler_sample(gaussian_velocity(mu, s), x0, steps=n).std().item() - s) for n in (5, 50, 500)]
    assert err[0] > err[1] > err[2] and err[2] < 0.01  # first-order: ~10x per 10x steps


def test_cfg_scale_one_is_conditional_and_extrapolates_otherwise():
    c, u = torch.tensor([1.0]), torch.tensor([0.0])
    assert cfg_combine(c, u, 1.0).item() == 1.0
    assert cfg_combine(c, u, 2.0).item() == 2.0  # w*c - (w-1)*u


def test_path_conventions_t0_noise_t1_data():
    x1, x0 = torch.full((2, 3), 5.0), torch.zeros(2, 3)
    assert torch.equal(interpolate(x1, x0, torch.tensor([0.0, 1.0]))[0], x0[0])
    assert torch.equal(interpolate(x1, x0, torch.tensor([0.0, 1.0]))[1], x1[1])
    assert torch.equal(target_velocity(x1, x0), x1 - x0)


def test_logit_normal_t_in_open_unit_interval_and_centered():
    t = sample_t(100_000, 0.0, 1.0, torch.Generator().manual_seed(0))
    assert (t > 0).all() and (t < 1).all()
    assert abs(t.median().item() - 0.5) < 0.01
