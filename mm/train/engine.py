"""Engines: who runs backward, gradient accumulation, clipping, the optimizer step and checkpoint I/O.

The trainer sees only :class:`Engine`::

    for each micro-batch:  with engine.micro_step(last): out = engine.forward(batch); engine.backward(loss)
    result = engine.step()          # clip, update (skipped on a non-finite gradient), zero the gradients
    engine.save(dir) / engine.load(dir)

Implementations, chosen by ``engine.kind`` (:data:`ENGINES`):

* ``ddp``: torch DistributedDataParallel (or the bare module in one process) and a fused AdamW. A
  non-finite gradient norm skips the update on the device: the norm's flag goes to the fused kernel
  as ``found_inf`` (the hand-off ``torch.amp.GradScaler`` uses with fused optimizers), so no step
  waits on the host.
* ``deepspeed``: DeepSpeed ZeRO stage 1/2/3 from a JSON in ``configs/deepspeed/``; bf16 weights with
  an fp32 master copy (``engine.precision=bf16``), optional CPU offload of the optimizer state.
  DeepSpeed detects a non-finite gradient itself and skips the step.

Loss scale: the trainer's loss is already normalised by global counts (summed over ranks and
micro-steps), so each rank's gradient is its share of the global gradient. Both DDP and DeepSpeed
*average* gradients over ranks; ``backward`` multiplies by the world size to turn that mean back
into the sum. DeepSpeed's own division by the accumulation steps is switched off for the same reason.

The EMA (:class:`ShardedEMA`) keeps an fp32 copy of only this rank's 1/world slice of every trainable
parameter, the same flat partition ZeRO-3 uses, so it costs 4/world bytes per parameter under any
engine and reads ZeRO-3's partitions in place.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from mm.checkpoint import deepspeed_safe_types, fsync_file, load_tensors
from mm.config import EngineConfig, TrainConfig
from mm.schema import ConfigError, resolve_path
from mm.train.precision import Precision


@dataclass
class DistEnv:
    """Where this process runs: rank, world and device; ``cpu_group`` carries small host-side collectives."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    cpu_group: object | None = None  # a gloo group beside NCCL (None: the default group is gloo already)

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.cpu_group)

    def all_gather_object(self, obj: object) -> list:
        if not self.distributed or self.world == 1:
            return [obj]
        out: list = [None] * self.world
        dist.all_gather_object(out, obj, group=self.cpu_group)
        return out

    def sum_host(self, values: torch.Tensor) -> torch.Tensor:
        """All-reduce a small CPU tensor over ranks (gloo): no device work, no wait on the GPU stream."""
        if self.distributed and self.world > 1:
            dist.all_reduce(values, group=self.cpu_group)
        return values


def init_distributed(need_process_group: bool = False) -> DistEnv:
    """Join the ``torchrun`` / ``deepspeed`` launcher's process group, or make a one-process one if asked."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if world > 1:
            dist.init_process_group(backend, timeout=timedelta(minutes=30))
        elif need_process_group:  # DeepSpeed wants one even alone; a private store needs no port
            for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
                os.environ.setdefault(key, value)  # what a launcher would have set
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    cpu_group = None
    if dist.is_initialized() and dist.get_backend() != "gloo":
        cpu_group = dist.new_group(backend="gloo")
    return DistEnv(rank, world, local_rank, device, cpu_group)


@dataclass
class StepResult:
    grad_norm: torch.Tensor  # 0-dim global gradient norm before clipping (inf/nan when skipped)
    applied: torch.Tensor  # 0-dim bool: False when the gradient was not finite and the update was skipped


@dataclass
class ParamGroup:
    name: str
    params: list[nn.Parameter]
    lr: float
    weight_decay: float


def build_optimizer(groups: list[ParamGroup], t: TrainConfig) -> torch.optim.Optimizer:
    """Fused AdamW (one kernel per step; takes the device-side skip flag)."""
    return torch.optim.AdamW(
        [
            {"params": g.params, "lr": g.lr, "base_lr": g.lr, "weight_decay": g.weight_decay, "name": g.name}
            for g in groups
        ],
        lr=t.lr,
        betas=tuple(t.betas),
        fused=True,
    )


def shard_bounds(numel: int, rank: int, world: int) -> tuple[int, int]:
    """This rank's [start, end) of a flattened tensor: ceil(numel/world) elements each, the last short."""
    size = math.ceil(numel / world)
    start = min(rank * size, numel)
    return start, min(start + size, numel)


