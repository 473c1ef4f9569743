"""Understanding encoders: a vision tower (registry of kinds) + an aligner into the LLM width.

A tower kind is an ``nn.Module`` class with a ``Config`` dataclass beside it, registered in
:data:`UND_TOWERS` by one line. The model config names the kind and gives the tower's own section::

    model:
      und: {kind: open_clip, tower: {image_size: 8, patch_size: 2, width: 64}, aligner_layers: 2}

A tower takes normalised pixels ``[N, channels, image_size, image_size]`` and returns patch tokens
``[N, tokens_per_image, width]``; it states its own size, channels and normalisation constants, which
the data pipeline and the processor read from it (``UnderstandingEncoder``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from mm.schema import ConfigError, parse_part, resolve_path


def _per_channel(values: tuple[float, ...], channels: int, key: str) -> tuple[float, ...]:
    if len(values) == 1:
        return tuple(values) * channels
    if len(values) != channels:
        raise ConfigError(f"{key}: {len(values)} values for {channels} channels (give 1 or {channels})")
    return tuple(values)


class Tower(nn.Module):
    """What every tower kind provides besides ``forward(pixels) -> [N, T, width]``."""

    Config: ClassVar[type]
    width: int
    image_size: int
    patch_size: int
    channels: int
    mean: tuple[float, ...]  # per channel, applied to [0,1] pixels
    std: tuple[float, ...]

    @property
    def tokens_per_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def pretrained_source(self) -> tuple[str, str] | None:
        """(config key, local path) of the weights this tower loaded, or None (random init)."""
        return None


@dataclass
class OpenClipTowerConfig:
    """open_clip VisionTransformer: built from the shape fields, or a named ``arch`` with local ``weights``."""

    arch: str = ""  # a named open_clip architecture (weights from ``weights``); "" = the fields below
    weights: str = ""  # local open_clip checkpoint file; "" = random init
    image_size: int = 8
    patch_size: int = 2
    width: int = 64
    layers: int = 2
    heads: int = 2
    mlp_ratio: float = 2.0
    mean: tuple[float, ...] = (0.5,)  # one value, or one per RGB channel (CLIP's constants)
    std: tuple[float, ...] = (0.5,)

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(f"model.und.tower: image_size={self.image_size} is not a multiple of "
                              f"patch_size={self.patch_size}")  # fmt: skip
        self.mean, self.std = _per_channel(self.mean, 3, "model.und.tower.mean"), _per_channel(
            self.std, 3, "model.und.tower.std"
        )


class OpenClipTower(Tower):
    """open_clip VisionTransformer returning patch tokens (RGB; no tokenizer is touched, so no hub access)."""

    Config = OpenClipTowerConfig

    def __init__(self, cfg: OpenClipTowerConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.arch:
            import open_clip  # heavy third-party import, only for named architectures

            weights = str(resolve_path(cfg.weights)) if cfg.weights else None
            if weights and not Path(weights).is_file():
                raise FileNotFoundError(f"model.und.tower.weights: no such file {weights}")
            model = open_clip.create_model(cfg.arch, pretrained=weights, load_weights=bool(weights))
            if not hasattr(model.visual, "transformer"):  # timm-backed towers (open_clip's SigLIP)
                raise ConfigError(
                    f"open_clip arch {cfg.arch!r} has no native VisionTransformer tower that returns "
                    "patch tokens; use model.und.kind=hf_siglip for SigLIP weights"
                )
            self.visual = model.visual
            self.visual.output_tokens = True
            self.image_size = self.visual.image_size[0]
            self.patch_size = self.visual.patch_size[0]
        else:
            from open_clip.transformer import VisionTransformer

            self.visual = VisionTransformer(
                image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.width, layers=cfg.layers,
                heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, output_dim=cfg.width, output_tokens=True,
            )  # fmt: skip
            if cfg.weights:
                state = torch.load(resolve_path(cfg.weights), map_location="cpu", weights_only=True)
                self.visual.load_state_dict(state)
            self.image_size, self.patch_size = cfg.image_size, cfg.patch_size
        self.width = self.visual.transformer.width
        self.channels, self.mean, self.std = 3, cfg.mean, cfg.std

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        _, tokens = self.visual(pixels)
        return tokens

    def pretrained_source(self) -> tuple[str, str] | None:
        return ("model.und.tower.weights", self.cfg.weights) if self.cfg.weights else None


@dataclass
class HFSiglipTowerConfig:
    """transformers' SigLIP vision model: a local directory, or built from the shape fields."""

    weights: str = ""  # local transformers directory; "" = built from the fields below
    image_size: int = 8
    patch_size: int = 2
    width: int = 64
    layers: int = 2
    heads: int = 2
    mlp_ratio: float = 2.0
    channels: int = 3
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)

    def __post_init__(self) -> None:
        self.mean = _per_channel(self.mean, self.channels, "model.und.tower.mean")
        self.std = _per_channel(self.std, self.channels, "model.und.tower.std")


