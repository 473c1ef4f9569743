"""The image-head interface: one way of drawing images, as an ``nn.Module`` that owns its parameters.

A head owns its config class (``Config``, validated by itself), its sequence template
(:class:`mm.sequence.ImageTemplate`: placeholders, begin/end tokens, attention blocks inside the
image), the seeded draws of a training batch (noise, times, prompt dropout), how it fills its
placeholders before the LLM, its losses after the LLM, its sampler and its default sampling recipe. It
registers itself by name in :data:`IMAGE_HEADS` with one line (``@register_head("name")``); the model
config maps head names to head configs (``model.heads: {flow: {...}, nextfreq: {...}}``).

Heads see the unified model only through :class:`HeadHost` (token embeddings, the decoder loop, the
understanding tower's features, the position policy) and :class:`HeadContext` at construction.

ZeRO-3's rule that every rank runs every module is one mechanism here: when a batch has no image of a
head and the model must run every module (``UnifiedModel.every_module``), the model hands the head its
:meth:`ImageHead.placeholder` inputs, one zero image marked ``placeholder``. The head runs its one code
path on them; :func:`place` and :func:`take_slots` attach such outputs to the graph times zero instead
of filling placeholder slots, and the losses weigh 0.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from mm.batch import Batch, ImageInputs
from mm.images import zero_images
from mm.kernels.attention import AttentionSpec
from mm.model.decoder import DecoderOutput, KVCache
from mm.positions import PositionPolicy
from mm.schema import ConfigError
from mm.sequence import ImageTemplate, Vocab, scatter_placeholders


@dataclass(frozen=True)
class HeadContext:
    """What a head may know of the model when it is built."""

    vocab: Vocab
    hidden_size: int  # LLM width
    num_layers: int  # LLM decoder layers
    und_width: int  # understanding tower's feature width (REPA targets)
    und_grid: int  # understanding tower's patch grid side


class HeadHost(Protocol):
    """What a head may use of the model at run time (``UnifiedModel`` implements it)."""

    vocab: Vocab
    position_policy: PositionPolicy

    @property
    def device(self) -> torch.device: ...

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor: ...

    def decode(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        spec: AttentionSpec,
        token_kinds: torch.Tensor | None = None,
        cache: KVCache | None = None,
        write_cache: bool = True,
        output_hidden_states: bool = False,
    ) -> DecoderOutput: ...

    def und_features(self, images: torch.Tensor) -> torch.Tensor:
        """[0,1] images of any size and channels -> the understanding tower's patch features."""
        ...


@dataclass(frozen=True)
class PartCost:
    """Training FLOPs of one part of a head, per image: forward, and the backward in forwards."""

    forward: float
    backward: float


