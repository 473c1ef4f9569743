"""Evaluate a trained run or a release folder on benchmark tasks (task YAMLs in mm/eval/tasks).

    python eval.py                                   # the latest run under runs/, the whole bundled benchmark
    python eval.py --run DIR --tasks digits_vqa,digits_pope
    python eval.py --model RELEASE_FOLDER --out DIR  # an exported release (scripts/export_release.py)
    python eval.py --task-dir MY_TASKS --tasks my_task eval.limit=100 model.heads.flow.cfg_scale=3

Writes OUT/results.json (task -> metrics, prompts and recipe), OUT/samples_<task>.jsonl
(one line per document), OUT/report.md, generated images in GenEval's layout
(OUT/<task>/<NNNNN>/samples/*.png) and sample grids; OUT defaults to DIR/eval.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from mm.schema import resolve_path  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--run", default=None, help="run directory (default: the latest under runs/)")
    src.add_argument("--model", default=None, help="release folder (config.json + model.safetensors + processor)")
    ap.add_argument("--tasks", action="append", default=None, help="task or group names, comma-separated")
    ap.add_argument("--task-dir", action="append", default=[], help="another folder of task YAMLs")
    ap.add_argument("--out", default=None, help="output folder (default: <run or release>/eval)")
    ap.add_argument("--list", action="store_true", help="list the known tasks and exit")
    ap.add_argument(
        "overrides", nargs="*", help="config overrides, e.g. eval.limit=50 model.heads.flow.cfg_scale=3"
    )
    args = ap.parse_args()

    # here, not at the top: --help stays fast
    from mm.eval.harness import evaluate
    from mm.eval.taskfile import DEFAULT_TASK_DIR, discover
    from mm.load import latest_run, load_release, load_run_model
    from mm.train.metrics import plot_loss_curve

    overrides = args.overrides + ([f"eval.task_dirs={list(args.task_dir)}"] if args.task_dir else [])
    if args.list:
        for name, path in sorted(discover([DEFAULT_TASK_DIR, *args.task_dir]).items()):
            print(f"{name:32s} {path}")
        return
    tasks = [t for arg in args.tasks or [] for t in arg.split(",") if t] or None
    if args.model:
        loaded = load_release(Path(args.model), overrides)
        out = Path(args.out) if args.out else Path(args.model) / "eval"
    else:
        run_dir = Path(args.run) if args.run else latest_run(resolve_path("runs"))
        loaded = load_run_model(run_dir, overrides)
        out = Path(args.out) if args.out else run_dir / "eval"
    if loaded.config.eval.threads:
        import torch

        torch.set_num_threads(loaded.config.eval.threads)
    evaluate(loaded, tasks, loaded.config.eval, out)
    if not args.model and (run_dir / "metrics.jsonl").exists():
        plot_loss_curve(run_dir / "metrics.jsonl", out / "loss_curve.png")


if __name__ == "__main__":
    main()
