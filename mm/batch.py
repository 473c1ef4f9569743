"""The typed batch: what collation produces and the model, its heads, FLOPs counting and the trainer read.

A batch is ``B`` packed rows of ``L`` tokens. Each sample keeps its own float32 position ids and a
batch-unique sample id; generation images are grouped by the image head that trains on them
(``Batch.images[head]``), found by head name. The host-side layout of the rows (:class:`Span`: where
each sample sits and how many tokens of each kind it has) and the varlen metadata derived from it
(``cu_seqlens``, ``max_seqlen``) are computed once here, on the host, so nothing downstream infers
sample boundaries from position ids and nothing in the layer loop reads a device tensor back.

:func:`collate` builds a training batch from packed rows; :func:`left_padded` builds an inference
batch (prompts right-aligned so generation continues at the same column).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace

import torch

from mm.images import ImagePreprocess
from mm.kernels.attention import AttentionSpec, Varlen
from mm.positions import PositionPolicy
from mm.sequence import IGNORE, TOKEN_KINDS, ImageTemplate, Sample

LOSS_REDUCTIONS = ("token", "sample", "square")
N_KINDS = len(TOKEN_KINDS)


@dataclass
class SampleShapes:
    """What building samples needs to know of the model (``UnifiedModel.sample_shapes``); picklable.

    ``und_preprocess``: how a picture becomes the understanding tower's square (the tower's own spec, the one
    the processor uses at inference); ``gen_templates``: each image head's layout, the first the default;
    ``position_policy``: V2PE's per-image deltas, drawn when a sample is built (None or disabled = positions
    0..n-1).
    """

    und_preprocess: ImagePreprocess
    und_tokens: int
    gen_templates: dict[str, ImageTemplate] = field(default_factory=dict)
    position_policy: PositionPolicy | None = None

    @property
    def default_head(self) -> str:
        if not self.gen_templates:
            raise ValueError("these sample shapes have no image head (SampleShapes.gen_templates is empty)")
        return next(iter(self.gen_templates))


@dataclass
class PackItem:
    """A sample, or a token range of a text-only one, waiting to be packed (the unit of a row)."""

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


@dataclass(frozen=True)
class Span:
    """Where one packed sample sits in its row (host side) and how many tokens of each kind it has."""

    sample: int  # batch-unique sample id
    start: int
    length: int
    kinds: tuple[int, ...]  # token count per mm.sequence TOKEN_* kind
    supervised: int = 0  # tokens with a text target


@dataclass
class ImageInputs:
    """One image head's images in a batch (or the understanding encoder's)."""

    images: torch.Tensor  # [N, C, H, W] uint8 (loader) or [0,1] float
    sample_ids: torch.Tensor  # [N] the packed sample of each image
    # A stand-in of one zero image that fills no slot and whose losses weigh 0: ZeRO-3's rule that every
    # rank runs every module, whatever its batch holds (UnifiedModel.every_module).
    placeholder: bool = False

    def __len__(self) -> int:
        return 0 if self.placeholder else len(self.images)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L] long
    targets: torch.Tensor  # [B, L] long: next-token targets, IGNORE where no loss
    position_ids: torch.Tensor  # [B, L] float32 (V2PE); never cast to bf16
    sample_ids: torch.Tensor  # [B, L] long, -1 = padding
    block_ids: torch.Tensor | None  # [B, L] long, >= 0: a full attention block; None: no block anywhere
    prompt_mask: torch.Tensor  # [B, L] bool: prompt tokens (CFG prompt dropout)
    token_kinds: torch.Tensor  # [B, L] int8: mm.sequence TOKEN_* kinds
    loss_weights: torch.Tensor  # [B, L] float32: per-token loss weight (loss reduction), 0 where no loss
    sample_source: torch.Tensor  # [n_samples] long: the data source of each sample
    cu_seqlens: torch.Tensor  # int32 over the flattened [B*L] rows (each row's padding is a segment)
    max_seqlen: int
    spans: tuple[tuple[Span, ...], ...]  # host layout, per row
    und_images: torch.Tensor | None = None  # [N, C, H, W] in placeholder order (row-major)
    images: dict[str, ImageInputs] = field(default_factory=dict)  # image head -> its images
    draws: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # image head -> seeded draws
    _spec: AttentionSpec | None = field(default=None, repr=False, compare=False)

    # ---- host-side facts (no device read) -----------------------------------------------------
    @property
    def rows(self) -> int:
        return len(self.spans)

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    @property
    def n_samples(self) -> int:
        return sum(len(row) for row in self.spans)

    @property
    def n_tokens(self) -> int:
        return sum(s.length for row in self.spans for s in row)

    def varlen(self) -> Varlen:
        runs = tuple(tuple((s.start, s.start + s.length) for s in row) for row in self.spans)
        return Varlen(runs, self.length, self.cu_seqlens, self.max_seqlen)

    def attention(self) -> AttentionSpec:
        """The rows' self-attention spec with its host metadata (built once per batch object)."""
        if self._spec is None:
            self._spec = AttentionSpec.packed(self.sample_ids, self.block_ids, self.varlen())
        return self._spec

    # ---- moving ------------------------------------------------------------------------------
    def map_tensors(self, fn: Callable[[torch.Tensor], object]) -> Batch:
        """A copy with ``fn`` applied to every tensor (device moves, worker transport)."""
        out = {}
        for f in fields(self):
            if f.name == "_spec":
                continue
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor) or _is_array(v):
                v = fn(v)
            elif f.name == "images":
                v = {k: replace(i, images=fn(i.images), sample_ids=fn(i.sample_ids)) for k, i in v.items()}
            elif f.name == "draws":
                v = {k: {n: fn(t) for n, t in d.items()} for k, d in v.items()}
            out[f.name] = v
        return Batch(**out)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return self.map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """Page-locked copies (the DataLoader calls this when ``pin_memory`` is on)."""
        return self.map_tensors(lambda t: t.pin_memory())


