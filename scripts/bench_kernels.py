"""Reference vs fused per op of ``mm/kernels/fused.py``, and packed attention's backward per token (JSON).

Each op runs its pure-PyTorch reference and its fused path (liger-kernel or our Triton kernels) on the
same inputs, interleaved repeat by repeat so both see the same machine noise; the report gives medians,
the speedup (reference / fused), the peak memory each path adds above its inputs (CUDA only: CPU has no
allocator statistics) and the largest forward difference between the two. For the LM head + loss the
issue's goal is a fused peak at most 1/4 of the unfused one at a 102,400 vocabulary
(``linear_ce_peak_ratio`` beside ``goal_linear_ce_peak_ratio``).

Section ``attention`` (``--sections``): the backward time per token of packed attention (``sdpa``'s
per-sample path) at rows of 1024 to 8192 tokens of 128-token samples, interleaved: the split/concatenate
path of ``mm/kernels/attention.py`` (``sdpa_segmented``) beside the slice-and-assign path it replaced
(:func:`slice_assign`, kept here only to show the before), whose every slice's backward allocated and
copied a whole-row gradient. Goal: per-token time flat within 20% over the lengths (``flatness`` <= 1.2).

    python scripts/bench_kernels.py [--dtype bfloat16 --tokens 16384 --hidden 4096 --vocab 102400 --repeats 10]
    python scripts/bench_kernels.py --sections attention --device cpu     # the attention rows on a CPU
    python scripts/bench_kernels.py --cpu-smoke      # tiny sizes, fp32, fused kernels in Triton's interpreter

The ops section needs CUDA (or ``--cpu-smoke``): on a CPU without the interpreter "fused" runs the
references. ``--cpu-smoke`` exercises the script (the test suite runs it): CPU timings of the interpreter
mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

if "--cpu-smoke" in sys.argv:  # before anything imports triton: see mm/kernels/interpreter.py
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mm.kernels.attention import AttentionSpec, Varlen, sdpa_segmented  # noqa: E402
from mm.kernels.fused import OPS  # noqa: E402
from mm.kernels.interpreter import enable_cpu_interpreter  # noqa: E402

GOAL_LINEAR_CE_PEAK_RATIO = 0.25
GOAL_ATTENTION_FLATNESS = 1.2
IGNORE = -100


@dataclass
class Case:
    """One op: fresh inputs per call, the outputs of either path, and what to differentiate."""

    name: str
    make: Callable[[], dict]  # -> inputs (leaves requiring grad) and cotangents
    run: Callable[[dict, str], tuple]  # (inputs, impl) -> outputs
    leaves: tuple[str, ...]  # the inputs that get gradients


def _leaf(shape, device, dtype, scale=1.0) -> torch.Tensor:
    return (torch.randn(shape, device=device, dtype=torch.float32) * scale).to(dtype).requires_grad_()


def _routing(B: int, L: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """keep about half of each row, then order/valid as the decoder's routed layer builds them."""
    keep = torch.rand(B, L, device=device) < 0.5
    counts = keep.sum(1)
    K = int(counts.max())
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :K]
    valid = torch.arange(K, device=device)[None, :] < counts[:, None]
    return keep, order, valid


