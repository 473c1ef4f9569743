"""Reading one source as one loader slice reads it: seeded shard order, a shuffle buffer, resume pointers.

A slice (one DataLoader worker of one rank, ``data/loader.py``) reads each source through a
:class:`SourceReader`: the source's shards (or interleaved parts of them, when there are fewer shards
than slices) in a seeded order, split by node then by worker; raw samples in a shuffle buffer; its position
and the buffer's contents as pointers (epoch, shard, ordinal) that a resumed run re-reads exactly. Damaged
or unavailable shards are counted skips (:class:`SkipLog`); a source stops only when none of its shards
yields a sample.
"""

from __future__ import annotations

import hashlib
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from data.config import DataConfig
from data.sources import SourceConfig
from data.stream import (
    ShardUnavailable,
    any_shard_has_sample,
    check_openable,
    expand_shards,
    iter_samples,
    note_reading,
    open_shard,
    read_shard,
)


def stable_seed(*parts: Any) -> int:
    """A 64-bit seed from any printable parts; the same in every process and Python run."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


@dataclass(frozen=True)
class SourceSpec:
    """A configured source with its shard list resolved."""

    source: SourceConfig
    urls: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def kind(self) -> str:
        return self.source.kind

    @property
    def weight(self) -> float:
        return self.source.weight

    @property
    def resample(self) -> bool:
        return self.source.resample


def resolve_sources(cfg: DataConfig) -> list[SourceSpec]:
    """Expand every source's shards (``shards: ""`` means ``data.train_shards``); fail naming what is wrong."""
    specs = []
    for src in cfg.sources:
        pattern = src.shards or cfg.train_shards
        try:
            urls = expand_shards(pattern, cfg.allow_shell_urls)
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"data.sources[{src.name}]: {e}") from None
        specs.append(SourceSpec(src, tuple(urls)))
    return specs


class SkipLog:
    """Counts skipped samples by "source/reason"; prints the first of each reason, then a summary at most every N s."""

    def __init__(self, where: str, every_s: float, counts: dict[str, int] | None = None):
        self.where, self.every_s = where, every_s
        self.counts: Counter[str] = Counter(counts or {})
        self.reported: set[str] = set(self.counts)
        self.last_summary, self.unreported = time.monotonic(), 0

    def __call__(self, key: str, message: str) -> None:
        self.counts[key] += 1
        if key not in self.reported:
            self.reported.add(key)
            print(f"data[{self.where}]: skipped ({key}) {message[:300]}", file=sys.stderr, flush=True)
            return
        self.unreported += 1
        now = time.monotonic()
        if now - self.last_summary >= self.every_s:
            print(
                f"data[{self.where}]: skipped {self.unreported} more; totals {dict(self.counts)}",
                file=sys.stderr,
                flush=True,
            )
            self.last_summary, self.unreported = now, 0


