"""Fused ops (mm/kernels/fused.py, rope.py, mod.py) equal their pure-PyTorch references, forward and backward.

Two processes. Triton decides interpreted vs compiled when it is first imported, and this suite's
conftest imports ``mm`` (hence triton, through transformers and torch._dynamo) before any test module,
so the Triton interpreter cannot be switched on from here. ``test_fused_ops_under_the_triton_interpreter``
therefore runs this file's ``test_interp_*`` tests in a child pytest with ``TRITON_INTERPRET=1`` set
from its start, where the fused paths (our kernels and liger's) really run on CPU tensors; in this
process they are skipped. The rest (references against today's code, the CPU fallback, the benchmark's
smoke run) runs here. ``pytest -m gpu`` runs the same comparisons compiled on CUDA, bf16 included.

Tolerances are explicit: fp32 1e-5 relative to the tensor's largest value (fp32 rounding only); bf16
2e-2 (two bf16 ulps: the reference rounds after every op, the kernels once, and the interpreter's
fp32 -> bf16 cast truncates).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch

from mm.kernels.dispatch import KERNEL_IMPLS, use_kernels
from mm.kernels.fused import (
    OPS,
    linear_cross_entropy,
    linear_cross_entropy_reference,
    rms_norm,
    rms_norm_reference,
    swiglu,
    swiglu_reference,
)
from mm.kernels.mod import gather_kept, gather_kept_reference, string_scatter, string_scatter_reference
from mm.kernels.rope import rotary_qk, rotary_qk_reference
from mm.model.routing import select_tokens, string_combine
from tests.conftest import ROOT

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRETED:
    from mm.kernels.interpreter import enable_cpu_interpreter

    enable_cpu_interpreter()  # raises if triton was imported before the variable was set

# triton and liger-kernel are Linux-only dependencies (requirements.txt); elsewhere only the references run
linux_only = pytest.mark.skipif(sys.platform != "linux", reason="the fused paths need triton (Linux wheels only)")
interp = pytest.mark.skipif(
    not INTERPRETED, reason="runs on CPU under the Triton interpreter, in test_fused_ops_under_the_triton_interpreter"
)
gpu = pytest.mark.gpu
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.bfloat16]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """|actual - expected| <= tol * (|expected| + max |expected|), elementwise, tol by dtype."""
    tol = TOL[dtype]
    a, e = actual.detach().float().cpu(), expected.detach().float().cpu()
    scale = float(e.abs().max()) if e.numel() else 0.0
    torch.testing.assert_close(a, e, rtol=tol, atol=tol * max(scale, 1e-6), msg=lambda m: f"{what}: {m}")


def grads(out: torch.Tensor | tuple, inputs: tuple, seed: int = 7) -> tuple:
    """Gradients of sum(out * fixed random cotangent) w.r.t. inputs (the same cotangent for both paths)."""
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(seed)
    cot = tuple(torch.randn(o.shape, generator=g).to(o) for o in outs)
    return torch.autograd.grad(outs, inputs, cot)


# ---- rotary ------------------------------------------------------------------------------------
def _rope_inputs(device: str, dtype: torch.dtype, B=2, H=3, Hk=2, L=6, D=12, max_pos=40.0, seed=0):
    """q/k in the decoder's layout (a [B, L, H, D] projection viewed as [B, H, L, D]), fractional positions."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, L, H, D, generator=g).to(device, dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(B, L, Hk, D, generator=g).to(device, dtype).transpose(1, 2).requires_grad_()
    pos = (torch.rand(B, L, generator=g) * max_pos).to(device)  # V2PE: fractional float32 positions
    inv_freq = (1.0 / 10000 ** (torch.arange(0, D, 2).float() / D)).to(device)
    return q, k, pos, inv_freq


def check_rotary(device: str, dtype: torch.dtype, **shape) -> None:
    q, k, pos, inv_freq = _rope_inputs(device, dtype, **shape)
    out = rotary_qk(q, k, pos, inv_freq, 1.25, impl="fused")
    assert type(out[0].grad_fn).__name__ == "RotaryQKBackward"  # the kernel ran, not the reference
    ref = rotary_qk_reference(q, k, pos, inv_freq, 1.25)
    for name, a, e in zip(("q", "k"), out, ref):
        assert a.stride() == e.stride() or a.is_contiguous() == e.is_contiguous()
        assert_close(a, e, dtype, f"rotary {name} {dtype}")
    for name, a, e in zip(("dq", "dk"), grads(out, (q, k)), grads(ref, (q, k))):
        assert_close(a, e, dtype, f"rotary {name} {dtype}")


