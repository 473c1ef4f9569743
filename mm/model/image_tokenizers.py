"""Image tokenizers of the code heads (image <-> discrete codes), as a registry of kinds.

A kind is an ``nn.Module`` class with a ``Config`` dataclass (its shapes), a ``from_pretrained(path)``
loader and ``image_size`` / ``image_channels`` attributes, registered in :data:`IMAGE_TOKENIZERS` by one
line. A code head's config names the kind and where its frozen weights live::

    model:
      heads:
        nextfreq: {tokenizer: {kind: freq, path: runs/tokenizer/tiny, build_config: configs/tokenizer/tiny.yaml}}

``path: ""`` builds the tokenizer from its shapes (``config``): a release, whose weights are in the
release's own safetensors, or a test.

Kinds: ``freq`` (NFIG's frequency-band tokenizer, ours) and ``janus_vq`` (Janus's VQ-16 image tokenizer:
transformers' ``JanusVQVAE``, 16384 codes of 8 dims on a 16x downsampled grid).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mm.model.freq_tokenizer import FreqTokenizer
from mm.schema import ConfigError, parse_part, resolve_path


@dataclass
class JanusVQConfig:
    """transformers' ``JanusVQVAEConfig`` as a dict (``to_dict()``); {} = transformers' defaults (Janus-Pro's)."""

    hf_config: dict = field(default_factory=dict)


class JanusVQ(nn.Module):
    """Janus's VQ tokenizer (transformers' ``JanusVQVAE``, frozen): [0,1] images <-> codes [N, grid*grid].

    Pixels enter as [-1, 1] (Janus's 0.5/0.5 normalisation) and leave as [0, 1]; codes are raster order.
    """

    Config = JanusVQConfig

    def __init__(self, cfg: JanusVQConfig | None = None, vq: nn.Module | None = None):
        super().__init__()
        from transformers import JanusVQVAE, JanusVQVAEConfig

        self.cfg = cfg or JanusVQConfig()
        if vq is None:
            hf = dict(self.cfg.hf_config)
            hf.pop("model_type", None)
            vq = JanusVQVAE(JanusVQVAEConfig(**hf))
        self.vq = vq
        c = vq.config
        self.grid = int(c.num_patches)  # code grid side (the vision config's image_size / patch_size in Janus)
        self.image_size = self.grid * 2 ** (len(c.channel_multiplier) - 1)
        self.image_channels = int(c.in_channels)
        self.codebook_size, self.embed_dim = int(c.num_embeddings), int(c.embed_dim)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> JanusVQ:
        """A ``JanusVQVAE.save_pretrained`` directory."""
        from transformers import JanusVQVAE

        vq = JanusVQVAE.from_pretrained(str(path), local_files_only=True)
        return cls(JanusVQConfig(hf_config=vq.config.to_dict()), vq=vq)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[0,1] images [N, C, S, S] -> codes [N, grid*grid]."""
        tokens = self.vq.encode((images * 2 - 1).to(self.vq.dtype)).image_tokens
        return tokens.view(images.shape[0], -1)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [N, grid*grid] -> [0,1] images."""
        return ((self.vq.decode(codes).float() + 1) / 2).clamp(0, 1)


IMAGE_TOKENIZERS: dict[str, type[nn.Module]] = {"freq": FreqTokenizer, "janus_vq": JanusVQ}


@dataclass
class ImageTokenizerConfig:
    kind: str = "freq"  # key of IMAGE_TOKENIZERS
    path: str = ""  # local directory of the trained tokenizer; "" = built from ``config`` (shapes only)
    build_config: str = ""  # a tokenizer-training config that builds ``path`` first when it is missing
    config: Any = field(default_factory=dict)  # the kind's shapes (IMAGE_TOKENIZERS[kind].Config)

    def __post_init__(self) -> None:
        if self.kind not in IMAGE_TOKENIZERS:
            raise ConfigError(f"tokenizer.kind={self.kind!r}; known: {sorted(IMAGE_TOKENIZERS)}")
        self.config = parse_part(IMAGE_TOKENIZERS[self.kind].Config, self.config, "tokenizer.config")


def load_image_tokenizer(cfg: ImageTokenizerConfig, where: str) -> nn.Module:
    """The frozen tokenizer: from its directory, or built from its shapes (a release, whose weights follow)."""
    cls = IMAGE_TOKENIZERS[cfg.kind]
    if not cfg.path:
        tok = cls(cfg.config)
    else:
        path = resolve_path(cfg.path)
        if not (path / "model.safetensors").is_file():
            hint = f" (or set {where}.build_config to train it first)" if not cfg.build_config else ""
            raise FileNotFoundError(
                f"{where}.path: no tokenizer checkpoint at {path}; train one with "
                f"scripts/train_tokenizer.py --config configs/tokenizer/tiny.yaml{hint}"
            )
        tok = cls.from_pretrained(path)
    tok.requires_grad_(False)
    return tok.eval()
