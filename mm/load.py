"""Loading what gets evaluated, exported or served: a training run's checkpoint, or a release folder.

``load_run`` is the one place that reads training checkpoints for use (eval, export, the CLIs and the
lmms-eval adapter go through it). A checkpoint our trainer wrote, with any engine, is read from its
safetensors (``model.safetensors``, and ``ema.safetensors`` when the run kept an EMA: used by default),
after its ``latest`` pointer is followed and the files are verified against ``trainer.json``
(``mm.checkpoint.find_checkpoint``: a damaged checkpoint is skipped with a message). A folder of
DeepSpeed's own files (no ``trainer.json``) is read with ``weights_only=True`` and an allow-list and
consolidated by ``mm.checkpoint.load_deepspeed_weights``; nothing here unpickles arbitrary objects.
Weights of frozen parts that a checkpoint leaves out (built from their local paths) are allowed to be
missing; any other missing or unexpected key fails.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mm.checkpoint import (
    META,
    CheckpointError,
    deepspeed_tag_dir,
    find_checkpoint,
    load_deepspeed_weights,
    load_model_weights,
    read_meta,
)
from mm.config import Config, EvalConfig, load_config
from mm.hf import UnifiedMMProcessor
from mm.model.unified import build_model
from mm.schema import ConfigError


def latest_run(runs_root: Path) -> Path:
    runs = [p.parent.parent for p in runs_root.glob("*/checkpoints/latest")]
    if not runs:
        raise CheckpointError(f"no trained run under {runs_root}: run `python train.py` first, or pass --run DIR")
    return max(runs, key=lambda p: (p / "checkpoints" / "latest").stat().st_mtime)


def is_deepspeed_folder(path: Path) -> bool:
    """A folder of DeepSpeed's own files (``*_model_states.pt``), not a checkpoint our trainer wrote."""
    return not (path / META).is_file() and deepspeed_tag_dir(path) is not None


def describe_weights(ckpt: Path, use_ema: bool = True) -> dict:
    """Which weights :func:`read_weights` takes from ``ckpt`` and the sha256 of the files they come from (what
    eval results and a release record, so a model card shows only numbers of these very weights)."""
    if is_deepspeed_folder(ckpt):
        return {"weights": "model (DeepSpeed ZeRO files, consolidated to fp32)"}
    ema = use_ema and (ckpt / "ema.safetensors").is_file()
    files = ["model.safetensors"] + (["ema.safetensors"] if ema else [])
    record = read_meta(ckpt).get("files") or {}
    sha = {f: record[f]["sha256"] for f in files if f in record}
    return {"weights": "ema" if ema else "model", **({"weights_sha256": sha} if len(sha) == len(files) else {})}


def read_weights(ckpt: Path, use_ema: bool = True, verify: bool = True) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, which weights) of a checkpoint directory; EMA when asked for and present."""
    if is_deepspeed_folder(ckpt):
        state, stage = load_deepspeed_weights(ckpt)
        return state, f"model (DeepSpeed ZeRO-{stage} files, consolidated to fp32)"
    if not (ckpt / META).is_file():
        raise CheckpointError(f"{ckpt}: not a checkpoint (no {META}) nor a folder of DeepSpeed files")
    return load_model_weights(ckpt, ema=use_ema, verify=verify), describe_weights(ckpt, use_ema)["weights"]


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Strict, except that frozen parameters may be absent (they come from their local paths)."""
    result = model.load_state_dict(state, strict=False)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    missing = [k for k in result.missing_keys if k not in frozen]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{source}: weights do not match the model: missing {missing[:5]} ({len(missing)}), "
            f"unexpected {result.unexpected_keys[:5]} ({len(result.unexpected_keys)})"
        )


def run_config(run_dir: Path, overrides: list[str] | None = None) -> Config:
    """The config of a run directory (with ``overrides``); cheap: no model is built."""
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no config.yaml): pass the run.dir train.py wrote")
    return _load_run_config(cfg_path, overrides)


def select_checkpoint(run_dir: Path, checkpoint: str = "latest") -> Path:
    """The checkpoint ``load_run`` would read (followed, verified, fallen back with a message); no model is built."""
    if is_deepspeed_folder(Path(checkpoint)):
        return Path(checkpoint)
    return find_checkpoint(run_dir, checkpoint)


