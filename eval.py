"""Evaluate a trained run or a release folder on benchmark tasks (task YAMLs in mm/eval/tasks).

    python eval.py                                   # the latest run under runs/, the whole bundled benchmark
    python eval.py --run DIR --tasks digits_vqa,digits_pope
    python eval.py --model RELEASE_FOLDER --out DIR  # an exported release (scripts/export_release.py)
    python eval.py --task-dir MY_TASKS --tasks my_task eval.limit=100 model.heads.flow.cfg_scale=3

Writes OUT/results.json (task -> metrics, prompts and recipe), OUT/samples_<task>.jsonl
(one line per document), OUT/report.md, generated images in GenEval's layout
(OUT/<task>/<NNNNN>/samples/*.png) and sample grids; OUT defaults to DIR/eval.

Everything is checked before a model is loaded (the tasks and their datasets, the overrides, the
checkpoint: ``latest``, verified against its checksums, and the output folder); a mistake is one line
on stderr saying what is wrong and what would be right.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


class UsageError(Exception):
    """A mistake in the command line or what it names: one line."""


def check_task_data(tasks: list, eval_cfg) -> None:
    """Every task's dataset is on disk (bundled ones are built when missing and allowed)."""
    # here, not at the top: --help stays fast
    from mm.eval.harness import ensure_bench_datasets
    from mm.eval.sources import PACKAGED_BUILDERS, resolve_data_path

    ensure_bench_datasets(tasks, eval_cfg.build_if_missing)
    for t in tasks:
        kwargs = t.dataset_kwargs or {}
        if kwargs.get("load_from_disk"):
            path = resolve_data_path(t.dataset_path, t.yaml_path)
            if not path.exists():
                raise UsageError(f"task {t.task}: dataset not found at {path} (dataset_path in {t.yaml_path})")
        elif t.dataset_path in PACKAGED_BUILDERS:
            files = kwargs.get("data_files")
            flat = list(files.values()) if isinstance(files, dict) else [files] if isinstance(files, str) else files
            for f in flat if isinstance(flat, list) else []:
                for one in f if isinstance(f, list) else [f]:
                    if isinstance(one, str) and not resolve_data_path(one, t.yaml_path).exists():
                        raise UsageError(f"task {t.task}: data file not found: {one} (data_files in {t.yaml_path})")
        else:
            raise UsageError(
                f"task {t.task}: dataset_path={t.dataset_path!r} is neither load_from_disk nor one of "
                f"{PACKAGED_BUILDERS} (datasets are read from local files only)"
            )


def prepare(args) -> tuple:
    """(how to load the model, task configs, output folder), every input checked; no model is loaded."""
    # here, not at the top: --help stays fast
    from mm.eval.harness import DEFAULT_TASKS
    from mm.eval.taskfile import DEFAULT_TASK_DIR, load_tasks
    from mm.load import check_release, latest_run, run_config, select_checkpoint
    from mm.schema import resolve_path, unwritable

    overrides = args.overrides + ([f"eval.task_dirs={list(args.task_dir)}"] if args.task_dir else [])
    if args.model:
        eval_cfg = check_release(Path(args.model), overrides)
        out = Path(args.out) if args.out else Path(args.model) / "eval"
        source = ("release", Path(args.model), overrides)
    else:
        run_dir = Path(args.run) if args.run else latest_run(resolve_path("runs"))
        eval_cfg = run_config(run_dir, overrides).eval
        out = Path(args.out) if args.out else run_dir / "eval"
        source = ("run", run_dir, overrides)
    names = [t for arg in args.tasks or [] for t in arg.split(",") if t.strip()]
    if args.tasks is not None and not names:
        raise UsageError("--tasks is empty: name tasks or groups (see --list), or leave it out for the default set")
    try:
        tasks = load_tasks(names or eval_cfg.tasks or DEFAULT_TASKS, [DEFAULT_TASK_DIR, *eval_cfg.task_dirs])
    except KeyError as e:
        raise UsageError(f"{e.args[0]} (see eval.py --list)") from None
    check_task_data(tasks, eval_cfg)
    problem = unwritable(out)
    if problem:
        raise UsageError(f"--out {out}: cannot write there ({problem})")
    if source[0] == "run":  # the checkpoint last: verifying it reads the weight files
        source += (select_checkpoint(source[1], "latest"),)
    return source, [t.task for t in tasks], out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--run", default=None, help="run directory (default: the latest under runs/)")
    src.add_argument("--model", default=None, help="release folder (config.json + model.safetensors + processor)")
    ap.add_argument("--tasks", action="append", default=None, help="task or group names, comma-separated")
    ap.add_argument("--task-dir", action="append", default=[], help="another folder of task YAMLs")
    ap.add_argument("--out", default=None, help="output folder (default: <run or release>/eval)")
    ap.add_argument("--list", action="store_true", help="list the known tasks and exit")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. eval.limit=50 model.heads.flow.cfg_scale=3")
    args = ap.parse_intermixed_args()

    # here, not at the top: --help stays fast
    from mm.checkpoint import CheckpointError
    from mm.eval.taskfile import DEFAULT_TASK_DIR, TaskFileError, discover
    from mm.schema import ConfigError

    try:
        if args.list:
            for name, path in sorted(discover([DEFAULT_TASK_DIR, *args.task_dir]).items()):
                print(f"{name:32s} {path}")
            return
        source, tasks, out = prepare(args)
    except (UsageError, ConfigError, CheckpointError, TaskFileError, FileNotFoundError) as e:
        sys.exit(f"eval: {e}")
    run(source, tasks, out)


def run(source: tuple, tasks: list[str], out: Path) -> None:
    # here, not at the top: --help and argument errors stay fast
    from mm.eval.harness import evaluate
    from mm.load import load_release, load_run_model
    from mm.train.metrics import plot_loss_curve

    if source[0] == "release":
        loaded = load_release(source[1], source[2])
    else:
        loaded = load_run_model(source[1], source[2], checkpoint=str(source[3]), verified=True)
    if loaded.config.eval.threads:
        import torch

        torch.set_num_threads(loaded.config.eval.threads)
    evaluate(loaded, tasks, loaded.config.eval, out)
    if source[0] == "run" and (source[1] / "metrics.jsonl").exists():
        plot_loss_curve(source[1] / "metrics.jsonl", out / "loss_curve.png")


if __name__ == "__main__":
    main()
