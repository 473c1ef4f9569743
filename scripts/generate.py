"""Draw images from prompts with a released model; save a PNG grid (one row per prompt).

    python scripts/generate.py RELEASE --prompt "draw the digit 7" --n 8 --out sevens.png
    python scripts/generate.py RELEASE --prompt "..." --prompt "..." --cfg 3 --steps 50 --seed 1 --batch 16 \\
        --out grid.png --samples-dir samples/

Defaults (head, steps, CFG scale) come from the release's generation_config.json; the
same seed gives the same images. ``--samples-dir`` also writes each image at its own
size (``<prompt index>_<sample index>.png``). The release folder, the head and every flag
(``--steps`` >= 1, ``--n``/``--batch`` >= 1, ``--cfg`` >= 0, ...) and the output paths are
checked before the model is loaded; a mistake is one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _writable(path: Path, what: str) -> str | None:
    # mm.schema.unwritable's twin: this script checks its arguments before importing mm (torch, transformers)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test.{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        return f"{what} {path}: cannot write there ({type(e).__name__}: {e.strerror or e})"
    return None


def check_args(args: argparse.Namespace) -> tuple[str, dict] | str:
    """(head, its recipe with the flags applied), or what is wrong (one line); opens no model file."""
    folder = args.release
    if not (folder / "config.json").is_file() or not (folder / "generation_config.json").is_file():
        return f"{folder} is not a release folder (no config.json or generation_config.json): give a folder " \
            "export_release.py wrote"  # fmt: skip
    if not any((folder / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
        return f"{folder} has no model.safetensors: give a folder export_release.py wrote"
    for flag, value, low, high in (("--n", args.n, 1, 10_000), ("--batch", args.batch, 1, 10_000),
                                   ("--steps", args.steps, 1, 10_000), ("--scale", args.scale, 0, 64),
                                   ("--seed", args.seed, 0, 2**63 - 1)):  # fmt: skip
        if value is not None and not low <= value <= high:
            return f"{flag} {value}: give an integer from {low} to {high}"
    if args.cfg is not None and not (math.isfinite(args.cfg) and args.cfg >= 0):
        return f"--cfg {args.cfg}: give a guidance scale >= 0 (1 = no guidance)"
    if args.out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"):
        return f"--out {args.out}: give an image file name (.png, .jpg, .webp, ...)"
    for path, what in ((args.out.parent, "--out folder"), (args.samples_dir, "--samples-dir")):
        problem = _writable(path, what) if path is not None else None
        if problem:
            return problem
    try:
        gen = json.loads((folder / "generation_config.json").read_text())
        heads, head = gen["image_heads"], args.head or gen["image_head"]
    except (ValueError, KeyError) as e:
        return f"{folder}/generation_config.json names no image head ({type(e).__name__}: {e}); re-export the release"
    if head not in heads:
        return f"head {head!r} not in this release; it has {sorted(heads)}"
    recipe = dict(heads[head], head=head)
    if args.steps is not None:
        if "steps" not in recipe:  # code heads take one pass per stage (nextfreq) or per code (raster)
            return f"head {head!r} has no sampler steps; drop --steps"
        recipe["steps"] = args.steps
    if args.cfg is not None:
        recipe["cfg_scale"] = args.cfg
    return head, recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("release", type=Path)
    ap.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    ap.add_argument("--n", type=int, default=8, help="images per prompt")
    ap.add_argument("--head", default=None, help="image head (default: the release's; see generation_config.json)")
    ap.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (>= 0)")
    ap.add_argument("--steps", type=int, default=None, help="sampler steps (flow head; >= 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=16, help="images per model call")
    ap.add_argument("--out", type=Path, default=Path("grid.png"))
    ap.add_argument("--samples-dir", type=Path, default=None)
    ap.add_argument("--scale", type=int, default=0, help="grid pixel scale (default: up to ~64 px per image)")
    args = ap.parse_args()
    checked = check_args(args)
    if isinstance(checked, str):
        sys.exit(f"generate: {checked}")
    head, recipe = checked

    # here, not at the top: --help and argument errors come before the heavy imports
    import torch
    from PIL import Image
    from tqdm import tqdm
    from transformers import AutoModel

    import mm  # noqa: F401  (registers the Auto classes)
    from mm.eval.generation import image_grid
    from mm.hf import sampler_kwargs

    model = AutoModel.from_pretrained(str(args.release), local_files_only=True).eval()
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
