"""Pack variable-length samples into rows of a fixed token budget (``mm.batch.collate`` makes the batch).

A batch is ``rows_per_batch`` rows of ``seq_len`` tokens; each row holds whole samples (and pieces of
text-only documents), every sample keeping its own positions (``mm.batch``).

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

Per-sample loss reduction (``mm.batch.LOSS_REDUCTIONS``, as InternVL): ``token`` (every supervised
token weighs 1), ``sample`` (1/n: every sample weighs the same), ``square`` (1/sqrt(n)).
"""

from __future__ import annotations

from collections.abc import Iterator

from mm.batch import PackItem, as_item
from mm.sequence import Sample


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
