"""The image-head interface: everything one way of drawing images adds to the unified model.

A head owns its sequence template (:class:`mm.sequence.ImageTemplate`: placeholders, begin/end
tokens, attention blocks inside the image), the inputs it draws for a training batch (noise, times,
prompt dropout), how it fills its placeholders before the LLM, its losses after the LLM, and its
sampler. ``UnifiedModel`` loops over its heads and knows none of them.

A head is a strategy object, not an ``nn.Module``: its learnable parts are registered on the
``UnifiedModel`` under the names :meth:`ImageHead.modules` gives. The flow head keeps its historical
top-level names (``gen_encoder``, ``repa_proj``, ...), so checkpoints, stage configs (``train.frozen``)
and parameter-group prefixes stay valid; the code heads register one module under their own name.

Batches (``data/pack.py: collate``): the flow head's images are ``gen_images``/``gen_sample_ids``,
another head's ``{name}_images``/``{name}_sample_ids``. Under ``run_every_module`` (ZeRO-3) a head
with no sample in the batch runs its modules on a placeholder whose output enters the loss times 0,
before the LLM and after it in the real path's order, on every rank alike.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from mm.sequence import ImageTemplate


class ImageHead(ABC):
    name: str
    template: ImageTemplate

    @abstractmethod
    def modules(self) -> dict[str, nn.Module]:
        """Learnable (or frozen) parts, registered on the UnifiedModel under these names, in this order."""

    @abstractmethod
    def loss_weights(self) -> dict[str, float]:
        """The head's losses and their weights (``{k}_sum``/``{k}_count`` in the forward output)."""

    @abstractmethod
    def loss_counts(self, batch: dict) -> dict[str, float]:
        """Denominators of the head's losses in ``batch``, known before the forward pass."""

    @abstractmethod
    def add_inputs(self, model, batch: dict, generator: torch.Generator) -> dict:
        """The seeded draws of a training batch (noise, times, prompt dropout) for this head's samples."""

    @abstractmethod
    def embed(self, model, embeds: torch.Tensor, batch: dict) -> tuple[torch.Tensor, Any, int]:
        """(embeds with the head's placeholders filled, state for :meth:`losses`, placeholder tokens claimed).

        With no sample of this head: state None, or a placeholder state under ``model.run_every_module``.
        """

    def needs_hidden_states(self, state: Any) -> bool:
        """Whether :meth:`losses` reads intermediate LLM layers (REPA)."""
        return False

    @abstractmethod
    def losses(self, model, hidden: torch.Tensor, decoder_out: Any, batch: dict, state: Any) -> dict:
        """``{k}_sum``, ``{k}_count`` (and per-image/per-token detail) of the head's losses; {} when state is None."""

    @abstractmethod
    def generate(self, model, prompts: list[str], generator: torch.Generator | None = None, **kwargs) -> torch.Tensor:
        """Text -> [0,1] images [N,C,H,W]."""

    @property
    @abstractmethod
    def passes_per_image(self) -> int:
        """LLM forward passes one batch of images takes with the default recipe (prefill included)."""


def head_sample_mask(batch: dict, ids_key: str, token_id: int) -> torch.Tensor:
    """Tokens equal to ``token_id`` inside the samples listed in ``batch[ids_key]`` (one head's placeholders)."""
    ids = batch["input_ids"]
    sample_ids = batch.get(ids_key)
    if sample_ids is None or not len(sample_ids):
        return torch.zeros_like(ids, dtype=torch.bool)
    return (ids == token_id) & torch.isin(batch["sample_ids"], sample_ids.to(ids.device))


def drop_prompts(batch: dict, sample_ids: torch.Tensor, p: float, pad: int, generator: torch.Generator) -> dict:
    """Replace the prompts of a share ``p`` of ``sample_ids`` by pad (classifier-free guidance training)."""
    drop = torch.rand(len(sample_ids), generator=generator) < p
    dropped = sample_ids[drop]
    if len(dropped):
        hit = batch["prompt_mask"] & torch.isin(batch["sample_ids"], dropped)
        batch["input_ids"] = batch["input_ids"].masked_fill(hit, pad)
    return batch


def unconditional(samples: list, pad: int) -> list:
    """Copies of inference samples with the prompt masked by pad, as prompt dropout does in training."""
    out = []
    for s in samples:
        u = copy.copy(s)
        u.input_ids = [pad if pm else t for t, pm in zip(s.input_ids, s.prompt_mask)]
        out.append(u)
    return out
