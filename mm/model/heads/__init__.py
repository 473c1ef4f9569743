"""Image heads, registered by name (``model.heads`` in the config chooses them); see ``base.py``."""

from __future__ import annotations

from collections.abc import Callable

from mm.model.heads.base import ImageHead
from mm.model.heads.codes import CFG_SCHEDULES, CodeHead, NextFreqHead, RasterHead, code_recipe
from mm.model.heads.flow import FlowHead, flow_recipe

# name -> builder(model config, vocab, LLM width, understanding tower width)
IMAGE_HEADS: dict[str, Callable[..., ImageHead]] = {
    "flow": lambda cfg, vocab, d, und_width: FlowHead(cfg, vocab, d, und_width),
    "nextfreq": lambda cfg, vocab, d, und_width: NextFreqHead("nextfreq", cfg, vocab, d),
    "raster": lambda cfg, vocab, d, und_width: RasterHead("raster", cfg, vocab, d),
}

# name -> default sampling recipe from the model config (no model needed: release generation_config, eval)
HEAD_RECIPES: dict[str, Callable[..., dict]] = {
    "flow": flow_recipe,
    "nextfreq": lambda cfg: code_recipe("nextfreq", cfg),
    "raster": lambda cfg: code_recipe("raster", cfg),
}

__all__ = [
    "CFG_SCHEDULES", "HEAD_RECIPES", "IMAGE_HEADS", "CodeHead", "FlowHead", "ImageHead", "NextFreqHead", "RasterHead",
]  # fmt: skip
