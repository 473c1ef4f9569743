"""p-MoD routing math: the decay schedule, per-sample top-k inside packed rows, TanhNorm, STRing."""

import math

import pytest
import torch

from mm.model.routing import (
    MoDConfig,
    MoDRouters,
    TokenRouter,
    kept_count,
    layer_ratios,
    routable_mask,
    select_tokens,
    string_combine,
    tanh_norm,
)
from mm.sequence import TOKEN_GEN_IMAGE, TOKEN_TEXT, TOKEN_UND_IMAGE


def test_schedule_32_layers_matches_the_paper():
    r = layer_ratios(32, MoDConfig(enabled=True))
    assert r[:8] == [1.0] * 8  # cos(7*pi/31)/2 + 0.5 = 0.879 > 0.85: dense
    assert round(r[8], 3) == 0.844
    assert r[8] == pytest.approx(math.cos(8 * math.pi / 31) / 2 + 0.5)
    assert r[-1] == 0.15 and min(r) == 0.15
    assert all(a >= b for a, b in zip(r, r[1:]))  # non-increasing
    assert sum(r) / 32 == pytest.approx(0.5375, abs=1e-12)
    # the floor holds from layer 24 on (cos(24*pi/31)/2 + 0.5 = 0.1206); layer 23 is 0.1555
    assert r.index(0.15) == 24 and r[23] == pytest.approx(0.15552, abs=1e-5)


def test_schedule_switches():
    assert layer_ratios(32, MoDConfig(enabled=False)) == [1.0] * 32
    assert layer_ratios(4, MoDConfig(enabled=True, ratio=0.5)) == [0.5] * 4
    assert layer_ratios(1, MoDConfig(enabled=True)) == [1.0]
    shifted = layer_ratios(32, MoDConfig(enabled=True, shift=0.1))
    assert shifted[:11] == [1.0] * 11  # the shift moves more layers above dense_above
    assert shifted[11] == pytest.approx(math.cos(11 * math.pi / 31) / 2 + 0.6)
    assert all(x <= 1.0 for x in layer_ratios(8, MoDConfig(enabled=True, shift=0.5, dense_above=2.0)))
    with pytest.raises(ValueError, match="min_ratio"):
        layer_ratios(4, MoDConfig(enabled=True, min_ratio=0.0))
    with pytest.raises(ValueError, match="num_layers"):
        layer_ratios(0, MoDConfig(enabled=True))


def test_kept_count_floors_decimal_ratios_as_written():
    assert kept_count(100, 0.29) == 29  # 100 * 0.29 = 28.999999999999996 in binary
    assert kept_count(576, 0.15) == 86 and kept_count(7, 0.5) == 3 and kept_count(5, 1.0) == 5


