"""Pack variable-length samples into fixed-length rows (next-fit greedy).

A batch is ``rows_per_batch`` rows of ``seq_len`` tokens. Every sample keeps
its own position ids (restarting at 0) and a batch-unique sample id; the
attention mask is block-diagonal causal over sample ids (kernels/attention.py),
so a packed sample sees exactly what it would see alone.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from mm.sequence import IGNORE, Sample


def collate(rows: list[list[Sample]], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of samples -> padded tensors. Images are stacked in token order (row-major)."""
    B = len(rows)
    input_ids = torch.full((B, seq_len), pad_id, dtype=torch.long)
    targets = torch.full((B, seq_len), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((B, seq_len), dtype=torch.float32)  # float32: V2PE-ready
    sample_ids = torch.full((B, seq_len), -1, dtype=torch.long)
    prompt_mask = torch.zeros((B, seq_len), dtype=torch.bool)
    token_kinds = torch.zeros((B, seq_len), dtype=torch.int8)
    und, gen, gen_sample_ids = [], [], []
    sid = 0
    for b, row in enumerate(rows):
        start = 0
        for s in row:
            n = len(s)
            end = start + n
            if end > seq_len:
                raise ValueError(f"row {b} holds {end} tokens, more than seq_len={seq_len}")
            input_ids[b, start:end] = torch.tensor(s.input_ids)
            targets[b, start:end] = torch.tensor(s.targets)
            position_ids[b, start:end] = s.position_ids()
            token_kinds[b, start:end] = torch.tensor(s.kinds(), dtype=torch.int8)
            sample_ids[b, start:end] = sid
            prompt_mask[b, start:end] = torch.tensor(s.prompt_mask, dtype=torch.bool)
            und += s.und_images
            gen += s.gen_images
            gen_sample_ids += [sid] * len(s.gen_images)
            sid += 1
            start = end
    batch = {
        "input_ids": input_ids,
        "targets": targets,
        "position_ids": position_ids,
        "sample_ids": sample_ids,
        "prompt_mask": prompt_mask,
        "token_kinds": token_kinds,
        "gen_sample_ids": torch.tensor(gen_sample_ids, dtype=torch.long),
    }
    if und:
        batch["und_images"] = torch.stack(und)
    if gen:
        batch["gen_images"] = torch.stack(gen)
    return batch


class NextFitPacker:
    """Fills one row at a time; a sample that does not fit closes the row.

    ``add`` returns a finished batch (list of rows) or None. The sample that
    closed the last row of a batch stays pending: it opens the next batch.
    """

    def __init__(self, seq_len: int, rows_per_batch: int):
        self.seq_len, self.rows_per_batch = seq_len, rows_per_batch
        self.rows: list[list[Sample]] = []
        self.row: list[Sample] = []
        self.used = 0

    def add(self, sample: Sample) -> list[list[Sample]] | None:
        if len(sample) > self.seq_len:
            raise ValueError(f"sample {sample.key!r} has {len(sample)} tokens > seq_len={self.seq_len}")
        done = None
        if self.used + len(sample) > self.seq_len:
            self.rows.append(self.row)
            self.row, self.used = [], 0
            if len(self.rows) == self.rows_per_batch:
                done, self.rows = self.rows, []
        self.row.append(sample)
        self.used += len(sample)
        return done


def pack_all(samples: list[Sample], seq_len: int, rows_per_batch: int) -> Iterator[list[list[Sample]]]:
    """Pack a finite list; the last partial batch is emitted too (eval, tests)."""
    packer = NextFitPacker(seq_len, rows_per_batch)
    for s in samples:
        if (rows := packer.add(s)) is not None:
            yield rows
    tail = packer.rows + ([packer.row] if packer.row else [])
    if tail:
        yield tail
