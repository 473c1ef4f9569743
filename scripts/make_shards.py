"""Convert local data into webdataset shards for training (logic in data/shards.py).

    python scripts/make_shards.py generation captions.jsonl --out /data/t2i [--image-root DIR]
    python scripts/make_shards.py conversation llava.json --image-root /data/coco --out /data/und
    python scripts/make_shards.py text docs.jsonl --out /data/text

Inputs: ``generation``: JSONL lines ``{"image": path, "caption": ...}``; ``conversation``:
LLaVA/InternVL records (``image``: a path or a list, ``conversations``: turns with
``<image>`` markers) as JSON or JSONL; ``text``: JSONL ``{"text": ...}`` or a text file
(documents separated by blank lines). Image paths are relative to ``--image-root``
(default: the input's folder). Rejected records (missing or unreadable image, empty
caption, image over the pixel cap, markers that do not match the images, ...) go to
``<out>/<prefix>-report.jsonl`` with the reason; the totals are printed as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.shards import ImageOptions, make_shards  # noqa: E402
from data.sources import SOURCE_KINDS  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=sorted(SOURCE_KINDS), help="the source kind the shards are for")
    ap.add_argument("input", help="captions JSONL, conversations JSON/JSONL, or text JSONL/file")
    ap.add_argument("--out", required=True, help="output folder (shards, sizes.json, report)")
    ap.add_argument("--prefix", default="shard", help="shard names: <prefix>-000000.tar, ...")
    ap.add_argument("--image-root", default=None, help="folder image paths are relative to")
    ap.add_argument("--shard-mb", type=float, default=256.0, help="target shard size in MB")
    ap.add_argument("--shard-samples", type=int, default=0, help="at most this many samples per shard (0: no limit)")
    ap.add_argument("--image-size", type=int, default=0, help="resize the shorter side to this (never up); 0: keep")
    ap.add_argument("--reencode", choices=["jpg", "png", "keep"], default="jpg")
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality")
    ap.add_argument("--max-pixels", type=int, default=64_000_000, help="reject larger images")
    ap.add_argument("--processes", type=int, default=0, help="converter processes (0: one per core)")
    args = ap.parse_args()
    if not Path(args.input).is_file():
        ap.error(f"input not found: {args.input}")
    opts = ImageOptions(args.image_size, args.max_pixels, args.reencode, args.quality)
    totals = make_shards(
        args.kind, args.input, args.out, args.prefix, args.image_root, int(args.shard_mb * 2**20),
        args.shard_samples, opts, args.processes,
    )  # fmt: skip
    print(
        f"wrote {totals['written']} samples in {totals['shards']} shards ({totals['bytes'] / 2**20:.1f} MB); "
        f"rejected {totals['rejected']} {totals['rejected_by_reason']} (see {totals['report']})",
        file=sys.stderr,
    )
    print(json.dumps(totals))


if __name__ == "__main__":
    main()
