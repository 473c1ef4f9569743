"""Evaluate a trained run. ``python eval.py`` evaluates the most recent run under runs/.

    python eval.py [--run DIR] [--tasks digits_vqa digits_t2i] [key=value ...]

Writes DIR/eval/results.json (task -> metrics), sample grids and the loss curve.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mm.config import resolve_path  # noqa: E402
from mm.eval.run import evaluate, latest_run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=None, help="run directory (default: the latest under runs/)")
    ap.add_argument("--tasks", nargs="*", default=None, help="subset of tasks (default: all)")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. eval.t2i_per_digit=10 model.flow.cfg_scale=3")
    args = ap.parse_args()
    run_dir = Path(args.run) if args.run else latest_run(resolve_path("runs"))
    evaluate(run_dir, args.tasks, args.overrides)


if __name__ == "__main__":
    main()
