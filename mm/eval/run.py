"""Evaluate a run's checkpoint on registered tasks; write ``<run>/eval/results.json``."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from kernels.attention import VARLEN_BACKENDS
from mm.config import Config, load_config
from mm.eval.digits import EVAL_TASKS
from mm.train.checkpoint import find_checkpoint, load_model_weights, read_meta
from mm.train.trainer import build_model


def latest_run(runs_root: Path) -> Path:
    runs = [p.parent.parent for p in runs_root.glob("*/checkpoints/latest")]
    if not runs:
        raise FileNotFoundError(f"no trained run under {runs_root}: run `python train.py` first")
    return max(runs, key=lambda p: (p / "checkpoints" / "latest").stat().st_mtime)


def load_run(run_dir: Path, checkpoint: str = "latest", overrides: list[str] | None = None, use_ema: bool = True):
    """(config, model in eval mode, checkpoint path, step) of a run directory."""
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"not a run directory (no config.yaml): {run_dir}")
    cfg = load_config(cfg_path, overrides)
    if cfg.model.llm.attn_implementation in VARLEN_BACKENDS:
        # inference rows are left-padded and cached: they need a mask, which flash varlen does not take
        print(f"eval: using sdpa instead of {cfg.model.llm.attn_implementation} for inference", flush=True)
        cfg.model.llm.attn_implementation = "sdpa"
    ckpt = find_checkpoint(run_dir, checkpoint)
    model, _ = build_model(cfg)
    model.load_state_dict(load_model_weights(ckpt, ema=use_ema))
    return cfg, model.eval(), ckpt, read_meta(ckpt)["step"]


def plot_losses(run_dir: Path, out: Path) -> None:
    """Loss curves of metrics.jsonl, one panel per loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln]
    keys = [k for k in ("loss", "text", "flow", "repa") if k in recs[0]]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3))
    for ax, k in zip(axes, keys):
        ax.plot([r["step"] for r in recs], [r[k] for r in recs])
        ax.set_title(k)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


def evaluate(run_dir: Path, tasks: list[str] | None = None, overrides: list[str] | None = None) -> dict:
    cfg: Config
    cfg, model, ckpt, step = load_run(run_dir, overrides=overrides)
    out_dir = run_dir / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = tasks or list(EVAL_TASKS)
    unknown = [t for t in tasks if t not in EVAL_TASKS]
    if unknown:
        raise KeyError(f"unknown eval tasks {unknown}; known: {sorted(EVAL_TASKS)}")
    results: dict = {"checkpoint": str(ckpt), "step": step}
    for name in tasks:
        t0 = time.time()
        with torch.no_grad():
            results[name] = EVAL_TASKS[name](model, cfg, out_dir)
        results[name]["seconds"] = round(time.time() - t0, 1)
        print(f"{name}: { {k: v for k, v in results[name].items() if k != 'examples'} }", flush=True)
    if (run_dir / "metrics.jsonl").exists():
        plot_losses(run_dir, out_dir / "loss_curve.png")
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {out_dir / 'results.json'}", flush=True)
    return results
