"""The EMA of the trainable weights forgets the random init (diffusers' warmup), and skipped steps leave it alone."""

from types import SimpleNamespace

import pytest
import torch

from mm.train.engine import ShardedEMA


def _engine(value: float) -> SimpleNamespace:
    w = torch.nn.Parameter(torch.full((3,), value))
    return SimpleNamespace(trainable=[("w", w)], local_shards=lambda: [w.data.view(-1)], env=SimpleNamespace(world=1))


def _init_share(decay: float, warmup: bool, steps: int) -> float:
    """Weights 1.0 at the start, 0.0 after: the EMA's value is the share the init keeps."""
    engine = _engine(1.0)
    ema = ShardedEMA(engine, decay, warmup)
    engine.trainable[0][1].data.zero_()
    applied = torch.tensor(True)
    for step in range(steps):
        ema.update(applied, step)
    return float(ema.gather()["w"][0])


def test_warmup_forgets_the_init():
    # without warmup the init keeps decay**steps: 0.999**2000 = 13.5% of the average
    assert _init_share(0.999, False, 2000) == pytest.approx(0.999**2000, rel=1e-3)
    # with it, prod_k (1+k)/(10+k) = 9! n! / (n+9)! while that is below the decay
    assert _init_share(0.999, True, 50) == pytest.approx(362880 / torch.arange(51, 60).double().prod().item(), rel=1e-3)
    assert _init_share(0.999, True, 2000) < 1e-12


def test_decay_reaches_the_configured_value():
    ema = ShardedEMA(_engine(0.0), 0.99, True)
    assert ema.decay_at(0) == pytest.approx(0.1)
    assert ema.decay_at(90) == pytest.approx(0.91)
    assert ema.decay_at(10_000) == 0.99
    assert ShardedEMA(_engine(0.0), 0.99, False).decay_at(0) == 0.99


def test_a_skipped_step_leaves_the_ema_alone():
    engine = _engine(1.0)
    ema = ShardedEMA(engine, 0.9, True)
    engine.trainable[0][1].data.fill_(5.0)
    ema.update(torch.tensor(False), 0)
    assert torch.equal(ema.gather()["w"], torch.ones(3))