class Engine(ABC):
    """One training engine; see the module docstring for the contract."""

    needs_process_group: bool = False  # a process group even in a one-process run

    def __init__(
        self, model: nn.Module, groups: list[ParamGroup], train: TrainConfig, cfg: EngineConfig, env: DistEnv,
        precision: Precision,
    ):  # fmt: skip
        self.model, self.train_cfg, self.cfg, self.env, self.precision = model, train, cfg, env, precision
        self.trainable: list[tuple[str, nn.Parameter]] = [
            (n, p) for n, p in model.named_parameters() if p.requires_grad
        ]

    @abstractmethod
    def micro_step(self, last: bool) -> contextlib.AbstractContextManager:
        """Wraps the forward and backward of one micro-batch; gradients are synchronised only when ``last``."""

    @abstractmethod
    def forward(self, batch: dict) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Backward of a loss normalised by global counts (the engine undoes the ranks' gradient averaging)."""

    @abstractmethod
    def step(self) -> StepResult:
        """Clip, update (or skip a non-finite step), zero the gradients."""

    @property
    @abstractmethod
    def optimizer(self) -> torch.optim.Optimizer: ...

    def set_lr_scale(self, scale: float) -> None:
        """The schedule's factor for the coming step, applied to every group's base lr."""
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * scale

    @abstractmethod
    def local_shards(self) -> list[torch.Tensor]:
        """This rank's :func:`shard_bounds` slice of every trainable parameter (views where possible)."""

    @abstractmethod
    def gather_trainable(self) -> dict[str, torch.Tensor]:
        """Full fp32 trainable weights on rank 0 (empty elsewhere). Collective: every rank calls it."""

    @abstractmethod
    def save(self, ckpt_dir: Path) -> None:
        """Optimizer state and whatever else this engine needs to resume. Collective."""

    @abstractmethod
    def load(self, ckpt_dir: Path) -> None:
        """Restore what :meth:`save` wrote, trainable weights included."""


class DDPEngine(Engine):
    """torch DDP (or the bare module in one process), fp32 or bf16-autocast, fused AdamW."""

    def __init__(
        self, model: nn.Module, groups: list[ParamGroup], train: TrainConfig, cfg: EngineConfig, env: DistEnv,
        precision: Precision,
    ):  # fmt: skip
        if precision.weights_bf16:
            raise ConfigError(
                "engine.precision=bf16 keeps an fp32 master copy inside DeepSpeed's optimizer: use "
                "engine.kind=deepspeed, or engine.precision=bf16_autocast with ddp"
            )
        super().__init__(model, groups, train, cfg, env, precision)
        model.to(env.device)
        self._optimizer = build_optimizer(groups, train)
        self.wrapped: nn.Module = model
        if env.world > 1:
            self.wrapped = nn.parallel.DistributedDataParallel(
                model,
                device_ids=[env.device.index] if env.device.type == "cuda" else None,
                find_unused_parameters=True,  # a batch may hold no image of one task
            )

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._optimizer

    def micro_step(self, last: bool) -> contextlib.AbstractContextManager:
        if self.env.world > 1 and not last:
            return self.wrapped.no_sync()  # DDP decides at forward time whether backward all-reduces
        return contextlib.nullcontext()

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return self.wrapped(batch)

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self.env.world).backward()

    def step(self) -> StepResult:
        params = [p for _, p in self.trainable]
        for p in params:
            # A weight no sample of this step used (a batch without generation images) steps with a zero
            # gradient, as under DeepSpeed, whose flat gradient buffers hold zeros for it: AdamW's momentum
            # and weight decay then move it alike whichever engine runs the trainer (torch would skip it).
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        norm = torch.nn.utils.clip_grad_norm_(params, self.train_cfg.grad_clip, foreach=True)
        applied = torch.isfinite(norm)
        # Fused AdamW skips the whole update (steps, moments, weights) when found_inf is 1, on the device.
        self._optimizer.grad_scale, self._optimizer.found_inf = None, (~applied).float()
        try:
            self._optimizer.step()
        finally:
            del self._optimizer.grad_scale, self._optimizer.found_inf
        self._optimizer.zero_grad(set_to_none=True)
        return StepResult(norm.detach(), applied)

    def local_shards(self) -> list[torch.Tensor]:
        out = []
        for _, p in self.trainable:
            start, end = shard_bounds(p.numel(), self.env.rank, self.env.world)
            out.append(p.detach().view(-1)[start:end])
        return out

    def gather_trainable(self) -> dict[str, torch.Tensor]:
        if self.env.rank != 0:
            return {}
        return {n: p.detach().float().cpu() for n, p in self.trainable}

    def save(self, ckpt_dir: Path) -> None:
        if self.env.rank == 0:  # replicated: one copy
            torch.save(self._optimizer.state_dict(), ckpt_dir / "optimizer.pt")
            fsync_file(ckpt_dir / "optimizer.pt")

    def load(self, ckpt_dir: Path) -> None:
        weights = load_tensors(ckpt_dir / "model.safetensors")
        with torch.no_grad():
            for n, p in self.trainable:
                p.copy_(weights[n])
        state = torch.load(ckpt_dir / "optimizer.pt", map_location=self.env.device, weights_only=True)
        self._optimizer.load_state_dict(state)


