"""The training loader: sharded, mixed, packed batches from DataLoader workers, resumable exactly.

Layout. Rank ``r`` of ``world`` runs ``num_workers`` real ``torch.utils.data.DataLoader``
workers (``batch_size=None``); each worker is one *slice* that reads, decodes,
builds, packs and collates on its own and yields whole packed batches. The
DataLoader hands batches out round robin (worker 0, 1, ..., 0, 1, ...), and every
worker is infinite, so every rank yields a batch for every step: no rank runs
dry and hangs a collective.

Sources. Each source of ``data.sources`` is read by every slice with its own
shuffle buffer (raw bytes; decoding happens only for the sample drawn). A source
either reads *exact epochs* (each epoch a seeded permutation of its shards, split
by node then by worker so every shard is read once per epoch by one slice; a
slice that finishes its part starts its next epoch) or *resamples* shards with
replacement (open-ended pretraining). With fewer shards than slices, each shard
is read as interleaved parts (sample ordinal mod m) so coverage stays exact. Which
source the next sample comes from is a seeded weighted draw.

Seeds. Every random choice is a pure function of (seed, source, rank, worker,
epoch or draw number, layout): shard permutations, shuffle-buffer picks, the
mixture, and each sample's own ``random.Random`` (seeded by where the sample
lives, so the same sample gets the same draws however it is packed or resumed).

State. After each batch a worker snapshots its position: per source the epoch,
the unit (shard) and ordinal reached, the pointers (shard, ordinal) of the raw
samples in its shuffle buffer, the packer's pending items (pointer + token
range) and its skip counts. The snapshot travels with the batch; the main
process keeps the latest one per worker and knows from the round robin which
worker comes next. ``load_state_dict`` gives each worker its snapshot; the worker
re-reads the buffered samples from their shards and rebuilds the pending ones,
so the next batches are bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import bisect
import math
import random
import weakref
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.config import DataConfig
from data.images import set_pixel_cap
from data.pack import PACKERS
from data.reader import SkipLog, SourceReader, SourceSpec, decode_pointers, fetch_raw, resolve_sources, stable_seed
from data.sources import BuildContext, build_samples, source_kind
from data.stream import BadSample, ReadingBoard
from mm.batch import Batch, PackItem, SampleShapes, collate
from mm.sequence import Vocab

STATE_VERSION = 1


class EncodeMemo(Vocab):
    """The vocab with a bounded memo of ``encode`` for short texts: prompts and questions repeat a lot."""

    def __init__(self, vocab: Vocab, max_entries: int = 1 << 16, max_chars: int = 512):
        self.__dict__.update(vocab.__dict__)  # the same tokenizer and special-token ids, as plain attributes
        self.max_entries, self.max_chars = max_entries, max_chars
        self.memo: dict[str, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        ids = self.memo.get(text)
        if ids is None:
            ids = super().encode(text)
            if len(text) <= self.max_chars and len(self.memo) < self.max_entries:
                self.memo[text] = ids
        return list(ids)


class WorkerStream:
    """One slice: mixes its sources, builds samples, packs them and yields (batch, state after it)."""

    def __init__(
        self, specs: list[SourceSpec], cfg: DataConfig, vocab: Vocab, shapes: SampleShapes, rank: int, world: int,
        worker: int, workers: int, salt: str = "", state: dict | None = None,
    ):  # fmt: skip
        self.specs, self.cfg, self.vocab, self.shapes = specs, cfg, EncodeMemo(vocab), shapes
        self.rank, self.world, self.worker, self.workers, self.salt = rank, world, worker, workers, salt
        self.skip = SkipLog(f"rank {rank} worker {worker}", cfg.skip_log_every_s, (state or {}).get("skipped"))
        self.readers = [SourceReader(s, cfg, rank, world, worker, workers, salt, self.skip) for s in specs]
        self.packer = PACKERS[cfg.packer](cfg.seq_len, cfg.pack_lookahead, cfg.min_piece, cfg.pack_slack)
        weights = [s.weight for s in specs]
        self.cumulative = [sum(weights[: i + 1]) for i in range(len(weights))]
        self.draws = 0  # mixture draws so far
        self.batches = 0
        self.good = [0] * len(specs)  # usable samples built, per source
        self.bad = [0] * len(specs)
        if state is not None:
            self._restore(state)

    def _choose(self) -> int:
        u = random.Random(stable_seed(self.cfg.seed, "mix", self.salt, self.world, self.workers, self.rank,
                                      self.worker, self.draws)).random()  # fmt: skip
        self.draws += 1
        return min(bisect.bisect_right(self.cumulative, u * self.cumulative[-1]), len(self.specs) - 1)

    def _context(self, source: int, ptr: tuple[int, int, int]) -> BuildContext:
        rng = random.Random(stable_seed(self.cfg.seed, self.specs[source].name, "sample", *ptr))
        return BuildContext(self.vocab, self.shapes, self.cfg.seq_len, self.cfg.max_image_pixels, rng)

    def _items(self, source: int, ptr: tuple[int, int, int], raw: dict) -> list[PackItem]:
        spec = self.specs[source]
        splittable = source_kind(spec.kind)[0].splittable
        items = []
        for sub, sample in enumerate(build_samples(spec.source, raw, self._context(source, ptr))):
            if len(sample) > self.cfg.seq_len and not splittable:
                self.skip(
                    f"{spec.name}/too_long", f"{sample.key}: {len(sample)} tokens > data.seq_len={self.cfg.seq_len}"
                )
                continue
            items.append(PackItem(len(sample), sample, 0, splittable, (source, *ptr, sub), source))
        return items

    def _draw_one(self) -> None:
        source = self._choose()
        ptr, raw = self.readers[source].next_raw()
        try:
            items = self._items(source, ptr, raw)
        except BadSample as e:
            self.skip(f"{self.specs[source].name}/{e.reason}", f"{raw.get('__key__')}: {e.message}")
            items = []
        for item in items:
            self.packer.add(item)
        if items:
            self.good[source] += 1
            return
        self.bad[source] += 1
        reader = self.readers[source]
        if self.good[source] == 0 and reader.reads_per_epoch and self.bad[source] >= reader.reads_per_epoch:
            raise RuntimeError(
                f"data source {self.specs[source].name!r} gave no usable sample in {self.bad[source]} tries "
                f"(an epoch is {reader.reads_per_epoch} samples for rank {self.rank} worker {self.worker}); "
                f"skipped: {dict(self.skip.counts)}"
            )

    def __iter__(self) -> Iterator[tuple[Batch, dict]]:
        while True:
            rows = []
            for _ in range(self.cfg.rows_per_batch):
                while not self.packer.ready():
                    self._draw_one()
                rows.append(self.packer.pop_row())
            batch = collate(rows, self.cfg.seq_len, self.vocab.pad, self.cfg.loss_reduction)
            self.batches += 1
            yield batch, self.state()

    # ---- state --------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "worker": self.worker, "batches": self.batches, "draws": self.draws,
            "good": list(self.good), "bad": list(self.bad),
            "sources": [r.state() for r in self.readers],
            "pending": [[*item.ref, item.start, item.length] for item in self.packer.buffer],
            "skipped": dict(self.skip.counts),
        }  # fmt: skip

    def _restore(self, state: dict) -> None:
        self.batches, self.draws = state["batches"], state["draws"]
        self.good, self.bad = list(state["good"]), list(state["bad"])
        wanted: dict[tuple[int, int], set[int]] = {}  # (source, shard) -> ordinals to re-read
        for i, s in enumerate(state["sources"]):
            for _, shard, ordinal in decode_pointers(s["buffer"]):
                wanted.setdefault((i, shard), set()).add(ordinal)
        for source, _, shard, ordinal, *_ in state["pending"]:
            wanted.setdefault((source, shard), set()).add(ordinal)
        raws = {key: fetch_raw(self.specs[key[0]], key[1], ords, self.skip) for key, ords in wanted.items()}
        for i, reader in enumerate(self.readers):
            per_source = {(shard, o): raw for (src, shard), got in raws.items() if src == i for o, raw in got.items()}
            reader.restore(state["sources"][i], per_source)
        built: dict[tuple, list[PackItem]] = {}
        for source, epoch, shard, ordinal, sub, start, length in state["pending"]:
            raw = raws[(source, shard)].get(ordinal)
            if raw is None:
                continue  # its shard is gone: counted by fetch_raw
            key = (source, epoch, shard, ordinal)
            if key not in built:
                built[key] = self._items(source, (epoch, shard, ordinal), raw)
            item = next(it for it in built[key] if it.ref[-1] == sub)
            self.packer.buffer.append(PackItem(length, item.sample, start, item.splittable, item.ref, source))


# ---- the main-process side ------------------------------------------------------------
def _identity(x: Any) -> Any:
    return x


class _Slices(IterableDataset):
    """What each DataLoader worker runs: the WorkerStream of its logical worker id."""

    def __init__(self, loader: TrainLoader, first: int):
        self.specs, self.cfg, self.vocab, self.shapes = loader.specs, loader.cfg, loader.vocab, loader.shapes
        self.rank, self.world, self.workers, self.salt = loader.rank, loader.world, loader.workers, loader.salt
        self.states, self.first = dict(loader.worker_states), first
        self.board: ReadingBoard | None = None  # where DataLoader workers say which shard they read

    def stream(self, worker: int) -> WorkerStream:
        if get_worker_info() is not None:  # PIL's cap is process-wide: set it in worker processes only
            set_pixel_cap(self.cfg.max_image_pixels)
        return WorkerStream(
            self.specs, self.cfg, self.vocab, self.shapes, self.rank, self.world, worker, self.workers, self.salt,
            self.states.get(worker),
        )  # fmt: skip

    def __iter__(self) -> Iterator[tuple[Batch, dict]]:
        info = get_worker_info()
        if info is not None and self.board is not None:
            self.board.attach(info.id)
        # The DataLoader starts its round robin at process 0; on resume, process 0 plays the logical worker
        # whose batch comes next, so the order continues where it stopped.
        worker = (self.first + (info.id if info else 0)) % self.workers
        for batch, state in self.stream(worker):
            if info is not None:
                batch = batch.map_tensors(to_transport)
            yield batch, state


def _watched(batches: DataLoader, board: ReadingBoard, rank: int, first: int, timeout: float) -> Iterator:
    """The DataLoader's batches; when a worker produces none in ``timeout`` s (data.worker_timeout_s), one line
    names the rank, the worker and the shard it was reading, instead of DataLoader's bare "timed out"."""
    due = 0  # DataLoader process whose batch comes next (its round robin)
    for_workers = batches.num_workers
    it = iter(batches)
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except RuntimeError as e:
            if not str(e).startswith("DataLoader timed out"):
                raise
            raise RuntimeError(
                f"data: rank {rank} DataLoader worker {due} (logical worker {(first + due) % for_workers}) produced "
                f"no batch in {timeout:g} s (data.worker_timeout_s); it was reading {board.read(due) or 'no shard yet'}"
            ) from None
        due = (due + 1) % for_workers
        yield item


