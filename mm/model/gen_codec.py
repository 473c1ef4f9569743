"""The flow head's generation encoder/decoder ("codec"), as a registry of kinds (``GEN_CODECS``).

A codec maps noisy latents and the flow time to LLM-width tokens (and a long skip), and the LLM's
hidden states at those tokens back to a velocity. Its parts are registered on the flow head under the
part names the kind gives them, so the state-dict keys are ``heads.flow.<part>.*``:

``convnext`` (the tiny default; ``time_embed``, ``gen_encoder``, ``gen_decoder``):
  encoder: latents -> patchify conv -> ConvNeXt blocks (FiLM) -> Linear -> LLM tokens (+ skip)
  decoder: LLM hidden -> RMSNorm + Linear -> concat skip (long skip) -> ConvNeXt blocks (FiLM)
           -> RMSNorm -> 1x1 conv -> PixelShuffle -> velocity
  FiLM projections and the velocity conv start at zero, so at init every block is the identity in its
  residual branch's modulation and the predicted velocity is 0.

``uvit`` (JanusFlow-1.3B's released layout, key for key and shape for shape: ``gen_encoder`` =
``vision_gen_enc_model``, ``gen_encoder_aligner``, ``gen_decoder_aligner_norm``, ``gen_decoder_aligner``,
``gen_decoder`` = ``vision_gen_dec_model``):
  time: sinusoid(t*1000) -> Linear -> SiLU -> Linear (the LLM's time token, inside the encoder)
  encoder: latents -> conv (stride = patch_size) -> ConvNeXt blocks with FiLM after the residual
           -> flatten -> Linear aligner -> LLM tokens; the block output is the long skip
  decoder: LLM hidden -> RMSNorm -> Linear aligner -> RMSNorm -> concat skip -> ConvNeXt blocks (FiLM)
           -> per upsampling: RMSNorm -> 1x1 conv -> PixelShuffle(2) -> velocity
  Written from the layout of the public reference (``janus/janusflow/models/uvit.py``); FiLM mappers and
  the last conv start at zero here (the released weights replace them).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from mm.profiling import forward_flops, trains
from mm.schema import ConfigError


@dataclass
class GenCodecConfig:
    """The flow head's generation encoder/decoder: a kind of :data:`GEN_CODECS` and its shapes."""

    kind: str = "convnext"  # key of GEN_CODECS: convnext (ours) | uvit (JanusFlow-1.3B's layout)
    channels: int = 64
    patch_size: int = 2  # latent cells per token side (uvit: the encoder conv's stride, a power of 2)
    encoder_blocks: int = 1
    decoder_blocks: int = 1
    time_freq_dim: int = 64  # sinusoidal embedding width of t*1000 (uvit: equal to channels)
    in_kernel: int = 2  # uvit: the encoder conv's kernel (padding kernel - stride)
    norm_eps: float = 1e-6  # uvit: the RMSNorms inside encoder and decoder
    aligner_norm_eps: float = 1e-6  # uvit: the RMSNorm before the decoder aligner (the LLM's rms_norm_eps)

    def __post_init__(self) -> None:
        if self.kind not in GEN_CODECS:
            raise ConfigError(f"codec.kind={self.kind!r}; known: {sorted(GEN_CODECS)}")
        if min(self.channels, self.patch_size, self.time_freq_dim) < 1 or self.time_freq_dim % 2:
            raise ConfigError("codec: channels, patch_size >= 1 and time_freq_dim an even number >= 2")
        if self.kind == "uvit":
            if self.time_freq_dim != self.channels:
                raise ConfigError(
                    f"codec.time_freq_dim={self.time_freq_dim} must equal codec.channels={self.channels} for "
                    "kind uvit (its time projection has the channel width)"
                )
            if self.patch_size & (self.patch_size - 1) or self.in_kernel < self.patch_size:
                raise ConfigError(f"codec: kind uvit needs a power-of-2 patch_size (got {self.patch_size}) and "
                                  f"in_kernel >= patch_size (got {self.in_kernel})")  # fmt: skip


