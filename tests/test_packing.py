"""Invariant 1: a packed batch gives each sample the same losses as running it alone."""

import torch

from data.pack import collate, pack_all
from data.stream import PackedStream
from mm.model.unified import UnifiedModel
from mm.sequence import TASK_GEN


def _mixed_samples(cfg, vocab, model, n=7):
    stream = PackedStream(cfg.data, vocab, model.sample_shapes())
    samples = []
    for _, _, s in stream._samples():
        samples.append(s)
        if len(samples) == n:
            return samples
    raise AssertionError("stream ended")


def _losses(model, samples, seq_len, rows, noise, t):
    batch = collate(rows, seq_len, model.vocab.pad)
    gen_order = [id(s) for row in rows for s in row if s.task == TASK_GEN]
    if gen_order:
        idx = [next(i for i, s in enumerate(samples) if id(s) == g) for g in gen_order]
        batch["gen_noise"], batch["gen_t"] = noise[idx], t[idx]
    return batch, model(batch)


def test_packed_equals_alone(small_cfg, vocab):
    torch.manual_seed(0)
    model = UnifiedModel(small_cfg.model, vocab).eval()
    samples = _mixed_samples(small_cfg, vocab, model)
    assert {s.task for s in samples} == {"understanding", "generation"}
    n_gen = sum(s.task == TASK_GEN for s in samples)
    noise = torch.randn(len(samples), *model.latent_shape)
    t = torch.rand(len(samples))
    seq_len = 128
    packed_rows = list(pack_all(samples, seq_len, rows_per_batch=8))
    assert len(packed_rows) == 1 and len(packed_rows[0]) < len(samples)  # really packed
    _, packed = _losses(model, samples, seq_len, packed_rows[0], noise, t)

    text_alone, flow_alone = [], []
    for s in samples:
        _, out = _losses(model, samples, len(s), [[s]], noise, t)
        if s.task == TASK_GEN:
            flow_alone.append(out["flow_per_image"])
        else:
            text_alone.append(out["text_per_token"])
    torch.testing.assert_close(packed["text_per_token"], torch.cat(text_alone), rtol=1e-4, atol=1e-5)
    assert len(packed["flow_per_image"]) == n_gen
    torch.testing.assert_close(packed["flow_per_image"], torch.cat(flow_alone), rtol=1e-4, atol=1e-6)


def test_pack_rows_respect_budget_and_keep_every_sample(small_cfg, vocab):
    model = UnifiedModel(small_cfg.model, vocab)
    samples = _mixed_samples(small_cfg, vocab, model, n=20)
    batches = list(pack_all(samples, 80, rows_per_batch=3))
    flat = [s for rows in batches for row in rows for s in row]
    assert [s.key for s in flat] == [s.key for s in samples]
    assert all(sum(len(s) for s in row) <= 80 for rows in batches for row in rows)
    b = collate(batches[0], 80, vocab.pad)
    # positions restart at 0 for every sample
    starts = (b["position_ids"] == 0) & (b["sample_ids"] >= 0)
    assert int(starts.sum()) == sum(len(r) for r in batches[0])
