"""Loading what gets evaluated, exported or served: a training run's checkpoint, or a release folder.

``load_run`` is the one place that reads training checkpoints for use (eval, export, the CLIs and the
lmms-eval adapter go through it). It reads step directories (``mm.checkpoint``) and DeepSpeed ZeRO
checkpoints (consolidated to fp32 with DeepSpeed's own ``zero_to_fp32``). Weights of frozen parts that
a checkpoint leaves out (built from their local paths) are allowed to be missing; any other missing or
unexpected key fails.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mm.checkpoint import find_checkpoint, load_model_weights, read_meta
from mm.config import Config, EvalConfig, load_config
from mm.hf import UnifiedMMProcessor
from mm.model.unified import build_model
from mm.schema import ConfigError


def latest_run(runs_root: Path) -> Path:
    runs = [p.parent.parent for p in runs_root.glob("*/checkpoints/latest")]
    if not runs:
        raise FileNotFoundError(f"no trained run under {runs_root}: run `python train.py` first")
    return max(runs, key=lambda p: (p / "checkpoints" / "latest").stat().st_mtime)


def is_zero_checkpoint(path: Path) -> bool:
    """A DeepSpeed checkpoint directory: ``latest`` naming a tag folder with ``*_model_states.pt``."""
    tag = (path / "latest").read_text().strip() if (path / "latest").is_file() else ""
    return bool(list(path.glob("*/mp_rank_*_model_states.pt"))) and (not tag or (path / tag).is_dir())


def read_weights(ckpt: Path, use_ema: bool = True) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, which weights) of a checkpoint directory; EMA when asked for and present."""
    if is_zero_checkpoint(ckpt):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt)), "model (ZeRO, consolidated to fp32)"
    which = "ema" if use_ema and (ckpt / "ema.safetensors").is_file() else "model"
    return load_model_weights(ckpt, ema=use_ema), which


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Strict, except that frozen parameters may be absent (they come from their local paths)."""
    result = model.load_state_dict(state, strict=False)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    missing = [k for k in result.missing_keys if k not in frozen]
    if missing or result.unexpected_keys:
        raise KeyError(
            f"{source}: weights do not match the model: missing {missing[:5]} ({len(missing)}), "
            f"unexpected {result.unexpected_keys[:5]} ({len(result.unexpected_keys)})"
        )


def load_run(run_dir: Path, checkpoint: str = "latest", overrides: list[str] | None = None, use_ema: bool = True):
    """(config, model in eval mode, checkpoint path, step) of a run directory."""
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"not a run directory (no config.yaml): {run_dir}")
    cfg = _load_run_config(cfg_path, overrides)
    ckpt = find_checkpoint(run_dir, checkpoint) if not is_zero_checkpoint(Path(checkpoint)) else Path(checkpoint)
    state, which = read_weights(ckpt, use_ema)
    model = build_model(cfg.model)
    load_weights(model, state, ckpt)
    step = _checkpoint_step(ckpt)
    print(f"loaded {which} weights of {ckpt} (step {step})", flush=True)
    return cfg, model.eval(), ckpt, step


def _load_run_config(path: Path, overrides: list[str] | None) -> Config:
    """The run's config; ``eval`` keys this version no longer has are dropped (and said), not fatal.

    Evaluation settings are not part of what a run trained, and runs outlive changes to
    ``EvalConfig``; every other section is validated strictly.
    """
    import tempfile
    from dataclasses import fields

    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(OmegaConf.load(path))
    known = {f.name for f in fields(EvalConfig)}
    stale = sorted(set(raw.get("eval") or {}) - known)
    if stale:
        print(f"eval: ignoring eval keys of {path} that this version does not have: {stale}", flush=True)
        raw["eval"] = {k: v for k, v in raw["eval"].items() if k in known}
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            f.write(OmegaConf.to_yaml(raw))
        try:
            return load_config(f.name, overrides, quiet=True)
        finally:
            Path(f.name).unlink()
    return load_config(path, overrides, quiet=True)


def _checkpoint_step(ckpt: Path) -> int:
    if (ckpt / "trainer.json").is_file():
        return int(read_meta(ckpt)["step"])
    name = (ckpt / "latest").read_text().strip() if (ckpt / "latest").is_file() else ckpt.name  # a ZeRO tag
    digits = "".join(ch for ch in name if ch.isdigit())
    return int(digits) if digits else -1


@dataclass
class LoadedModel:
    """What the harness, the CLIs and the export need: model, processor, config and where it came from."""

    model: torch.nn.Module  # a UnifiedModel in eval mode
    processor: object  # mm.hf.UnifiedMMProcessor
    config: Config
    source: dict = field(default_factory=dict)


def load_run_model(run_dir: Path, overrides: list[str] | None = None, checkpoint: str = "latest") -> LoadedModel:
    cfg, model, ckpt, step = load_run(run_dir, checkpoint, overrides)
    processor = UnifiedMMProcessor.from_model(model)
    return LoadedModel(model, processor, cfg, {"run": str(run_dir), "checkpoint": str(ckpt), "step": step})


def load_release(folder: Path, overrides: list[str] | None = None) -> LoadedModel:
    """A release folder through the Auto classes; ``eval.*`` and the flow head's sampling overrides
    (``model.heads.flow.*``) apply."""
    from dataclasses import replace

    from transformers import AutoModel, AutoProcessor

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"not a release folder (no config.json): {folder}")
    hf = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(str(folder), local_files_only=True)
    overrides = list(overrides or [])
    allowed = ("model.heads.flow.sample_steps", "model.heads.flow.cfg_scale")
    bad = [o for o in overrides if not o.startswith(("eval.", *allowed))]
    if bad:
        raise ConfigError(
            "with a release folder only eval.* and model.heads.flow.{sample_steps,cfg_scale} can be overridden: "
            f"{bad}"
        )
    eval_cfg = load_config(None, [o for o in overrides if o.startswith("eval.")], quiet=True).eval
    model_cfg = hf.config.to_model_config()
    for o in overrides:
        key, _, value = o.partition("=")
        if key in allowed and "flow" in model_cfg.heads:
            flow = model_cfg.heads["flow"]
            field_name = key.rsplit(".", 1)[1]
            model_cfg.heads["flow"] = replace(flow, **{field_name: type(getattr(flow, field_name))(value)})
            hf.unified.heads["flow"].cfg = model_cfg.heads["flow"]  # sampling defaults are read at generate time
    hf.unified.cfg = model_cfg
    cfg = Config(model=model_cfg, eval=eval_cfg)
    info = json.loads((folder / "release.json").read_text()) if (folder / "release.json").is_file() else {}
    return LoadedModel(hf.unified, processor, cfg, {"release": str(folder), **info.get("source", {})})
