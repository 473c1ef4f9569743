"""Frequency-band image tokenizer (NFIG's FR-VAE): images -> code grids ordered from low to high frequency.

Pipeline (h = s_n, D = code_dim):

* encoder: [0,1] images [N,C,H,W] -> feature map f [N,D,h,h] (residual conv blocks, 2x downsamples).
* bands: FFT masks split f's spectrum by radius (cycles per map). Stage i's cumulative region is the disc of
  radius s_i/2: the frequencies an s_i x s_i grid represents in every direction. Band i is that disc minus the
  previous one; the last band takes everything left (the spectrum's corners), so the masks partition the
  spectrum and ``sum_i IFFT(FFT(f) * M_i) == f`` exactly, for any map size.
* residual quantization across bands: stage i takes what stages < i left, r = f - f_hat_{i-1}, keeps its
  frequencies up to band i (``residual_scope="cumulative"``: the new band plus what earlier stages got wrong,
  as VAR/RQ-VAE residuals; ``"band"``: band i alone), samples it on an s_i x s_i grid and replaces each of the
  s_i^2 vectors by a code of one shared codebook; the code grid goes back to h x h and is restricted to the same
  frequencies: f_hat_i = f_hat_{i-1} + P_i(up_i(codes_i)). Stage i therefore adds no frequency above its band.
  Resampling is spectral (crop / zero-pad the FFT), exact for the band-limited maps the stages carry, so a
  stage's grid holds its band-limited residual sampled at s_i x s_i and nothing is lost in the resampling.
* decoder: f_hat_n -> images; a prefix of the stages decodes to a coarse (low-pass) image.
* single-scale mode: one stage at s_n x s_n (plain VQ of f), same encoder, decoder and codebook: the
  tokenizer of the raster-order baseline. ``forward`` trains both modes jointly.

Codebook: codes are matched by cosine similarity (``lookup="cosine"``: l2-normalised vectors and codes, as
ViT-VQGAN/LlamaGen; VAR's ``using_znorm``) and stand for their raw (un-normalised) EMA centroid, so residual
stages can carry magnitude. Centroids follow the assigned vectors by EMA (k-means); a code whose EMA
assignment count falls below ``dead_code_threshold`` is restarted on a random vector of the current batch.

Interface of the LLM head (inference, no gradients; stage indices are 0-based, stage k+1 of the issue is
index k):

    tok.stages: tuple[int, ...]            # s_1..s_n
    tok.codebook_size: int; tok.code_dim: int; tok.tokens_per_image: int (sum of s_i^2)
    tok.encode(images, single_scale=False) -> list[LongTensor]   # [0,1] float or uint8 [N,C,H,W] -> [N,s_i,s_i]
    tok.decode(codes, single_scale=False) -> images               # all stages or a prefix (coarse) -> [N,C,H,W]
    tok.stage_inputs(codes) -> list[Tensor]  # teacher forcing: element k-1 (k = 1..n-1) is the input of stage
                                             # k+1, [N, s_{k+1}^2, D]: the upsampled sum of stages 1..k sampled on
                                             # stage k+1's grid (as VAR); the LLM predicts stage k+1's codes there
    tok.code_embedding(codes_k) -> Tensor    # [N,s,s] or [N,s*s] codes -> code vectors [N, s*s, D]
    # sampling, one forward pass per stage:
    acc = tok.empty_accumulator(n_images)
    for k in range(len(tok.stages)):
        codes_k = ...                        # sampled from the LLM, [N, s_k, s_k]
        acc, next_inputs = tok.next_stage_input(acc, codes_k, k)   # next_inputs: [N, s_{k+1}^2, D] or None
    images = tok.decode_features(acc)
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mm.schema import ConfigError

# ---------------------------------------------------------------------------------------------------------------
# Frequency bands and spectral resampling (pure functions: tested on their own, any size)
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class FreqTokenizerConfig:
    """Frequency-band image tokenizer (NFIG's FR-VAE), this module; trained by
    ``scripts/train_tokenizer.py``. Defaults are the tiny digits tokenizer (8x8 grey -> 4x4 map)."""

    image_size: int = 8
    image_channels: int = 1
    channels: tuple[int, ...] = (64, 128)  # conv widths per resolution level, finest first; len - 1 = 2x downsamples
    blocks_per_level: int = 1  # residual blocks per level (encoder and decoder)
    code_dim: int = 16  # channels of the feature map = width of a code vector
    codebook_size: int = 256  # one codebook shared by every stage (and by single-scale mode)
    stages: tuple[int, ...] = (1, 2, 4)  # s_1..s_n: stage i has s_i x s_i tokens; s_n = side of the feature map
    residual_scope: str = "cumulative"  # key of freq_tokenizer.RESIDUAL_SCOPES
    lookup: str = "cosine"  # key of freq_tokenizer.CODE_LOOKUPS (cosine = l2-normalised matching)
    commitment: float = 0.25  # beta of ||f - sg(f_hat_k)||^2
    ema_decay: float = 0.99  # codebook EMA (k-means) decay
    dead_code_threshold: float = 1.0  # EMA assignments per step below which a code is restarted

    def __post_init__(self) -> None:
        s = list(self.stages)
        if not s or s[0] < 1 or any(b <= a for a, b in zip(s, s[1:])):
            raise ConfigError(f"tokenizer stages must be strictly increasing positive sizes, got {s}")
        levels = len(self.channels)
        if levels < 1 or self.image_size % 2 ** (levels - 1) or self.image_size // 2 ** (levels - 1) != s[-1]:
            raise ConfigError(
                f"tokenizer: image_size={self.image_size} with {levels} levels ({levels - 1} 2x downsamples) gives a "
                f"{self.image_size / 2 ** (levels - 1):g} map, but the last stage is {s[-1]}; they must be equal"
            )
        if self.codebook_size < 2 or self.code_dim < 1:
            raise ConfigError("tokenizer: codebook_size must be >= 2 and code_dim >= 1")


def frequency_radius(height: int, width: int) -> torch.Tensor:
    """[height, width] radius of each FFT bin in cycles per map (0 at DC), in ``torch.fft.fft2`` order."""
    ky = torch.fft.fftfreq(height, d=1.0 / height, dtype=torch.float64, device="cpu")
    kx = torch.fft.fftfreq(width, d=1.0 / width, dtype=torch.float64, device="cpu")
    return torch.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2)


def band_masks(height: int, width: int, stages: tuple[int, ...] | list[int]) -> torch.Tensor:
    """[n, height, width] bool: band i holds the bins with s_{i-1}/2 < radius <= s_i/2; the last band all the rest.

    Radius depends on |k| only, so every mask is symmetric under k -> -k and each band of a real map is real.
    An empty band (stages too close for the map's frequency lattice) is an error: it would be a stage of tokens
    that can carry nothing.
    """
    radius = frequency_radius(height, width)
    masks, inside = [], torch.zeros_like(radius, dtype=torch.bool)
    for i, s in enumerate(stages):
        disc = radius <= s / 2 if i < len(stages) - 1 else torch.ones_like(inside)
        band = disc & ~inside
        if not band.any():
            raise ValueError(f"stage {i} (s={s}) adds no frequency of a {height}x{width} map over stages {stages[:i]}")
        masks.append(band)
        inside = inside | band
    return torch.stack(masks)


def split_bands(x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """x [..., H, W] -> its bands [n, ..., H, W] (real; they sum to x)."""
    spectrum = torch.fft.fft2(x)
    return torch.stack([torch.fft.ifft2(spectrum * m.to(x.device)).real for m in masks])


def spectral_resample_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """[n_out, n_in] real matrix resampling a periodic signal by cropping or zero-padding its spectrum.

    Frequencies below the smaller grid's Nyquist are copied. At an even smaller size m the frequencies +-m/2
    share one bin: downsampling folds both into it (what sampling does), upsampling splits it evenly, so real
    signals stay real and up(down(x)) == x for x band-limited below m/2 (and for its cosine at m/2).
    """
    if n_in == n_out:
        return torch.eye(n_in)
    spectrum = torch.fft.fft(torch.eye(n_in, dtype=torch.float64), dim=0)  # column j: spectrum of e_j
    out = torch.zeros(n_out, n_in, dtype=torch.complex128)
    m = min(n_in, n_out)
    for f in range(-((m - 1) // 2), (m - 1) // 2 + 1):
        out[f % n_out] = spectrum[f % n_in]
    if m % 2 == 0:
        nyq = m // 2
        if n_out < n_in:
            out[nyq % n_out] = spectrum[nyq % n_in] + spectrum[-nyq % n_in]
        else:
            out[nyq % n_out] = out[-nyq % n_out] = spectrum[nyq % n_in] / 2
    return (torch.fft.ifft(out, dim=0).real * (n_out / n_in)).float()


def resample(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """[N,D,h,h] -> [N,D,s,s] (or back) with one separable resampling matrix [s,h] for both axes."""
    return torch.einsum("ih,ndhw,jw->ndij", matrix, x, matrix)


def project(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Keep the frequencies of ``mask`` (float [h,h]) of a real map x [..., h, h]."""
    return torch.fft.ifft2(torch.fft.fft2(x) * mask).real


def _cumulative_scope(bands: torch.Tensor) -> torch.Tensor:
    return bands.cumsum(0) > 0


def _band_scope(bands: torch.Tensor) -> torch.Tensor:
    return bands


# Which frequencies of the residual stage i quantizes (and may add to).
RESIDUAL_SCOPES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "cumulative": _cumulative_scope,  # bands 1..i: the new band and what earlier stages left (residual VQ)
    "band": _band_scope,  # band i alone: the bands are quantized independently
}

# ---------------------------------------------------------------------------------------------------------------
# Codebook
# ---------------------------------------------------------------------------------------------------------------


def _cosine_lookup(vectors: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    return (F.normalize(vectors, dim=-1) @ F.normalize(codes, dim=-1).T).argmax(-1)


def _euclidean_lookup(vectors: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    dist = vectors.pow(2).sum(-1, keepdim=True) - 2 * vectors @ codes.T + codes.pow(2).sum(-1)[None]
    return dist.argmin(-1)


CODE_LOOKUPS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cosine": _cosine_lookup,
    "euclidean": _euclidean_lookup,
}


class EMACodebook(nn.Module):
    """K codes of width D; centroids follow their assigned vectors by EMA, dead codes restart on batch vectors."""

    def __init__(self, size: int, dim: int, lookup: str, decay: float, dead_threshold: float):
        super().__init__()
        if lookup not in CODE_LOOKUPS:
            raise KeyError(f"tokenizer lookup={lookup!r}; known: {sorted(CODE_LOOKUPS)}")
        self.match = CODE_LOOKUPS[lookup]
        self.decay, self.dead_threshold = decay, dead_threshold
        self.register_buffer("embed", torch.randn(size, dim))
        self.register_buffer("cluster_size", torch.full((size,), float(dead_threshold)))
        self.register_buffer("embed_sum", self.embed.clone() * dead_threshold)
        self.register_buffer("initialized", torch.tensor(False))

    @property
    def size(self) -> int:
        return self.embed.shape[0]

    def lookup(self, vectors: torch.Tensor) -> torch.Tensor:
        """[..., D] -> code indices [...]."""
        flat = vectors.reshape(-1, vectors.shape[-1]).float()
        return self.match(flat, self.embed).reshape(vectors.shape[:-1])

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return F.embedding(indices, self.embed)

    @torch.no_grad()
    def update(self, vectors: torch.Tensor, indices: torch.Tensor, generator: torch.Generator | None = None) -> int:
        """One EMA k-means step on the assignments of a batch; returns how many dead codes were restarted."""
        vectors, indices = vectors.reshape(-1, vectors.shape[-1]).float(), indices.reshape(-1)
        if not bool(self.initialized):  # data-dependent init: codes start on batch vectors
            self._restart(torch.ones(self.size, dtype=torch.bool, device=vectors.device), vectors, generator)
            self.initialized.fill_(True)
            return self.size
        counts = torch.bincount(indices, minlength=self.size).to(vectors.dtype)
        sums = torch.zeros_like(self.embed).index_add_(0, indices, vectors)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        used = self.cluster_size > 0
        self.embed[used] = self.embed_sum[used] / self.cluster_size[used, None]
        dead = self.cluster_size < self.dead_threshold
        self._restart(dead, vectors, generator)
        return int(dead.sum())

    def _restart(self, dead: torch.Tensor, vectors: torch.Tensor, generator: torch.Generator | None) -> None:
        n = int(dead.sum())
        if n == 0:
            return
        pick = torch.randint(len(vectors), (n,), generator=generator, device="cpu").to(vectors.device)
        self.embed[dead] = vectors[pick]
        self.cluster_size[dead] = self.dead_threshold
        self.embed_sum[dead] = vectors[pick] * self.dead_threshold


# ---------------------------------------------------------------------------------------------------------------
# Encoder / decoder
# ---------------------------------------------------------------------------------------------------------------


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.body = nn.Sequential(
            _norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1),
            _norm(c_out), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1),
        )  # fmt: skip
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


