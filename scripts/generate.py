"""Draw images from prompts with a released model; save a PNG grid (one row per prompt).

    python scripts/generate.py RELEASE --prompt "draw the digit 7" --n 8 --out sevens.png
    python scripts/generate.py RELEASE --prompt "..." --prompt "..." --cfg 3 --steps 50 --seed 1 --batch 16 \\
        --out grid.png --samples-dir samples/

Defaults (head, steps, CFG scale) come from the release's generation_config.json; the
same seed gives the same images. ``--samples-dir`` also writes each image at its own
size (``<prompt index>_<sample index>.png``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("release", type=Path)
    ap.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    ap.add_argument("--n", type=int, default=8, help="images per prompt")
    ap.add_argument("--head", default=None, help="image head (default: the release's; see generation_config.json)")
    ap.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale")
    ap.add_argument("--steps", type=int, default=None, help="sampler steps (flow head)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=16, help="images per model call")
    ap.add_argument("--out", type=Path, default=Path("grid.png"))
    ap.add_argument("--samples-dir", type=Path, default=None)
    ap.add_argument("--scale", type=int, default=0, help="grid pixel scale (default: up to ~64 px per image)")
    args = ap.parse_args()

    # here, not at the top: --help and argument errors come before the heavy imports
    import torch
    from PIL import Image
    from tqdm import tqdm
    from transformers import AutoModel, GenerationConfig

    import mm  # noqa: F401  (registers the Auto classes)
    from mm.eval.generation import image_grid
    from mm.hf import sampler_kwargs

    model = AutoModel.from_pretrained(str(args.release), local_files_only=True).eval()
    gen_cfg = GenerationConfig.from_pretrained(str(args.release))
    heads = gen_cfg.image_heads
    head = args.head or gen_cfg.image_head
    if head not in heads:
        sys.exit(f"generate: head {head!r} not in this release; it has {sorted(heads)}")
    recipe = dict(heads[head], head=head)
    if args.steps is not None:
        if "steps" not in recipe:  # code heads take one pass per stage (nextfreq) or per code (raster)
            sys.exit(f"generate: head {head!r} has no sampler steps; drop --steps")
        recipe["steps"] = args.steps
    if args.cfg is not None:
        recipe["cfg_scale"] = args.cfg
    kwargs = sampler_kwargs(recipe)
    print(f"head {head}: {recipe}, seed {args.seed}", flush=True)

    jobs = [p for p in args.prompt for _ in range(args.n)]
    generator = torch.Generator().manual_seed(args.seed)
    images = []
    with torch.no_grad():
        for i in tqdm(range(0, len(jobs), args.batch), desc="generate", unit="batch"):
            chunk = jobs[i : i + args.batch]
            out = model.generate_images(chunk, generator=generator, **kwargs)
            images.append(out.float().cpu())
    images = torch.cat(images).numpy()
    size = images.shape[-1]
    grid = image_grid(images, columns=args.n, scale=args.scale or max(1, 64 // size))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)
    if args.samples_dir:
        args.samples_dir.mkdir(parents=True, exist_ok=True)
        for k, img in enumerate(images):
            a = (img.clip(0, 1) * 255).round().astype("uint8")
            a = a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)
            Image.fromarray(a).save(args.samples_dir / f"{k // args.n}_{k % args.n}.png")
    print(f"wrote {args.out}" + (f" and {len(images)} images in {args.samples_dir}" if args.samples_dir else ""))


if __name__ == "__main__":
    main()
