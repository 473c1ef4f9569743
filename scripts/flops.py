"""Prefill FLOPs and KV-cache bytes of one understanding sample, dense vs mixture-of-depths, as JSON.

    python scripts/flops.py --config configs/llava_7b_mod.yaml
    python scripts/flops.py --config configs/tiny.yaml --vision-tokens 16 --text-tokens 8 model.mod.enabled=true

One sample = ``--images`` images of the config's understanding tower (``--vision-tokens`` defaults to
images x tokens per image) followed by ``--text-tokens`` text tokens, prefilled once; the LM head runs
on the last token only (the next token's logits). The LLM and the tower are built on the meta device
(no memory, no weights read: the shapes come from the config, or from a local ``model.llm.pretrained``
config.json); the LLM is counted analytically (``mm/train/flops.py``), the tower by FlopCounterMode.
The MoD figures use the config's ``model.mod`` as it stands: with ``model.mod.enabled=false`` they equal
the dense ones (every ratio 1.0).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from mm.config import Config, load_config  # noqa: E402
from mm.model.backbone import LLMConfig, build_llm  # noqa: E402
from mm.model.routing import layer_ratios  # noqa: E402
from mm.model.towers import UnderstandingEncoder  # noqa: E402
from mm.profiling import forward_flops  # noqa: E402
from mm.schema import resolve_path  # noqa: E402
from mm.sequence import load_vocab  # noqa: E402
from mm.train.flops import LLMShape, kv_cache_bytes, layer_counts, prefill_flops  # noqa: E402

KV_DTYPES = {"bfloat16": 2, "float16": 2, "float32": 4, "float8": 1}  # bytes per cached value


def llm_shape(cfg: LLMConfig) -> LLMShape:
    """The LLM's shape on the meta device; the attention kernel does not change the count, so sdpa."""
    if cfg.pretrained:  # shapes from the checkpoint's config.json; no weights read
        path = resolve_path(cfg.pretrained)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.llm.pretrained: no config.json in {path}")
        hf = AutoConfig.from_pretrained(str(path), local_files_only=True)
        with torch.device("meta"):
            return LLMShape.from_llm(AutoModelForCausalLM.from_config(hf, attn_implementation="sdpa"))
    if cfg.vocab_size:
        vocab = cfg.vocab_size  # the tokenizer's special tokens may add rows: negligible for a 1-token head
    else:
        vocab = len(load_vocab(resolve_path(cfg.tokenizer_dir())))
    with torch.device("meta"):
        llm = build_llm(dataclasses.replace(cfg, attn_implementation="sdpa"), vocab)
    return LLMShape.from_llm(llm)


def und_image_flops(cfg: Config) -> tuple[float, int]:
    """Forward FLOPs of the understanding tower + aligner for one image, and its tokens per image."""
    tower = dataclasses.replace(cfg.model.und.tower, weights="")  # the shape fields only: no weights read
    with torch.device("meta"):
        width = cfg.model.llm.effective("hidden_size")
        und = UnderstandingEncoder(dataclasses.replace(cfg.model.und, tower=tower), width)
    shape = (1, und.channels, und.image_size, und.image_size)
    return forward_flops(und, shape, device="meta"), und.tokens_per_image


def report(
    cfg: Config,
    images: int = 1,
    vision_tokens: int | None = None,
    text_tokens: int = 64,
    kv_dtype: str = "bfloat16",
) -> dict:
    """The JSON report (see the module docstring)."""
    if images < 0 or text_tokens < 0 or (vision_tokens is not None and vision_tokens < 0):
        raise ValueError("--images, --vision-tokens and --text-tokens must be >= 0")
    if kv_dtype not in KV_DTYPES:
        raise KeyError(f"--kv-dtype {kv_dtype!r}; known: {sorted(KV_DTYPES)}")
    llm = llm_shape(cfg.model.llm)
    per_image, tokens_per_image = und_image_flops(cfg)
    n_vis = images * tokens_per_image if vision_tokens is None else vision_tokens
    n = n_vis + text_tokens
    if n < 1:
        raise ValueError("the sample is empty: give --vision-tokens or --text-tokens > 0")
    mod = cfg.model.mod
    # the routable tokens of this sample: understanding-image tokens, if that kind is routable
    routable = n_vis if "und_image" in mod.routable_kinds else 0
    ratios = layer_ratios(llm.num_layers, mod)
    dense_counts = layer_counts([n], [0], [1.0] * llm.num_layers)
    mod_counts = layer_counts([n], [routable], ratios)
    dense = prefill_flops(llm, dense_counts, logit_tokens=1)
    moded = prefill_flops(llm, mod_counts, logit_tokens=1)
    vision = per_image * images
    llm_dense, llm_mod = sum(dense.values()), sum(moded.values())
    dtype_bytes = KV_DTYPES[kv_dtype]
    kv_dense = kv_cache_bytes(llm, dense_counts, dtype_bytes)
    kv_mod = kv_cache_bytes(llm, mod_counts, dtype_bytes)
    # the vision tokens' share of the cache alone (what a per-image-token retention figure measures)
    kv_vis_dense = n_vis * llm.num_layers
    kv_vis_mod = sum(mod_counts.tokens_per_layer) - text_tokens * llm.num_layers
    tera = 1e12
    return {
        "config": cfg.run.name,
        "images": images,
        "vision_tokens": n_vis,
        "text_tokens": text_tokens,
        "routable_tokens": routable,
        "layers": llm.num_layers,
        "routed_layers": sum(r < 1.0 for r in ratios),
        "mean_layer_ratio": sum(ratios) / len(ratios),
        "layer_ratios": [round(r, 4) for r in ratios],
        "prefill_tflops_dense": (llm_dense + vision) / tera,
        "prefill_tflops_mod": (llm_mod + vision) / tera,
        "prefill_tflops_ratio": (llm_mod + vision) / (llm_dense + vision),
        "llm_tflops_dense": llm_dense / tera,
        "llm_tflops_mod": llm_mod / tera,
        "llm_tflops_ratio": llm_mod / llm_dense,
        "vision_tower_tflops": vision / tera,
        "llm_parts_tflops_dense": {k: v / tera for k, v in dense.items()},
        "llm_parts_tflops_mod": {k: v / tera for k, v in moded.items()},
        "kv_dtype": kv_dtype,
        "kv_cache_bytes_dense": kv_dense,
        "kv_cache_bytes_mod": kv_mod,
        "kv_cache_ratio": kv_mod / kv_dense,
        "vision_kv_ratio": kv_vis_mod / kv_vis_dense if kv_vis_dense else 1.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--images", type=int, default=1, help="understanding images in the sample (tower FLOPs)")
    ap.add_argument("--vision-tokens", type=int, default=None, help="default: images x the config's tokens per image")
    ap.add_argument("--text-tokens", type=int, default=64)
    ap.add_argument("--kv-dtype", default="bfloat16", choices=sorted(KV_DTYPES))
    ap.add_argument("--override", action="append", default=[], help="a.b=c config override (repeatable)")
    ap.add_argument("overrides", nargs="*", help="more a.b=c config overrides")
    args = ap.parse_args()
    cfg = load_config(args.config, args.override + args.overrides)
    out = report(cfg, args.images, args.vision_tokens, args.text_tokens, args.kv_dtype)
    print(json.dumps({"config_file": args.config, **out}, indent=1))


if __name__ == "__main__":
    main()
