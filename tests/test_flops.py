"""Whole-model training FLOPs against torch's FlopCounterMode on a real step, and the peak table."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from data.loader import build_train_loader
from mm.config import load_config
from mm.train.flops import BatchShape, ModelFlops, batch_shape, peak_tflops
from mm.train.trainer import apply_stage, build_model
from tests.conftest import ROOT, SMALL


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread: on a shared 2-core machine a 2-thread region waits for a descheduled thread at every op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    model, vocab = build_model(cfg)
    if tie:
        model.llm.get_output_embeddings().weight = model.llm.get_input_embeddings().weight
    apply_stage(model, cfg, allow_random_frozen=True)
    flops = ModelFlops(model)
    batch = next(iter(build_train_loader(cfg.data, vocab, model.sample_shapes(), 0, 1)))
    batch = model.add_flow_inputs(batch, torch.Generator().manual_seed(0))
    assert len(batch["und_images"]) and len(batch["gen_images"])  # both image paths are exercised
    # eager computes every (query, key) pair of the row under a mask: count those for the comparison
    B, L = batch["sample_ids"].shape
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
        (["llm", "und", "time_embed", "gen_encoder", "repa_proj"], False),  # only the decoder: no LLM backward
    ],
    ids=["all", "tied", "stage1", "decoder_only"],
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