def time_token(temb: torch.Tensor) -> torch.Tensor:
    """The embedding at <begin_of_generation>: the image's, or with one time per slot their mean over the grid."""
    return temb if temb.ndim == 2 else temb.mean(dim=(1, 2))


def sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[cos | sin] of t*1000 at ``dim/2`` geometric frequencies (diffusers' Timesteps, flip_sin_to_cos)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimeEmbedding(nn.Module):
    """t in [0,1] -> sinusoidal(t*1000) -> MLP -> LLM width (JanusFlow's time token)."""

    def __init__(self, freq_dim: int, width: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoid(t, self.freq_dim))


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
        film = self.film(cond)  # cond [N, D] (one time per image) or [N, h, w, D] (one per slot)
        scale, shift = (film[:, None, None, :] if film.ndim == 2 else film).chunk(2, dim=-1)
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


# ---------------------------------------------------------------------------------------------------------
# Codec kinds: the parts a flow head registers, and the two calls it makes
# ---------------------------------------------------------------------------------------------------------


class GenCodec(nn.Module, ABC):
    """A codec kind: its children are the flow head's parts (registered there under the same names).

    ``embed(z_t, t) -> (tokens [N, g*g, D], time embedding, skip)``;
    ``velocity(hidden [N, g*g, D], skip, time embedding) -> [N, C, h, w]``. The time embedding is [N, D]
    for times [N]; a kind with ``SLOT_TIMES`` also takes times [N, g*g] (one per slot) and returns [N, g, g, D].
    """

    PART_NAMES: ClassVar[tuple[str, ...]]
    SLOT_TIMES: ClassVar[bool] = False  # takes one time per slot (Diffusion Forcing)

    def __init__(self, cfg: GenCodecConfig, latent_channels: int, llm_width: int):
        super().__init__()
        self.cfg, self.latent_channels, self.llm_width = cfg, latent_channels, llm_width

    @abstractmethod
    def embed(self, z_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Implemented by each codec kind."""

    @abstractmethod
    def velocity(self, hidden: torch.Tensor, skip: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """Implemented by each codec kind."""

    def skip_shape(self, grid: int) -> tuple[int, ...]:
        return (self.cfg.channels, grid, grid)

    @abstractmethod
    def trains_before_llm(self) -> bool:
        """Implemented by each codec kind."""

    @abstractmethod
    def costs(self, latent_shape: tuple[int, ...], grid: int, llm_out_needs_grad: bool) -> dict[str, tuple]:
        """Per image: part -> (forward FLOPs, backward in forwards) (``mm.train.flops``)."""


class ConvNeXtCodec(GenCodec):
    """Ours (the tiny default): a separate time embedding, ConvNeXt-v2 encoder/decoder with FiLM."""

    PART_NAMES = ("time_embed", "gen_encoder", "gen_decoder")
    SLOT_TIMES = True  # FiLM is per position: each slot can carry its own time

    def __init__(self, cfg: GenCodecConfig, latent_channels: int, llm_width: int):
        super().__init__(cfg, latent_channels, llm_width)
        self.time_embed = TimeEmbedding(cfg.time_freq_dim, llm_width)
        self.gen_encoder = GenEncoder(cfg, latent_channels, llm_width)
        self.gen_decoder = GenDecoder(cfg, latent_channels, llm_width)

    def embed(self, z_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if t.ndim == 2:  # one time per slot: [N, g*g] -> FiLM conditions [N, g, g, D]
            g = math.isqrt(t.shape[1])
            temb = self.time_embed(t.flatten()).view(t.shape[0], g, g, -1)
        else:
            temb = self.time_embed(t)
        tokens, skip = self.gen_encoder(z_t, temb)
        return tokens, temb, skip

    def velocity(self, hidden: torch.Tensor, skip: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.gen_decoder(hidden, skip, temb)

    def trains_before_llm(self) -> bool:
        return trains(self.time_embed) or trains(self.gen_encoder)

    def costs(self, latent_shape: tuple[int, ...], grid: int, llm_out_needs_grad: bool) -> dict[str, tuple]:
        d, g, c = self.llm_width, grid, self.cfg.channels
        te, enc, dec = trains(self.time_embed), trains(self.gen_encoder), trains(self.gen_decoder)
        return {
            "time_embed": (forward_flops(self.time_embed, (1,)), 2.0 if te else 0.0),
            "gen_encoder": (forward_flops(self.gen_encoder, (1, *latent_shape), (1, d)), float(enc) + float(enc or te)),
            "gen_decoder": (
                forward_flops(self.gen_decoder, (1, g * g, d), (1, c, g, g), (1, d)),
                float(dec) + float(llm_out_needs_grad or enc or te),
            ),
        }


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-v2's GRN with JanusFlow's parameter names and [1,1,1,C] shapes (channels-last input)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.bias = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.bias + (self.weight * nx + 1) * x


class UViTBlock(nn.Module):
    """A ConvNeXt block whose FiLM acts after the residual sum: x = (x + branch(x)) * (1 + s) + b, with
    (s, b) = Linear(SiLU(time token))."""

    def __init__(self, dim: int, cond_dim: int, eps: float):
        super().__init__()
        self.depthwise = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.RMSNorm(dim, eps=eps)
        self.channelwise_linear_1 = nn.Linear(dim, 4 * dim)
        self.channelwise_act = nn.GELU()
        self.channelwise_norm = GlobalResponseNorm(4 * dim)
        self.channelwise_linear_2 = nn.Linear(4 * dim, dim)
        self.cond_embeds_mapper = nn.Linear(cond_dim, 2 * dim)
        nn.init.zeros_(self.cond_embeds_mapper.weight)  # identity modulation at init
        nn.init.zeros_(self.cond_embeds_mapper.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = rearrange(self.depthwise(x), "n c h w -> n h w c")
        h = self.channelwise_linear_2(
            self.channelwise_norm(self.channelwise_act(self.channelwise_linear_1(self.norm(h))))
        )
        x = x + rearrange(h, "n h w c -> n c h w")
        scale, shift = self.cond_embeds_mapper(F.silu(cond)).chunk(2, dim=1)
        return x * (1 + scale[:, :, None, None]) + shift[:, :, None, None]


class UViTMidBlock(nn.Module):
    def __init__(self, dim: int, cond_dim: int, n: int, eps: float):
        super().__init__()
        self.res_blocks = nn.ModuleList(UViTBlock(dim, cond_dim, eps) for _ in range(n))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        for block in self.res_blocks:
            x = block(x, cond)
        return x


class UViTTimeEmbedding(nn.Module):
    """sinusoid(t*1000) -> linear_1 -> SiLU -> linear_2 (diffusers' Timesteps + TimestepEmbedding names)."""

    def __init__(self, freq_dim: int, width: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.linear_1 = nn.Linear(freq_dim, width)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(width, width)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(sinusoid(t, self.freq_dim))))


def _channels_last_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return rearrange(norm(rearrange(x, "n c h w -> n h w c")), "n h w c -> n c h w")


class UViTEncoder(nn.Module):
    """JanusFlow's ``vision_gen_enc_model``: the time embedding, a strided conv, a mid block."""

    def __init__(self, cfg: GenCodecConfig, latent_channels: int, llm_width: int):
        super().__init__()
        c = cfg.channels
        self.time_embed = UViTTimeEmbedding(c, llm_width)
        self.in_conv = nn.Conv2d(latent_channels, c, kernel_size=cfg.in_kernel, stride=cfg.patch_size,
                                 padding=cfg.in_kernel - cfg.patch_size)  # fmt: skip
        self.mid_block = UViTMidBlock(c, llm_width, cfg.encoder_blocks, cfg.norm_eps)

    def forward(self, latents: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.mid_block(self.in_conv(latents), temb)


class UViTUnpatchify(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, eps: float):
        super().__init__()
        self.norm = nn.RMSNorm(in_channels, eps=eps)
        self.unpatch_conv = nn.Conv2d(in_channels, out_channels * 4, kernel_size=1)
        self.pixel_shuffle = nn.PixelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pixel_shuffle(self.unpatch_conv(_channels_last_norm(self.norm, x)))


class UViTDecoder(nn.Module):
    """JanusFlow's ``vision_gen_dec_model``: norm, concat the long skip, a mid block, 2x unpatchify steps."""

    def __init__(self, cfg: GenCodecConfig, latent_channels: int, llm_width: int):
        super().__init__()
        c, steps = cfg.channels, int(math.log2(cfg.patch_size))
        self.mid_block = UViTMidBlock(2 * c, llm_width, cfg.decoder_blocks, cfg.norm_eps)
        self.out_convs = nn.ModuleList(
            UViTUnpatchify(2 * c if i == 0 else c, latent_channels if i == steps - 1 else c, cfg.norm_eps)
            for i in range(steps)
        )
        last = self.out_convs[-1].unpatch_conv
        nn.init.zeros_(last.weight)  # velocity 0 at init
        nn.init.zeros_(last.bias)
        self.input_norm = nn.RMSNorm(c, eps=cfg.norm_eps)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(torch.cat([_channels_last_norm(self.input_norm, x), skip], dim=1), temb)
        for out_conv in self.out_convs:
            x = out_conv(x)
        return x


class UViTCodec(GenCodec):
    """JanusFlow-1.3B's generation path, with its separate encoder and decoder aligners."""

    PART_NAMES = ("gen_encoder", "gen_encoder_aligner", "gen_decoder_aligner_norm", "gen_decoder_aligner",
                  "gen_decoder")  # fmt: skip

    def __init__(self, cfg: GenCodecConfig, latent_channels: int, llm_width: int):
        super().__init__(cfg, latent_channels, llm_width)
        c = cfg.channels
        self.gen_encoder = UViTEncoder(cfg, latent_channels, llm_width)
        self.gen_encoder_aligner = nn.Linear(c, llm_width)
        self.gen_decoder_aligner_norm = nn.RMSNorm(llm_width, eps=cfg.aligner_norm_eps)
        self.gen_decoder_aligner = nn.Linear(llm_width, c)
        self.gen_decoder = UViTDecoder(cfg, latent_channels, llm_width)

    def embed(self, z_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        temb = self.gen_encoder.time_embed(t)
        x = self.gen_encoder(z_t, temb)
        return self.gen_encoder_aligner(rearrange(x, "n c h w -> n (h w) c")), temb, x

    def velocity(self, hidden: torch.Tensor, skip: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        g = skip.shape[-1]
        x = self.gen_decoder_aligner(self.gen_decoder_aligner_norm(hidden))
        return self.gen_decoder(rearrange(x, "n (h w) c -> n c h w", h=g, w=g), skip, temb)

    def trains_before_llm(self) -> bool:
        return trains(self.gen_encoder) or trains(self.gen_encoder_aligner)

    def costs(self, latent_shape: tuple[int, ...], grid: int, llm_out_needs_grad: bool) -> dict[str, tuple]:
        d, g, c = self.llm_width, grid, self.cfg.channels
        enc = self.trains_before_llm()
        dec = any(trains(getattr(self, n)) for n in self.PART_NAMES[2:])
        return {
            "gen_encoder": (forward_flops(lambda z, t: self.embed(z, t[:, 0]), (1, *latent_shape), (1, 1)), 2.0 * enc),
            "gen_decoder": (
                forward_flops(self.velocity, (1, g * g, d), (1, c, g, g), (1, d)),
                float(dec) + float(llm_out_needs_grad or enc),
            ),
        }


GEN_CODECS: dict[str, type[GenCodec]] = {"convnext": ConvNeXtCodec, "uvit": UViTCodec}
