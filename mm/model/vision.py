"""Understanding encoder: a vision tower (registry) + aligner into the LLM width."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mm.config import UndEncoderConfig, resolve_path


class OpenClipTower(nn.Module):
    """open_clip VisionTransformer returning patch tokens [N, T, width].

    Built from the config's shape fields, or, with ``open_clip_arch``, as that
    named architecture with weights from the local file ``weights`` (only the
    vision tower is kept; no tokenizer is touched, so no hub access).
    """

    def __init__(self, cfg: UndEncoderConfig):
        super().__init__()
        if cfg.open_clip_arch:
            import open_clip

            weights = str(resolve_path(cfg.weights)) if cfg.weights else None
            if weights and not Path(weights).is_file():
                raise FileNotFoundError(f"model.und.weights: no such file {weights}")
            model = open_clip.create_model(cfg.open_clip_arch, pretrained=weights, load_weights=bool(weights))
            if not hasattr(model.visual, "transformer"):  # timm-backed towers (open_clip's SigLIP)
                raise ValueError(
                    f"open_clip arch {cfg.open_clip_arch!r} has no native VisionTransformer tower that returns "
                    "patch tokens; use model.und.kind=hf_siglip for SigLIP weights"
                )
            self.visual = model.visual
            self.visual.output_tokens = True
        else:
            from open_clip.transformer import VisionTransformer

            self.visual = VisionTransformer(
                image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.width, layers=cfg.layers,
                heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, output_dim=cfg.width, output_tokens=True,
            )  # fmt: skip
            if cfg.weights:
                state = torch.load(resolve_path(cfg.weights), map_location="cpu", weights_only=True)
                self.visual.load_state_dict(state)
        self.width = self.visual.transformer.width

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _, tokens = self.visual(images)
        return tokens


class HFSiglipTower(nn.Module):
    """transformers SigLIP vision model (local directory, or built from the shape fields)."""

    def __init__(self, cfg: UndEncoderConfig):
        super().__init__()
        from transformers import SiglipVisionConfig, SiglipVisionModel

        if cfg.weights:
            path = resolve_path(cfg.weights)
            if not path.is_dir():
                raise FileNotFoundError(f"model.und.weights: no such directory {path}")
            self.model = SiglipVisionModel.from_pretrained(str(path), local_files_only=True)
        else:
            hf = SiglipVisionConfig(
                image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_size=cfg.width,
                num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                intermediate_size=int(cfg.width * cfg.mlp_ratio), num_channels=cfg.in_channels,
            )  # fmt: skip
            self.model = SiglipVisionModel(hf)
        self.width = self.model.config.hidden_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=images).last_hidden_state


UND_TOWERS: dict[str, type[nn.Module]] = {"open_clip": OpenClipTower, "hf_siglip": HFSiglipTower}


def mlp(dims: list[int]) -> nn.Sequential:
    """Linear layers with GELU between them."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        if i:
            layers.append(nn.GELU())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


class UnderstandingEncoder(nn.Module):
    def __init__(self, cfg: UndEncoderConfig, llm_width: int):
        super().__init__()
        if cfg.kind not in UND_TOWERS:
            raise KeyError(f"model.und.kind={cfg.kind!r}; known: {sorted(UND_TOWERS)}")
        self.cfg = cfg
        self.tower = UND_TOWERS[cfg.kind](cfg)
        self.aligner = mlp([self.tower.width] + [llm_width] * cfg.aligner_layers)
        if cfg.freeze:
            self.tower.requires_grad_(False)

    @property
    def tokens_per_image(self) -> int:
        return (self.cfg.image_size // self.cfg.patch_size) ** 2

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.cfg.mean) / self.cfg.std

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Tower patch tokens of [0,1] images: [N, T, width] (REPA's targets)."""
        return self.tower(self.normalize(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[0,1] images -> LLM-width tokens [N, T, D]."""
        return self.aligner(self.features(images))