def test_rotary_reference_is_transformers_rotary():
    """rotary_qk_reference == LlamaRotaryEmbedding + apply_rotary_pos_emb, bit for bit (yarn: scaling != 1)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    yarn = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 64}
    cfg = LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_parameters=yarn
    )
    rotary = LlamaRotaryEmbedding(cfg)
    assert rotary.attention_scaling != 1.0
    for dtype in DTYPES:
        q, k, pos, _ = _rope_inputs("cpu", dtype, H=4, Hk=2, D=16, max_pos=200.0)
        cos, sin = rotary(q, pos.float())
        hf = apply_rotary_pos_emb(q, k, cos, sin)
        ours = rotary_qk_reference(q, k, pos, rotary.inv_freq, rotary.attention_scaling)
        for a, e in zip(ours, hf):
            assert torch.equal(a, e)


@interp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [{}, {"H": 4, "Hk": 4, "D": 16, "max_pos": 5000.0}], ids=["gqa_odd", "mha_far"])
def test_interp_rotary_qk(dtype, shape):
    check_rotary("cpu", dtype, **shape)


# ---- p-MoD gather / STRing scatter -------------------------------------------------------------
def _routing(device: str, B=3, L=12, ratio=0.5, seed=1):
    """keep/order/valid exactly as _routed_layer builds them, from select_tokens on packed rows."""
    g = torch.Generator().manual_seed(seed)
    sample_ids = torch.tensor([[0] * 5 + [1] * 7, [0] * 12, [0] * 8 + [-1] * 4])[:B, :L]
    routable = torch.rand(B, L, generator=g) < 0.7
    routable[1] = True  # a row of routable tokens only: it drops to ratio, others keep their text
    scores = torch.randn(B, L, generator=g)
    keep = select_tokens(scores, routable, sample_ids, ratio)
    counts = keep.sum(1)
    K = int(counts.max())
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :K]
    valid = torch.arange(K)[None, :] < counts[:, None]
    assert not bool(valid.all()), "the fixture must have filler slots"
    w = torch.where(routable, 1 + 0.5 * torch.tanh(scores), torch.ones_like(scores))
    return keep.to(device), order.to(device), valid.to(device), w.to(device)


def _mod_inputs(device: str, dtype: torch.dtype, D=10, seed=2):
    keep, order, valid, w = _routing(device)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*keep.shape, D, generator=g).to(device, dtype).requires_grad_()
    kept = torch.randn(*order.shape, D, generator=g).to(device, dtype).requires_grad_()
    return keep, order, valid, w.requires_grad_(), x, kept


def test_string_scatter_reference_is_string_combine():
    """The sync-free reference == today's string_combine(x, out[valid], keep, w), values and gradients."""
    for dtype in DTYPES:
        keep, order, valid, w, x, kept = _mod_inputs("cpu", dtype)
        ours = string_scatter_reference(x, kept, order, valid, w)
        today = string_combine(x, kept[valid], keep, w)
        assert torch.equal(ours, today)
        for a, e in zip(grads(ours, (x, kept, w)), grads(today, (x, kept, w))):
            assert torch.equal(a, e)
        assert torch.equal(gather_kept_reference(x, order)[valid], x[keep])


def check_gather(device: str, dtype: torch.dtype, D: int = 10) -> None:
    _, order, _, _, x, _ = _mod_inputs(device, dtype, D=D)
    out = gather_kept(x, order, impl="fused")
    assert type(out.grad_fn).__name__ == "GatherKeptBackward"
    ref = gather_kept_reference(x, order)
    assert torch.equal(out, ref)  # a copy: exact
    assert torch.equal(grads(out, (x,))[0], grads(ref, (x,))[0])


def check_scatter(device: str, dtype: torch.dtype, D: int = 10) -> None:
    _, order, valid, w, x, kept = _mod_inputs(device, dtype, D=D)
    out = string_scatter(x, kept, order, valid, w, impl="fused")
    assert type(out.grad_fn).__name__ == "StringScatterBackward"
    ref = string_scatter_reference(x, kept, order, valid, w)
    assert_close(out, ref, dtype, f"string_scatter {dtype}")
    got = grads(out, (x, kept, w))
    for name, a, e in zip(("dx", "dkept", "dw"), got, grads(ref, (x, kept, w))):
        assert_close(a, e, dtype, f"string_scatter {name} {dtype}")
    assert float(got[1][~valid].abs().sum()) == 0.0  # filler slots get no gradient


