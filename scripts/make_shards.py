"""Convert local data into webdataset shards for training (logic in data/shards.py).

    python scripts/make_shards.py generation captions.jsonl --out /data/t2i [--image-root DIR]
    python scripts/make_shards.py conversation llava.json --image-root /data/coco --out /data/und
    python scripts/make_shards.py text docs.jsonl --out /data/text

Inputs: ``generation``: JSONL lines ``{"image": path, "caption": ...}``; ``conversation``:
LLaVA/InternVL records (``image``: a path or a list, ``conversations``: turns with
``<image>`` markers) as JSON or JSONL; ``text``: JSONL ``{"text": ...}`` or a text file
(documents separated by blank lines). Image paths are relative to ``--image-root``
(default: the input's folder) and must stay inside it. Rejected records (missing or
unreadable image, empty caption, image over the pixel cap, markers that do not match
the images, an empty id, an id another record already has, an image path outside the
root, ...) go to ``<out>/<prefix>-report.jsonl`` with the reason; the totals are
printed as one JSON line.

``--out`` must be empty: shards of an earlier run left there would be read with this
run's. ``--replace`` removes an earlier run's shards, sizes.json and reports first (and
refuses a folder that holds anything else). Every error is one line, before any work.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints the whole usage first; one line says it
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args() -> argparse.Namespace:
    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", help="the source kind the shards are for: generation[:<head>], conversation, text")
    ap.add_argument("input", help="captions JSONL, conversations JSON/JSONL, or text JSONL/file")
    ap.add_argument("--out", required=True, help="output folder (shards, sizes.json, report); must be empty")
    ap.add_argument("--replace", action="store_true", help="replace the shards of an earlier run in --out")
    ap.add_argument("--prefix", default="shard", help="shard names: <prefix>-000000.tar, ...")
    ap.add_argument("--image-root", default=None, help="folder image paths are relative to (and must stay in)")
    ap.add_argument("--shard-mb", type=float, default=256.0, help="target shard size in MB")
    ap.add_argument("--shard-samples", type=int, default=0, help="at most this many samples per shard (0: no limit)")
    ap.add_argument("--image-size", type=int, default=0, help="resize the shorter side to this (never up); 0: keep")
    ap.add_argument("--reencode", choices=["jpg", "png", "keep"], default="jpg")
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality (1-100)")
    ap.add_argument("--max-pixels", type=int, default=64_000_000, help="reject larger images")
    ap.add_argument("--processes", type=int, default=0, help="converter processes (0: one per core)")
    args = ap.parse_args()
    if not Path(args.input).is_file():
        ap.error(f"input not found: {args.input}")
    if args.image_root is not None and not Path(args.image_root).is_dir():
        ap.error(f"--image-root is not a folder: {args.image_root}")
    if not args.prefix or not all(c.isalnum() or c in "-_." for c in args.prefix) or args.prefix.startswith("."):
        ap.error(f"--prefix {args.prefix!r}: letters, digits, '-', '_', '.' (not first)")
    limits = {"--shard-mb": args.shard_mb > 0, "--max-pixels": args.max_pixels > 0, "--processes": args.processes >= 0,
              "--shard-samples": args.shard_samples >= 0, "--image-size": args.image_size >= 0,
              "--quality": 1 <= args.quality <= 100}  # fmt: skip
    bad = [name for name, ok in limits.items() if not ok]
    if bad:
        ap.error(f"out of range: {', '.join(bad)} (sizes and counts >= 0, --shard-mb and --max-pixels > 0)")
    # here, not at the top: argument errors come before the heavy imports (torch)
    from data.shards import LAYOUTS, prepare_out_dir
    from data.sources import source_kind
    from mm.schema import ConfigError

    if args.kind.partition(":")[0] not in LAYOUTS:
        ap.error(f"kind {args.kind!r}: one of {LAYOUTS} (or generation:<image head>)")
    try:
        prepare_out_dir(args.out, args.replace, check_only=True)  # make_shards empties it (--replace), after all checks
    except OSError as e:
        ap.error(str(e))
    try:
        source_kind(args.kind)
    except ConfigError as e:
        ap.error(str(e))
    return args


def main() -> None:
    args = parse_args()
    from data.shards import ImageOptions, make_shards  # here, not at the top: see parse_args

    opts = ImageOptions(args.image_size, args.max_pixels, args.reencode, args.quality)
    totals = make_shards(
        args.kind, args.input, args.out, args.prefix, args.image_root, int(args.shard_mb * 2**20),
        args.shard_samples, opts, args.processes, replace=args.replace,
    )  # fmt: skip
    print(
        f"wrote {totals['written']} samples in {totals['shards']} shards ({totals['bytes'] / 2**20:.1f} MB); "
        f"rejected {totals['rejected']} {totals['rejected_by_reason']} (see {totals['report']})",
        file=sys.stderr,
    )
    print(json.dumps(totals))


if __name__ == "__main__":
    main()
