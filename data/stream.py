"""Deterministic, resumable stream of packed batches from webdataset shards.

Order: per epoch, a seeded shard order and a seeded shuffle buffer (raw
bytes; images are decoded late, only for samples this rank keeps). Rank r of
W keeps every W-th sample, so all ranks see equal counts and never hang a
collective. The stream's position is (epoch, index of the first sample not
yet in an emitted batch) plus the skip counters; resuming replays the raw
stream up to that index without decoding, so resumed == uninterrupted.

Bad samples (undecodable image or json, unreadable member, over-long sample)
are skipped and counted by reason; the trainer reports the counts in the
metrics. A missing shard fails at start, naming the path.
"""

from __future__ import annotations

import io
import json
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand
import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

from data.pack import NextFitPacker, collate
from mm.config import DataConfig, resolve_path
from mm.sequence import TASK_UND, Sample, Vocab, generation_sample, understanding_sample


def expand_shards(pattern: str) -> list[str]:
    """Brace-expand a shard pattern and check that every shard exists."""
    paths = [str(resolve_path(p)) for p in braceexpand.braceexpand(pattern)]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) of {pattern!r} not found, e.g. {missing[0]}")
    return paths


def decode_image(data: bytes) -> torch.Tensor:
    """PNG/JPEG bytes -> [C,H,W] float in [0,1] (C=1 for grey, 3 for colour)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        mode = "L" if img.mode in ("L", "1", "I;16", "I") else "RGB"
        arr = np.asarray(img.convert(mode), dtype=np.float32) / 255.0
    t = torch.from_numpy(arr)
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def fit_image(image: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """Centre-crop to square, resize to ``size`` and convert grey<->RGB."""
    c, h, w = image.shape
    s = min(h, w)
    image = image[:, (h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    if s != size:
        image = F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    if c == channels:
        return image.clamp(0, 1)
    if channels == 3 and c == 1:
        return image.expand(3, -1, -1).clamp(0, 1)
    if channels == 1 and c == 3:
        return image.mean(0, keepdim=True).clamp(0, 1)
    raise ValueError(f"cannot convert a {c}-channel image to {channels} channels")


@dataclass
class SampleShapes:
    """What the model needs of each image: sizes, channels and token counts."""

    und_size: int
    und_channels: int
    und_tokens: int
    gen_size: int
    gen_channels: int
    gen_tokens: int


@dataclass
class StreamState:
    epoch: int = 0
    index: int = 0  # first global sample index of ``epoch`` not yet in an emitted batch
    skipped: dict[str, int] = field(default_factory=dict)


def build_sample(raw: dict, vocab: Vocab, shapes: SampleShapes, task: str) -> Sample:
    """Raw webdataset sample (bytes) -> template-built Sample for ``task``."""
    image_key = next((k for k in ("png", "jpg", "jpeg", "webp") if k in raw), None)
    if image_key is None or "json" not in raw:
        raise ValueError(f"sample {raw.get('__key__')} lacks an image or json member")
    meta = json.loads(raw["json"])
    image = decode_image(raw[image_key])
    key = raw["__key__"]
    if task == TASK_UND:
        img = fit_image(image, shapes.und_size, shapes.und_channels)
        return understanding_sample(vocab, img, shapes.und_tokens, meta["question"], meta["answer"], key=key)
    img = fit_image(image, shapes.gen_size, shapes.gen_channels)
    return generation_sample(vocab, img, shapes.gen_tokens, meta["caption"], key=key)


class PackedStream:
    """Infinite iterator of packed batches for one rank; see the module docstring."""

    def __init__(
        self, cfg: DataConfig, vocab: Vocab, shapes: SampleShapes, rank: int = 0, world: int = 1,
        state: StreamState | None = None,
    ):  # fmt: skip
        self.cfg, self.vocab, self.shapes = cfg, vocab, shapes
        self.rank, self.world = rank, world
        self.shards = expand_shards(cfg.train_shards)
        self.state = state or StreamState()
        self.skipped: Counter[str] = Counter(self.state.skipped)
        self.first_errors: dict[str, str] = {}  # reason -> first message, for the reports
        tasks = [(t, w) for t, w in cfg.task_weights.items() if w > 0]
        self.tasks, self.task_weights = [t for t, _ in tasks], [w for _, w in tasks]

    def _skip(self, reason: str, message: str) -> None:
        self.skipped[reason] += 1
        if reason not in self.first_errors:
            self.first_errors[reason] = message
            print(f"data: skipping ({reason}) {message[:300]} (further skips are only counted)", flush=True)

    def _raw_epoch(self, epoch: int) -> Iterator[dict]:
        """Raw samples of one epoch in the seeded order (same on every rank)."""
        rng = random.Random(f"{self.cfg.seed}-shards-{epoch}")
        shards = list(self.shards)
        rng.shuffle(shards)

        def count_and_continue(exn: Exception) -> bool:
            if self.rank == 0:  # every rank reads every shard: count a bad member once, not once per rank
                self._skip("unreadable", repr(exn))
            return True

        pipeline = wds.DataPipeline(wds.SimpleShardList(shards), wds.tarfile_to_samples(handler=count_and_continue))
        buf: list[dict] = []
        for raw in pipeline:
            buf.append(raw)
            if len(buf) >= self.cfg.shuffle_buffer:
                yield buf.pop(rng.randrange(len(buf)))
        rng.shuffle(buf)
        yield from buf

    def _samples(self) -> Iterator[tuple[int, int, Sample]]:
        epoch, start = self.state.epoch, self.state.index
        while True:
            n_seen = n_kept = 0
            # Replaying up to ``start`` re-meets unreadable members the saved counts already hold.
            unreadable_at_save = self.skipped.get("unreadable", 0) if start else None
            for index, raw in enumerate(self._raw_epoch(epoch)):
                n_seen += 1
                if index < start:
                    continue
                if unreadable_at_save is not None:
                    self.skipped.pop("unreadable", None)
                    if unreadable_at_save:
                        self.skipped["unreadable"] = unreadable_at_save
                    unreadable_at_save = None
                if index % self.world != self.rank:
                    continue
                rng = random.Random(f"{self.cfg.seed}-sample-{epoch}-{index}")  # order-independent draw
                task = rng.choices(self.tasks, self.task_weights)[0]
                try:
                    sample = build_sample(raw, self.vocab, self.shapes, task)
                except Exception as exc:  # noqa: BLE001 - any undecodable sample is skipped and counted
                    self._skip(f"bad_sample_{task}", f"{raw.get('__key__')}: {exc!r}")
                    continue
                if len(sample) > self.cfg.seq_len:
                    self._skip("too_long", f"{sample.key}: {len(sample)} tokens > data.seq_len={self.cfg.seq_len}")
                    continue
                n_kept += 1
                yield epoch, index, sample
            if n_kept == 0:  # skipping everything would loop forever: a bug or unusable data
                raise RuntimeError(
                    f"epoch {epoch} of {self.cfg.train_shards} gave no usable sample for rank {self.rank} "
                    f"({n_seen} read; skipped {dict(self.skipped)}; first errors {self.first_errors})"
                )
            epoch, start = epoch + 1, 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        packer = NextFitPacker(self.cfg.seq_len, self.cfg.rows_per_batch)
        for epoch, index, sample in self._samples():
            rows = packer.add(sample)
            if rows is None:
                continue
            # ``sample`` closed the batch and is pending in the packer: resume from it.
            self.state = StreamState(epoch, index, dict(self.skipped))
            yield collate(rows, self.cfg.seq_len, self.vocab.pad)


def read_samples(pattern: str) -> Iterator[dict]:
    """Every raw sample (member bytes by extension) of the shards, in order; a bad tar raises."""
    yield from wds.DataPipeline(wds.SimpleShardList(expand_shards(pattern)), wds.tarfile_to_samples())