@interp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_interp_gather_kept(dtype):
    check_gather("cpu", dtype)


@interp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [10, 1100], ids=["D10", "D1100_two_blocks"])
def test_interp_string_scatter(dtype, D):
    check_scatter("cpu", dtype, D=D)


# ---- RMSNorm and SwiGLU (liger) ----------------------------------------------------------------
def check_rms_norm(device: str, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 5, 48, generator=g) * 3).to(device, dtype).requires_grad_()
    weight = (1 + 0.2 * torch.randn(48, generator=g)).to(device, dtype).requires_grad_()
    out = rms_norm(x, weight, 1e-6, impl="fused")
    assert type(out.grad_fn).__name__ == "LigerRMSNormFunctionBackward"
    ref = rms_norm_reference(x, weight, 1e-6)
    assert_close(out, ref, dtype, f"rms_norm {dtype}")
    for name, a, e in zip(("dx", "dweight"), grads(out, (x, weight)), grads(ref, (x, weight))):
        assert_close(a, e, dtype, f"rms_norm {name} {dtype}")


def check_swiglu(device: str, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(4)
    gate = (torch.randn(2, 5, 40, generator=g) * 2).to(device, dtype).requires_grad_()
    up = torch.randn(2, 5, 40, generator=g).to(device, dtype).requires_grad_()
    # liger's backward writes the gradients into its saved inputs: give it fresh activations, as an MLP does
    out = swiglu(gate * 1, up * 1, impl="fused")
    assert type(out.grad_fn).__name__ == "LigerSiLUMulFunctionBackward"
    ref = swiglu_reference(gate, up)
    assert_close(out, ref, dtype, f"swiglu {dtype}")
    for name, a, e in zip(("dgate", "dup"), grads(out, (gate, up)), grads(ref, (gate, up))):
        assert_close(a, e, dtype, f"swiglu {name} {dtype}")


def test_rms_norm_reference_is_transformers_rmsnorm():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    for dtype in DTYPES:
        norm = LlamaRMSNorm(48, eps=1e-5).to(dtype)
        with torch.no_grad():
            norm.weight.normal_()
        x = torch.randn(3, 48).to(dtype)
        assert torch.equal(rms_norm_reference(x, norm.weight, 1e-5), norm(x))


@interp
def test_interp_rms_norm_fp32():
    """fp32 only on CPU: the interpreter's bf16 arithmetic is integer math on the bits (see interpreter.py)."""
    check_rms_norm("cpu", torch.float32)


@interp
def test_interp_swiglu_fp32():
    check_swiglu("cpu", torch.float32)


@interp
def test_interp_liger_elementwise_bf16_uses_the_reference_on_cpu():
    """Interpreted bf16 RMSNorm/SwiGLU would be wrong (bf16 * bf16 in the interpreter): the reference runs."""
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    assert torch.equal(rms_norm(x, x[0], 1e-6, "fused"), rms_norm_reference(x, x[0], 1e-6))
    assert torch.equal(swiglu(x, x, "fused"), swiglu_reference(x, x))


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_liger_rms_norm_and_swiglu(dtype):
    check_rms_norm("cuda", dtype)
    check_swiglu("cuda", dtype)


# ---- fused linear cross-entropy ----------------------------------------------------------------
def _ce_inputs(device: str, dtype: torch.dtype, with_bias: bool, with_weights: bool, N=14, D=16, V=70, seed=5):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g).to(device, dtype).requires_grad_()
    weight = (0.3 * torch.randn(V, D, generator=g)).to(device, dtype).requires_grad_()
    bias = (0.1 * torch.randn(V, generator=g)).to(device, dtype).requires_grad_() if with_bias else None
    targets = torch.randint(0, V, (N,), generator=g)
    targets[[0, 3, 4, 9]] = -100  # IGNORE: prompts, images, padding
    weights = None
    if with_weights:  # e.g. square reduction: 1/sqrt(n) per sample; garbage where ignored must not matter
        weights = torch.rand(N, generator=g) + 0.1
        weights[3] = float("nan")
    return hidden, weight, bias, targets.to(device), (weights.to(device) if weights is not None else None)