class Encoder(nn.Module):
    """[N,C,H,W] in [-1,1] -> [N,D,h,h]; one 2x stride-2 downsample between consecutive levels."""

    def __init__(self, cfg: FreqTokenizerConfig):
        super().__init__()
        ch = list(cfg.channels)
        layers: list[nn.Module] = [nn.Conv2d(cfg.image_channels, ch[0], 3, padding=1)]
        c = ch[0]
        for level, width in enumerate(ch):
            for _ in range(cfg.blocks_per_level):
                layers.append(ResBlock(c, width))
                c = width
            if level < len(ch) - 1:
                layers.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        layers += [_norm(c), nn.SiLU(), nn.Conv2d(c, cfg.code_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """[N,D,h,h] -> [N,C,H,W] (unbounded; ~[-1,1]); mirror of the encoder with nearest 2x upsampling + conv."""

    def __init__(self, cfg: FreqTokenizerConfig):
        super().__init__()
        ch = list(reversed(cfg.channels))
        layers: list[nn.Module] = [nn.Conv2d(cfg.code_dim, ch[0], 3, padding=1)]
        c = ch[0]
        for level, width in enumerate(ch):
            for _ in range(cfg.blocks_per_level):
                layers.append(ResBlock(c, width))
                c = width
            if level < len(ch) - 1:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)]
        layers += [_norm(c), nn.SiLU(), nn.Conv2d(c, cfg.image_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.net(f)


# ---------------------------------------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------------------------------------


class FreqTokenizer(nn.Module):
    Config = FreqTokenizerConfig  # the shapes (mm.model.image_tokenizers reads it)

    def __init__(self, cfg: FreqTokenizerConfig):
        super().__init__()
        if cfg.residual_scope not in RESIDUAL_SCOPES:
            raise KeyError(f"tokenizer residual_scope={cfg.residual_scope!r}; known: {sorted(RESIDUAL_SCOPES)}")
        self.cfg = cfg
        self.stages: tuple[int, ...] = tuple(cfg.stages)
        self.codebook_size, self.code_dim = cfg.codebook_size, cfg.code_dim
        self.feature_size = self.stages[-1]
        self.image_size, self.image_channels = cfg.image_size, cfg.image_channels
        self.tokens_per_image = sum(s * s for s in self.stages)
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.codebook = EMACodebook(cfg.codebook_size, cfg.code_dim, cfg.lookup, cfg.ema_decay, cfg.dead_code_threshold)
        self.init_derived_buffers()

    def init_derived_buffers(self) -> None:
        """(Re)compute the band masks and resampling matrices from the config.

        Derived, not learned: non-persistent buffers (they follow .to(device); checkpoints hold weights
        only). ``transformers.from_pretrained`` builds modules on the meta device and restores only what
        a checkpoint holds, so a release calls this again after loading (``mm/hf.py: _init_weights``).
        """
        h = self.feature_size
        scopes = RESIDUAL_SCOPES[self.cfg.residual_scope](band_masks(h, h, self.stages))
        device = self.codebook.embed.device if self.codebook.embed.device.type != "meta" else None
        self.register_buffer("scope_mask", scopes.float().to(device), persistent=False)
        self._full_scope = [bool(m.all()) for m in scopes]  # the last cumulative stage keeps everything: no FFT
        for i, s in enumerate(self.stages):
            self.register_buffer(f"down_{i}", spectral_resample_matrix(h, s).to(device), persistent=False)
            self.register_buffer(f"up_{i}", spectral_resample_matrix(s, h).to(device), persistent=False)

    # -- pieces ------------------------------------------------------------------------------------------------

    def _down(self, stage: int) -> torch.Tensor:
        return getattr(self, f"down_{stage}")

    def _up(self, stage: int) -> torch.Tensor:
        return getattr(self, f"up_{stage}")

    def _project(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        return x if self._full_scope[stage] else project(x, self.scope_mask[stage])

    def _float32(self) -> torch.autocast:
        """The band/codebook math runs in float32 even inside an autocast region (FFTs have no bf16; code
        lookups in bf16 would flip nearest codes)."""
        return torch.autocast(self.codebook.embed.device.type, enabled=False)

    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Validate [N,C,H,W] images (uint8, or float in [0,1]) and map them to [-1,1]."""
        c, s = self.cfg.image_channels, self.cfg.image_size
        if images.ndim != 4 or images.shape[1] != c or images.shape[2] != s or images.shape[3] != s:
            raise ValueError(f"tokenizer expects images [N,{c},{s},{s}], got {list(images.shape)}")
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        return x * 2 - 1

    def _check_stage_codes(self, codes_k: torch.Tensor, stage: int, single_scale: bool = False) -> None:
        s = self.feature_size if single_scale else self.stages[stage]
        if codes_k.ndim != 3 or codes_k.shape[1:] != (s, s):
            raise ValueError(f"codes of stage {stage} must be [N,{s},{s}], got {list(codes_k.shape)}")
        if codes_k.numel() and (int(codes_k.min()) < 0 or int(codes_k.max()) >= self.codebook_size):
            raise ValueError(f"codes of stage {stage} outside 0..{self.codebook_size - 1}")

    def _check_codes(self, codes: list[torch.Tensor], single_scale: bool) -> None:
        n = 1 if single_scale else len(self.stages)
        if not 1 <= len(codes) <= n:
            raise ValueError(f"expected codes of 1..{n} stages, got {len(codes)}")
        for i, c in enumerate(codes):
            self._check_stage_codes(c, i, single_scale)

    def stage_contribution(self, codes_k: torch.Tensor, stage: int) -> torch.Tensor:
        """What stage ``stage``'s codes [N,s,s] add to the h x h map: P_i(up_i(code vectors)), [N,D,h,h]."""
        with self._float32():
            q = self.codebook(codes_k).permute(0, 3, 1, 2)
            return self._project(resample(q, self._up(stage)), stage)

    def _grid_tokens(self, f: torch.Tensor, stage: int) -> torch.Tensor:
        """[N,D,h,h] -> its samples on stage ``stage``'s grid as tokens [N, s*s, D]."""
        with self._float32():
            return resample(f.float(), self._down(stage)).flatten(2).transpose(1, 2)

    @torch.no_grad()
    def quantize(self, f: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Residual quantization across bands of f [N,D,h,h].

        Returns (codes per stage [N,s_i,s_i], f_hat after each stage [N,D,h,h], the quantized vectors [M,D]
        (every stage's targets, for the codebook update)).
        """
        f = f.detach().float()
        acc = torch.zeros_like(f)
        codes, prefixes, targets = [], [], []
        with self._float32():
            for i in range(len(self.stages)):
                target = resample(self._project(f - acc, i), self._down(i))  # [N,D,s,s]
                vectors = target.permute(0, 2, 3, 1)
                idx = self.codebook.lookup(vectors)
                acc = acc + self.stage_contribution(idx, i)
                codes.append(idx)
                prefixes.append(acc)
                targets.append(vectors.reshape(-1, self.code_dim))
        return codes, prefixes, torch.cat(targets)

    @torch.no_grad()
    def quantize_single_scale(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Plain VQ of every vector of f: (codes [N,h,h], f_hat [N,D,h,h])."""
        with self._float32():
            idx = self.codebook.lookup(f.detach().float().permute(0, 2, 3, 1))
            return idx, self.codebook(idx).permute(0, 3, 1, 2)

    # -- training ----------------------------------------------------------------------------------------------

    def forward(self, images: torch.Tensor, single_scale_weight: float = 1.0) -> dict[str, torch.Tensor]:
        """Training losses of both modes (the encoder runs once, the decoder once per mode).

        ``pixel``: MSE of the decoded image in [-1,1]; ``feature``: ``commitment`` * mean over the prefixes k of
        ||f - sg(f_hat_k)||^2 (RQ-VAE/VAR: the encoder learns features the first stages can already express).
        The decoder sees f + sg(f_hat - f) (straight-through). ``loss`` = nfig terms + weight * single-scale terms.
        Also returns ``vectors``/``indices`` for ``codebook.update`` and the reconstructions.
        """
        x = self._pixels(images)
        f = self.encoder(x)
        codes, prefixes, targets = self.quantize(f)
        recon = self.decoder(f + (prefixes[-1] - f).detach())
        out = {
            "pixel": F.mse_loss(recon, x),
            "feature": self.cfg.commitment * torch.stack([F.mse_loss(f, p) for p in prefixes]).mean(),
        }
        indices = [torch.cat([c.reshape(-1) for c in codes])]
        vectors = [targets]
        if single_scale_weight > 0:
            ss_codes, ss_hat = self.quantize_single_scale(f)
            ss_recon = self.decoder(f + (ss_hat - f).detach())
            out["ss_pixel"] = F.mse_loss(ss_recon, x)
            out["ss_feature"] = self.cfg.commitment * F.mse_loss(f, ss_hat)
            indices.append(ss_codes.reshape(-1))
            vectors.append(f.detach().permute(0, 2, 3, 1).reshape(-1, self.code_dim))
        loss = out["pixel"] + out["feature"]
        if single_scale_weight > 0:
            loss = loss + single_scale_weight * (out["ss_pixel"] + out["ss_feature"])
        out.update(
            loss=loss, recon=((recon + 1) / 2).clamp(0, 1), vectors=torch.cat(vectors), indices=torch.cat(indices)
        )
        return out

    # -- inference API (LLM head) ------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, images: torch.Tensor, single_scale: bool = False) -> list[torch.Tensor]:
        """[0,1] images [N,C,H,W] -> codes per stage [N,s_i,s_i] (single_scale: one stage [N,h,h])."""
        f = self.encoder(self._pixels(images))
        if single_scale:
            return [self.quantize_single_scale(f)[0]]
        return self.quantize(f)[0]

    @torch.no_grad()
    def features(self, codes: list[torch.Tensor], single_scale: bool = False) -> torch.Tensor:
        """Codes of all stages (or a prefix) -> the quantized map f_hat [N,D,h,h]."""
        self._check_codes(codes, single_scale)
        if single_scale:
            return self.codebook(codes[0]).permute(0, 3, 1, 2)
        return sum(self.stage_contribution(c, i) for i, c in enumerate(codes))

    @torch.no_grad()
    def decode_features(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Quantized map [N,D,h,h] -> [0,1] images [N,C,H,W]."""
        return ((self.decoder(f_hat) + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def decode(self, codes: list[torch.Tensor], single_scale: bool = False) -> torch.Tensor:
        """Codes of all stages (a prefix gives a coarse image) -> [0,1] images [N,C,H,W]."""
        return self.decode_features(self.features(codes, single_scale))

    def code_embedding(self, codes_k: torch.Tensor) -> torch.Tensor:
        """Codes of one stage [N,s,s] or [N,s*s] -> their code vectors [N, s*s, D]."""
        return self.codebook(codes_k.reshape(codes_k.shape[0], -1))

    def empty_accumulator(self, n: int, device: torch.device | str | None = None) -> torch.Tensor:
        """The map before any stage: zeros [n,D,h,h]."""
        h = self.feature_size
        return torch.zeros(n, self.code_dim, h, h, device=device or self.codebook.embed.device)

    @torch.no_grad()
    def next_stage_input(
        self, accumulated: torch.Tensor, codes_k: torch.Tensor, stage: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Add stage ``stage``'s codes to the map; return (map, the input tokens of stage ``stage``+1 or None)."""
        self._check_stage_codes(codes_k, stage)
        accumulated = accumulated + self.stage_contribution(codes_k, stage)
        if stage + 1 == len(self.stages):
            return accumulated, None
        return accumulated, self._grid_tokens(accumulated, stage + 1)

    @torch.no_grad()
    def stage_inputs(self, codes: list[torch.Tensor]) -> list[torch.Tensor]:
        """Teacher forcing: inputs of stages 2..len(codes) ([N, s_{k+1}^2, D]) from the codes of stages 1..k."""
        self._check_codes(codes, False)
        acc = self.empty_accumulator(codes[0].shape[0], codes[0].device)
        inputs = []
        for k in range(len(codes) - 1):
            acc = acc + self.stage_contribution(codes[k], k)
            inputs.append(self._grid_tokens(acc, k + 1))
        return inputs

    # -- checkpoints -------------------------------------------------------------------------------------------

    def save_pretrained(self, path: str | Path) -> None:
        """Weights as safetensors + the config as JSON (no pickle)."""
        from dataclasses import asdict

        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path / "model.safetensors"))
        (path / "tokenizer_config.json").write_text(json.dumps(asdict(self.cfg), indent=1))

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> FreqTokenizer:
        from safetensors.torch import load_file

        path = Path(path)
        for name in ("model.safetensors", "tokenizer_config.json"):
            if not (path / name).is_file():
                raise FileNotFoundError(f"not a tokenizer checkpoint (no {name}): {path}")
        raw = json.loads((path / "tokenizer_config.json").read_text())
        known = set(FreqTokenizerConfig.__dataclass_fields__)
        if set(raw) - known:
            raise ValueError(f"{path}/tokenizer_config.json: unknown keys {sorted(set(raw) - known)}")
        cfg = FreqTokenizerConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
        tok = cls(cfg)
        tok.load_state_dict(load_file(str(path / "model.safetensors"), device="cpu"))
        return tok.to(device).eval()
