"""Atomic checkpoints: a step directory appears complete or not at all.

Layout: ``<run>/checkpoints/step_00001000/{model.pt,optim.pt,trainer.json}`` and
``<run>/checkpoints/latest`` (a text file naming the newest complete step
directory). Each save writes into a temporary directory, renames it into
place, then swaps the ``latest`` pointer; a crash mid-save leaves the previous
checkpoint intact and pointed to.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, step: int, tensors: dict[str, dict], meta: dict, keep: int) -> Path:
    """Save ``tensors`` (file stem -> state dict) and ``meta`` (JSON) for ``step``; prune to ``keep``."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for stem, state in tensors.items():
        torch.save(state, tmp / f"{stem}.pt")
    (tmp / "trainer.json").write_text(json.dumps(meta, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _atomic_write_text(root / "latest", final.name)
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in steps[: max(0, len(steps) - keep)]:
        shutil.rmtree(old)
    return final


def find_checkpoint(run_dir: Path, which: str = "latest") -> Path:
    """``latest`` (via the pointer) or a path to a step directory; a clear error if absent."""
    if which != "latest":
        path = Path(which)
        if not (path / "trainer.json").is_file():
            raise FileNotFoundError(f"not a checkpoint directory (no trainer.json): {path}")
        return path
    pointer = checkpoint_root(run_dir) / "latest"
    if not pointer.is_file():
        raise FileNotFoundError(f"no checkpoint to resume in {checkpoint_root(run_dir)}")
    path = checkpoint_root(run_dir) / pointer.read_text().strip()
    if not (path / "trainer.json").is_file():
        raise FileNotFoundError(f"'latest' points to an incomplete checkpoint: {path}")
    return path


def load_checkpoint(path: Path) -> tuple[dict[str, dict], dict]:
    tensors = {p.stem: torch.load(p, map_location="cpu", weights_only=False) for p in path.glob("*.pt")}
    return tensors, json.loads((path / "trainer.json").read_text())