def check_linear_ce(device: str, dtype: torch.dtype, with_bias: bool, with_weights: bool, **sizes) -> None:
    hidden, weight, bias, targets, weights = _ce_inputs(device, dtype, with_bias, with_weights, **sizes)
    out = linear_cross_entropy(hidden, weight, targets, weights, bias, impl="fused")
    assert type(out.loss_sum.grad_fn).__name__ == "_LigerWeightedLinearCEBackward"
    ref = linear_cross_entropy_reference(hidden, weight, targets, weights, bias)
    assert torch.isfinite(ref.loss_sum)
    for name in ("loss_sum", "per_token", "weight_sum"):
        assert_close(getattr(out, name), getattr(ref, name), dtype, f"linear CE {name} {dtype}")
    global_count = float(ref.weight_sum) + 37.5  # the trainer's count, summed over ranks: not this batch's
    inputs = (hidden, weight) + ((bias,) if bias is not None else ())
    got = torch.autograd.grad(out.loss_sum / global_count, inputs)
    want = torch.autograd.grad(ref.loss_sum / global_count, inputs)
    for name, a, e in zip(("dhidden", "dweight", "dbias"), got, want):
        assert a.dtype == e.dtype
        assert_close(a, e, dtype, f"linear CE {name} {dtype}")


def test_linear_ce_reference_is_unified_text_loss():
    """The reference on all rows == unified.py's text loss on hidden[text_mask] (sum, per token, gradients)."""
    hidden, weight, _, targets, weights = _ce_inputs("cpu", torch.float32, with_bias=False, with_weights=True)
    lm_head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    lm_head.weight = torch.nn.Parameter(weight.detach().clone())
    text_mask = targets != -100  # as mm/model/unified.py computes losses["text_sum"]:
    logits = lm_head(hidden[text_mask]).float()
    per_token = torch.nn.functional.cross_entropy(logits, targets[text_mask], reduction="none")
    w = weights[text_mask].float()
    text_sum = (per_token * w).sum()
    ref = linear_cross_entropy_reference(hidden, weight, targets, weights)
    assert_close(ref.loss_sum, text_sum, torch.float32, "sum")
    assert torch.equal(ref.per_token[text_mask], per_token.detach())
    assert_close(ref.weight_sum, w.sum(), torch.float32, "count")
    a = torch.autograd.grad(text_sum / 9.0, (hidden, lm_head.weight))
    b = torch.autograd.grad(ref.loss_sum / 9.0, (hidden, weight))
    for x, y in zip(a, b):
        assert_close(y, x, torch.float32, "gradient")


@interp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", [(True, True), (False, False)], ids=["bias_weights", "plain"])
def test_interp_linear_cross_entropy(dtype, variant):
    check_linear_ce("cpu", dtype, *variant)


@interp
def test_interp_linear_cross_entropy_edges():
    """No grad (eval): loss only. All rows ignored: zero loss and gradients. One backward per forward."""
    hidden, weight, bias, targets, weights = _ce_inputs("cpu", torch.float32, True, True)
    with torch.no_grad():
        out = linear_cross_entropy(hidden, weight, targets, weights, bias, impl="fused")
        ref = linear_cross_entropy_reference(hidden, weight, targets, weights, bias)
    assert_close(out.loss_sum, ref.loss_sum, torch.float32, "no-grad loss")
    ignored = torch.full_like(targets, -100)
    out = linear_cross_entropy(hidden, weight, ignored, weights, bias, impl="fused")
    assert float(out.loss_sum.detach()) == 0.0 and float(out.weight_sum) == 0.0
    assert all(float(g.abs().sum()) == 0.0 for g in torch.autograd.grad(out.loss_sum, (hidden, weight, bias)))
    out = linear_cross_entropy(hidden, weight, targets, None, None, impl="fused")
    out.loss_sum.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="used once"):
        out.loss_sum.backward()