SMALL_TENSOR_BYTES = 1 << 20


def to_transport(t: torch.Tensor) -> torch.Tensor | np.ndarray:
    """Small tensors leave a worker as numpy arrays, copied through the pipe: sending a tensor through
    shared memory costs a file descriptor and a mapping each (~0.25 ms), which for a batch of a dozen
    small tensors was most of the main process's wait. Large ones (images) still go by shared memory."""
    return t.numpy() if t.numel() * t.element_size() < SMALL_TENSOR_BYTES else t


class TrainLoader:
    """Infinite packed batches for one rank; ``state_dict`` is this rank's whole position, all workers included."""

    def __init__(self, cfg: DataConfig, vocab: Vocab, shapes: SampleShapes, rank: int = 0, world: int = 1):
        self.cfg, self.vocab, self.shapes, self.rank, self.world = cfg, vocab, shapes, rank, world
        self.specs = resolve_sources(cfg)
        self.workers = max(1, cfg.num_workers)  # logical workers (0 = one, in this process)
        self.salt = ""  # changes when a position is re-split for a new layout
        self.worker_states: dict[int, dict] = {}  # logical worker -> its state after its last consumed batch
        self.consumed = 0  # batches handed out; the next comes from logical worker consumed % workers
        self.carried_skips: Counter[str] = Counter()  # skip counts of a re-split layout
        self._active: weakref.ref | None = None
        for spec in self.specs:
            if not spec.resample and len(spec.urls) < world * self.workers and rank == 0:
                parts = math.ceil(world * self.workers / len(spec.urls))
                print(
                    f"data: source {spec.name!r} has {len(spec.urls)} shard(s) for {world * self.workers} readers "
                    f"({world} rank(s) x {self.workers} worker(s)); each shard is read as {parts} interleaved parts",
                    flush=True,
                )

    def __iter__(self) -> Iterator[Batch]:
        self.close()  # one live DataLoader at a time
        batches = self._batches()
        # A weak reference: the iterator refers to this loader, so a strong one would make a cycle that only the
        # cyclic GC frees, at a random time, possibly inside a forked worker that inherited it.
        self._active = weakref.ref(batches)
        return batches

    def close(self) -> None:
        """Stop the worker processes now (they also stop as soon as the caller drops the iterator)."""
        batches = self._active() if self._active is not None else None
        if batches is not None:
            batches.close()
        self._active = None

    def _batches(self) -> Iterator[Batch]:
        first = self.consumed % self.workers
        dataset = _Slices(self, first)
        if self.cfg.num_workers == 0:
            source: Any = iter(dataset)
        else:
            dataset.board = ReadingBoard(self.workers)
            source = _watched(DataLoader(
                dataset, batch_size=None, num_workers=self.workers, collate_fn=_identity,
                prefetch_factor=self.cfg.prefetch_factor, pin_memory=torch.cuda.is_available(),
                timeout=self.cfg.worker_timeout_s,
            ), dataset.board, self.rank, first, self.cfg.worker_timeout_s)  # fmt: skip
        expected = first
        for batch, state in source:
            batch = batch.map_tensors(lambda v: torch.from_numpy(v) if isinstance(v, np.ndarray) else v)
            if state["worker"] != expected:  # the resume logic relies on the DataLoader's in-order round robin
                raise RuntimeError(f"batch from worker {state['worker']}, expected worker {expected}")
            self.worker_states[expected] = state
            self.consumed += 1
            expected = (expected + 1) % self.workers
            yield batch

    def skip_counts(self) -> dict[str, int]:
        total = Counter(self.carried_skips)
        for state in self.worker_states.values():
            total.update(state["skipped"])
        return dict(total)

    # ---- state --------------------------------------------------------------------
    def _fingerprint(self) -> list[list]:
        return [[s.name, s.kind, len(s.urls), stable_seed(s.urls)] for s in self.specs]

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION, "rank": self.rank, "world": self.world, "workers": self.workers,
            "consumed": self.consumed, "salt": self.salt, "sources": self._fingerprint(),
            "skipped": dict(self.carried_skips),
            "worker_states": {str(w): s for w, s in sorted(self.worker_states.items())},
        }  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (call before iterating); a new world size or worker count re-splits or refuses."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}; this code reads {STATE_VERSION}")
        if state["sources"] != self._fingerprint():
            raise ValueError(
                "data.sources changed since the checkpoint (names, kinds or shard lists): saved "
                f"{[s[:3] for s in state['sources']]}, now {[s[:3] for s in self._fingerprint()]}; "
                "positions inside shards would point at other samples"
            )
        if (state["world"], state["workers"]) == (self.world, self.workers):
            if state["rank"] != self.rank:
                raise ValueError(f"loader state of rank {state['rank']} given to rank {self.rank}")
            self.consumed, self.salt = state["consumed"], state["salt"]
            self.carried_skips = Counter(state["skipped"])
            self.worker_states = {int(w): s for w, s in state["worker_states"].items()}
            return
        exact = [s.name for s in self.specs if not s.resample]
        if exact:
            raise ValueError(
                f"the loader state was saved with {state['world']} rank(s) x {state['workers']} worker(s), now "
                f"{self.world} x {self.workers}: sources {exact} read exact epochs and their positions cannot be "
                "re-split without replaying or dropping samples; resume with the same world size and "
                "data.num_workers, or set resample: true on those sources"
            )
        self.salt = f"{state['salt']}/{state['world']}x{state['workers']}@{state['consumed']}"
        self.carried_skips = Counter(state["skipped"])
        for s in state["worker_states"].values():
            self.carried_skips.update(s["skipped"])
        self.worker_states, self.consumed = {}, 0
        print(
            f"data: rank {self.rank}: re-split for {self.world} rank(s) x {self.workers} worker(s) (saved with "
            f"{state['world']} x {state['workers']}); resampled sources continue with new seeds ({self.salt!r}); "
            "their buffered samples are dropped (drawn with replacement, nothing is owed)",
            flush=True,
        )
