"""Packing: budget and image integrity, packed == alone per sample, loss reductions, varlen metadata."""

import math
import random

import pytest
import torch

from data.bundled.mixes import ffd_efficiency, packer_efficiency, padding_efficiency, realistic_mix
from data.pack import PACKERS, pack_all
from data.sources import BuildContext, SourceConfig, build_samples
from data.stream import read_samples
from mm.batch import PackItem, collate
from mm.config import with_overrides
from mm.kernels.attention import cu_seqlens
from mm.model.unified import UnifiedModel
from mm.sequence import IGNORE, TASK_GEN


def _samples(shard_dir, vocab, shapes, n_und=4, n_gen=3, n_text=2, seq_len=128):
    """Real samples of all three kinds, built from the bundled digits shards."""
    raws = list(read_samples(f"{shard_dir}/digits/train-000000.tar"))
    docs = list(read_samples(f"{shard_dir}/digits/text-000000.tar"))
    out = []
    for kind, pool, n in (("conversation", raws, n_und), ("generation", raws[50:], n_gen), ("text", docs, n_text)):
        for raw in pool[:n]:
            ctx = BuildContext(vocab, shapes, seq_len, 10**6, random.Random(0))
            out += build_samples(SourceConfig(kind, kind), raw, ctx)
    return out


def _items(samples):
    return [PackItem(len(s), s, splittable=s.task == "text") for s in samples]


def _forward(model, rows, seq_len, noise_of):
    batch = collate(rows, seq_len, model.vocab.pad, "token")
    gen = [item.sample for row in rows for item in row if item.sample.task == TASK_GEN]
    if gen:
        noise = torch.stack([noise_of[id(s)][0] for s in gen])
        batch.draws["flow"] = {"noise": noise, "t": torch.stack([noise_of[id(s)][1] for s in gen])}
    return batch, model(batch)


PACKED_VARIANTS = {
    "sdpa": [],
    "sdpa_dense": ["model.llm.attn_implementation=sdpa_dense"],
    "eager": ["model.llm.attn_implementation=eager"],  # additive float mask (a bool one mixed samples)
    "sdpa_segmented": ["model.llm.attn_implementation=sdpa_segmented"],  # each sample alone, split + concat
    "mod+v2pe": ["model.mod.enabled=true", "model.mod.ratio=0.5", "model.v2pe.enabled=true"],
}
PACKED_VARIANTS["mod+v2pe eager"] = PACKED_VARIANTS["mod+v2pe"] + PACKED_VARIANTS["eager"]
PACKED_VARIANTS["mod+v2pe sdpa_segmented"] = PACKED_VARIANTS["mod+v2pe"] + PACKED_VARIANTS["sdpa_segmented"]


