"""Build the bundled shards a config reads, when they are missing (``python train.py`` on a fresh machine)."""

from __future__ import annotations

from collections.abc import Callable

from data.bundled.digits import ensure_bundled_digits
from data.bundled.generalist import ensure_generalist_shards
from data.bundled.longctx import ensure_longctx_shards
from data.config import DataConfig

# Bundled shard folders and what builds them (the long-context albums read the digits too).
BUNDLED_SHARDS: dict[str, Callable[[str], bool]] = {
    "data/shards/digits/": ensure_bundled_digits,
    "data/shards/longctx/": ensure_longctx_shards,
    "data/shards/generalist/": ensure_generalist_shards,
}


def ensure_bundled_shards(cfg: DataConfig) -> None:
    """Build the bundled shards (digits, albums, the generalist's) when every path the config reads is one of them."""
    if not cfg.build_if_missing:
        return
    wanted = [cfg.train_shards, cfg.heldout_shards] + [s.shards for s in cfg.sources if s.shards]
    folders = [next((f for f in BUNDLED_SHARDS if w.startswith(f)), None) for w in wanted]
    if all(folders):
        for folder in dict.fromkeys(folders):
            BUNDLED_SHARDS[folder](folder.rstrip("/"))
