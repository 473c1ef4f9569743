"""A run's config: one YAML = run + model + data + train + engine + eval, typed and validated.

Each part's config lives beside the part (``mm.model.config.ModelConfig`` and the component configs it
holds, ``data.config.DataConfig``, ``data.sources.SourceConfig``); this module composes them with the
run-level sections (``run``, ``train``, ``engine``, ``eval``) and loads them. YAML files in
``configs/`` and ``a.b=c`` command-line overrides only change values; an unknown key or a wrong type
fails at load time naming the key and the closest valid one; rules that span sections are checked
here. Configs written before image heads owned their parts (format 1) are migrated on load
(``mm.model.legacy``), with a note of what moved.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from data.config import DataConfig
from mm.model.config import ModelConfig
from mm.model.legacy import migrate_model, migrate_prefixes
from mm.schema import (
    REPO_ROOT,
    ConfigError,
    dotlist_layer,
    merge_layers,
    resolve_path,
    to_plain,
    to_yaml,
    yaml_layers,
)

DEFAULT_CONFIG = REPO_ROOT / "configs" / "tiny.yaml"


@dataclass
class ParamGroupConfig:
    """Optimizer settings for the trainable parameters under some module prefixes (e.g. aligners vs LLM)."""

    modules: list[str] = field(default_factory=list)  # prefixes of UnifiedModel parameter names: und.aligner, llm
    lr: float = 0.0  # 0 = train.lr (the schedule scales every group alike)
    weight_decay: float = -1.0  # < 0 = train.weight_decay


@dataclass
class TrainConfig:
    max_steps: int = 2000
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    schedule: str = "cosine"  # key of mm.train.schedule.LR_SCHEDULES
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    grad_accum_steps: int = 1  # micro-batches per optimizer step on each rank
    ema_decay: float = 0.0  # 0 disables the EMA of the trainable parameters
    # decay at step n: min(ema_decay, (1 + n) / (10 + n)), as diffusers' EMAModel: without it the random init keeps
    # ema_decay**n of the average (0.999: 13.5% after 2000 steps; the default run's judge accuracy fell to 0.58)
    ema_warmup: bool = True
    # Stages: module-name prefixes of UnifiedModel to freeze (und.tower, llm, heads.flow.gen_encoder, ...). A frozen
    # module needs weights to load (a local path in model.*, or init_from); modules the model freezes itself count too.
    frozen: list[str] = field(default_factory=list)
    param_groups: list[ParamGroupConfig] = field(default_factory=list)  # the rest trains at lr/weight_decay
    # A pretrained understanding tower (model.und.tower.weights, or any tower under train.init_from) that trains and
    # that no param group names: its learning rate; 0 = train.lr (one lr for everything, as JanusFlow's stage 3).
    # Printed at start. Freeze it instead with model.und.freeze=true.
    pretrained_tower_lr: float = 0.0
    init_from: str = ""  # a checkpoint (or run) directory whose weights start this run (the previous stage)
    max_nonfinite_steps: int = 20  # NaN/inf loss or gradient: skip the step; stop after this many in a row
    log_every: int = 25
    metrics: list[str] = field(default_factory=lambda: ["console", "jsonl", "tensorboard"])  # mm.train.metrics.SINKS
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    seed: int = 0
    threads: int = 0  # torch intra-op threads; 0 = torch default

    def __post_init__(self) -> None:
        for key in ("max_steps", "grad_accum_steps", "max_nonfinite_steps", "log_every", "ckpt_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}={getattr(self, key)} must be >= 1")
        if self.keep_checkpoints < 1:
            raise ConfigError("train.keep_checkpoints must be >= 1")
        if self.pretrained_tower_lr < 0:
            raise ConfigError(f"train.pretrained_tower_lr={self.pretrained_tower_lr} must be >= 0 (0 = train.lr)")
        for i, group in enumerate(self.param_groups):
            if not group.modules:
                raise ConfigError(f"train.param_groups[{i}].modules is empty: name the module prefixes it sets")


@dataclass
class EngineConfig:
    """Who runs backward/step: torch DDP or DeepSpeed ZeRO (mm.train.engine.ENGINES)."""

    kind: str = "ddp"  # ddp | deepspeed
    precision: str = "fp32"  # key of mm.train.precision.PRECISIONS: fp32 | bf16_autocast | bf16 (DeepSpeed)
    deepspeed_config: str = "configs/deepspeed/zero2.json"  # ZeRO stage and communication settings
    offload_optimizer: bool = False  # DeepSpeed: optimizer state and fp32 master weights in CPU memory
    activation_checkpointing: bool = False  # recompute the LLM layers in backward


@dataclass
class EvalConfig:
    """Benchmark evaluation (``eval.py``, ``mm/eval/harness.py``); tasks are YAML files (``mm/eval/tasks``)."""

    tasks: list[str] = field(default_factory=list)  # task or group names; [] = DEFAULT_TASKS of the harness
    task_dirs: list[str] = field(default_factory=list)  # extra folders of task YAMLs (the bundled one is always read)
    build_if_missing: bool = True  # build the bundled datasets (data/bench/<name>) on first use
    limit: int = 0  # documents per task; 0 = all
    images_per_prompt: int = 0  # generation tasks; 0 = each task's own generation_kwargs
    batch_size: int = 64  # questions (or images) per model call
    seed: int = 0  # generation noise: torch.Generator(seed + crc32(task))
    threads: int = 1  # torch intra-op threads; 0 = torch default. 1: on 2 shared cores the tiny benchmark took
    # 78-150 s with 1 thread and 400 s with 2 (other jobs running); raise it for big models evaluated on CPU
    grid_columns: int = 10
    # the standard FID Inception's weights (pt_inception-2015-12-05-6726825d.pth of torch-fidelity/pytorch-fid),
    # a local file; "" or missing = FID/KID skipped
    inception_weights: str = ""
    clip_arch: str = "ViT-B-32"  # open_clip architecture of clip_weights
    clip_weights: str = ""  # local open_clip checkpoint (CLIP score); "" or missing = skipped

    def __post_init__(self) -> None:
        for key, low in (("limit", 0), ("images_per_prompt", 0), ("batch_size", 1), ("seed", 0), ("threads", 0),
                         ("grid_columns", 1)):  # fmt: skip
            if getattr(self, key) < low:
                raise ConfigError(f"eval.{key}={getattr(self, key)} must be >= {low}")


@dataclass
class RunConfig:
    name: str = "tiny"
    dir: str = ""  # "" = runs/<name>


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        for s in self.data.sources:  # a generation source must name a head the model has
            head = getattr(s.options, "head", "")
            if head and head not in self.model.heads:
                raise ConfigError(
                    f"data.sources[{s.name}].kind={s.kind!r} trains image head {head!r}, which model.heads="
                    f"{list(self.model.heads)} lacks"
                )

    def run_dir(self) -> Path:
        return resolve_path(self.run.dir or f"runs/{self.run.name}")


PLUG_INS = {f"model.{p}": k and f"model.{k}" for p, k in ModelConfig.PLUG_INS.items()}


def _migrate(source: str, layer: DictConfig, notes: list[str]) -> DictConfig:
    """A layer written with format-1 names (model sections, module prefixes) -> today's names."""
    raw = OmegaConf.to_container(layer)
    if isinstance(raw.get("model"), dict):
        raw["model"], moved = migrate_model(raw["model"])
        notes += [f"{source}: {m}" for m in moved]
    train = raw.get("train")
    if isinstance(train, dict):
        if isinstance(train.get("frozen"), list):
            train["frozen"] = migrate_prefixes(train["frozen"])
        for group in train.get("param_groups") or []:
            if isinstance(group, dict) and isinstance(group.get("modules"), list):
                group["modules"] = migrate_prefixes(group["modules"])
    return OmegaConf.create(raw)