def cases(s: dict, device: torch.device, dtype: torch.dtype) -> list[Case]:
    """The six ops at sizes ``s`` (tokens, hidden, mlp, vocab, heads, kv_heads, head_dim, rows)."""
    N, D, B = s["tokens"], s["hidden"], s["rows"]
    L = N // B
    ops = {name: op.dispatch for name, op in OPS.items()}

    def mod_inputs() -> dict:
        _, order, valid = _routing(B, L, device)
        x = _leaf((B, L, D), device, dtype)
        kept = _leaf((B, order.shape[1], D), device, dtype)
        w = (1 + 0.3 * torch.rand(B, L, device=device)).requires_grad_()
        return {"x": x, "kept": kept, "order": order, "valid": valid, "w": w}

    def ce_inputs() -> dict:
        targets = torch.randint(0, s["vocab"], (N,), device=device)
        targets[torch.rand(N, device=device) < 0.3] = IGNORE  # prompts / images: no text loss
        weights = torch.rand(N, device=device) + 0.5
        return {
            "hidden": _leaf((N, D), device, dtype),
            "weight": _leaf((s["vocab"], D), device, dtype, 0.02),
            "targets": targets,
            "weights": weights,
            "count": float((weights * (targets != IGNORE)).sum()) + 100.0,  # a global count: other ranks too
        }

    def rope_inputs() -> dict:
        H, Hk, hd = s["heads"], s["kv_heads"], s["head_dim"]
        return {
            "q": _leaf((B, L, H, hd), device, dtype).transpose(1, 2),  # the decoder's layout
            "k": _leaf((B, L, Hk, hd), device, dtype).transpose(1, 2),
            "pos": torch.rand(B, L, device=device) * L,
            "inv_freq": 1.0 / 10000 ** (torch.arange(0, hd, 2, device=device).float() / hd),
        }

    def ce_run(i: dict, impl: str) -> tuple:
        out = ops["linear_cross_entropy"](i["hidden"], i["weight"], i["targets"], i["weights"], impl=impl)
        return (out.loss_sum / i["count"],)

    return [
        Case("rms_norm", lambda: {"x": _leaf((N, D), device, dtype), "w": _leaf((D,), device, dtype)},
             lambda i, impl: (ops["rms_norm"](i["x"], i["w"], 1e-6, impl=impl),), ("x", "w")),
        Case("swiglu", lambda: {"g": _leaf((N, s["mlp"]), device, dtype), "u": _leaf((N, s["mlp"]), device, dtype)},
             lambda i, impl: (ops["swiglu"](i["g"], i["u"], impl=impl),), ("g", "u")),
        Case("linear_cross_entropy", ce_inputs, ce_run, ("hidden", "weight")),
        Case("rotary_qk", rope_inputs,
             lambda i, impl: ops["rotary_qk"](i["q"], i["k"], i["pos"], i["inv_freq"], 1.0, impl=impl), ("q", "k")),
        Case("gather_kept", mod_inputs, lambda i, impl: (ops["gather_kept"](i["x"], i["order"], impl=impl),), ("x",)),
        Case("string_scatter", mod_inputs,
             lambda i, impl: (ops["string_scatter"](i["x"], i["kept"], i["order"], i["valid"], i["w"], impl=impl),),
             ("x", "kept", "w")),
    ]  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(case: Case, inputs: dict, impl: str, device: torch.device) -> tuple[float, float | None, tuple]:
    """One forward + backward -> (seconds, peak MiB above the inputs or None on CPU, detached outputs)."""
    leaves = [inputs[k] for k in case.leaves]
    _sync(device)
    base = 0
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    outs = case.run(inputs, impl)
    cot = [torch.ones_like(o) if o.dim() == 0 else torch.full_like(o, 0.01) for o in outs]
    torch.autograd.backward(outs, cot, inputs=leaves)
    _sync(device)
    seconds = time.perf_counter() - t
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else None
    return seconds, peak, tuple(o.detach() for o in outs)


