"""Frozen latent autoencoders of the generation path (registry).

``encode`` maps [0,1] images to the latents the flow runs on; ``decode`` maps
latents back to [0,1] images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from torch import nn

from mm.schema import ConfigError, resolve_path


@dataclass
class AutoencoderConfig:
    """Latent autoencoder of the flow head's generation path (frozen); kind: a key of AUTOENCODERS.

    ``image_channels``, ``latent_channels`` and ``downsample`` are the autoencoder's own: unset (None), they are
    read from a ``diffusers_kl`` folder's ``config.json`` (SDXL-VAE's without a path; the identity's: 1, the
    image's channels, 1); a set value that contradicts the folder is a one-line error naming the key. The head
    that owns this section fills them (:meth:`fill_shapes`): a default instance of this class is made while the
    config schema is built, where nothing may be filled in yet.
    """

    kind: str = "identity"
    path: str = ""  # local diffusers AutoencoderKL directory for kind=diffusers_kl
    image_size: int = 8  # pixel size of generated images (the autoencoder does not fix it)
    image_channels: int | None = None
    latent_channels: int | None = None
    downsample: int | None = None  # pixels per latent cell
    dtype: str = "float32"  # SDXL-VAE overflows in fp16: use bfloat16 or float32

    def __post_init__(self) -> None:
        if self.kind not in AUTOENCODERS:
            raise ConfigError(f"{KEY}.kind={self.kind!r}; known: {sorted(AUTOENCODERS)}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"{KEY}.dtype={self.dtype!r}; known: float32, bfloat16, float16")

    def fill_shapes(self) -> None:
        """Unset shape fields from the autoencoder (its folder), set ones checked against it."""
        if self.kind == "identity":
            channels = self.image_channels or self.latent_channels or 1
            own, source = {"image_channels": channels, "latent_channels": channels, "downsample": 1}, "identity"
        else:
            folder = _vae_folder_config(self.path) if self.path else None
            own = kl_shapes(folder or SDXL_VAE)
            source = f"{self.path}/config.json" if folder else ""  # a missing folder is said when built
        for key, value in own.items():
            mine = getattr(self, key)
            if mine is None:
                setattr(self, key, value)
            elif mine != value and source:
                raise ConfigError(f"{KEY}.{key}={mine} contradicts the {source} autoencoder ({value}); "
                                  f"drop {KEY}.{key}")  # fmt: skip
        if self.image_size % self.downsample:
            raise ConfigError(f"{KEY}.image_size={self.image_size} is not a multiple of the autoencoder's "
                              f"downsample={self.downsample}")  # fmt: skip

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.image_size // self.downsample
        return (self.latent_channels, side, side)


KEY = "model.heads.flow.autoencoder"  # the one head with an autoencoder (named in messages)


def kl_shapes(config: dict) -> dict[str, int]:
    """An AutoencoderKL config's image channels, latent channels and downsampling (one per down block but the last)."""
    return {"image_channels": int(config.get("in_channels", 3)), "latent_channels": int(config["latent_channels"]),
            "downsample": 2 ** (len(config["block_out_channels"]) - 1)}  # fmt: skip


def _vae_folder_config(path: str) -> dict | None:
    file = resolve_path(path) / "config.json"
    return json.loads(file.read_text()) if file.is_file() else None


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
        cfg.fill_shapes()  # a section built outside a head (FlowHeadConfig fills its own)
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

        cfg.fill_shapes()  # a section built outside a head (FlowHeadConfig fills its own)
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