@pytest.mark.parametrize("variant", sorted(PACKED_VARIANTS))
def test_packed_equals_alone(small_cfg, vocab, shard_dir, variant):
    cfg = with_overrides(small_cfg, PACKED_VARIANTS[variant])
    torch.manual_seed(0)
    model = UnifiedModel(cfg.model, vocab).eval()
    if model.mod_routers is not None:  # trained-looking routers: distinct scores, so routing really selects
        for p in model.mod_routers.parameters():
            torch.nn.init.normal_(p, std=0.5)
    samples = _samples(shard_dir, vocab, model.sample_shapes(), n_und=3, n_gen=3, n_text=2)
    noise_of = {id(s): (torch.randn(model.heads["flow"].latent_shape), torch.rand(())) for s in samples}
    seq_len = 64
    p = PACKERS["best_fit"](seq_len, lookahead=64, min_piece=4)
    for item in _items(samples):
        p.add(item)
    rows = []
    while p.buffer:
        rows.append(p.pop_row())
    assert len(rows) < len(samples) and any(item.start > 0 for row in rows for item in row)  # packed, a text cut
    _, packed = _forward(model, rows, seq_len, noise_of)

    text_alone, flow_alone = [], []
    for item in (item for row in rows for item in row):  # row-major order, as the packed losses come out
        _, out = _forward(model, [[item]], item.length, noise_of)
        if item.sample.task == TASK_GEN:
            flow_alone.append(out["flow_per_image"])
        elif "text_per_token" in out:
            text_alone.append(out["text_per_token"])
    torch.testing.assert_close(packed["text_per_token"], torch.cat(text_alone), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(packed["flow_per_image"], torch.cat(flow_alone), rtol=1e-4, atol=1e-6)


def test_per_sample_loss_reduction(small_cfg, vocab, shard_dir):
    torch.manual_seed(0)
    model = UnifiedModel(small_cfg.model, vocab).eval()
    samples = [s for s in _samples(shard_dir, vocab, model.sample_shapes(), n_und=3, n_gen=0, n_text=2)]
    rows = next(pack_all(samples, 128, rows_per_batch=len(samples)))
    means, sizes = [], []
    for s in samples:  # each alone, with the plain per-token mean
        means.append(float(model(collate([[s]], len(s), vocab.pad))["text"]))
        sizes.append(sum(t != IGNORE for t in s.targets))
    for reduction, weight in (("sample", lambda n: 1.0), ("square", math.sqrt), ("token", float)):
        packed = float(model(collate(rows, 128, vocab.pad, reduction))["text"])
        w = [weight(n) for n in sizes]  # a sample's summed token weights: 1, sqrt(n) or n
        assert packed == pytest.approx(sum(wi * m for wi, m in zip(w, means)) / sum(w), rel=1e-4), reduction


def test_packer_never_exceeds_the_budget_nor_cuts_an_image():
    rng = random.Random(0)
    for packer in PACKERS:
        p = PACKERS[packer](512, lookahead=32, min_piece=8)
        items = []
        for i in range(3000):
            splittable = rng.random() < 0.2
            items.append(PackItem(rng.randint(1, 512 if splittable else 300), ref=(i,), splittable=splittable))
        rows, added_at, first_row = [], {}, {}
        for item in items:
            p.add(item)
            added_at[item.ref[0]] = len(rows)
            while p.ready():
                rows.append(p.pop_row())
                for it in rows[-1]:
                    first_row.setdefault(it.ref[0], len(rows))
        while p.buffer:
            rows.append(p.pop_row())
        if packer == "best_fit":  # the oldest item always opens the next row: nothing waits forever
            assert max(first_row[k] - added_at[k] for k in first_row) <= 32 + 1
        assert all(0 < sum(i.length for i in row) <= 512 for row in rows)
        pieces: dict[int, list[tuple[int, int]]] = {}
        for row in rows:
            for it in row:
                pieces.setdefault(it.ref[0], []).append((it.start, it.length))
        for item in items:  # every token exactly once; only text is ever cut
            got = sorted(pieces[item.ref[0]])
            assert sum(n for _, n in got) == item.length and got[0][0] == 0
            assert all(a + n == b for (a, n), (b, _) in zip(got, got[1:]))
            assert item.splittable or len(got) == 1


def test_best_fit_reaches_097_on_the_realistic_mix():
    items = realistic_mix(3000, 4096)
    ours = packer_efficiency(items, 4096)
    assert ours >= 0.97 and ours > ffd_efficiency(items, 4096) and ours > padding_efficiency(items)


def test_collate_carries_varlen_metadata_and_policy_positions(small_cfg, vocab, shard_dir):
    from dataclasses import replace

    from mm.positions import PositionPolicy
    from mm.sequence import TOKEN_UND_IMAGE

    shapes = UnifiedModel(small_cfg.model, vocab).sample_shapes()
    v2pe = replace(shapes, position_policy=PositionPolicy(frozenset({TOKEN_UND_IMAGE}), train_deltas=(0.25, 0.5)))
    samples = _samples(shard_dir, vocab, v2pe, n_und=3, n_gen=2, n_text=1)
    rows = next(pack_all(samples, 128, rows_per_batch=8))
    b = collate(rows, 128, vocab.pad)
    bounds, longest = cu_seqlens(b.sample_ids)  # derived from the device tensor, as a reference
    assert torch.equal(b.cu_seqlens, bounds) and b.max_seqlen == longest
    assert b.cu_seqlens.dtype == torch.int32
    for item in (it for row in rows for it in row):  # positions are the sample's own, copied
        sid = int(b.sample_ids.flatten()[_offset(rows, item)])
        pos = b.position_ids[b.sample_ids == sid]
        assert torch.equal(pos, item.sample.position_ids()[item.start : item.start + item.length])
    for r, row in enumerate(b.spans):  # the host layout is where the samples are
        for span in row:
            assert (b.sample_ids[r, span.start : span.start + span.length] == span.sample).all()
            kinds = b.token_kinds[r, span.start : span.start + span.length]
            assert span.kinds == tuple(int((kinds == k).sum()) for k in range(len(span.kinds)))
    und = [s for s in samples if s.und_images]
    assert all((s.position_ids() % 1 != 0).any() for s in und)  # fractional V2PE deltas were drawn
    assert torch.equal(b.loss_weights > 0, b.targets != IGNORE)


def _offset(rows, target) -> int:
    for b, row in enumerate(rows):
        start = 0
        for it in row:
            if it is target:
                return b * 128 + start
            start += it.length
    raise AssertionError