class HFSiglipTower(Tower):
    Config = HFSiglipTowerConfig

    def __init__(self, cfg: HFSiglipTowerConfig):
        super().__init__()
        from transformers import SiglipVisionConfig, SiglipVisionModel

        self.cfg = cfg
        if cfg.weights:
            path = resolve_path(cfg.weights)
            if not path.is_dir():
                raise FileNotFoundError(f"model.und.tower.weights: no such directory {path}")
            self.model = SiglipVisionModel.from_pretrained(str(path), local_files_only=True)
        else:
            hf = SiglipVisionConfig(
                image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_size=cfg.width,
                num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                intermediate_size=int(cfg.width * cfg.mlp_ratio), num_channels=cfg.channels,
            )  # fmt: skip
            self.model = SiglipVisionModel(hf)
        c = self.model.config
        self.width, self.image_size, self.patch_size, self.channels = (
            c.hidden_size, c.image_size, c.patch_size, c.num_channels
        )
        self.mean, self.std = _per_channel(cfg.mean, self.channels, "mean"), _per_channel(cfg.std, self.channels, "std")

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).last_hidden_state

    def pretrained_source(self) -> tuple[str, str] | None:
        return ("model.und.tower.weights", self.cfg.weights) if self.cfg.weights else None


UND_TOWERS: dict[str, type[Tower]] = {"open_clip": OpenClipTower, "hf_siglip": HFSiglipTower}


@dataclass
class UndConfig:
    """The understanding encoder: a tower of a registered kind + an aligner into the LLM width."""

    kind: str = "open_clip"  # key of UND_TOWERS
    tower: Any = field(default_factory=dict)  # the kind's own config (UND_TOWERS[kind].Config)
    aligner_layers: int = 2  # 1 = Linear (JanusFlow), 2 = Linear-GELU-Linear (Janus)
    freeze: bool = False

    def __post_init__(self) -> None:
        if self.kind not in UND_TOWERS:
            raise ConfigError(f"model.und.kind={self.kind!r}; known: {sorted(UND_TOWERS)}")
        self.tower = parse_part(UND_TOWERS[self.kind].Config, self.tower, "model.und.tower")
        if self.aligner_layers < 1:
            raise ConfigError("model.und.aligner_layers must be >= 1")


def mlp(dims: list[int]) -> nn.Sequential:
    """Linear layers with GELU between them."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        if i:
            layers.append(nn.GELU())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


class UnderstandingEncoder(nn.Module):
    def __init__(self, cfg: UndConfig, llm_width: int):
        super().__init__()
        self.cfg = cfg
        self.tower: Tower = UND_TOWERS[cfg.kind](cfg.tower)
        self.aligner = mlp([self.tower.width] + [llm_width] * cfg.aligner_layers)
        if cfg.freeze:
            self.tower.requires_grad_(False)

    @property
    def tokens_per_image(self) -> int:
        return self.tower.tokens_per_image

    @property
    def image_size(self) -> int:
        return self.tower.image_size

    @property
    def channels(self) -> int:
        return self.tower.channels

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        # constants made at each call, not buffers: a release loads on the meta device, where buffers that
        # no checkpoint holds would stay empty
        mean = images.new_tensor(self.tower.mean).view(1, -1, 1, 1)
        std = images.new_tensor(self.tower.std).view(1, -1, 1, 1)
        return (images - mean) / std

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Tower patch tokens of [0,1] images: [N, T, width] (REPA's targets)."""
        return self.tower(self.normalize(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[0,1] images -> LLM-width tokens [N, T, D]."""
        return self.aligner(self.features(images))