class SourceReader:
    """One source as one slice reads it: its units (shards or shard parts) in a seeded order, and a shuffle buffer."""

    def __init__(
        self, spec: SourceSpec, cfg: DataConfig, rank: int, world: int, worker: int, workers: int, salt: str,
        skip: SkipLog,
    ):  # fmt: skip
        self.spec, self.cfg, self.skip = spec, cfg, skip
        self.rank, self.world, self.worker, self.workers, self.salt = rank, world, worker, workers, salt
        n_shards, n_slices = len(spec.urls), world * workers
        self.parts = 1 if spec.resample or n_shards >= n_slices else math.ceil(n_slices / n_shards)
        # position: epoch (exact) or shard draw number (resampled); unit index in the epoch; next ordinal
        self.epoch, self.unit, self.ordinal = 0, 0, 0
        self.picks = 0  # shuffle-buffer draws so far (seeds the next pick)
        self.buffer: list[tuple[tuple[int, int, int], dict]] = []  # ((epoch, shard, ordinal), raw)
        self.epoch_reads = 0  # raw samples read in the current epoch
        self.reads_per_epoch = 0  # of the first completed epoch (0 = none completed yet)
        self._samples: Iterator[tuple[int, dict]] | None = None
        self._units_cache: tuple[int, list[tuple[int, int]]] | None = None
        self._label = b""  # the shard being read, for a stalled worker's report (note_reading)

    # ---- where to read ----------------------------------------------------------------
    def _seed(self, *parts: Any) -> int:
        s = self.spec
        return stable_seed(self.cfg.seed, s.name, self.salt, self.world, self.workers, self.rank, self.worker, *parts)

    def units(self) -> list[tuple[int, int]]:
        """(shard, part) units of the current epoch for this slice: split by node, then by worker."""
        if self.spec.resample:
            return [(random.Random(self._seed("draw", self.epoch)).randrange(len(self.spec.urls)), 0)]
        if self._units_cache is None or self._units_cache[0] != self.epoch:
            every = [(shard, part) for shard in range(len(self.spec.urls)) for part in range(self.parts)]
            # the same permutation on every rank and worker (no rank/worker in this seed)
            random.Random(stable_seed(self.cfg.seed, self.spec.name, "epoch", self.epoch)).shuffle(every)
            self._units_cache = (self.epoch, every[self.rank :: self.world][self.worker :: self.workers])
        return self._units_cache[1]

    def _problem(self, reason: str, message: str) -> None:
        self.skip(f"{self.spec.name}/{reason}", message)

    def _open(self) -> Iterator[tuple[int, dict]] | None:
        shard, part = self.units()[self.unit]
        url, parts, start = self.spec.urls[shard], self.parts, self.ordinal
        try:
            check_openable(url, self.cfg.open_retries, self.cfg.retry_delay_s)
        except ShardUnavailable as e:
            self._problem("shard_unavailable", f"{e}; skipping this shard for now")
            return None

        self._label = f"{url} (source {self.spec.name!r})".encode()
        # a whole shard that yields nothing (empty or unreadable) is counted as data/<source>/empty_shard
        return read_shard(url, self._problem, lambda o: o >= start and o % parts == part, start == 0 and parts == 1)

    def _next_unit(self) -> None:
        self._samples, self.ordinal = None, 0
        self.unit += 1
        if self.unit < len(self.units()):
            return
        self.epoch, self.unit = self.epoch + 1, 0  # next epoch (exact) or next shard draw (resampled)
        n = len(self.spec.urls)
        if self.spec.resample and self.epoch % n:
            return  # resampled: the bookkeeping below runs every n draws ("an epoch")
        if self.epoch_reads == 0 and (not self.spec.resample or self.reads_per_epoch == 0):
            # This slice's shards gave nothing (empty, unreadable or gone: each counted). Other shards of the source
            # may: then this slice goes on to its next epoch's shards. Only a source none of whose shards yields a
            # sample stops, instead of spinning forever (asked again after each empty epoch: shards may vanish).
            if not any_shard_has_sample(self.spec.urls, self.cfg.open_retries, self.cfg.retry_delay_s):
                raise RuntimeError(
                    f"data source {self.spec.name!r} (rank {self.rank}, worker {self.worker}): none of its {n} "
                    f"shard(s) yields a sample (empty, unreadable or missing); skipped so far: {dict(self.skip.counts)}"
                )
        self.reads_per_epoch = self.reads_per_epoch or self.epoch_reads
        self.epoch_reads = 0

    def _read(self) -> tuple[tuple[int, int, int], dict]:
        while True:
            if self._samples is None:
                self._samples = self._open()
                if self._samples is None:
                    self._next_unit()
                    continue
            note_reading(self._label)
            try:
                ordinal, raw = next(self._samples)
            except StopIteration:
                self._next_unit()
                continue
            except OSError as e:  # the shard went away mid-read (or its command failed): skip the rest of it
                self._problem("shard_unavailable", f"{self.spec.urls[self.units()[self.unit][0]]}: {e!r}")
                self._next_unit()
                continue
            self.ordinal = ordinal + 1
            self.epoch_reads += 1
            return (self.epoch, self.units()[self.unit][0], ordinal), raw

    def next_raw(self) -> tuple[tuple[int, int, int], dict]:
        """The next raw sample of this source: a seeded pick from a full shuffle buffer."""
        while len(self.buffer) < max(1, self.cfg.shuffle_buffer):
            self.buffer.append(self._read())
        i = random.Random(self._seed("pick", self.picks)).randrange(len(self.buffer))
        self.picks += 1
        return self.buffer.pop(i)  # the rest stays in read order: the state stores it as compact runs

    # ---- state --------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "epoch": self.epoch, "unit": self.unit, "ordinal": self.ordinal, "picks": self.picks,
            "epoch_reads": self.epoch_reads, "reads_per_epoch": self.reads_per_epoch,
            "buffer": encode_pointers([ptr for ptr, _ in self.buffer]),
        }  # fmt: skip

    def restore(self, state: dict, raws: dict[tuple[int, int], dict]) -> None:
        """Position from ``state``; the buffered raw samples from ``raws`` ((shard, ordinal) -> raw, re-read)."""
        self.epoch, self.unit, self.ordinal, self.picks = (state[k] for k in ("epoch", "unit", "ordinal", "picks"))
        self.epoch_reads, self.reads_per_epoch = state["epoch_reads"], state["reads_per_epoch"]
        self.buffer = [(p, raws[(p[1], p[2])]) for p in decode_pointers(state["buffer"]) if (p[1], p[2]) in raws]
        self._samples = None


def encode_pointers(pointers: list[tuple[int, int, int]]) -> list[list]:
    """Pointers (epoch, shard, ordinal) in read order -> runs [epoch, shard, first ordinal, hex bitmap].

    A shuffle buffer holds a random subset of the samples read last, in read order: a
    bitmap per shard keeps a 2000-sample buffer in a few hundred bytes of the checkpoint.
    """
    runs: list[list] = []
    for epoch, shard, ordinal in pointers:
        if runs and runs[-1][:2] == [epoch, shard] and ordinal > runs[-1][3]:
            runs[-1][2] |= 1 << (ordinal - runs[-1][4])
            runs[-1][3] = ordinal
        else:
            runs.append([epoch, shard, 1, ordinal, ordinal])  # epoch, shard, bitmap, last, first
    return [[epoch, shard, first, format(bits, "x")] for epoch, shard, bits, _, first in runs]


def decode_pointers(runs: list[list]) -> list[tuple[int, int, int]]:
    out = []
    for epoch, shard, first, bits in runs:
        out += [(epoch, shard, first + j) for j, b in enumerate(reversed(bin(int(bits, 16))[2:])) if b == "1"]
    return out


def fetch_raw(spec: SourceSpec, shard: int, ordinals: set[int], skip: SkipLog) -> dict[int, dict]:
    """Re-read the given samples of one shard (payloads of the others are not read)."""
    try:
        check_openable(spec.urls[shard], 2, 1.0)
        with open_shard(spec.urls[shard]) as f:
            return dict(iter_samples(f, lambda reason, message: None, lambda o: o in ordinals))
    except OSError as e:
        for _ in ordinals:
            skip(f"{spec.name}/shard_unavailable", f"re-reading buffered samples on resume: {e!r}")
        return {}