class ImageHead(nn.Module, ABC):
    Config: ClassVar[type]
    template: ImageTemplate
    plan_temperature: float = 0.0  # how the model writes a plan first (template.plan_tokens > 0): 0 = greedy

    def __init__(self, name: str, cfg: Any, ctx: HeadContext):
        super().__init__()
        self.name, self.cfg, self.vocab = name, cfg, ctx.vocab

    # ---- what the rest of the system reads -----------------------------------------------------
    @staticmethod
    @abstractmethod
    def recipe(cfg: Any) -> dict:
        """The default sampling recipe of a head with config ``cfg`` (no model needed: releases, eval)."""

    @property
    @abstractmethod
    def passes_per_image(self) -> int:
        """LLM forward passes one batch of images takes with the default recipe (prefill included)."""

    @property
    def tokens_per_image(self) -> int:
        return self.template.image_tokens

    @abstractmethod
    def loss_weights(self) -> dict[str, float]:
        """The head's losses and their weights (``{k}_sum``/``{k}_count`` in the forward output)."""

    @abstractmethod
    def loss_counts(self, inputs: ImageInputs | None) -> dict[str, float]:
        """Denominators of the head's losses for a batch's ``inputs`` (None: no image), known before forward."""

    def pretrained_sources(self) -> dict[str, tuple[str, str]]:
        """Frozen parts that load weights: sub-module name -> (config key, local path)."""
        return {}

    def costs(self, llm_out_needs_grad: bool) -> dict[str, PartCost]:
        """Training FLOPs per image of the head's parts (``mm.train.flops``); {} = not counted."""
        return {}

    def trains_before_llm(self) -> bool:
        """Whether a part the head runs before the LLM trains (the LLM's input then needs a gradient)."""
        return False

    # ---- training --------------------------------------------------------------------------------
    def draw(self, inputs: ImageInputs, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The seeded draws of a training batch for these images (noise, times); ``drop`` = prompts to drop."""
        return {"drop": torch.rand(len(inputs), generator=generator) < self.cfg.prompt_dropout}

    def placeholder(self, like: torch.Tensor) -> tuple[ImageInputs, dict[str, torch.Tensor]]:
        """One zero image that fills no slot, with zero draws (see the module docstring)."""
        t = self.template
        images = zero_images(1, t.image_channels, t.image_size, like)
        return ImageInputs(images, torch.full((1,), -1, device=like.device), placeholder=True), {}

    @abstractmethod
    def embed(
        self, host: HeadHost, embeds: torch.Tensor, batch: Batch, inputs: ImageInputs, draws: dict
    ) -> tuple[torch.Tensor, Any]:
        """(embeds with the head's placeholders filled, state for :meth:`losses`)."""

    def needs_hidden_states(self) -> bool:
        """Whether :meth:`losses` reads intermediate LLM layers (REPA)."""
        return False

    @abstractmethod
    def losses(self, host: HeadHost, hidden: torch.Tensor, decoder_out: DecoderOutput, state: Any) -> dict:
        """``{k}_sum``, ``{k}_count`` (and per-image/per-token detail) of the head's losses."""

    # ---- sampling --------------------------------------------------------------------------------
    @abstractmethod
    def generate(
        self, host: HeadHost, prompts: list[str], generator: torch.Generator | None = None, **kwargs
    ) -> torch.Tensor:
        """Text -> [0,1] images [N,C,H,W]."""


IMAGE_HEADS: dict[str, type[ImageHead]] = {}


def register_head(name: str):
    """Class decorator: ``@register_head("flow")`` makes the head available as ``model.heads.flow``."""

    def add(cls: type[ImageHead]) -> type[ImageHead]:
        IMAGE_HEADS[name] = cls
        return cls

    return add


def head_class(name: str) -> type[ImageHead]:
    if name not in IMAGE_HEADS:
        raise ConfigError(f"model.heads: unknown image head {name!r}; known: {sorted(IMAGE_HEADS)}")
    return IMAGE_HEADS[name]


# ---- helpers shared by the heads --------------------------------------------------------------------
def slot_mask(batch: Batch, inputs: ImageInputs, token_id: int) -> torch.Tensor:
    """Tokens equal to ``token_id`` inside the samples of ``inputs`` (one head's placeholders)."""
    ids = batch.input_ids
    if inputs.placeholder:
        return torch.zeros_like(ids, dtype=torch.bool)
    return (ids == token_id) & torch.isin(batch.sample_ids, inputs.sample_ids)


def place(embeds: torch.Tensor, mask: torch.Tensor, features: torch.Tensor, inputs: ImageInputs, what: str):
    """Write ``features`` [n, D] into the ``mask``ed slots, or, for a placeholder, add them times zero."""
    if inputs.placeholder:
        return embeds + 0.0 * features.sum()
    return scatter_placeholders(embeds, mask, features, what)


def take_slots(hidden: torch.Tensor, mask: torch.Tensor, shape: tuple[int, ...], inputs: ImageInputs):
    """The hidden states at the ``mask``ed slots as [n, ...shape], or zeros hanging off ``hidden`` (placeholder)."""
    if inputs.placeholder:
        return torch.zeros(1, *shape, dtype=hidden.dtype, device=hidden.device) + 0.0 * hidden.sum()
    return hidden[mask].view(-1, *shape)


def unconditional(samples: list, pad: int) -> list:
    """Copies of inference samples with the prompt masked by pad, as prompt dropout does in training."""
    out = []
    for s in samples:
        u = copy.copy(s)
        u.input_ids = [pad if pm else t for t, pm in zip(s.input_ids, s.prompt_mask)]
        out.append(u)
    return out


def loss_weight(inputs: ImageInputs) -> float:
    """1 for real images, 0 for a placeholder (its losses only join the graph)."""
    return 0.0 if inputs.placeholder else 1.0
