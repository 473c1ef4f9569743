"""Frozen latent autoencoders of the generation path (registry).

``encode`` maps [0,1] images to the latents the flow runs on; ``decode`` maps
latents back to [0,1] images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mm.schema import ConfigError, resolve_path


@dataclass
class AutoencoderConfig:
    """Latent autoencoder of the flow head's generation path (frozen); kind: a key of AUTOENCODERS."""

    kind: str = "identity"
    path: str = ""  # local diffusers AutoencoderKL directory for kind=diffusers_kl
    image_size: int = 8  # pixel size of generated images
    image_channels: int = 1
    latent_channels: int = 1
    downsample: int = 1  # pixels per latent cell
    dtype: str = "float32"  # SDXL-VAE overflows in fp16: use bfloat16 or float32

    def __post_init__(self) -> None:
        if self.kind not in AUTOENCODERS:
            raise ConfigError(f"autoencoder.kind={self.kind!r}; known: {sorted(AUTOENCODERS)}")
        if self.image_size % self.downsample:
            raise ConfigError(f"autoencoder.image_size={self.image_size} is not a multiple of "
                              f"downsample={self.downsample}")  # fmt: skip
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"autoencoder.dtype={self.dtype!r}; known: float32, bfloat16, float16")

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.image_size // self.downsample
        return (self.latent_channels, side, side)

# SDXL-VAE's architecture (used when no local weights are given: shape tests, meta builds).
SDXL_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=1024,
    block_out_channels=[128, 256, 512, 512], scaling_factor=0.13025,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
)  # fmt: skip


class IdentityAutoencoder(nn.Module):
    """Pixels are the latents, rescaled to [-1, 1] (tiny configs)."""

    def __init__(self, cfg: AutoencoderConfig, where: str = "autoencoder"):
        super().__init__()
        if cfg.latent_channels != cfg.image_channels or cfg.downsample != 1:
            raise ConfigError("identity autoencoder needs latent_channels == image_channels and downsample == 1")

    def pretrained_source(self) -> tuple[str, str] | None:
        return None

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images * 2 - 1

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return ((latents + 1) / 2).clamp(0, 1)


class DiffusersKL(nn.Module):
    """diffusers ``AutoencoderKL`` from a local directory (e.g. SDXL-VAE), frozen."""

    def __init__(self, cfg: AutoencoderConfig, where: str = "autoencoder"):
        super().__init__()
        from diffusers import AutoencoderKL

        self.dtype = getattr(torch, cfg.dtype)
        if cfg.path:
            path = resolve_path(cfg.path)
            if not path.is_dir():
                raise FileNotFoundError(f"{where}.path: no such directory {path}")
            self.vae = AutoencoderKL.from_pretrained(str(path), local_files_only=True, torch_dtype=self.dtype)
        else:
            self.vae = AutoencoderKL(**SDXL_VAE).to(self.dtype)
        self.vae.requires_grad_(False).eval()
        self.scaling = float(self.vae.config.scaling_factor)  # the VAE's own latent scale
        self.cfg = cfg

    @property
    def path(self) -> str:
        return self.cfg.path

    def pretrained_source(self) -> tuple[str, str] | None:
        return ("autoencoder.path", self.cfg.path) if self.cfg.path else None

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        posterior = self.vae.encode((images * 2 - 1).to(self.dtype)).latent_dist
        return posterior.mean.float() * self.scaling

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        images = self.vae.decode((latents / self.scaling).to(self.dtype)).sample.float()
        return ((images + 1) / 2).clamp(0, 1)

    def train(self, mode: bool = True) -> DiffusersKL:
        super().train(mode)
        self.vae.eval()  # frozen: always in eval mode
        return self


AUTOENCODERS: dict[str, type[nn.Module]] = {"identity": IdentityAutoencoder, "diffusers_kl": DiffusersKL}


def build_autoencoder(cfg: AutoencoderConfig, where: str = "autoencoder") -> nn.Module:
    """``where``: the config key of ``cfg`` (e.g. ``model.heads.flow.autoencoder``), for error messages."""
    return AUTOENCODERS[cfg.kind](cfg, where)
