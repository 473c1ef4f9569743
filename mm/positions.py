"""The position policy: position ids of a sample, in training, understanding inference and generation.

One rule (V2PE, with the standard encoding as its delta = 1 case):

* text tokens advance the position by 1;
* the tokens of one image advance by that image's ``delta`` each:
  ``p_prev + delta * (1, 2, ..., n)``;
* the first token after an image sits at ``ceil(last visual position) + 1``.

With every delta equal to 1 this is ``0, 1, 2, ...``: today's positions exactly.
Positions restart at 0 for each packed sample and stay float32 end to end
(rotary embeddings take float positions; never cast them to bf16). They are
computed in float64 and rounded once to float32: float32 resolves 1/256 only
below 2**16, so contexts longer than that lose V2PE's finest deltas (a limit of
float32 position ids, noted here rather than hidden).

An "image" is a maximal run of tokens of one visual kind (``mm.sequence``'s
token kinds); the templates always put text (``<begin_of_image>`` ...) between
two images, so runs never merge.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mm.schema import ConfigError
from mm.sequence import TOKEN_KINDS


def image_runs(kinds: Sequence[int], visual_kinds: frozenset[int]) -> list[tuple[int, int]]:
    """[start, end) of every maximal run of one visual kind."""
    runs, i, n = [], 0, len(kinds)
    while i < n:
        if kinds[i] in visual_kinds:
            j = i
            while j < n and kinds[j] == kinds[i]:
                j += 1
            runs.append((i, j))
            i = j
        else:
            i += 1
    return runs


def sample_positions(
    kinds: Sequence[int],
    deltas: Sequence[float] = (),
    visual_kinds: frozenset[int] = frozenset(),
    start: float = 0.0,
) -> torch.Tensor:
    """Float32 positions of one sample's tokens.

    ``kinds``: per-token kind codes; ``visual_kinds``: the kinds V2PE applies to;
    ``deltas``: one per image run of those kinds (missing ones are 1).
    ``start``: the position of the first token (0 for a fresh sample; a
    decoding step passes :func:`next_position` of what came before).
    """
    n = len(kinds)
    pos = np.empty(n, dtype=np.float64)
    runs = image_runs(kinds, visual_kinds) if visual_kinds else []
    p, i, prev_visual = start - 1.0, 0, False
    for r, (a, b) in enumerate(runs + [(n, n)]):
        if a > i:  # text before this image
            first = (math.ceil(p) + 1.0) if prev_visual else p + 1.0
            pos[i:a] = first + np.arange(a - i)
            p, prev_visual = pos[a - 1], False
        if b > a:
            delta = float(deltas[r]) if r < len(deltas) else 1.0
            pos[a:b] = p + delta * np.arange(1, b - a + 1)
            p, prev_visual = pos[b - 1], True
        i = b
    return torch.from_numpy(pos.astype(np.float32))


def next_position(last: float, last_was_visual: bool) -> float:
    """Where the token after ``last`` goes (decoding continues from the last position)."""
    return float(math.ceil(last) + 1.0) if last_was_visual else float(last + 1.0)


@dataclass
class V2PEConfig:
    """V2PE: tokens of one image advance the position by delta (see the module docstring).

    Training draws delta per image from ``train_deltas``; evaluation and inference use
    ``infer_delta``. ``enabled=False`` is the standard 0, 1, 2, ... positions.
    """

    enabled: bool = False
    kinds: tuple[str, ...] = ("und_image",)  # keys of mm.sequence.TOKEN_KINDS
    train_deltas: tuple[float, ...] = tuple(1.0 / 2**i for i in range(9))  # 1, 1/2, ..., 1/256
    infer_delta: float = 0.25

    def __post_init__(self) -> None:
        unknown = [k for k in self.kinds if k not in TOKEN_KINDS]
        if unknown:
            raise ConfigError(f"model.v2pe.kinds: unknown token kinds {unknown}; known: {sorted(TOKEN_KINDS)}")
        if not self.train_deltas or any(not 0 < d <= 1 for d in (*self.train_deltas, self.infer_delta)):
            raise ConfigError("model.v2pe deltas must be in (0, 1] and train_deltas non-empty")


@dataclass(frozen=True)
class PositionPolicy:
    """Which deltas images get: drawn per image in training, fixed in eval and inference.

    ``train_deltas`` empty (the default) or ``(1.0,)`` is the standard encoding.
    """

    visual_kinds: frozenset[int] = frozenset()
    train_deltas: tuple[float, ...] = ()
    infer_delta: float = 1.0

    @property
    def enabled(self) -> bool:
        return bool(self.visual_kinds) and (any(d != 1.0 for d in self.train_deltas) or self.infer_delta != 1.0)

    def draw(self, n_images: int, rng: random.Random) -> list[float]:
        """Training deltas for ``n_images`` images from a seeded per-sample ``rng`` (packing-invariant)."""
        if not self.train_deltas:
            return [1.0] * n_images
        return [rng.choice(self.train_deltas) for _ in range(n_images)]

    @classmethod
    def from_config(cls, cfg: V2PEConfig) -> PositionPolicy:
        """V2PE's deltas (training draws, inference fixed), or the standard positions when disabled."""
        if not cfg.enabled:
            return cls()
        kinds = frozenset(TOKEN_KINDS[k] for k in cfg.kinds)
        return cls(kinds, tuple(float(d) for d in cfg.train_deltas), float(cfg.infer_delta))

    def positions(
        self, kinds: Sequence[int], deltas: Sequence[float] | None = None, start: float = 0.0
    ) -> torch.Tensor:
        """Positions with the given deltas, or the inference delta for every image."""
        if deltas is None:
            deltas = [self.infer_delta] * len(image_runs(kinds, self.visual_kinds))
        return sample_positions(kinds, deltas, self.visual_kinds, start)
