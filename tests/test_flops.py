"""Whole-model training FLOPs against torch's FlopCounterMode on a real step, and the peak table."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from data.loader import TrainLoader
from mm.batch import Batch, Span
from mm.config import load_config
from mm.kernels.attention import Varlen
from mm.model.routing import MoDConfig, layer_ratios, routable_mask, select_tokens
from mm.model.unified import build_model
from mm.sequence import IGNORE, TOKEN_GEN_IMAGE, TOKEN_UND_IMAGE
from mm.train.flops import (
    BatchShape,
    LLMShape,
    ModelFlops,
    batch_shape,
    kv_cache_bytes,
    layer_counts,
    peak_tflops,
    prefill_flops,
)
from mm.train.stage import apply_stage
from tests.conftest import ROOT, SMALL

pytestmark = pytest.mark.usefixtures("one_thread")


def _measured_step_flops(model, batch) -> float:
    """FlopCounterMode over forward + backward of one batch.

    torch's grouped-convolution backward formula ignores the groups, so a depthwise 7x7 conv's
    weight gradient counts C times over; convolution backward is taken as its 2x forward instead.
    """
    with FlopCounterMode(display=False) as counter:
        model(batch)["loss"].backward()
    ops = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    return counter.get_total_flops() - ops.get("aten.convolution_backward", 0) + 2 * ops.get("aten.convolution", 0)


def _step(small_cfg, frozen: list[str], tie: bool = False):
    # eager attention: FlopCounterMode has no formula for the CPU SDPA kernel, it sees eager's matmuls
    cfg = load_config(
        ROOT / "configs/tiny.yaml",
        SMALL + [f"data.train_shards={small_cfg.data.train_shards}", "model.llm.attn_implementation=eager"],
    )
    cfg.train.frozen = frozen
    torch.manual_seed(0)
    model = build_model(cfg.model)
    if tie:
        model.llm.get_output_embeddings().weight = model.llm.get_input_embeddings().weight
    apply_stage(model, cfg.train, allow_random_frozen=True)
    flops = ModelFlops(model)
    batch = next(iter(TrainLoader(cfg.data, model.vocab, model.sample_shapes(), 0, 1)))
    batch = model.add_draws(batch, torch.Generator().manual_seed(0))
    assert len(batch.und_images) and len(batch.images["flow"])  # both image paths are exercised
    # eager computes every (query, key) pair of the row under a mask: count those for the comparison
    B, L = batch.sample_ids.shape
    real = batch_shape(batch, flops.num_layers)
    dense = BatchShape(
        real.tokens, [B * L] * flops.num_layers, [float(B * L * L)] * flops.num_layers,
        real.logit_tokens, real.und_images, real.gen_images, real.samples,
    )  # fmt: skip
    return flops.train_flops(dense), _measured_step_flops(model, batch), flops, real


@pytest.mark.parametrize(
    "frozen, tie",
    [
        ([], False),  # everything trains
        ([], True),  # tied embeddings: the head's matmul counts once per logit token, the lookup not at all
        (["llm", "und.tower"], False),  # stage 1: a frozen LLM still back-propagates to the aligner
        (["llm", "und", "heads.flow.time_embed", "heads.flow.gen_encoder", "heads.flow.repa_proj"], False),
    ],
    ids=["all", "tied", "stage1", "decoder_only"],  # decoder_only: only the flow decoder trains, no LLM backward
)
def test_analytic_flops_match_flop_counter(small_cfg, frozen, tie):
    analytic, measured, _, _ = _step(small_cfg, frozen, tie)
    assert analytic == pytest.approx(measured, rel=0.05), (analytic, measured)


def test_causal_packed_attention_counts_pairs_within_samples(small_cfg):
    _, _, flops, real = _step(small_cfg, [])
    assert real.pairs_per_layer[0] < real.tokens**2 / 2  # samples never attend to each other
    # mixture-of-depths hook: fewer tokens in a layer lower its share, nothing else
    half = flops.llm_forward([real.tokens, real.tokens // 2], real.pairs_per_layer, 0)
    full = flops.llm_forward(real.tokens_per_layer, real.pairs_per_layer, 0)
    assert full - half == pytest.approx(2 * flops.layer_macs[1] * (real.tokens - real.tokens // 2))


def test_peak_table():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert peak_tflops("NVIDIA H200", "tf32") == 494.7
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5
    assert peak_tflops("NVIDIA B200", "bf16") == 2250.0
    assert peak_tflops("NVIDIA GeForce RTX 4090", "bf16") is None


def _packed_batch():
    """Two rows, three samples with understanding-image tokens between text, padding at the ends."""
    sid = torch.tensor([[0] * 12 + [1] * 7 + [-1] * 3, [2] * 20 + [-1] * 2])
    kinds = torch.zeros_like(sid, dtype=torch.int8)
    kinds[0, 2:10] = TOKEN_UND_IMAGE  # 8 routable in sample 0
    kinds[0, 13:17] = TOKEN_UND_IMAGE  # 4 in sample 1
    kinds[1, 1:8] = TOKEN_UND_IMAGE  # 7 + 6 in sample 2, text between the two images
    kinds[1, 10:16] = TOKEN_UND_IMAGE
    kinds[1, 16:18] = TOKEN_GEN_IMAGE  # not routable by default
    targets = torch.full_like(sid, IGNORE)
    targets[:, -4] = 1
    spans = []  # the host layout collate would record
    for r in range(sid.shape[0]):
        row = []
        for s in sorted(set(sid[r].tolist()) - {-1}):
            at = (sid[r] == s).nonzero().flatten()
            k, t = kinds[r, at], targets[r, at]
            counts = tuple(int((k == kind).sum()) for kind in range(3))
            row.append(Span(s, int(at[0]), len(at), counts, int((t != IGNORE).sum())))
        spans.append(tuple(row))
    varlen = Varlen.from_segments(sid)
    zeros = torch.zeros_like(sid)
    return Batch(zeros, targets, zeros.float(), sid, None, zeros.bool(), kinds, zeros.float(), torch.arange(3),
                 varlen.cu_seqlens, varlen.max_seqlen, tuple(spans))  # fmt: skip


def test_layer_counts_analytic():
    # one sample of 10 tokens, 6 routable; ratios 1, 0.5, 0.15: kept 10, 4 + 3, 4 + floor(0.9) = 4
    c = layer_counts([10], [6], [1.0, 0.5, 0.15])
    assert c.tokens_per_layer == [10, 7, 4]
    assert c.pairs_per_layer == [55.0, 28.0, 10.0]
    assert c.router_tokens == 12  # 6 scored in each of the 2 routed layers
    with pytest.raises(ValueError, match="routable counts"):
        layer_counts([3], [4], [1.0])


def test_mod_batch_shape_counts_what_select_tokens_keeps():
    batch = _packed_batch()
    mod = MoDConfig(enabled=True)
    ratios = layer_ratios(8, mod)
    shape = batch_shape(batch, 8, mod)
    sid = batch.sample_ids
    routable = routable_mask(batch.token_kinds, sid, mod.routable_kinds)
    for layer, ratio in enumerate(ratios):
        keep = select_tokens(torch.randn(sid.shape), routable, sid, ratio) & (sid >= 0)
        assert shape.tokens_per_layer[layer] == int(keep.sum())
        per_sample = [int((keep & (sid == s)).sum()) for s in range(3)]
        assert shape.pairs_per_layer[layer] == sum(k * (k + 1) / 2 for k in per_sample)
    assert shape.router_tokens == int(routable.sum()) * sum(r < 1 for r in ratios)
    # MoD off (or no config) is the dense count, unchanged
    dense = batch_shape(batch, 8)
    assert dense == batch_shape(batch, 8, MoDConfig(enabled=False))
    assert dense.tokens_per_layer == [39] * 8 and dense.router_tokens == 0
    assert dense.pairs_per_layer == [12 * 13 / 2 + 7 * 8 / 2 + 20 * 21 / 2] * 8


def test_prefill_and_kv_accounting_analytic():
    # a 2-layer LLaMA-shaped LLM: hidden 8, MLP 16, 2 heads (head_dim 4), 1 KV head, vocab 10
    llm = LLMShape(
        layer_macs=(8 * 8 * 2 + 8 * 4 * 2 + 3 * 8 * 16,) * 2, pair_macs=2 * 2 * 4, head_macs=80, kv_width=8, hidden=8
    )
    dense = layer_counts([6], [4], [1.0, 1.0])
    mod = layer_counts([6], [4], [1.0, 0.5])  # layer 1 keeps 2 + 2 = 4 tokens
    f = prefill_flops(llm, mod, logit_tokens=1)
    assert f == {
        "layers": 2.0 * 576 * (6 + 4), "attention": 2.0 * 16 * (21 + 10), "router": 2.0 * 8 * 4, "head": 160.0,
    }  # fmt: skip
    assert kv_cache_bytes(llm, dense) == 12 * 8 * 2 and kv_cache_bytes(llm, mod, dtype_bytes=4) == 10 * 8 * 4
    with pytest.raises(ValueError, match="layers"):
        kv_cache_bytes(llm, layer_counts([6], [4], [1.0]))
