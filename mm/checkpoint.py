"""Checkpoints on disk: written by the trainer, read by resume, eval, export and the lmms-eval adapter.

Layout of ``<run>/checkpoints/step_00001000/``:

* ``model.safetensors``: the trainable weights in fp32 (ZeRO's master copy, consolidated) and the
  buffers. Frozen pretrained modules are not copied: ``trainer.json`` names them (``referenced``) and
  :func:`load_model_weights` rebuilds them from the config's local paths (or ``train.init_from``).
* ``ema.safetensors``: the EMA of the trainable weights (fp32), when ``train.ema_decay > 0``.
* the engine's own state: ``optimizer.pt`` (DDP) or ``deepspeed/`` (DeepSpeed's ZeRO files).
* ``rng_rank<r>.pt``: each rank's torch RNG state.
* ``config.yaml`` and ``trainer.json`` (step, world size, every rank's data-loader position and skip
  counts, counters, the checkpoint ``format``), written last.

Every rank writes into ``.tmp_step_*``; after a barrier rank 0 writes ``trainer.json`` and renames
the directory into place (atomic), then points ``latest`` at it and prunes to the newest K. A job
killed at any moment leaves either the new complete checkpoint or the previous one; a
``step_*`` directory exists only complete. Everything is read with ``weights_only=True`` or as
safetensors: no checkpoint can run code. Checkpoints of format 1 (written before image heads owned
their parts) load with their weight names mapped (``mm.model.legacy``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mm.config import load_config
from mm.model.legacy import legacy_key
from mm.model.unified import build_model
from mm.schema import resolve_path

META = "trainer.json"


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def load_tensors(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    return load_file(str(path), device=str(device))


def staging_dir(run_dir: Path, step: int) -> Path:
    return checkpoint_root(run_dir) / f".tmp_step_{step:08d}"


def commit_checkpoint(run_dir: Path, step: int, meta: dict, keep: int) -> Path:
    """Rank 0, after every rank has written into :func:`staging_dir`: meta last, rename, point, prune."""
    root = checkpoint_root(run_dir)
    tmp, final = staging_dir(run_dir, step), root / f"step_{step:08d}"
    (tmp / META).write_text(json.dumps(meta, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _atomic_write_text(root / "latest", final.name)
    steps = complete_checkpoints(run_dir)
    for old in steps[: max(0, len(steps) - keep)]:
        shutil.rmtree(old)
    return final


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete step directories, oldest first."""
    root = checkpoint_root(run_dir)
    return sorted(p for p in root.glob("step_*") if (p / META).is_file())


def find_checkpoint(run_dir: Path, which: str = "latest") -> Path | None:
    """``auto``: the newest complete checkpoint or None (a fresh start); ``latest``: the same, but absent
    is an error; else a path to a step directory (or a run directory: its newest)."""
    if which in ("auto", "latest"):
        steps = complete_checkpoints(run_dir)
        if steps:
            return steps[-1]
        if which == "auto":
            return None
        raise FileNotFoundError(f"no checkpoint to resume in {checkpoint_root(run_dir)}")
    path = Path(which)
    if not (path / META).is_file() and (checkpoint_root(path)).is_dir():
        newest = complete_checkpoints(path)
        if newest:
            return newest[-1]
    if not (path / META).is_file():
        raise FileNotFoundError(f"not a checkpoint directory (no {META}): {path}")
    return path


def read_meta(ckpt: Path) -> dict:
    return json.loads((ckpt / META).read_text())


def load_model_weights(checkpoint_dir: str | Path, ema: bool = False) -> dict[str, torch.Tensor]:
    """Full weights (every key of the model's state dict) of a checkpoint written by any engine.

    ``ema=True`` takes the EMA of the trainable weights where the run kept one (else the weights).
    Frozen modules the checkpoint only references are rebuilt from the saved config's local paths.
    """
    ckpt = Path(checkpoint_dir)
    if not (ckpt / META).is_file():
        ckpt = find_checkpoint(ckpt, "latest")
    meta = read_meta(ckpt)
    weights = load_tensors(ckpt / "model.safetensors")
    if ema and (ckpt / "ema.safetensors").is_file():
        weights.update(load_tensors(ckpt / "ema.safetensors"))
    rename = legacy_key if meta.get("format", 1) < 2 else (lambda k: k)
    weights = {rename(k): v for k, v in weights.items()}
    if meta.get("referenced"):  # frozen pretrained modules: from their paths (or init_from), as the run built them
        cfg = load_config(ckpt / "config.yaml", quiet=True)
        model = build_model(cfg.model)
        if cfg.train.init_from:
            load_init(model, cfg.train.init_from)
        full = model.state_dict()
        weights = {k: weights.get(k, v) for k, v in full.items()}
    for alias, target in meta.get("aliases", {}).items():  # tied weights are saved once
        weights[rename(alias)] = weights[rename(target)]
    missing = sorted({rename(k) for k in meta.get("state_keys", weights)} - set(weights))
    if missing:
        raise KeyError(f"{ckpt} lacks {len(missing)} weights, e.g. {missing[:3]}")
    return weights


def is_release(path: Path) -> bool:
    """A release folder (``scripts/export_release.py``, ``scripts/convert.py``): config.json + safetensors."""
    return (path / "config.json").is_file() and any(
        (path / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")
    )


def release_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a release folder (one file, or shards named by the index)."""
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return load_tensors(path / "model.safetensors")
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        out.update(load_tensors(path / shard))
    return out


# Parts a model may add to the one it starts from; they begin at their own initialisation: p-MoD's routers
# (zero: every token kept, as dense) and REPA's projector (a release holds none). A model that adds them
# to a converted release or a dense run starts from the rest.
FRESH_PARTS = ("mod_routers.", "heads.*.repa_proj.")


def _fresh(key: str) -> bool:
    parts = key.split(".")
    return key.startswith("mod_routers.") or (len(parts) > 3 and parts[0] == "heads" and parts[2] == "repa_proj")


def load_init(model: torch.nn.Module, path: str | Path) -> None:
    """``train.init_from``: start from the weights of a checkpoint (or a run's newest one), or of a release
    folder (a converted published model: its ``model.yaml`` is the model section that fits). Every weight must
    be there except :data:`FRESH_PARTS` (said when missing); nothing may be left over."""
    path = resolve_path(path)
    if not (path / META).is_file() and is_release(path):
        state = release_weights(path)
    else:
        state = load_model_weights(path)
    result = model.load_state_dict(state, strict=False)
    fresh = [k for k in result.missing_keys if _fresh(k)]
    missing = [k for k in result.missing_keys if not _fresh(k)]
    if missing or result.unexpected_keys:
        extra = result.unexpected_keys
        raise KeyError(f"train.init_from={path}: weights do not match the model: missing {missing[:5]} "
                       f"({len(missing)}), unexpected {extra[:5]} ({len(extra)})")  # fmt: skip
    if fresh:
        parts = sorted({".".join(k.split(".")[:3]) if k.startswith("heads.") else k.split(".")[0] for k in fresh})
        print(f"train.init_from={path}: no weights for {', '.join(parts)} ({len(fresh)} tensors): they start from "
              "their initialisation", flush=True)  # fmt: skip
