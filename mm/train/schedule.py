"""Learning-rate schedules: the factor applied to every parameter group's base lr at a step.

Shared by the model trainer and the image-tokenizer trainer (``train.schedule``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from mm.schema import ConfigError


def constant_schedule(step: int, warmup: int, total: int, min_ratio: float) -> float:
    return min(1.0, (step + 1) / max(1, warmup))


def cosine_schedule(step: int, warmup: int, total: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


LR_SCHEDULES: dict[str, Callable[[int, int, int, float], float]] = {
    "constant": constant_schedule,
    "cosine": cosine_schedule,
}


def get_schedule(name: str) -> Callable[[int, int, int, float], float]:
    if name not in LR_SCHEDULES:
        raise ConfigError(f"train.schedule={name!r}; known: {sorted(LR_SCHEDULES)}")
    return LR_SCHEDULES[name]