def load_run(
    run_dir: Path, checkpoint: str = "latest", overrides: list[str] | None = None, use_ema: bool = True,
    verified: bool = False,
):  # fmt: skip
    """(config, model in eval mode, checkpoint path, step) of a run directory. ``verified``: ``checkpoint`` is a
    directory :func:`select_checkpoint` already chose and verified (it is not hashed again)."""
    cfg = run_config(run_dir, overrides)
    ckpt = Path(checkpoint) if verified else select_checkpoint(run_dir, checkpoint)
    state, which = read_weights(ckpt, use_ema, verify=False)  # select_checkpoint verified the files read
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
    if (ckpt / META).is_file():
        return int(read_meta(ckpt)["step"])
    tag = deepspeed_tag_dir(ckpt) or ckpt  # DeepSpeed's tag (global_step100), or a step directory around it
    for name in (tag.name, tag.parent.name):
        digits = "".join(ch for ch in name if ch.isdigit())
        if digits:
            return int(digits)
    return -1


@dataclass
class LoadedModel:
    """What the harness, the CLIs and the export need: model, processor, config and where it came from."""

    model: torch.nn.Module  # a UnifiedModel in eval mode
    processor: object  # mm.hf.UnifiedMMProcessor
    config: Config
    source: dict = field(default_factory=dict)


def load_run_model(
    run_dir: Path, overrides: list[str] | None = None, checkpoint: str = "latest", verified: bool = False
) -> LoadedModel:
    """``verified``: ``checkpoint`` is a step directory :func:`select_checkpoint` already chose and verified."""
    cfg, model, ckpt, step = load_run(run_dir, checkpoint, overrides, verified=verified)
    processor = UnifiedMMProcessor.from_model(model)
    source = {"run": str(run_dir), "checkpoint": str(ckpt.resolve()), "step": step, **describe_weights(ckpt)}
    return LoadedModel(model, processor, cfg, source)


RELEASE_OVERRIDES = {
    "model.heads.flow.sample_steps": (int, 1), "model.heads.flow.cfg_scale": (float, 0.0),
    "model.heads.flow.plan_temperature": (float, 0.0),
}  # fmt: skip


def check_release(folder: Path, overrides: list[str] | None = None) -> EvalConfig:
    """The eval config a release folder would be evaluated with; the folder and the overrides checked, no model
    loaded. Only ``eval.*`` and the flow head's ``sample_steps`` (>= 1) and ``cfg_scale`` (>= 0) apply."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(
            f"{folder} is not a release folder (no config.json): give a folder export_release.py wrote"
        )
    overrides = list(overrides or [])
    bad = [o for o in overrides if not o.startswith("eval.") and o.partition("=")[0] not in RELEASE_OVERRIDES]
    if bad:
        raise ConfigError(
            "with a release folder only eval.* and model.heads.flow.{sample_steps,cfg_scale} can be overridden: "
            f"{bad}"
        )
    for o in overrides:
        key, _, value = o.partition("=")
        if key in RELEASE_OVERRIDES:
            kind, low = RELEASE_OVERRIDES[key]
            try:
                number = kind(value)
            except ValueError:
                number = None
            if number is None or not low <= number < float("inf"):
                raise ConfigError(f"{key}={value!r}: expected a{'n integer' if kind is int else ' number'} >= {low}")
    return load_config(None, [o for o in overrides if o.startswith("eval.")], quiet=True).eval


def load_release(folder: Path, overrides: list[str] | None = None) -> LoadedModel:
    """A release folder through the Auto classes; ``eval.*`` and the flow head's sampling overrides
    (``model.heads.flow.*``) apply."""
    from dataclasses import replace

    from transformers import AutoModel, AutoProcessor

    folder = Path(folder)
    eval_cfg = check_release(folder, overrides)  # before the model is loaded
    hf = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(str(folder), local_files_only=True)
    model_cfg = hf.config.to_model_config()
    for o in overrides or []:
        key, _, value = o.partition("=")
        if key in RELEASE_OVERRIDES and "flow" in model_cfg.heads:
            flow = model_cfg.heads["flow"]
            field_name = key.rsplit(".", 1)[1]
            model_cfg.heads["flow"] = replace(flow, **{field_name: RELEASE_OVERRIDES[key][0](value)})
            hf.unified.heads["flow"].cfg = model_cfg.heads["flow"]  # sampling defaults are read at generate time
    hf.unified.cfg = model_cfg
    cfg = Config(model=model_cfg, eval=eval_cfg)
    info = json.loads((folder / "release.json").read_text()) if (folder / "release.json").is_file() else {}
    return LoadedModel(hf.unified, processor, cfg, {"release": str(folder), **info.get("source", {})})
