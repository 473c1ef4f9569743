"""Dense vs p-MoD decoder: wall time beside the analytic FLOPs ratio, side by side in one run (JSON).

Vision-heavy packed rows (several LLaVA-like samples per row: many image tokens, a short question)
go through our decoder loop (``mm/model/decoder.py``) twice per repeat, dense and routed, with the
same weights; medians over interleaved repeats, so both see the same machine noise. Measured:

* ``train``: forward + backward of the decoder (the training step's LLM part);
* ``prefill``: forward under ``no_grad`` that fills a KV cache (routed layers cache kept tokens only).

The analytic ratio counts what ``mm/train/flops.py`` counts (layers' linear work on the tokens each
layer processes, causal attention pairs among them, the routers). Goal (issue): wall-time ratio
within 15% of the FLOPs ratio.

    python scripts/bench_mod.py [--hidden 512 --layers 8 --samples-per-row 4 --image-tokens 144 --device cpu]

``--config CFG`` (e.g. configs/tiny_mod.yaml) measures instead the whole model's training step
(forward + backward, every part) on real batches of the config's loader, MoD as configured vs the same
weights dense, beside the analytic training-FLOPs ratio of ``mm/train/flops.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from data.loader import TrainLoader  # noqa: E402
from mm.batch import Span  # noqa: E402
from mm.config import load_config  # noqa: E402
from mm.kernels.attention import AttentionSpec, Varlen  # noqa: E402
from mm.model.decoder import KVCache, run_layers  # noqa: E402
from mm.model.routing import MoDConfig, MoDRouters, Routing, plan_layers  # noqa: E402
from mm.model.unified import build_model  # noqa: E402
from mm.sequence import TOKEN_KINDS  # noqa: E402
from mm.train.flops import LLMShape, ModelFlops, batch_shape, layer_counts, prefill_flops  # noqa: E402


def _spans(args) -> tuple[tuple[Span, ...], ...]:
    """The host-side layout of the rows (what a collated batch carries), for the routing plan and the spec."""
    n = args.image_tokens + args.text_tokens
    kinds = (args.text_tokens, args.image_tokens, 0)
    return tuple(
        tuple(Span(r * args.samples_per_row + i, i * n, n, kinds) for i in range(args.samples_per_row))
        for r in range(args.rows)
    )


def _rows(args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sample ids, routable mask and positions of ``rows`` packed rows."""
    n = args.image_tokens + args.text_tokens
    sid = torch.arange(args.samples_per_row).repeat_interleave(n).expand(args.rows, -1).contiguous()
    one = torch.zeros(n, dtype=torch.bool)
    one[args.text_before : args.text_before + args.image_tokens] = True  # text, image, question
    routable = one.repeat(args.samples_per_row).expand(args.rows, -1).contiguous()
    pos = torch.arange(n, dtype=torch.float32).repeat(args.samples_per_row).expand(args.rows, -1).contiguous()
    return sid, routable, pos


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--mlp", type=int, default=1376)
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--samples-per-row", type=int, default=4)
    ap.add_argument("--image-tokens", type=int, default=144)
    ap.add_argument("--text-tokens", type=int, default=40)
    ap.add_argument("--text-before", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backend", default="sdpa")
    ap.add_argument("--kernels", default="torch", choices=["torch", "fused"], help="the decoder loop's ops")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0 = leave)")
    ap.add_argument("--config", default="", help="whole-model mode: a config with model.mod enabled")
    ap.add_argument("--batches", type=int, default=8, help="whole-model mode: distinct cached batches")
    return ap.parse_args()


