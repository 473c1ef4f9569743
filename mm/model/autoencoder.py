"""Frozen latent autoencoders of the generation path (registry).

``encode`` maps [0,1] images to the latents the flow runs on; ``decode`` maps
latents back to [0,1] images.
"""

from __future__ import annotations

import torch
from torch import nn

from mm.config import AutoencoderConfig, resolve_path

# SDXL-VAE's architecture (used when no local weights are given: shape tests, meta builds).
SDXL_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=1024,
    block_out_channels=[128, 256, 512, 512], scaling_factor=0.13025,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
)  # fmt: skip


class IdentityAutoencoder(nn.Module):
    """Pixels are the latents, rescaled to [-1, 1] (tiny configs)."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        if cfg.latent_channels != cfg.image_channels or cfg.downsample != 1:
            raise ValueError("identity autoencoder needs latent_channels == image_channels and downsample == 1")

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images * 2 - 1

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return ((latents + 1) / 2).clamp(0, 1)


class DiffusersKL(nn.Module):
    """diffusers ``AutoencoderKL`` from a local directory (e.g. SDXL-VAE), frozen."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        from diffusers import AutoencoderKL

        self.dtype = getattr(torch, cfg.dtype)
        if cfg.path:
            path = resolve_path(cfg.path)
            if not path.is_dir():
                raise FileNotFoundError(f"model.autoencoder.path: no such directory {path}")
            self.vae = AutoencoderKL.from_pretrained(str(path), local_files_only=True, torch_dtype=self.dtype)
        else:
            self.vae = AutoencoderKL(**SDXL_VAE).to(self.dtype)
        self.vae.requires_grad_(False).eval()
        self.scaling = float(self.vae.config.scaling_factor)

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


def build_autoencoder(cfg: AutoencoderConfig) -> nn.Module:
    if cfg.kind not in AUTOENCODERS:
        raise KeyError(f"model.autoencoder.kind={cfg.kind!r}; known: {sorted(AUTOENCODERS)}")
    return AUTOENCODERS[cfg.kind](cfg)
