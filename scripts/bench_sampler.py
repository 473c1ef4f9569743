"""Benchmark: KV-cached vs recompute-everything flow sampling (JanusFlow's released sampler
recomputes the prompt every step). Prints JSON; the two paths run interleaved in one
process so the ratio is robust to a noisy machine.

    python scripts/bench_sampler.py [--config configs/tiny.yaml] [--prompts 32] [--prompt-words 4 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from mm.config import load_config  # noqa: E402
from mm.model.unified import build_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--prompt-words", type=int, nargs="+", default=[4, 64])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cfg = load_config(args.config)
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    results = []
    for words in args.prompt_words:
        prompt = " ".join(["draw the digit 3"] * max(1, words // 4))
        noise = torch.randn(args.prompts, *model.heads["flow"].latent_shape)
        times: dict[str, list[float]] = {"cached": [], "uncached": []}
        for _ in range(args.repeats):
            for name, use_cache in (("cached", True), ("uncached", False)):
                t0 = time.perf_counter()
                model.generate([prompt] * args.prompts, head="flow", noise=noise, steps=args.steps,
                               use_cache=use_cache)  # fmt: skip
                times[name].append(time.perf_counter() - t0)
        best = {k: min(v) for k, v in times.items()}
        results.append({
            "prompt_tokens": len(model.vocab.encode(prompt)),
            "images": args.prompts, "steps": args.steps,
            "cached_s": round(best["cached"], 4), "uncached_s": round(best["uncached"], 4),
            "speedup": round(best["uncached"] / best["cached"], 2),
        })  # fmt: skip
    print(json.dumps({"bench": "sampler_kv_cache", "device": "cpu", "threads": torch.get_num_threads(),
                      "results": results}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