# ---- the switch and the CPU fallback -----------------------------------------------------------
def test_fused_impl_falls_back_to_the_reference_without_gpu_or_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert KERNEL_IMPLS == ("torch", "fused") and not use_kernels("fused", torch.zeros(1))
    with pytest.raises(ValueError, match="known"):
        use_kernels("liger", torch.zeros(1))
    q, k, pos, inv_freq = _rope_inputs("cpu", torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(rotary_qk(q, k, pos, inv_freq, impl="fused"),
                                                 rotary_qk_reference(q, k, pos, inv_freq)))  # fmt: skip
    keep, order, valid, w, x, kept = _mod_inputs("cpu", torch.float32)
    assert torch.equal(gather_kept(x, order, impl="fused"), gather_kept_reference(x, order))
    want = string_scatter_reference(x, kept, order, valid, w)
    assert torch.equal(string_scatter(x, kept, order, valid, w, "fused"), want)
    assert torch.equal(rms_norm(x, x[0, 0], 1e-6, "fused"), rms_norm_reference(x, x[0, 0], 1e-6))
    assert torch.equal(swiglu(x, x, "fused"), swiglu_reference(x, x))
    hidden, weight, bias, targets, weights = _ce_inputs("cpu", torch.float32, True, True)
    out = linear_cross_entropy(hidden, weight, targets, weights, bias, impl="fused")
    assert torch.equal(out.loss_sum, linear_cross_entropy_reference(hidden, weight, targets, weights, bias).loss_sum)
    assert set(OPS) == {"rms_norm", "swiglu", "linear_cross_entropy", "rotary_qk", "gather_kept", "string_scatter"}
    if not INTERPRETED:  # nothing imported our kernel modules: a CPU run never needs Triton kernels
        assert not [m for m in sys.modules if m.startswith("mm.kernels._")]


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_fused_ops_match_references(dtype):
    """Compiled on CUDA, at sizes that exercise tiling: long V2PE positions, D > one block, a real vocabulary."""
    check_rotary("cuda", dtype)
    check_rotary("cuda", dtype, B=2, H=32, Hk=8, L=64, D=128, max_pos=32768.0)
    check_gather("cuda", dtype, D=4096)
    check_scatter("cuda", dtype, D=4096)
    check_linear_ce("cuda", dtype, True, True, N=512, D=256, V=32000)
    check_linear_ce("cuda", dtype, False, True, N=300, D=128, V=1000)


# ---- the interpreter run and the benchmark -----------------------------------------------------
def _interp_test_names() -> set[str]:
    return {name for name in globals() if name.startswith("test_interp_")}


@linux_only
@pytest.mark.skipif(INTERPRETED, reason="this process is the child run")
def test_fused_ops_under_the_triton_interpreter(tmp_path):
    """Runs every test_interp_* test in a child pytest with TRITON_INTERPRET=1; all must pass, none skip."""
    report = tmp_path / "interp.xml"
    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-k", "test_interp_", f"--junitxml={report}", __file__]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    log = run.stdout[-6000:] + run.stderr[-3000:]
    assert run.returncode == 0, log
    root = ET.parse(report).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    assert int(suite.get("failures")) == int(suite.get("errors")) == int(suite.get("skipped")) == 0, log
    ran = {case.get("name").split("[")[0] for case in suite.iter("testcase")}
    assert ran == _interp_test_names(), log


@linux_only
def test_bench_cpu_smoke_prints_one_json(tmp_path):
    """scripts/bench_kernels.py --cpu-smoke: reference and fused (interpreted) per op, one JSON object."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script sets it itself
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_kernels.py"), "--cpu-smoke"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(run.stdout)
    keys = {"device", "dtype", "smoke", "repeats", "ops", "linear_ce_peak_ratio", "goal_linear_ce_peak_ratio"}
    assert keys <= set(report)
    assert report["smoke"] is True and report["device"] == "cpu"
    assert set(report["ops"]) == set(OPS)
    for name, op in report["ops"].items():
        assert {"reference_ms", "fused_ms", "speedup", "reference_peak_mb", "fused_peak_mb", "max_abs_diff"} <= set(op)
        assert op["reference_ms"] > 0 and op["fused_ms"] > 0, name
        assert op["max_abs_diff"] < 1e-3, name  # fp32 smoke: the fused path computed the same thing
    attention = report["attention"]  # the packed-attention section: both per-sample paths, every row length
    assert set(attention["rows"]) == {"256", "512"} and set(attention["flatness"]) == {"slice_assign", "split_concat"}
    for row in attention["rows"].values():
        assert row["slice_assign_us_per_token"] > 0 and row["split_concat_us_per_token"] > 0
        assert row["max_grad_diff"] == 0.0  # split/concatenate gives the old path's gradients exactly
