"""JanusFlow's generation encoder/decoder: ConvNeXt-v2 blocks with FiLM time conditioning.

encoder: latents -> patchify conv -> ConvNeXt blocks (FiLM) -> Linear -> LLM tokens (+ skip)
decoder: LLM hidden -> RMSNorm + Linear -> concat skip (long skip) -> ConvNeXt blocks (FiLM)
         -> RMSNorm -> 1x1 conv -> PixelShuffle -> velocity
FiLM projections and the velocity conv start at zero, so at init every block is
the identity in its residual branch's modulation and the predicted velocity is 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from mm.schema import ConfigError


@dataclass
class GenCodecConfig:
    """ConvNeXt-v2 generation encoder/decoder with FiLM time conditioning."""

    channels: int = 64
    patch_size: int = 2
    encoder_blocks: int = 1
    decoder_blocks: int = 1
    time_freq_dim: int = 64  # sinusoidal embedding width of t*1000

    def __post_init__(self) -> None:
        if min(self.channels, self.patch_size, self.time_freq_dim) < 1 or self.time_freq_dim % 2:
            raise ConfigError("codec: channels, patch_size >= 1 and time_freq_dim an even number >= 2")


class TimeEmbedding(nn.Module):
    """t in [0,1] -> sinusoidal(t*1000) -> MLP -> LLM width (JanusFlow's time token)."""

    def __init__(self, freq_dim: int, width: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = (t.float() * 1000.0)[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class GRN(nn.Module):
    """Global response normalisation (ConvNeXt-v2), channels-last input [N,H,W,C]."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(dim))
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * nx) + self.beta + x


class ConvNeXtFiLMBlock(nn.Module):
    """dw7x7 -> RMSNorm -> FiLM(t) -> Linear 4x -> GELU -> GRN -> Linear, residual."""

    def __init__(self, dim: int, cond_dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.RMSNorm(dim, eps=1e-6)
        self.film = nn.Linear(cond_dim, 2 * dim)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.grn = GRN(4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.norm(rearrange(self.dwconv(x), "n c h w -> n h w c"))
        scale, shift = self.film(cond)[:, None, None, :].chunk(2, dim=-1)
        h = h * (1 + scale) + shift
        h = self.fc2(self.grn(self.act(self.fc1(h))))
        return x + rearrange(h, "n h w c -> n c h w")


class GenEncoder(nn.Module):
    def __init__(self, cfg: GenCodecConfig, latent_channels: int, llm_width: int):
        super().__init__()
        self.patchify = nn.Conv2d(latent_channels, cfg.channels, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.blocks = nn.ModuleList(ConvNeXtFiLMBlock(cfg.channels, llm_width) for _ in range(cfg.encoder_blocks))
        self.norm = nn.RMSNorm(cfg.channels, eps=1e-6)
        self.proj = nn.Linear(cfg.channels, llm_width)

    def forward(self, latents: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latents [N,C,h,w], temb [N,D] -> (tokens [N, g*g, D], skip [N, channels, g, g])."""
        x = self.patchify(latents)
        for block in self.blocks:
            x = block(x, temb)
        tokens = self.proj(self.norm(rearrange(x, "n c h w -> n (h w) c")))
        return tokens, x


class GenDecoder(nn.Module):
    def __init__(self, cfg: GenCodecConfig, latent_channels: int, llm_width: int):
        super().__init__()
        c = cfg.channels
        self.in_norm = nn.RMSNorm(llm_width, eps=1e-6)
        self.in_proj = nn.Linear(llm_width, c)
        self.merge = nn.Conv2d(2 * c, c, kernel_size=1)  # long skip from the encoder
        self.blocks = nn.ModuleList(ConvNeXtFiLMBlock(c, llm_width) for _ in range(cfg.decoder_blocks))
        self.out_norm = nn.RMSNorm(c, eps=1e-6)
        self.out = nn.Conv2d(c, latent_channels * cfg.patch_size**2, kernel_size=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.unpatchify = nn.PixelShuffle(cfg.patch_size)

    def forward(self, hidden: torch.Tensor, skip: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """hidden [N, g*g, D], skip [N, c, g, g], temb [N, D] -> velocity [N, C, h, w]."""
        g = skip.shape[-1]
        x = rearrange(self.in_proj(self.in_norm(hidden)), "n (h w) c -> n c h w", h=g, w=g)
        x = self.merge(torch.cat([x, skip], dim=1))
        for block in self.blocks:
            x = block(x, temb)
        x = rearrange(self.out_norm(rearrange(x, "n c h w -> n h w c")), "n h w c -> n c h w")
        return self.unpatchify(self.out(x))