def bench(case: Case, repeats: int, warmup: int, device: torch.device) -> dict:
    """Interleaved repeats (fresh inputs each, same seed for both paths); medians."""
    times: dict[str, list[float]] = {"torch": [], "fused": []}
    peaks: dict[str, list[float]] = {"torch": [], "fused": []}
    diff = 0.0
    for r in range(warmup + repeats):
        outs = {}
        for impl in ("torch", "fused") if r % 2 == 0 else ("fused", "torch"):
            torch.manual_seed(1000 + r)  # identical inputs for both paths of a repeat
            inputs = case.make()
            seconds, peak, outs[impl] = step(case, inputs, impl, device)
            del inputs
            if r >= warmup:
                times[impl].append(seconds)
                if peak is not None:
                    peaks[impl].append(peak)
        diff = max([diff] + [float((a.float() - b.float()).abs().max()) for a, b in zip(outs["torch"], outs["fused"])])
    ref_ms, fused_ms = (1e3 * statistics.median(times[k]) for k in ("torch", "fused"))
    ref_peak = max(peaks["torch"]) if peaks["torch"] else None
    fused_peak = max(peaks["fused"]) if peaks["fused"] else None
    return {
        "reference_ms": round(ref_ms, 4),
        "fused_ms": round(fused_ms, 4),
        "speedup": round(ref_ms / fused_ms, 3),
        "reference_peak_mb": None if ref_peak is None else round(ref_peak, 1),
        "fused_peak_mb": None if fused_peak is None else round(fused_peak, 1),
        "peak_ratio": None if not ref_peak or fused_peak is None else round(fused_peak / ref_peak, 3),
        "max_abs_diff": diff,
    }


# ---- packed attention: backward time per token against row length ------------------------------
def slice_assign(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, runs, scale: float) -> torch.Tensor:
    """The per-sample path before the split/concatenate one (the "before" only; not used by the model):
    slice each sample out of the row, attend, assign into a zero output. The backward of every slice and
    every assignment materialises a gradient of the whole row, so its cost per token grows with the row."""
    out = torch.zeros_like(q)
    for a, b in runs:
        sl = (slice(None), slice(None), slice(a, b))
        out[sl] = F.scaled_dot_product_attention(q[sl], k[sl], v[sl], is_causal=True, scale=scale)
    return out


def _attention_row(length: int, sample: int, heads: int, head_dim: int, device, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, length, head_dim, generator=g).to(device, dtype) for _ in range(3))
    cot = torch.randn(1, heads, length, head_dim, generator=g).to(device, dtype)
    runs = tuple((a, a + sample) for a in range(0, length, sample))
    spec = AttentionSpec.packed(
        torch.arange(length, device=device)[None] // sample, varlen=Varlen.from_runs((runs,), length)
    )
    return q, k, v, cot, runs, spec


ATTENTION_PATHS = {
    "slice_assign": lambda q, k, v, runs, spec, scale: slice_assign(q, k, v, runs, scale),
    "split_concat": lambda q, k, v, runs, spec, scale: sdpa_segmented(q, k, v, spec, scale),
}