# Keys the YAML owns; a DeepSpeed JSON that sets them would silently disagree with it.
DEEPSPEED_OWNED_KEYS = (
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
    "bf16", "fp16", "torch_autocast", "optimizer", "scheduler",
)  # fmt: skip


def deepspeed_config(
    train: TrainConfig, cfg: EngineConfig, world: int, precision: Precision, device: torch.device
) -> dict:
    """The JSON of ``engine.deepspeed_config`` completed from the YAML (batch, accumulation, clipping, precision)."""
    path = resolve_path(cfg.deepspeed_config)
    if not path.is_file():
        raise ConfigError(f"engine.deepspeed_config: no such file {path}")
    ds = json.loads(path.read_text())
    clash = sorted(set(DEEPSPEED_OWNED_KEYS) & set(ds))
    if clash:
        raise ConfigError(
            f"{path} sets {clash}: these come from the YAML (train.grad_accum_steps, train.grad_clip, "
            "engine.precision, train.lr); remove them from the JSON"
        )
    if "zero_optimization" not in ds or ds["zero_optimization"].get("stage") not in (1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage must be 1, 2 or 3")
    a = train.grad_accum_steps
    ds.update(
        train_micro_batch_size_per_gpu=1,  # one packed batch is one micro-batch
        gradient_accumulation_steps=a,
        train_batch_size=a * world,
        gradient_clipping=train.grad_clip,
        bf16={"enabled": precision.weights_bf16, "check_grad_overflow": True},
        # DeepSpeed switches an outer torch.autocast off inside its forward unless told to run it itself
        torch_autocast={"enabled": precision.autocast_dtype is not None, "dtype": "bfloat16"},
        zero_allow_untested_optimizer=True,  # our fused torch AdamW with per-group learning rates
    )
    ds.setdefault("steps_per_print", 10**12)  # the trainer logs
    if cfg.offload_optimizer:
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
        ds["zero_force_ds_cpu_optimizer"] = False  # torch AdamW steps the CPU partitions
    return ds


def _weights_only_checkpoint_engine(config_params):
    """DeepSpeed's torch checkpoint engine, loading with ``weights_only=True`` and syncing what it saves.

    DeepSpeed unpickles its checkpoint files with ``weights_only=False`` (any object). Its files hold
    tensors, plain containers and a few DeepSpeed types (:func:`mm.checkpoint.deepspeed_safe_types`);
    allowing exactly those keeps arbitrary pickle out. Each file is fsynced by the rank that wrote it
    before the checkpoint is committed. DeepSpeed takes custom checkpoint engines through its
    ``checkpoint_engine`` attribute.
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    safe = deepspeed_safe_types()

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def save(self, state_dict, path: str) -> None:
            super().save(state_dict, path)
            fsync_file(Path(path))

        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(safe):
                return torch.load(path, map_location=map_location, weights_only=True)

    return WeightsOnlyCheckpointEngine(config_params)


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO 1/2/3 (``engine.deepspeed_config``), bf16 with fp32 master weights or fp32."""

    TAG = "deepspeed"  # the sub-directory of a checkpoint that DeepSpeed writes
    needs_process_group = True  # DeepSpeed wants one even alone

    def __init__(
        self, model: nn.Module, groups: list[ParamGroup], train: TrainConfig, cfg: EngineConfig, env: DistEnv,
        precision: Precision,
    ):  # fmt: skip
        import deepspeed  # heavy optional dependency: only when this engine is chosen
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
        super().__init__(model, groups, train, cfg, env, precision)
        ds_cfg = deepspeed_config(train, cfg, env.world, precision, env.device)
        self.stage = ds_cfg["zero_optimization"]["stage"]
        if hasattr(model, "require_every_module"):  # ZeRO's collectives: the same modules on every rank, every step
            model.require_every_module(True)
        model.to(env.device)
        self.ds, _, _, _ = deepspeed.initialize(
            model=model, optimizer=build_optimizer(groups, train), config=ds_cfg, dist_init_required=False
        )
        self.ds.checkpoint_engine = _weights_only_checkpoint_engine(self.ds._config)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.ds.optimizer  # the ZeRO wrapper; its param_groups are the torch optimizer's

    @contextlib.contextmanager
    def micro_step(self, last: bool):
        yield
        if not last:
            self.ds.step()  # DeepSpeed counts micro-steps in step(); off the boundary it only books it

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return self.ds(batch)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss * self.env.world, scale_wrt_gas=False)

    def step(self) -> StepResult:
        self.ds.step()  # the accumulation boundary: clip, update or skip on overflow, zero the gradients
        norm = self.ds.get_global_grad_norm()  # a device tensor or a float, depending on the stage
        norm = torch.as_tensor(float("nan") if norm is None else norm).detach()
        return StepResult(norm, torch.tensor(bool(self.ds.was_step_applied())))

    def local_shards(self) -> list[torch.Tensor]:
        out = []
        for _, p in self.trainable:
            if self.stage == 3:  # ZeRO-3 keeps exactly this slice (padded at the end) in ds_tensor
                start, end = shard_bounds(p.ds_numel, self.env.rank, self.env.world)
                out.append(p.ds_tensor.detach()[: end - start])
                continue
            start, end = shard_bounds(p.numel(), self.env.rank, self.env.world)
            out.append(p.detach().view(-1)[start:end])
        return out

    def gather_trainable(self) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for n, p in self.trainable:  # the fp32 master weights; a collective per parameter under ZeRO
            full = safe_get_full_fp32_param(p)
            if self.env.rank == 0:
                out[n] = full.detach().float().cpu()
        return out

    def save(self, ckpt_dir: Path) -> None:
        self.ds.save_checkpoint(str(ckpt_dir), tag=self.TAG, save_latest=False, exclude_frozen_parameters=True)
        if self.env.rank == 0:  # DeepSpeed copies in its consolidation scripts, which unpickle anything: not ours
            for script in ("zero_to_fp32.py", "zero_to_torch.py"):
                (ckpt_dir / script).unlink(missing_ok=True)

    def load(self, ckpt_dir: Path) -> None:
        # Frozen weights are not in the checkpoint (they come from their pretrained paths): load non-strictly.
        path, _ = self.ds.load_checkpoint(
            str(ckpt_dir), tag=self.TAG, load_module_strict=False, load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )  # fmt: skip
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint in {ckpt_dir / self.TAG}")