def _packed(lengths_per_row, seed=0, kinds_fn=None):
    """Rows of samples; each sample: text, an image block, text. Returns scores, routable, sample_ids, kinds."""
    g = torch.Generator().manual_seed(seed)
    L = max(sum(n for n in row) for row in lengths_per_row) + 3
    B = len(lengths_per_row)
    sid = torch.full((B, L), -1)
    kinds = torch.zeros((B, L), dtype=torch.int8)
    s = 0
    for b, row in enumerate(lengths_per_row):
        pos = 0
        for n in row:
            sid[b, pos : pos + n] = s
            kinds[b, pos + 1 : pos + n - 1] = TOKEN_UND_IMAGE  # first and last token text
            if n > 6:
                kinds[b, pos + n // 2] = TOKEN_TEXT  # text between two images
                kinds[b, pos + n // 2 + 1] = TOKEN_GEN_IMAGE
            pos += n
            s += 1
    scores = torch.randn((B, L), generator=g)
    return scores, routable_mask(kinds, sid, ["und_image"]), sid, kinds


@pytest.mark.parametrize("ratio", [0.0, 0.15, 0.5, 0.8444, 1.0])
def test_select_tokens_per_sample_counts_are_exact(ratio):
    scores, routable, sid, _ = _packed([[9, 14, 5], [20, 3], [30]])
    keep = select_tokens(scores, routable, sid, ratio)
    assert keep[~routable].all()  # text, generation tokens and padding always go through
    for s in sid.unique():
        if s < 0:
            continue
        m = sid == s
        n = int((routable & m).sum())
        assert int((keep & routable & m).sum()) == kept_count(n, ratio)
        # the kept ones are the top scores of that sample
        kept = scores[keep & routable & m]
        dropped = scores[~keep & routable & m]
        if len(kept) and len(dropped):
            assert kept.min() >= dropped.max()


def test_select_tokens_packed_equals_each_sample_alone():
    rows = [[9, 14, 5], [20, 3], [30]]
    scores, routable, sid, _ = _packed(rows, seed=1)
    keep = select_tokens(scores, routable, sid, 0.4)
    for s in sid.unique():
        if s < 0:
            continue
        m = sid == s
        alone = select_tokens(scores[m][None], routable[m][None], torch.zeros(1, int(m.sum()), dtype=torch.long), 0.4)
        assert torch.equal(keep[m], alone[0])


def test_select_tokens_ties_break_by_position_and_ids_may_repeat_across_rows():
    # zero-initialised routers score everything 0: the earliest routable tokens win
    sid = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, -1], [0, 0, 0, 0, 0, 0, 0, -1, -1]])  # row-local ids
    routable = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    keep = select_tokens(torch.zeros(2, 9), routable, sid, 0.5)
    expect = torch.tensor([[1, 1, 1, 0, 0, 1, 0, 0, 1], [1, 1, 1, 1, 0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(keep, expect)
    # ratio 1.0 keeps everything, ratio 0 only what is not routable
    assert select_tokens(torch.randn(2, 9), routable, sid, 1.0).all()
    assert torch.equal(select_tokens(torch.randn(2, 9), routable, sid, 0.0), ~routable)


def test_select_tokens_rejects_bad_input():
    s, r, i = torch.zeros(2, 4), torch.ones(2, 4, dtype=torch.bool), torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="ratio"):
        select_tokens(s, r, i, 1.5)
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        select_tokens(s, r[:, :3], i, 0.5)
    with pytest.raises(TypeError, match="bool"):
        select_tokens(s, r.long(), i, 0.5)
    with pytest.raises(KeyError, match="unknown token kinds"):
        routable_mask(i, i, ["und_imag"])


def test_router_is_zero_initialised_float32_and_tanh_norm_is_one_there():
    router = TokenRouter(16)
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    scores = router(x)
    assert scores.shape == (2, 5) and scores.dtype == torch.float32 and not scores.any()
    assert torch.equal(tanh_norm(scores, 0.2), torch.ones(2, 5))
    w = tanh_norm(torch.tensor([-100.0, 0.5, 100.0]), 0.2)
    assert w[0] == pytest.approx(0.8) and w[2] == pytest.approx(1.2) and w[1] == pytest.approx(1 + 0.2 * math.tanh(0.5))


def test_mod_routers_hold_one_router_per_routed_layer():
    routers = MoDRouters(32, 64, MoDConfig(enabled=True))
    assert [routers.routed(i) for i in range(32)] == [False] * 8 + [True] * 24
    assert sorted(routers.routers, key=int) == [str(i) for i in range(8, 32)]
    assert isinstance(routers[8], TokenRouter)
    with pytest.raises(KeyError, match="dense"):
        routers[0]
    with pytest.raises(IndexError):
        routers.routed(32)
    assert len(MoDRouters(4, 8, MoDConfig(enabled=False)).routers) == 0


def _routed_layer(x, router, keep_ratio, sid, routable, scale=0.2):
    """One routed layer as the decoder loop runs it: kept tokens x + Attn + w*MLP, skipped w*x."""
    torch.manual_seed(0)
    mlp = torch.nn.Linear(x.shape[-1], x.shape[-1])
    w = tanh_norm(router(x), scale)
    w = torch.where(routable, w, torch.ones_like(w))  # only the routed kind reweights
    keep = select_tokens(router(x).detach(), routable, sid, keep_ratio)
    xk = x[keep]
    attn = 0.1 * xk.cumsum(0)  # stands in for attention among the kept tokens
    kept_out = xk + attn + w[keep].unsqueeze(-1) * mlp(xk + attn)
    return string_combine(x, kept_out, keep, w), keep


def test_router_gets_gradient_from_kept_and_skipped_tokens():
    scores, routable, sid, _ = _packed([[9, 14], [20]], seed=2)
    x = torch.randn(*sid.shape, 8)
    for which in ("kept", "skipped"):
        router = TokenRouter(8)
        out, keep = _routed_layer(x, router, 0.5, sid, routable)
        pick = (keep & routable) if which == "kept" else ~keep
        assert pick.any()
        out[pick].square().sum().backward()
        assert router.proj.weight.grad.abs().sum() > 0, which
        assert router.proj.bias.grad.abs() > 0, which


def test_string_combine_places_outputs_and_scales_skipped():
    x = torch.randn(2, 4, 3)
    keep = torch.tensor([[1, 0, 1, 1], [0, 1, 1, 0]], dtype=torch.bool)
    w = torch.rand(2, 4) + 0.5
    kept_out = torch.randn(int(keep.sum()), 3)
    out = string_combine(x, kept_out, keep, w)
    assert torch.equal(out[keep], kept_out)
    assert torch.allclose(out[~keep], w[~keep].unsqueeze(-1) * x[~keep])
    with pytest.raises(ValueError, match="kept_out"):
        string_combine(x, kept_out[:, :2], keep, w)


def test_ratio_one_and_zero_router_is_the_dense_layer():
    """Every token kept and w = 1: STRing gives exactly x + Attn + MLP."""
    _, routable, sid, _ = _packed([[9, 14], [20]], seed=3)
    x = torch.randn(*sid.shape, 8)
    out, keep = _routed_layer(x, TokenRouter(8), 1.0, sid, routable)
    torch.manual_seed(0)
    mlp = torch.nn.Linear(8, 8)
    xf = x.reshape(-1, 8)
    attn = 0.1 * xf.cumsum(0)
    assert keep.all() and torch.equal(out.reshape(-1, 8), xf + attn + mlp(xf + attn))


def _reference_keep(scores, routable, sid, ratio):
    """Brute force: per (row, sample) sort routable tokens by (-score, position), keep the first k."""
    keep = torch.ones_like(routable)
    for b in range(sid.shape[0]):
        for s in sid[b].unique().tolist():
            if s < 0:
                continue
            pos = [j for j in range(sid.shape[1]) if sid[b, j] == s and routable[b, j]]
            ranked = sorted(pos, key=lambda j: (-float(scores[b, j]), j))
            for j in ranked[kept_count(len(pos), ratio) :]:
                keep[b, j] = False
    return keep


@pytest.mark.parametrize("seed", range(5))
def test_select_tokens_equals_brute_force_with_many_ties(seed):
    g = torch.Generator().manual_seed(seed)
    B, L = 3, 40
    sid = torch.sort(torch.randint(0, 4, (B, L), generator=g), dim=1).values  # contiguous samples per row
    sid[:, -torch.randint(0, 5, (1,), generator=g).item() or L :] = -1  # some padding at the row ends
    routable = torch.rand(B, L, generator=g) < 0.7
    scores = torch.randint(0, 3, (B, L), generator=g).float()  # three values: ties everywhere
    for ratio in (0.1, 0.33, 0.5, 0.9):
        assert torch.equal(select_tokens(scores, routable, sid, ratio), _reference_keep(scores, routable, sid, ratio))
