"""Attention patterns as data: the spec's rule, and every backend computing the same thing from it."""

import pytest
import torch

from mm.kernels.attention import AttentionSpec, attention, block_causal_mask, cu_seqlens, flex_block_mask


def test_block_causal_mask():
    sid = torch.tensor([[0, 0, 1, 1, 1, -1]])
    m = block_causal_mask(sid)[0, 0]
    assert m[1, 0] and not m[0, 1]  # causal inside sample 0
    assert not m[2, 1] and m[4, 2]  # sample 1 does not see sample 0
    assert m[5, 5] and not m[5, 4]  # padding sees only padding: no empty softmax row


def test_blocks_are_full_inside_causal_across_and_never_cross_samples():
    """Next-frequency stages: stage k sees stages <= k of its own sample, all of its own stage."""
    sid = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1, 1, 1]])
    blk = torch.tensor([[-1, 0, 1, 1, 1, -1, -1, 0, 1, 1]])  # text, stage 0, stage 1 (3 tokens), text | sample 1
    m = block_causal_mask(sid, blk)[0, 0].int()
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 0, 0, 0, 0, 0],  # stage 1 sees its whole stage (full block)
            [1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 1, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 1, 0, 0, 0],  # sample 1: same block ids, nothing of sample 0
            [0, 0, 0, 0, 0, 0, 1, 1, 0, 0],
            [0, 0, 0, 0, 0, 0, 1, 1, 1, 1],
            [0, 0, 0, 0, 0, 0, 1, 1, 1, 1],
        ]
    )
    assert torch.equal(m, expected)


def test_cu_seqlens_splits_samples_padding_and_rows():
    sid = torch.tensor([[0, 0, 1, -1], [1, 1, 1, 1]])
    cu, longest = cu_seqlens(sid)
    assert cu.tolist() == [0, 2, 3, 4, 8] and longest == 4


def test_unknown_backend_named():
    spec = AttentionSpec.packed(torch.zeros(1, 2, dtype=torch.long))
    q = torch.zeros(1, 1, 2, 4)
    with pytest.raises(KeyError, match="nope"):
        attention("nope", q, q, q, spec, 1.0)


def _random_case(seed=0, L=300, blocks=False):
    g = torch.Generator().manual_seed(seed)
    a, b, c = int(0.3 * L), int(0.8 * L), int(0.4 * L)
    sid = torch.tensor([[0] * a + [1] * (b - a) + [-1] * (L - b), [2] * c + [3] * (L - c)])
    blk = None
    if blocks:
        blk = torch.full_like(sid, -1)
        blk[0, 10:20], blk[0, 20:40], blk[1, 130:170] = 0, 1, 0
    q = torch.randn(2, 4, L, 16, generator=g)
    k = torch.randn(2, 2, L, 16, generator=g)
    v = torch.randn(2, 2, L, 16, generator=g)
    return q, k, v, AttentionSpec.packed(sid, blk), sid


@pytest.mark.parametrize("blocks", [False, True])
@pytest.mark.parametrize("backend", ["sdpa", "sdpa_segmented", "eager"])
def test_cpu_backends_equal_the_dense_mask_and_each_sample_alone(backend, blocks):
    """sdpa runs long, sparse rows per segment (sdpa_segmented always does); eager adds a float mask:
    all == dense == each sample alone."""
    q, k, v, spec, sid = _random_case(blocks=blocks)
    ref = attention("sdpa_dense", q, k, v, spec, 0.25)
    out = attention(backend, q, k, v, spec, 0.25)
    real = (sid >= 0)[:, None, :, None].expand_as(out)  # padding's output is free (nothing reads it)
    torch.testing.assert_close(out[real], ref[real], rtol=1e-5, atol=1e-5)
    a, b = 90, 240  # sample 1 of row 0 (L = 300), alone
    alone_spec = AttentionSpec.packed(sid[:1, a:b], None if spec.q_blocks is None else spec.q_blocks[:1, a:b])
    alone = attention(backend, q[:1, :, a:b], k[:1, :, a:b], v[:1, :, a:b], alone_spec, 0.25)
    torch.testing.assert_close(out[:1, :, a:b], alone, rtol=1e-5, atol=1e-5)


def test_cached_keys_and_gathered_subsets_keep_the_rule():
    """A KV-cached step and a token subset (MoD) mask exactly as the full sequence does."""
    q, k, v, spec, sid = _random_case(L=64)
    full = attention("sdpa_dense", q, k, v, spec, 0.25)
    # the last 8 tokens as a cached step
    c = 56
    step = AttentionSpec(sid[:, c:], sid[:, c:], spec.q_index[:, c:], spec.q_index[:, c:])
    step = step.with_cached_keys(sid[:, :c], spec.q_index[:, :c], None)
    torch.testing.assert_close(attention("sdpa", q[:, :, c:], k, v, step, 0.25), full[:, :, c:])
    # a subset: every other token, as a routed layer gathers its kept tokens
    idx = torch.arange(0, 64, 2).expand(2, -1)
    valid = torch.ones_like(idx, dtype=torch.bool)
    sub = spec.gather(idx, valid)
    g = lambda t: t[:, :, idx[0]]  # noqa: E731
    expected = attention("sdpa_dense", g(q), g(k), g(v), AttentionSpec.packed(sid[:, idx[0]]), 0.25)
    torch.testing.assert_close(attention("sdpa", g(q), g(k), g(v), sub, 0.25), expected)


def test_flex_block_mask_is_the_same_pattern():
    """The FlexAttention block mask is derived from the same rule (its dense view equals the SDPA mask)."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    _, _, _, spec, _ = _random_case(L=256, blocks=True)
    bm = flex_block_mask(spec)
    dense = bm.to_dense()  # [B, H, Lq/128, Lk/128] tiles that hold any allowed pair
    mask = spec.mask()[:, 0]
    tiles = mask.reshape(2, 2, 128, 2, 128).any(2).any(-1)
    assert torch.equal(dense[:, 0].bool(), tiles)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flex", "flash_attention_2"])
def test_gpu_backends_match_sdpa(backend):
    if backend == "flash_attention_2":
        pytest.importorskip("flash_attn")
    q, k, v, spec, _ = (t.cuda() if isinstance(t, torch.Tensor) else t for t in _random_case(L=256))
    spec = spec.to(torch.device("cuda"))
    if backend == "flash_attention_2":  # flash-attn has no GQA broadcast of our layout: equal heads
        k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    ref = attention("sdpa_dense", q, k, v, spec, 0.25)
    out = attention(backend, q, k, v, spec, 0.25)
    valid = (spec.q_segments >= 0)[:, None, :, None].expand_as(ref)
    torch.testing.assert_close(out[valid], ref[valid], rtol=2e-2, atol=2e-2)