def main() -> None:
    args = _args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.config:
        print(json.dumps(whole_model(args)))
        return
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    hf_cfg = AutoConfig.for_model(
        "llama", vocab_size=256, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, intermediate_size=args.mlp,
        max_position_embeddings=8192,
    )  # fmt: skip
    llm = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa").to(dev, dtype)
    decoder = llm.model
    mod_cfg = MoDConfig(enabled=True)
    routers = MoDRouters(args.layers, args.hidden, mod_cfg).to(dev, dtype)
    for p in routers.parameters():  # trained-looking routers (zero-init ones would keep by position)
        torch.nn.init.normal_(p, std=0.02)
    sid, routable, pos = (t.to(dev) for t in _rows(args))
    spans = _spans(args)
    B, L = sid.shape
    runs = tuple(tuple((s.start, s.start + s.length) for s in row) for row in spans)
    spec = AttentionSpec.packed(sid, varlen=Varlen.from_runs(runs, L).to(dev))
    plans = plan_layers(spans, L, [TOKEN_KINDS["und_image"]], routers.ratios)
    routing = Routing(routers, routable, plans)
    x = torch.randn(B, L, args.hidden, device=dev, dtype=dtype)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def train(mod: bool):
        def step():
            inp = x.detach().requires_grad_()
            out = run_layers(
                decoder, inp, pos, spec, args.backend, routing=routing if mod else None, kernels=args.kernels
            )
            out.last_hidden_state.float().pow(2).mean().backward()
            sync()

        return step

    def prefill(mod: bool):
        def step():
            with torch.no_grad():
                run_layers(decoder, x, pos, spec, args.backend, cache=KVCache(), routing=routing if mod else None,
                           kernels=args.kernels)  # fmt: skip
            sync()

        return step

    results: dict[str, dict[str, list[float]]] = {k: {"dense": [], "mod": []} for k in ("train", "prefill")}
    for fn in (train(False), train(True), prefill(False), prefill(True)):  # warm-up
        fn()
    for _ in range(args.repeats):  # interleaved: dense and MoD see the same noise
        for kind, make in (("train", train), ("prefill", prefill)):
            for name, mod in (("dense", False), ("mod", True)):
                results[kind][name] += _time(make(mod), 1)

    n = args.image_tokens + args.text_tokens
    lengths, routed = [n] * (args.samples_per_row * B), [args.image_tokens] * (args.samples_per_row * B)
    shape = LLMShape.from_llm(llm)
    dense_f = sum(prefill_flops(shape, layer_counts(lengths, routed, [1.0] * args.layers), 0).values())
    mod_f = sum(prefill_flops(shape, layer_counts(lengths, routed, routers.ratios), 0).values())
    out = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "dtype": args.dtype,
        "backend": args.backend, "kernels": args.kernels, "threads": torch.get_num_threads(),
        "rows": B, "row_tokens": L, "samples_per_row": args.samples_per_row, "image_tokens": args.image_tokens,
        "text_tokens": args.text_tokens, "layers": args.layers, "hidden": args.hidden,
        "layer_ratios": [round(r, 4) for r in routers.ratios],
        "flops_ratio": mod_f / dense_f,
    }  # fmt: skip
    for kind, r in results.items():
        d, m = statistics.median(r["dense"]), statistics.median(r["mod"])
        out[f"{kind}_s_dense"], out[f"{kind}_s_mod"], out[f"{kind}_wall_ratio"] = d, m, m / d
        out[f"{kind}_ratio_vs_flops"] = (m / d) / out["flops_ratio"]
    print(json.dumps(out))


def whole_model(args) -> dict:
    """Training step of the config's model, routed vs dense with the same weights, on real batches."""
    cfg = load_config(args.config)
    if not cfg.model.mod.enabled:
        raise SystemExit(f"{args.config}: model.mod.enabled is false; nothing to compare")
    torch.manual_seed(0)
    routed = build_model(cfg.model)
    dense = build_model(replace(cfg.model, mod=replace(cfg.model.mod, enabled=False)))
    dense.load_state_dict(routed.state_dict(), strict=False)  # same weights; routers only in the routed one
    for p in routed.mod_routers.parameters():  # trained-looking routers
        torch.nn.init.normal_(p, std=0.02)
    loader = iter(TrainLoader(cfg.data, routed.vocab, routed.sample_shapes(), 0, 1))
    g = torch.Generator().manual_seed(0)
    batches = [routed.add_draws(next(loader), g) for _ in range(args.batches)]
    times: dict[str, list[float]] = {"dense": [], "mod": []}

    def step(model, batch):
        model.zero_grad(set_to_none=True)
        model(batch)["loss"].backward()

    for model in (dense, routed):  # warm-up
        step(model, batches[0])
    for r in range(args.repeats):
        for b in batches:
            for name, model in (
                (("dense", dense), ("mod", routed)) if r % 2 == 0 else (("mod", routed), ("dense", dense))
            ):
                t = time.perf_counter()
                step(model, b)
                times[name].append(time.perf_counter() - t)
    n_layers = routed.llm.config.num_hidden_layers
    flops = {
        name: sum(ModelFlops(m).train_flops(batch_shape(b, n_layers, mod)) for b in batches)
        for name, m, mod in (("dense", dense, None), ("mod", routed, cfg.model.mod))
    }
    d, m = statistics.median(times["dense"]), statistics.median(times["mod"])
    return {
        "config": args.config, "threads": torch.get_num_threads(), "batches": len(batches),
        "rows_x_seq_len": list(batches[0].input_ids.shape), "layer_ratios": routed.mod_routers.ratios,
        "step_s_dense": d, "step_s_mod": m, "wall_ratio": m / d, "speedup": d / m,
        "train_flops_ratio": flops["mod"] / flops["dense"], "ratio_vs_flops": (m / d) / (flops["mod"] / flops["dense"]),
    }  # fmt: skip


if __name__ == "__main__":
    main()
