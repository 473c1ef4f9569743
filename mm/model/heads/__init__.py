"""Image heads, registered by name (``model.heads`` in the config chooses them); see ``base.py``."""

from __future__ import annotations

from collections.abc import Callable

from mm.model.heads.base import ImageHead
from mm.model.heads.codes import CFG_SCHEDULES, CodeHead, NextFreqHead, RasterHead
from mm.model.heads.flow import FlowHead

# name -> builder(model config, vocab, LLM width, understanding tower width)
IMAGE_HEADS: dict[str, Callable[..., ImageHead]] = {
    "flow": lambda cfg, vocab, d, und_width: FlowHead(cfg, vocab, d, und_width),
    "nextfreq": lambda cfg, vocab, d, und_width: NextFreqHead("nextfreq", cfg, vocab, d),
    "raster": lambda cfg, vocab, d, und_width: RasterHead("raster", cfg, vocab, d),
}

__all__ = ["CFG_SCHEDULES", "IMAGE_HEADS", "CodeHead", "FlowHead", "ImageHead", "NextFreqHead", "RasterHead"]
