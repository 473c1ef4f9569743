"""Image tokenizers of the code heads (image <-> discrete codes), as a registry of kinds.

A kind is an ``nn.Module`` class with a ``Config`` dataclass (its shapes), a ``from_pretrained(path)``
loader and ``image_size`` / ``image_channels`` attributes, registered in :data:`IMAGE_TOKENIZERS` by one
line. A code head's config names the kind and where its frozen weights live::

    model:
      heads:
        nextfreq: {tokenizer: {kind: freq, path: runs/tokenizer/tiny, build_config: configs/tokenizer/tiny.yaml}}

``path: ""`` builds the tokenizer from its shapes (``config``): a release, whose weights are in the
release's own safetensors, or a test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from mm.model.freq_tokenizer import FreqTokenizer
from mm.schema import ConfigError, parse_part, resolve_path

IMAGE_TOKENIZERS: dict[str, type[nn.Module]] = {"freq": FreqTokenizer}


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