def bench_attention(lengths: list[int], sample: int, heads: int, head_dim: int, repeats: int, device, dtype) -> dict:
    """Backward seconds per token of each path at each row length; lengths and paths interleaved per repeat
    (orders alternate), fresh inputs per repeat, the same inputs for both paths; medians."""
    times = {(L, p): [] for L in lengths for p in ATTENTION_PATHS}
    diff = dict.fromkeys(lengths, 0.0)
    for r in range(repeats + 1):  # repeat 0 warms up
        for L in lengths if r % 2 == 0 else lengths[::-1]:
            q, k, v, cot, runs, spec = _attention_row(L, sample, heads, head_dim, device, dtype, seed=r)
            grads = {}
            for path in list(ATTENTION_PATHS) if (r + L // sample) % 2 == 0 else list(ATTENTION_PATHS)[::-1]:
                leaves = [t.detach().requires_grad_() for t in (q, k, v)]
                out = ATTENTION_PATHS[path](*leaves, runs, spec, head_dim**-0.5)
                _sync(device)
                t = time.perf_counter()
                out.backward(cot)
                _sync(device)
                if r:
                    times[(L, path)].append((time.perf_counter() - t) / L)
                grads[path] = [x.grad for x in leaves]
            diff[L] = max([diff[L]] + [float((a - b).abs().max()) for a, b in zip(*grads.values())])
    per_token = {key: 1e6 * statistics.median(v) for key, v in times.items()}
    rows = {
        str(L): {f"{p}_us_per_token": round(per_token[(L, p)], 3) for p in ATTENTION_PATHS} | {"max_grad_diff": diff[L]}
        for L in lengths
    }
    flat = {
        p: max(per_token[(L, p)] for L in lengths) / min(per_token[(L, p)] for L in lengths) for p in ATTENTION_PATHS
    }
    return {
        "sample_tokens": sample, "heads": heads, "head_dim": head_dim, "repeats": repeats, "rows": rows,
        "flatness": {p: round(f, 3) for p, f in flat.items()},  # slowest / fastest per-token time over the lengths
        "goal_flatness": GOAL_ATTENTION_FLATNESS,
        "split_concat_speedup_at_longest": round(per_token[(lengths[-1], "slice_assign")]
                                                 / per_token[(lengths[-1], "split_concat")], 2),
    }  # fmt: skip


SMOKE = {"tokens": 16, "hidden": 32, "mlp": 48, "vocab": 96, "heads": 2, "kv_heads": 1, "head_dim": 16, "rows": 2}
SMOKE_ATTENTION = {"lengths": [256, 512], "sample": 64, "heads": 2, "head_dim": 16, "repeats": 1}


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny fp32 sizes on CPU, Triton interpreted")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sections", default="", help="ops,attention (default: both on CUDA, attention on a CPU)")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per step (rows * row length)")
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--mlp", type=int, default=11008)
    ap.add_argument("--vocab", type=int, default=102400)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--ops", default=",".join(OPS), help="comma-separated subset")
    ap.add_argument("--attn-lengths", default="1024,2048,4096,8192", help="attention: row lengths")
    ap.add_argument("--attn-sample", type=int, default=128, help="attention: tokens per packed sample")
    ap.add_argument("--attn-heads", type=int, default=8)
    ap.add_argument("--attn-head-dim", type=int, default=64)
    ap.add_argument("--attn-repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads on a CPU (0 = leave): one thread keeps "
                    "timings stable on a shared machine")  # fmt: skip
    return ap.parse_args()


def main() -> None:
    args = _args()
    if args.threads and (args.cpu_smoke or args.device == "cpu"):
        torch.set_num_threads(args.threads)
    if args.cpu_smoke:
        enable_cpu_interpreter()
        args.device, args.dtype, args.repeats, args.warmup = "cpu", "float32", 2, 0
        sizes, attn = dict(SMOKE), dict(SMOKE_ATTENTION)
        sections = {"ops", "attention"}
    else:
        keys = ("tokens", "hidden", "mlp", "vocab", "heads", "kv_heads", "head_dim", "rows")
        sizes = {k: getattr(args, k) for k in keys}
        attn = {"lengths": [int(x) for x in args.attn_lengths.split(",")], "sample": args.attn_sample,
                "heads": args.attn_heads, "head_dim": args.attn_head_dim, "repeats": args.attn_repeats}  # fmt: skip
        sections = set((args.sections or ("ops,attention" if args.device == "cuda" else "attention")).split(","))
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    wanted = set(args.ops.split(",")) if "ops" in sections else set()
    results = {
        c.name: bench(c, args.repeats, args.warmup, device) for c in cases(sizes, device, dtype) if c.name in wanted
    }
    ran_ops = "ops" in sections
    report = {
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "threads": torch.get_num_threads(),
        "sections": sorted(sections),
        "dtype": args.dtype if ran_ops else None,  # of the ops section
        "smoke": args.cpu_smoke,
        "repeats": args.repeats if ran_ops else None,
        "sizes": sizes if ran_ops else None,
        "ops": results,
    }
    ce = report["ops"].get("linear_cross_entropy", {})
    report["linear_ce_peak_ratio"] = ce.get("peak_ratio")
    report["goal_linear_ce_peak_ratio"] = GOAL_LINEAR_CE_PEAK_RATIO
    if "attention" in sections:  # fp32 on a CPU (its bf16 attention is emulated), the chosen dtype on CUDA
        attn_dtype = dtype if device.type == "cuda" else torch.float32
        report["attention"] = bench_attention(**attn, device=device, dtype=attn_dtype) | {"dtype": str(attn_dtype)[6:]}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
