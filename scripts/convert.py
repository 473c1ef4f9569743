"""Convert a published checkpoint into a release folder of ours.

    python scripts/convert.py hf_janus  /models/Janus-Pro-1B        /models/janus-pro-1b-mm
    python scripts/convert.py hf_llava  /models/llava-1.5-7b-hf     /models/llava-1.5-7b-mm
    python scripts/convert.py janusflow /models/JanusFlow-1.3B      /models/janusflow-1.3b-mm --vae /models/sdxl-vae

SRC is a local folder (nothing is downloaded): transformers' Janus or LLaVA format, or JanusFlow's release.
OUT loads with ``AutoModel.from_pretrained`` after ``import mm``, evaluates with ``eval.py --model OUT`` and
starts training: its ``model.yaml`` is the model section to ``base:`` on, with ``train.init_from=OUT``.
Every tensor is renamed, never changed; the keys and shapes are checked against our model before writing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mm.convert import IMPORTERS, ConversionError  # noqa: E402

KINDS = tuple(IMPORTERS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=KINDS)
    ap.add_argument("src", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--vae", help="janusflow: a local diffusers SDXL-VAE folder (the release does not hold it)")
    ap.add_argument("--random-vae", action="store_true", help="janusflow: an SDXL-shaped random VAE (tests only)")
    ap.add_argument("--gen-image-size", type=int, default=384, help="janusflow: generated image size (384)")
    ap.add_argument("--dtype", default="float32", help="hf_*: the dtype weights are read and written in")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args()
    if not args.src.is_dir():
        sys.exit(f"convert: no such folder {args.src}")
    if args.out.exists() and not args.overwrite:
        sys.exit(f"convert: {args.out} exists: pass --overwrite to replace it")

    tmp = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        IMPORTERS[args.kind](args.src, tmp, vae=args.vae, random_vae=args.random_vae,
                             gen_image_size=args.gen_image_size, dtype=args.dtype, final=args.out)  # fmt: skip
    except (ConversionError, FileNotFoundError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        sys.exit(f"convert: {e}")
    if args.out.exists():
        shutil.rmtree(args.out)
    tmp.rename(args.out)
    print(f"wrote {args.out}: {sorted(p.name for p in args.out.iterdir())}", flush=True)


if __name__ == "__main__":
    main()