def _is_array(v: object) -> bool:
    return type(v).__module__ == "numpy" and hasattr(v, "dtype")


def token_weight(n_supervised: int, reduction: str) -> float:
    """Per-token loss weight of a sample with ``n_supervised`` supervised tokens (InternVL's reductions)."""
    if reduction == "token":
        return 1.0
    if reduction == "sample":
        return 1.0 / n_supervised
    if reduction == "square":
        return 1.0 / math.sqrt(n_supervised)
    raise KeyError(f"loss reduction {reduction!r}; known: {LOSS_REDUCTIONS}")


def _counts(kinds: Sequence[int]) -> tuple[int, ...]:
    out = [0] * N_KINDS
    for k in kinds:
        out[k] += 1
    return tuple(out)


def collate(rows: list[list[Sample | PackItem]], seq_len: int, pad_id: int, loss_reduction: str = "token") -> Batch:
    """Packed rows of samples (or items) -> a :class:`Batch`. Images are stacked in token order (row-major).

    Generation images go to the image head their sample names (``Sample.head``).
    """
    B = len(rows)
    t = _Tensors(B, seq_len, pad_id)
    und: list[torch.Tensor] = []
    head_images: dict[str, list[torch.Tensor]] = {}
    head_sample_ids: dict[str, list[int]] = {}
    sources, spans, sid, any_blocks = [], [], 0, False
    for b, row in enumerate(rows):
        cols: dict[str, list] = {"ids": [], "tgt": [], "kinds": [], "prompt": [], "w": []}
        row_spans = []
        for item in map(as_item, row):
            s, a, n = item.sample, item.start, item.length
            if (a or n != len(s)) and (s.und_images or s.gen_images):
                raise ValueError(f"sample {s.key!r} holds images and cannot be cut")
            start = len(cols["ids"])
            if start + n > seq_len:
                raise ValueError(f"row {b} holds {start + n} tokens, more than seq_len={seq_len}")
            piece_targets = s.targets[a : a + n]
            supervised = sum(x != IGNORE for x in piece_targets)
            w = token_weight(supervised, loss_reduction) if supervised else 0.0
            kinds = s.kinds()[a : a + n]
            cols["ids"] += s.input_ids[a : a + n]
            cols["tgt"] += piece_targets
            cols["kinds"] += kinds
            cols["prompt"] += s.prompt_mask[a : a + n] if s.prompt_mask else [False] * n
            cols["w"] += [w if x != IGNORE else 0.0 for x in piece_targets]
            t.position_ids[b, start : start + n] = s.position_ids()[a : a + n]
            t.sample_ids[b, start : start + n] = sid
            if s.block_ids:
                t.block_ids[b, start : start + n] = torch.tensor(s.block_ids[a : a + n], dtype=torch.long)
                any_blocks = True
            und += s.und_images
            if s.gen_images:
                if not s.head:
                    raise ValueError(f"generation sample {s.key!r} names no image head (Sample.head)")
                head_images.setdefault(s.head, []).extend(s.gen_images)
                head_sample_ids.setdefault(s.head, []).extend([sid] * len(s.gen_images))
            sources.append(item.source)
            row_spans.append(Span(sid, start, n, _counts(kinds), supervised))
            sid += 1
        t.fill_row(b, cols)
        spans.append(tuple(row_spans))
    varlen = Varlen.from_runs(tuple(tuple((s.start, s.start + s.length) for s in r) for r in spans), seq_len)
    images = {
        h: ImageInputs(torch.stack(imgs), torch.tensor(head_sample_ids[h], dtype=torch.long))
        for h, imgs in head_images.items()
    }
    return Batch(
        t.input_ids, t.targets, t.position_ids, t.sample_ids, t.block_ids if any_blocks else None, t.prompt_mask,
        t.token_kinds, t.loss_weights, torch.tensor(sources, dtype=torch.long), varlen.cu_seqlens,
        varlen.max_seqlen, tuple(spans), torch.stack(und) if und else None, images,
    )  # fmt: skip