ENGINES: dict[str, type[Engine]] = {"ddp": DDPEngine, "deepspeed": DeepSpeedEngine}


def engine_class(kind: str) -> type[Engine]:
    if kind not in ENGINES:
        raise ConfigError(f"engine.kind={kind!r}; known: {sorted(ENGINES)}")
    return ENGINES[kind]


class ShardedEMA:
    """fp32 EMA of the trainable parameters, each rank holding its :func:`shard_bounds` slice.

    ``update`` weighs the step by its ``applied`` flag on the device, so a skipped step leaves the
    EMA untouched without a host sync.
    """

    def __init__(self, engine: Engine, decay: float, warmup: bool = True):
        self.engine, self.decay, self.warmup = engine, decay, warmup
        self.names = [n for n, _ in engine.trainable]
        self.shards = [s.detach().float().clone() for s in engine.local_shards()]

    def decay_at(self, step: int) -> float:
        """The decay of the update made at optimizer step ``step`` (0-based; a host number, no sync)."""
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, applied: torch.Tensor, step: int) -> None:
        if not self.shards:
            return
        weight = (1.0 - self.decay_at(step)) * applied.to(self.shards[0].device, torch.float32)
        current = self.engine.local_shards()
        if all(c.dtype == torch.float32 for c in current):
            torch._foreach_lerp_(self.shards, current, weight)
        else:  # bf16 weights: one fp32 copy at a time, not of the whole model
            for ema, c in zip(self.shards, current):
                ema.lerp_(c.float(), weight)

    def gather(self) -> dict[str, torch.Tensor]:
        """Full fp32 EMA weights on rank 0 (empty elsewhere). Collective."""
        env = self.engine.env
        out: dict[str, torch.Tensor] = {}
        for name, shard, (_, p) in zip(self.names, self.shards, self.engine.trainable):
            shape = p.ds_shape if hasattr(p, "ds_shape") else p.shape
            numel = math.prod(shape)
            if env.world == 1:
                out[name] = shard.view(shape).cpu().clone()
                continue
            size = math.ceil(numel / env.world)
            padded = torch.zeros(size, dtype=torch.float32, device=shard.device)
            padded[: shard.numel()] = shard
            parts = [torch.empty_like(padded) for _ in range(env.world)] if env.rank == 0 else None
            dist.gather(padded, parts, dst=0)
            if env.rank == 0:
                out[name] = torch.cat(parts)[:numel].view(shape).cpu()
        return out

    def load(self, full: dict[str, torch.Tensor]) -> None:
        env = self.engine.env
        for name, shard in zip(self.names, self.shards):
            start, end = shard_bounds(full[name].numel(), env.rank, env.world)
            shard.copy_(full[name].reshape(-1)[start:end])