def with_overrides(cfg: Config, overrides: list[str]) -> Config:
    """``cfg`` with ``a.b=c`` overrides applied and validated, as the command line would."""
    layers = [("the config", OmegaConf.create(to_plain(cfg))), ("the overrides", dotlist_layer(overrides))]
    return merge_layers(Config, [(src, _migrate(src, layer, [])) for src, layer in layers], plug_ins=PLUG_INS)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, quiet: bool = False) -> Config:
    """Schema defaults <- YAML file (after its ``base`` files) <- dotlist overrides, validated.

    A YAML file may start with ``base: other.yaml`` (relative to itself): that file is applied first,
    so a stage config states only what differs from the model config. A wrong key or type raises a
    one-line :class:`ConfigError` naming the key, the file or the command line it came from, and the
    closest valid key.
    """
    layers = yaml_layers(Path(path)) if path is not None else []
    if overrides:
        layers.append(("the command line", dotlist_layer(overrides)))
    notes: list[str] = []
    layers = [(source, _migrate(source, layer, notes)) for source, layer in layers]
    if notes and not quiet:
        print("config: read with format-1 names, now: " + "; ".join(dict.fromkeys(notes)), file=sys.stderr)
    try:
        return merge_layers(Config, layers, plug_ins=PLUG_INS)
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith("config error") else f"config error: {msg}") from None


__all__ = [
    "DEFAULT_CONFIG", "Config", "ConfigError", "DataConfig", "EngineConfig", "EvalConfig", "ModelConfig",
    "ParamGroupConfig", "RunConfig", "TrainConfig", "load_config", "resolve_path", "to_yaml", "with_overrides",
]  # fmt: skip
