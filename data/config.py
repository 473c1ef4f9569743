"""The data section of a run's config (``data.*``): sources, packing, the loader's workers and limits."""

from __future__ import annotations

from dataclasses import dataclass, field

from data.pack import PACKERS
from data.sources import SourceConfig
from mm.batch import LOSS_REDUCTIONS
from mm.schema import ConfigError


def _digits_sources() -> list[SourceConfig]:
    return [
        SourceConfig(name="digits_vqa", kind="conversation", weight=1.0),
        SourceConfig(name="digits_t2i", kind="generation", weight=1.0),
    ]


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=_digits_sources)
    train_shards: str = "data/shards/digits/train-{000000..000003}.tar"  # the shards of sources with shards: ""
    heldout_shards: str = "data/shards/digits/heldout-000000.tar"  # evaluation only
    build_if_missing: bool = True  # build the bundled digits shards on first run
    seq_len: int = 128  # tokens per packed row
    rows_per_batch: int = 8
    packer: str = "best_fit"  # key of PACKERS (data/pack.py)
    pack_lookahead: int = 64  # samples the packer chooses from
    min_piece: int = 16  # a text document is cut only into pieces of at least this many tokens
    pack_slack: float = 0.02  # best_fit takes the oldest samples that fill a row within this share of the best fill
    loss_reduction: str = "token"  # token | sample (1/n) | square (1/sqrt n), per sample as InternVL
    shuffle_buffer: int = 512  # raw samples per source per worker
    num_workers: int = 2  # DataLoader worker processes per rank; 0 = read in the training process
    prefetch_factor: int = 4  # batches each worker keeps ready
    max_image_pixels: int = 64_000_000  # larger images are skipped as decompression bombs
    allow_shell_urls: bool = False  # allow 'pipe:COMMAND' shard URLs (they run shell commands)
    open_retries: int = 3  # a shard that cannot be opened is retried (backoff) then skipped
    retry_delay_s: float = 1.0
    skip_log_every_s: float = 60.0  # after the first skip of each reason, at most one summary line per interval
    # A DataLoader worker that produces no batch for this long (a stalled pipe: command, a hung mount) stops the run
    # with one line naming the rank, the worker and the shard it was reading; 0 waits forever.
    worker_timeout_s: float = 600.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.sources:
            raise ConfigError("data.sources is empty: list at least one source")
        self.sources = [s if isinstance(s, SourceConfig) else SourceConfig(**s) for s in self.sources]
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names) or not all(names):
            raise ConfigError(f"data.sources need distinct non-empty names, got {names}")
        for s in self.sources:
            pattern = s.shards or self.train_shards
            if "pipe:" in pattern and not self.allow_shell_urls:
                raise ConfigError(
                    f"data.sources[{s.name}] reads {pattern!r}, a shell command; set data.allow_shell_urls=true "
                    "to allow it"
                )
        if sum(s.weight for s in self.sources) <= 0:
            raise ConfigError("data.sources: no source has a positive weight")
        if self.packer not in PACKERS:
            raise ConfigError(f"data.packer={self.packer!r}; known: {sorted(PACKERS)}")
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise ConfigError(f"data.loss_reduction={self.loss_reduction!r}; known: {list(LOSS_REDUCTIONS)}")
        for key in ("seq_len", "rows_per_batch", "pack_lookahead", "min_piece", "shuffle_buffer", "max_image_pixels"):
            if getattr(self, key) < 1:
                raise ConfigError(f"data.{key}={getattr(self, key)} must be >= 1")
        if not 0 <= self.pack_slack < 1:
            raise ConfigError(f"data.pack_slack={self.pack_slack} must be in [0, 1)")
        if self.worker_timeout_s < 0:
            raise ConfigError(f"data.worker_timeout_s={self.worker_timeout_s} must be >= 0 (0 waits forever)")
        if self.num_workers < 0 or self.prefetch_factor < 1 or self.open_retries < 0:
            raise ConfigError("data.num_workers and data.open_retries must be >= 0, data.prefetch_factor >= 1")
