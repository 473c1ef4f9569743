"""Build a config's model on the meta device (no memory, no weights) and print parameter counts as JSON.

    python scripts/param_counts.py --config configs/janusflow_1.3b.yaml \
        model.llm.tokenizer=configs/tokenizers/digits model.llm.attn_implementation=sdpa

(The tokenizer only sets the special-token rows; ``model.llm.vocab_size`` fixes the table size.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from mm.config import load_config  # noqa: E402
from mm.model.unified import build_model, count_parameters  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    with torch.device("meta"):
        model = build_model(cfg.model)
    counts = count_parameters(model) | {f"heads.{n}": count_parameters(h)["total"] for n, h in model.heads.items()}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(json.dumps({"config": args.config, "params": counts, "trainable": trainable,
                      "gen_tokens_per_image": {n: h.tokens_per_image for n, h in model.heads.items()},
                      "und_tokens_per_image": model.und.tokens_per_image}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
