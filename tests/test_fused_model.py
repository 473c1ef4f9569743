"""The whole model with ``model.llm.kernels=fused`` equals ``torch``: losses and every gradient, p-MoD and V2PE on.

Like ``tests/test_kernels.py``: the fused paths run on a CPU only under Triton's interpreter, which must be
on before triton is imported (``mm/kernels/interpreter.py``), so ``test_interp_*`` run in a child pytest
with ``TRITON_INTERPRET=1`` (``test_fused_model_under_the_triton_interpreter``); here they show as skipped.
The rest (the config switch, the CPU fallback) runs in this process.

The batch is a real packed one from the loader (understanding and generation samples in 320-token rows),
the model has a dense layer and two routed ones (the p-MoD schedule over 3 layers) and V2PE's fractional
positions, so every fused op of the decoder loop runs: RMSNorm, SwiGLU, rotary from float positions (dense
and gathered), the p-MoD gather and STRing scatter, and the LM head + loss. Tolerance: fp32, 1e-4 of each
tensor's largest value (the fused ops round differently - sums in another order, cos/sin in-kernel - and
three layers compound it; the routers' gradients are sums with cancellation, the loosest at ~6e-5).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import replace

import pytest
import torch

from data.loader import TrainLoader
from mm.checkpoint import load_model_weights
from mm.config import with_overrides
from mm.model.unified import UnifiedModel, build_model
from mm.schema import ConfigError
from tests.conftest import ROOT, SMALL
from tests.test_engine import _env, _metrics, _torchrun
from tests.test_host_sync import HostReads

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRETED:
    from mm.kernels.interpreter import enable_cpu_interpreter

    enable_cpu_interpreter()

interp = pytest.mark.skipif(
    not INTERPRETED, reason="runs on CPU under the Triton interpreter, in test_fused_model_under_the_triton_interpreter"
)
MOD_V2PE = [
    "model.llm.num_layers=3", "model.mod.enabled=true", "model.v2pe.enabled=true", "data.seq_len=128",
    "data.rows_per_batch=2", "data.num_workers=0", "model.heads.flow.repa_layer=2",
]  # fmt: skip
# every fused op of the loop and the loss, by the autograd node it leaves in the graph
FUSED_NODES = {
    "LigerRMSNormFunctionBackward", "LigerSiLUMulFunctionBackward", "RotaryQKBackward", "GatherKeptBackward",
    "StringScatterBackward", "_LigerWeightedLinearCEBackward",
}  # fmt: skip
TOL = 1e-4


def _pair(small_cfg, *extra: str) -> tuple[UnifiedModel, UnifiedModel, object]:
    """The same weights as ``torch`` and ``fused`` models, and a packed, drawn batch of the loader."""
    cfg = with_overrides(small_cfg, MOD_V2PE + list(extra))
    torch.manual_seed(0)
    ref = build_model(cfg.model).train()
    for p in ref.mod_routers.parameters():  # distinct scores: the routed layers really select
        torch.nn.init.normal_(p, std=0.5)
    assert 1.0 in ref.mod_routers.ratios and len(ref.mod_routers.routers) == 2  # dense and routed layers
    fused_cfg = replace(cfg.model, llm=replace(cfg.model.llm, kernels="fused"))
    fused = UnifiedModel(fused_cfg, ref.vocab).train()
    fused.load_state_dict(ref.state_dict())
    batch = next(iter(TrainLoader(cfg.data, ref.vocab, ref.sample_shapes(), 0, 1)))
    assert batch.und_images is not None and "flow" in batch.images and batch.n_samples > 4  # a packed mix
    return ref, fused, ref.add_draws(batch, torch.Generator().manual_seed(0))


def _nodes(t: torch.Tensor) -> set[str]:
    """Names of every autograd node behind ``t``."""
    seen, stack, names = set(), [t.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack += [n for n, _ in node.next_functions]
    return names


def _step(model: UnifiedModel, batch, global_count: float, reads: HostReads | None = None) -> tuple[dict, dict]:
    """Losses and gradients of the loss as ``combine`` weighs it with a global text count; ``reads`` counts
    the host reads of the decoder loop (forward)."""
    model.zero_grad(set_to_none=True)
    decode = model.decode
    if reads is not None:

        def counted(*args, **kwargs):
            with reads:
                return decode(*args, **kwargs)

        model.decode = counted
    try:
        out = model(batch)
    finally:
        model.decode = decode
    counts = {k: float(out[f"{k}_count"]) for k in model.loss_weights()}
    counts["text"] = global_count  # the trainer's count summed over ranks: not this batch's own
    loss = model.combine(out, counts)
    nodes = _nodes(loss)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    losses = {k: v.detach() for k, v in out.items() if isinstance(v, torch.Tensor)}
    return losses | {"combined": loss.detach(), "nodes": nodes}, grads


def _close(a: torch.Tensor, e: torch.Tensor, what: str) -> float:
    """Asserts closeness; returns max |a - e| / max |e|."""
    scale = float(e.abs().max()) if e.numel() else 0.0
    torch.testing.assert_close(a, e, rtol=TOL, atol=TOL * max(scale, 1e-6), msg=lambda m: f"{what}: {m}")
    return float((a - e).abs().max()) / max(scale, 1e-30) if e.numel() else 0.0


class _OursOnly(HostReads):
    """Host reads (tests/test_host_sync.py), except those the Triton interpreter makes: it copies every
    kernel argument to numpy, its stand-in for the device memory a GPU kernel reads."""

    def __init__(self) -> None:
        super().__init__()
        self.interpreter_reads = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_code.co_filename.endswith(os.path.join("triton", "runtime", "interpreter.py")):
                self.interpreter_reads += 1
                return func(*args, **(kwargs or {}))
            frame = frame.f_back
        return super().__torch_function__(func, types, args, kwargs)


@interp
@pytest.mark.parametrize(
    "checkpointing", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["stored", "recomputed"]
)
def test_interp_whole_model_fused_equals_torch(small_cfg, checkpointing):
    """Losses and every gradient equal; every fused op ran; nothing in the fused layer loop read the host."""
    ref, fused, batch = _pair(small_cfg)
    for m in (ref, fused):
        m.set_activation_checkpointing(checkpointing)
    global_count = float(batch.loss_weights[batch.targets != -100].sum()) + 11.0
    want, want_g = _step(ref, batch, global_count)
    reads = _OursOnly()
    got, got_g = _step(fused, batch, global_count, reads)
    assert not FUSED_NODES - got["nodes"], f"fused ops that did not run: {FUSED_NODES - got['nodes']}"
    assert not FUSED_NODES & want["nodes"]  # the reference model ran none
    assert reads.reads == [], f"host reads in the fused layer loop: {reads.reads}"
    assert reads.interpreter_reads > 0  # the filter saw the interpreter's copies: kernels did run in the loop
    assert want["text"] > 0 and want["flow"] > 0
    keys = ("combined", "loss", "text_sum", "text_count", "text_per_token", "flow_sum", "repa_sum")
    worst_loss = max(_close(got[k], want[k], k) for k in keys)
    assert set(got_g) == set(want_g) and any(n.startswith("mod_routers") for n in got_g)
    worst_grad = max(_close(got_g[n], want_g[n], f"grad {n}") for n in want_g)
    print(f"fused vs torch: worst relative difference {worst_loss:.1e} (losses), {worst_grad:.1e} (gradients)")


@pytest.mark.gpu
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_gpu_whole_model_fused_equals_torch(small_cfg, autocast):
    """The same comparison compiled on CUDA, and no host read in the fused layer loop (no interpreter there:
    every read counts). fp32: 5e-4 of each tensor's largest value (cuDNN's convolution backward of the towers
    is not bitwise reproducible); bf16 autocast: losses within 2e-2, gradients aligned (cosine >= 0.99)."""
    ref, fused, batch = _pair(small_cfg)
    ref, fused, batch = ref.cuda(), fused.cuda(), batch.to(torch.device("cuda"))
    global_count = float(batch.loss_weights[batch.targets != -100].sum()) + 11.0
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        want, want_g = _step(ref, batch, global_count)
        reads = HostReads()
        got, got_g = _step(fused, batch, global_count, reads)
    assert not FUSED_NODES - got["nodes"], f"fused ops that did not run: {FUSED_NODES - got['nodes']}"
    assert reads.reads == [], f"host reads in the fused layer loop: {reads.reads}"
    for k in ("combined", "text_sum", "flow_sum", "repa_sum"):
        if autocast:
            assert float(got[k]) == pytest.approx(float(want[k]), rel=2e-2, abs=1e-3), k
        else:
            torch.testing.assert_close(got[k], want[k], rtol=5e-4, atol=5e-4 * float(want[k].abs().max()))
    assert set(got_g) == set(want_g)
    for n, e in want_g.items():
        a = got_g[n].float()
        if autocast and float(e.abs().max()) == 0:
            assert float(a.abs().max()) == 0, n
        elif autocast:
            assert torch.nn.functional.cosine_similarity(a.flatten(), e.float().flatten(), dim=0) >= 0.99, n
        else:
            torch.testing.assert_close(a, e, rtol=5e-4, atol=5e-4 * max(float(e.abs().max()), 1e-6), msg=n)


def test_kernels_switch_is_validated(small_cfg):
    with pytest.raises(ConfigError, match=r"model\.llm\.kernels='liger'; known: \['torch', 'fused'\]"):
        with_overrides(small_cfg, ["model.llm.kernels=liger"])
    assert small_cfg.model.llm.kernels == "torch"  # the default: the reference


@pytest.mark.skipif(INTERPRETED, reason="the CPU fallback: no interpreter")
def test_fused_on_a_cpu_runs_the_references_exactly(small_cfg):
    """Without a GPU or the interpreter ``fused`` is the reference path: identical losses and gradients."""
    ref, fused, batch = _pair(small_cfg)
    want, want_g = _step(ref, batch, 50.0)
    got, got_g = _step(fused, batch, 50.0)
    assert got.pop("nodes") == want.pop("nodes")
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert all(torch.equal(got_g[n], want_g[n]) for n in want_g)
    assert not [m for m in sys.modules if m.startswith("mm.kernels._")]  # no Triton kernel was even imported


def _zero3_run(shard_dir, run, kernels: str, ds_json, interpreted: bool) -> list[dict]:
    over = SMALL + [
        f"data.train_shards={shard_dir}/digits/train-{{000000..000003}}.tar",
        f"data.heldout_shards={shard_dir}/digits/heldout-000000.tar", f"run.dir={run}", "train.max_steps=3",
        "train.ckpt_every=1000", "train.metrics=[jsonl]", "engine.kind=deepspeed",
        f"engine.deepspeed_config={ds_json}", f"model.llm.kernels={kernels}",
    ]  # fmt: skip
    env = _env() | ({"TRITON_INTERPRET": "1"} if interpreted else {})
    p = subprocess.run(
        _torchrun() + ["train.py", *over], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return _metrics(run)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="the fused paths need triton (Linux wheels only)")
@pytest.mark.skipif(INTERPRETED, reason="starts its own interpreted ranks")
def test_fused_under_zero3_equals_torch(shard_dir, tmp_path):
    """2 ranks of DeepSpeed ZeRO-3 with every parameter partitioned (persistence threshold 0): the fused LM
    head + loss (interpreted) gathers the head as an external parameter of its module, and the norms, whose
    weights are partitioned, fall back to their modules. 3 steps equal the torch run: losses and grad norms
    rel 1e-5, weights abs 1e-4 (as tests/test_engine.py: Adam turns tiny gradient differences into steps)."""
    ds = json.loads((ROOT / "configs/deepspeed/zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # the LM head of this tiny model too
    (tmp_path / "zero3.json").write_text(json.dumps(ds))
    want = _zero3_run(shard_dir, tmp_path / "torch", "torch", tmp_path / "zero3.json", interpreted=False)
    got = _zero3_run(shard_dir, tmp_path / "fused", "fused", tmp_path / "zero3.json", interpreted=True)
    keys = ("loss", "text", "flow", "grad_norm")
    for a, b in zip(got, want, strict=True):
        for k in keys:
            assert (a[k] is None) == (b[k] is None) and (a[k] is None or a[k] == pytest.approx(b[k], rel=1e-5)), k
    assert any(a[k] != b[k] for a, b in zip(got, want) for k in keys)  # not bit-identical: the fused path ran
    wa, wb = (load_model_weights(tmp_path / r / "checkpoints/step_00000003") for r in ("fused", "torch"))
    for k in wb:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-4, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.skipif(sys.platform != "linux", reason="the fused paths need triton (Linux wheels only)")
@pytest.mark.skipif(INTERPRETED, reason="this process is the child run")
@pytest.mark.parametrize("markers", ["not gpu and not slow", pytest.param("slow", marks=pytest.mark.slow)])
def test_fused_model_under_the_triton_interpreter(tmp_path, markers):
    """Runs the test_interp_* tests of ``markers`` in a child pytest with TRITON_INTERPRET=1; all pass, none skip."""
    report = tmp_path / "interp.xml"
    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", markers, "-k", "test_interp_", f"--junitxml={report}", __file__]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    log = run.stdout[-6000:] + run.stderr[-3000:]
    assert run.returncode == 0, log
    root = ET.parse(report).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    assert int(suite.get("tests")) > 0, log
    assert int(suite.get("failures")) == int(suite.get("errors")) == int(suite.get("skipped")) == 0, log
    ran = {case.get("name").split("[")[0] for case in suite.iter("testcase")}
    assert ran == {n for n in globals() if n.startswith("test_interp_")}, log