class _Tensors:
    """The [B, L] tensors of a batch being collated, padded."""

    def __init__(self, B: int, L: int, pad_id: int):
        self.input_ids = torch.full((B, L), pad_id, dtype=torch.long)
        self.targets = torch.full((B, L), IGNORE, dtype=torch.long)
        self.position_ids = torch.zeros((B, L), dtype=torch.float32)  # float32: V2PE-ready
        self.sample_ids = torch.full((B, L), -1, dtype=torch.long)
        self.block_ids = torch.full((B, L), -1, dtype=torch.long)
        self.prompt_mask = torch.zeros((B, L), dtype=torch.bool)
        self.token_kinds = torch.zeros((B, L), dtype=torch.int8)
        self.loss_weights = torch.zeros((B, L), dtype=torch.float32)

    def fill_row(self, b: int, cols: dict[str, list]) -> None:
        used = len(cols["ids"])
        self.input_ids[b, :used] = torch.tensor(cols["ids"], dtype=torch.long)
        self.targets[b, :used] = torch.tensor(cols["tgt"], dtype=torch.long)
        self.token_kinds[b, :used] = torch.tensor(cols["kinds"], dtype=torch.int8)
        self.prompt_mask[b, :used] = torch.tensor(cols["prompt"], dtype=torch.bool)
        self.loss_weights[b, :used] = torch.tensor(cols["w"], dtype=torch.float32)


_PER_TOKEN = ("input_ids", "targets", "position_ids", "sample_ids", "prompt_mask", "token_kinds", "loss_weights")


def left_padded(samples: list[Sample], pad_id: int) -> Batch:
    """Inference rows: one sample per row, right-aligned (padding on the left, sample id 0, padding -1).

    Each sample keeps its own float32 positions (``Sample.positions``, V2PE); generation continues at
    the same column in every row.
    """
    L = max(len(s) for s in samples)
    rows = []
    for s in samples:
        pad = L - len(s)
        b = collate([[s]], L, pad_id)
        rolled = {k: getattr(b, k).roll(pad, dims=1) for k in _PER_TOKEN}
        if b.block_ids is not None:
            rolled["block_ids"] = b.block_ids.roll(pad, dims=1)
        span = replace(b.spans[0][0], start=pad)
        rows.append(replace(b, **rolled, spans=((span,),), _spec=None))
    cat = lambda name: torch.cat([getattr(r, name) for r in rows])  # noqa: E731
    any_blocks = any(r.block_ids is not None for r in rows)
    spans = tuple(replace(r.spans[0][0], sample=0) for r in rows)
    varlen = Varlen.from_runs(tuple(((s.start, s.start + s.length),) for s in spans), L)
    und = [r.und_images for r in rows if r.und_images is not None]
    return Batch(
        cat("input_ids"), cat("targets"), cat("position_ids"), cat("sample_ids").clamp(max=0),
        torch.cat([r.block_ids if r.block_ids is not None else torch.full((1, L), -1) for r in rows])
        if any_blocks else None,
        cat("prompt_mask"), cat("token_kinds"), cat("loss_weights"), torch.zeros(len(rows), dtype=torch.long),
        varlen.cu_seqlens, varlen.max_seqlen, tuple((s,) for s in spans), torch.cat(und) if und else None,
    )  # fmt: skip
