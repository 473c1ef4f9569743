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


def test_staggered_schedule_runs_each_slot_in_raster_order():
    from mm.model.flow import staggered_times

    plain = staggered_times(5, 4, 0.0)
    torch.testing.assert_close(plain, torch.linspace(0, 1, 6)[:, None].expand(6, 4))  # all slots together
    t = staggered_times(3, 4, 1.0)  # one slot after another: 4 units of 3 steps
    assert t.shape == (13, 4) and (t[0] == 0).all() and (t[-1] == 1).all()
    moving = (t[1:] - t[:-1]) > 0  # [steps, slots]
    assert moving.sum(0).tolist() == [3, 3, 3, 3]
    assert [int(moving[:, k].nonzero()[0]) for k in range(4)] == [0, 3, 6, 9]  # slot k starts after slot k-1 ends
    half = staggered_times(4, 3, 0.5)  # span 2: slot k starts 0.5 k later, overlapping the one before
    assert half.shape == (9, 3) and half[4].tolist() == [1.0, 0.5, 0.0]  # tau = 1: slot 0 done, slot 2 starts
    assert ((half[1:] - half[:-1]) >= 0).all()


def test_staggered_sampler_transports_every_slot_to_its_target():
    """Independent Gaussian slots under the exact per-slot velocity: the schedule only reorders the work."""
    from mm.model.flow import euler_sample_slots, slot_map, staggered_times

    mu, s, grid, cell = 3.0, 0.5, 2, 2
    v = gaussian_velocity(mu, s)

    def velocity(z, t):  # t [N, m] -> the per-element exact velocity
        tm = slot_map(t, grid, cell).expand_as(z).double()
        var = tm**2 * s**2 + (1 - tm) ** 2
        return mu + (tm * s**2 - (1 - tm)) / var * (z - tm * mu)

    def expand(d):
        return slot_map(d, grid, cell)

    x0 = torch.randn(50_000, 1, grid * cell, grid * cell, generator=torch.Generator().manual_seed(0)).double()
    x = euler_sample_slots(velocity, x0, staggered_times(100, grid * grid, 1.0).double(), expand)
    for k in range(grid * grid):
        r, c = divmod(k, grid)
        slot = x[:, 0, r * cell : (r + 1) * cell, c * cell : (c + 1) * cell]
        assert abs(slot.mean().item() - mu) < 0.02 and abs(slot.std().item() - s) < 0.02
    # together (stagger 0) the same sampler is the plain one
    same = euler_sample_slots(velocity, x0[:100], staggered_times(7, 4, 0.0).double(), expand)
    torch.testing.assert_close(same, euler_sample(v, x0[:100], 7), rtol=1e-5, atol=1e-5)
