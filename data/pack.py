"""Pack variable-length samples into rows of a fixed token budget, and collate rows into a batch.

A batch is ``rows_per_batch`` rows of ``seq_len`` tokens. Each sample keeps its own
position ids (copied from ``Sample.position_ids()``) and a batch-unique sample id; the
batch carries explicit varlen metadata (``cu_seqlens``, ``max_seqlen``) so nothing
downstream infers sample boundaries from position ids.

Packers (:data:`PACKERS`) buffer :class:`PackItem` s and hand out one row at a time:

* ``best_fit`` (default): the oldest buffered item opens the row (so nothing waits
  forever), then the oldest-first subset of the other buffered items that fills
  the row within ``slack`` of the best possible fill (exact subset sum over the
  lookahead), then the tail is filled by cutting a text-only document (never a
  sample with images). On a realistic mix this fills
  4096-token rows to ~0.99 (``scripts/bench_data.py``); whole-sample bin packing
  tops out near 0.96 there because a row holds only ~6 image samples.
* ``next_fit``: rows in arrival order, a sample that does not fit closes the row
  (the baseline).

Per-sample loss reduction (``loss_weights`` per token, as InternVL): ``token`` (every
supervised token weighs 1), ``sample`` (1/n: every sample weighs the same),
``square`` (1/sqrt(n)). The model divides the weighted sum by the summed weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

from mm.sequence import FLOW_HEAD, IGNORE, Sample

LOSS_REDUCTIONS = ("token", "sample", "square")


@dataclass
class PackItem:
    """A sample, or a token range of a text-only one, waiting to be packed."""

    length: int
    sample: Sample | None = None  # None in length-only simulations (benchmarks)
    start: int = 0  # the item covers tokens [start, start + length) of ``sample``
    splittable: bool = False
    ref: tuple = ()  # where the sample came from (the loader's resume pointer); opaque here
    source: int = 0  # index of the data source (per-source counts)

    def split(self, n: int) -> tuple[PackItem, PackItem]:
        return replace(self, length=n), replace(self, start=self.start + n, length=self.length - n)


def as_item(s: Sample | PackItem) -> PackItem:
    return s if isinstance(s, PackItem) else PackItem(len(s), s)


class NextFitPacker:
    """Rows in arrival order; an item that does not fit closes the row."""

    def __init__(self, seq_len: int, lookahead: int = 1, min_piece: int = 1, slack: float = 0.0):
        self.seq_len = seq_len
        self.buffer: list[PackItem] = []
        self.tokens = 0

    def add(self, item: PackItem) -> None:
        if item.length > self.seq_len:
            raise ValueError(f"item of {item.length} tokens > seq_len={self.seq_len}")
        self.buffer.append(item)
        self.tokens += item.length

    def ready(self) -> bool:
        return self.tokens > self.seq_len  # the row's closing item has arrived

    def pop_row(self) -> list[PackItem]:
        row, room = [], self.seq_len
        while self.buffer and self.buffer[0].length <= room:
            item = self.buffer.pop(0)
            row.append(item)
            room -= item.length
        self.tokens -= self.seq_len - room
        return row


def best_subset(lengths: list[int], room: int, slack: int = 0) -> list[int]:
    """Indices of the oldest-first subset of ``lengths`` whose total is within ``slack`` of the best total <= room.

    Exact subset sum with Python ints as bitsets (bit t of ``suffix[i]``: items i.. can
    total t). Walking the items oldest first, an item is taken whenever the rest can
    still end within [best - slack, best]: the earliest items that pack well win, so
    rows keep the arrival order's mix of tasks instead of grouping look-alike lengths.
    """
    mask = (1 << (room + 1)) - 1
    suffix = [1] * (len(lengths) + 1)
    for i in range(len(lengths) - 1, -1, -1):
        suffix[i] = (suffix[i + 1] | (suffix[i + 1] << lengths[i])) & mask
    best = suffix[0].bit_length() - 1
    floor = max(0, best - slack)
    chosen, total = [], 0
    for i, n in enumerate(lengths):
        lo, hi = max(0, floor - total - n), best - total - n
        if hi >= 0 and (suffix[i + 1] >> lo) & ((1 << (hi - lo + 1)) - 1):
            chosen.append(i)
            total += n
    return chosen


class BestFitPacker:
    """Each row: the oldest item, the subset of the buffer that fills the rest best, then a cut text document."""

    def __init__(self, seq_len: int, lookahead: int = 64, min_piece: int = 16, slack: float = 0.02):
        self.seq_len, self.lookahead, self.min_piece = seq_len, lookahead, min_piece
        self.slack = int(slack * seq_len)
        self.buffer: list[PackItem] = []

    def add(self, item: PackItem) -> None:
        if item.length > self.seq_len:
            raise ValueError(f"item of {item.length} tokens > seq_len={self.seq_len}")
        self.buffer.append(item)

    def ready(self) -> bool:
        return len(self.buffer) >= self.lookahead

    def pop_row(self) -> list[PackItem]:
        if not self.buffer:
            return []
        row = [self.buffer.pop(0)]  # the oldest always goes: nothing waits more than lookahead rows
        room = self.seq_len - row[0].length
        chosen = set(best_subset([i.length for i in self.buffer], room, self.slack))
        row += [item for i, item in enumerate(self.buffer) if i in chosen]
        self.buffer = [item for i, item in enumerate(self.buffer) if i not in chosen]
        room -= sum(item.length for item in row[1:])
        if room >= self.min_piece:  # fill the tail with the head of the oldest long-enough text document
            for i, item in enumerate(self.buffer):
                if item.splittable and item.length - room >= self.min_piece:
                    head, self.buffer[i] = item.split(room)
                    row.append(head)
                    break
        return row


PACKERS = {"best_fit": BestFitPacker, "next_fit": NextFitPacker}


def pack_all(
    samples: list[Sample | PackItem], seq_len: int, rows_per_batch: int, packer: str = "best_fit", lookahead: int = 64
) -> Iterator[list[list[PackItem]]]:
    """Pack a finite list; the last partial batch is emitted too (evaluation, tests)."""
    p = PACKERS[packer](seq_len, lookahead)
    for s in samples:
        p.add(as_item(s))
    rows = []
    while p.buffer:
        rows.append(p.pop_row())
        if len(rows) == rows_per_batch:
            yield rows
            rows = []
    if rows:
        yield rows


def _weight(n_supervised: int, reduction: str) -> float:
    if reduction == "token":
        return 1.0
    if reduction == "sample":
        return 1.0 / n_supervised
    if reduction == "square":
        return 1.0 / math.sqrt(n_supervised)
    raise KeyError(f"loss reduction {reduction!r}; known: {LOSS_REDUCTIONS}")


def collate(
    rows: list[list[Sample | PackItem]], seq_len: int, pad_id: int, loss_reduction: str = "token"
) -> dict[str, torch.Tensor]:
    """Rows of samples (or items) -> padded tensors. Images are stacked in token order (row-major).

    Keys: ``input_ids, targets, position_ids (float32), sample_ids (-1 = padding),
    block_ids (-1 = ordinary causal token; >= 0: tokens of one sample with one block id
    see each other, a full block inside an image), prompt_mask, token_kinds, loss_weights
    (float32), gen_sample_ids, sample_source, cu_seqlens (int32, over the flattened [B*L]
    rows: one segment per sample and one per row's padding), max_seqlen`` and
    ``und_images`` / ``gen_images`` when present.

    Generation samples go to the image head they name (``Sample.head``): the flow head's
    images are ``gen_images`` (with ``gen_sample_ids``), any other head's are
    ``{head}_images`` with ``{head}_sample_ids``, so heads whose images differ in size
    can share a batch.
    """
    B = len(rows)
    input_ids = torch.full((B, seq_len), pad_id, dtype=torch.long)
    targets = torch.full((B, seq_len), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((B, seq_len), dtype=torch.float32)  # float32: V2PE-ready
    sample_ids = torch.full((B, seq_len), -1, dtype=torch.long)
    block_ids = torch.full((B, seq_len), -1, dtype=torch.long)
    prompt_mask = torch.zeros((B, seq_len), dtype=torch.bool)
    token_kinds = torch.zeros((B, seq_len), dtype=torch.int8)
    loss_weights = torch.zeros((B, seq_len), dtype=torch.float32)
    und, sources, bounds = [], [], [0]
    head_images: dict[str, list] = {FLOW_HEAD: []}
    head_sample_ids: dict[str, list[int]] = {FLOW_HEAD: []}
    sid = 0
    for b, row in enumerate(rows):
        ids, tgt, kinds, prompt, weights = [], [], [], [], []
        for item in map(as_item, row):
            s, a, n = item.sample, item.start, item.length
            if a or n != len(s):
                if s.und_images or s.gen_images:
                    raise ValueError(f"sample {s.key!r} holds images and cannot be cut")
            piece_targets = s.targets[a : a + n]
            supervised = sum(t != IGNORE for t in piece_targets)
            w = _weight(supervised, loss_reduction) if supervised else 0.0
            start = len(ids)
            if start + n > seq_len:
                raise ValueError(f"row {b} holds {start + n} tokens, more than seq_len={seq_len}")
            ids += s.input_ids[a : a + n]
            tgt += piece_targets
            kinds += s.kinds()[a : a + n]
            prompt += s.prompt_mask[a : a + n] if s.prompt_mask else [False] * n
            weights += [w if t != IGNORE else 0.0 for t in piece_targets]
            position_ids[b, start : start + n] = s.position_ids()[a : a + n]
            sample_ids[b, start : start + n] = sid
            if s.block_ids:
                block_ids[b, start : start + n] = torch.tensor(s.block_ids[a : a + n], dtype=torch.long)
            und += s.und_images
            if s.gen_images:
                head = s.head or FLOW_HEAD
                head_images.setdefault(head, []).extend(s.gen_images)
                head_sample_ids.setdefault(head, []).extend([sid] * len(s.gen_images))
            sources.append(item.source)
            bounds.append(b * seq_len + start + n)
            sid += 1
        used = len(ids)
        input_ids[b, :used] = torch.tensor(ids, dtype=torch.long)
        targets[b, :used] = torch.tensor(tgt, dtype=torch.long)
        token_kinds[b, :used] = torch.tensor(kinds, dtype=torch.int8)
        prompt_mask[b, :used] = torch.tensor(prompt, dtype=torch.bool)
        loss_weights[b, :used] = torch.tensor(weights, dtype=torch.float32)
        if used < seq_len:
            bounds.append((b + 1) * seq_len)  # the row's padding is a segment of its own
    cu = torch.tensor(bounds, dtype=torch.int32)
    batch = {
        "input_ids": input_ids,
        "targets": targets,
        "position_ids": position_ids,
        "sample_ids": sample_ids,
        "block_ids": block_ids,
        "prompt_mask": prompt_mask,
        "token_kinds": token_kinds,
        "loss_weights": loss_weights,
        "gen_sample_ids": torch.tensor(head_sample_ids[FLOW_HEAD], dtype=torch.long),
        "sample_source": torch.tensor(sources, dtype=torch.long),
        "cu_seqlens": cu,
        "max_seqlen": (cu[1:] - cu[:-1]).max() if len(cu) > 1 else torch.tensor(0, dtype=torch.int32),
    }
    if und:
        batch["und_images"] = torch.stack(und)
    for head, images in head_images.items():
        if not images:
            continue
        key = "gen" if head == FLOW_HEAD else head
        batch[f"{key}_images"] = torch.stack(images)
        if head != FLOW_HEAD:
            batch[f"{head}_sample_ids"] = torch.tensor(head_sample_ids[head], dtype=torch.long)
    return batch
