"""The training loop: loader -> batch -> model(batch) -> engine.step, for any engine.

One optimizer step on each rank:
  1. take ``train.grad_accum_steps`` packed micro-batches from the loader (timed: data wait);
  2. count each loss's denominator before the forward pass and sum the counts over ranks, so every
     loss is normalised by its *global* count (tokens for text, images for flow and REPA: torchtitan,
     BAGEL), not by a per-rank mean; a 2-process run equals 1 process with doubled accumulation;
  3. forward + backward each micro-batch inside ``engine.micro_step``; ``engine.step`` clips and
     updates, or skips a non-finite step on the device (counted; the run stops after
     ``train.max_nonfinite_steps`` in a row, checked at log steps so no step waits on the host).

Randomness per micro-batch (flow t, noise, prompt dropout) comes from a generator seeded by (seed,
step, rank * accumulation + micro-step): a resumed run draws what the uninterrupted run drew, and a
global micro-batch gets the same draw however it is split over ranks and accumulation steps.

Stages need no code: ``train.frozen`` freezes modules by name prefix, ``train.param_groups`` sets
learning rates per prefix, ``train.init_from`` starts from the previous stage's checkpoint. A frozen
module with no weights to load is an error at start.
"""

from __future__ import annotations

import math
import os
import resource
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from data.digits import ensure_bundled_digits
from data.loader import build_train_loader
from data.longctx import ensure_longctx_shards
from mm.config import CodeHeadConfig, Config, ConfigError, ModelConfig, resolve_path, to_yaml
from mm.model.unified import UnifiedModel
from mm.sequence import Vocab, load_vocab
from mm.train.checkpoint import (
    checkpoint_root,
    commit_checkpoint,
    find_checkpoint,
    load_model_weights,
    load_tensors,
    read_meta,
    save_tensors,
    staging_dir,
)
from mm.train.engine import Engine, ParamGroup, ShardedEMA, build_engine, init_distributed
from mm.train.flops import ModelFlops, batch_shape, device_peak_tflops
from mm.train.metrics import MetricsLogger, check_sinks
from mm.train.precision import fp32_peak_key, get_precision

LOSSES = ("text", "flow", "repa")


def constant_schedule(step: int, warmup: int, total: int, min_ratio: float) -> float:
    return min(1.0, (step + 1) / max(1, warmup))


def cosine_schedule(step: int, warmup: int, total: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


LR_SCHEDULES = {"constant": constant_schedule, "cosine": cosine_schedule}

# Where a module's pretrained weights come from, for the rule "a frozen module needs weights to load".
PRETRAINED_SOURCES: dict[str, Callable[[ModelConfig], str]] = {
    "und.tower": lambda m: m.und.weights,
    "llm": lambda m: m.llm.pretrained,
    "autoencoder": lambda m: m.autoencoder.path,
    # the code heads' frozen tokenizers (mm/model/heads/codes.py)
    "nextfreq.tokenizer": lambda m: m.nextfreq.tokenizer,
    "raster.tokenizer": lambda m: m.raster.tokenizer,
}
SOURCE_KEYS = {
    "und.tower": "model.und.weights", "llm": "model.llm.pretrained", "autoencoder": "model.autoencoder.path",
    "nextfreq.tokenizer": "model.nextfreq.tokenizer", "raster.tokenizer": "model.raster.tokenizer",
}  # fmt: skip


# Bundled shard folders and what builds them (the long-context albums read the digits too).
BUNDLED_SHARDS: dict[str, Callable[[str], bool]] = {
    "data/shards/digits/": ensure_bundled_digits,
    "data/shards/longctx/": ensure_longctx_shards,
}


def ensure_digit_shards(cfg: Config) -> None:
    """Build the bundled shards (digits, long-context albums) when the default paths are missing."""
    if not cfg.data.build_if_missing:
        return
    wanted = [cfg.data.train_shards, cfg.data.heldout_shards] + [s.shards for s in cfg.data.sources if s.shards]
    folders = [next((f for f in BUNDLED_SHARDS if w.startswith(f)), None) for w in wanted]
    if all(folders):
        for folder in dict.fromkeys(folders):
            BUNDLED_SHARDS[folder](folder.rstrip("/"))


def ensure_head_tokenizers(cfg: Config) -> None:
    """Train a code head's frequency tokenizer first when its directory is missing and ``build_config`` names how."""
    for name in cfg.model.heads:
        c = getattr(cfg.model, name, None)
        if not isinstance(c, CodeHeadConfig) or not c.tokenizer or not c.build_config:
            continue
        out = resolve_path(c.tokenizer)
        if (out / "model.safetensors").is_file():
            continue
        from mm.train.tokenizer import main as train_tokenizer  # only when one is missing

        print(f"[{name}] no tokenizer at {out}: training it from {c.build_config}", flush=True)
        train_tokenizer(["--config", str(resolve_path(c.build_config)), f"out_dir={out}"])


def build_model(cfg: Config, init: bool = False) -> tuple[UnifiedModel, Vocab]:
    """The model of ``cfg`` (pretrained parts from their local paths); ``init`` applies ``train.init_from``."""
    vocab = load_vocab(resolve_path(cfg.model.llm.tokenizer))
    model = UnifiedModel(cfg.model, vocab)
    if init and cfg.train.init_from:
        model.load_state_dict(load_model_weights(resolve_path(cfg.train.init_from)))
    return model, vocab


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _part(name: str) -> str:
    """The module a parameter is reported under: two levels for ``und`` (tower vs aligner), else one."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "und" else parts[0]


@dataclass
class Stage:
    groups: list[ParamGroup]
    referenced: list[str]  # frozen parts whose weights come from a path or init_from (not saved)
    random_frozen: list[str]  # frozen parts with no weights (allowed only for benchmarks)
    report: str


def apply_stage(model: UnifiedModel, cfg: Config, allow_random_frozen: bool = False) -> Stage:
    """Freeze ``train.frozen``, check frozen parts have weights, split the rest into ``train.param_groups``."""
    t = cfg.train
    params = dict(model.named_parameters())
    for where, prefixes in [("train.frozen", t.frozen)] + [
        (f"train.param_groups[{i}].modules", g.modules) for i, g in enumerate(t.param_groups)
    ]:
        for prefix in prefixes:
            if not any(_matches(n, prefix) for n in params):
                parts = sorted({_part(n) for n in params})
                raise ConfigError(f"{where}: {prefix!r} names no parameter of the model; modules: {', '.join(parts)}")
    for n, p in params.items():
        if any(_matches(n, f) for f in t.frozen):
            p.requires_grad_(False)

    def source(name: str) -> str | None:
        for prefix, path_of in PRETRAINED_SOURCES.items():
            if _matches(name, prefix) and path_of(cfg.model):
                return SOURCE_KEYS[prefix]
        return "train.init_from" if t.init_from else None

    frozen = [n for n, p in params.items() if not p.requires_grad]
    random_frozen = sorted({_part(n) for n in frozen if source(n) is None})
    if random_frozen and not allow_random_frozen:
        what = []
        for part in random_frozen:
            n_params = sum(p.numel() for n, p in params.items() if _part(n) == part and not p.requires_grad)
            fix = [SOURCE_KEYS[k] for k in SOURCE_KEYS if _matches(part, k) or _matches(k, part)]
            fix += ["model.und.freeze=false"] if part == "und.tower" else []
            fix += [] if part == "autoencoder" else ["remove it from train.frozen"]
            what.append(f"{part} ({n_params / 1e6:.1f}M; {' or '.join(fix)})")
        raise ConfigError(
            f"frozen modules without weights to load would keep their random init: {', '.join(what)}; "
            "train.init_from can supply any of them"
        )
    referenced = sorted({_part(n) for n in frozen if source(n) is not None})

    # Each trainable parameter goes to the group with the longest matching prefix, else the default group.
    def group_of(name: str) -> int:
        best, best_len = -1, -1
        for i, g in enumerate(t.param_groups):
            for prefix in g.modules:
                if _matches(name, prefix) and len(prefix) > best_len:
                    best, best_len = i, len(prefix)
        return best

    groups = [
        ParamGroup("+".join(g.modules), [], g.lr or t.lr, g.weight_decay if g.weight_decay >= 0 else t.weight_decay)
        for g in t.param_groups
    ] + [ParamGroup("default", [], t.lr, t.weight_decay)]
    lr_of: dict[str, set[float]] = {}
    for n, p in params.items():
        if p.requires_grad:
            g = groups[group_of(n)]
            g.params.append(p)
            lr_of.setdefault(_part(n), set()).add(g.lr)
    for i, g in enumerate(groups[:-1]):
        if not g.params:
            raise ConfigError(f"train.param_groups[{i}] ({g.name}) holds only frozen parameters")
    groups = [g for g in groups if g.params]

    lines = ["parameters (trainable / total):"]
    for part in sorted({_part(n) for n in params}, key=lambda s: list(dict.fromkeys(map(_part, params))).index(s)):
        members = [(n, p) for n, p in params.items() if _part(n) == part]
        total = sum(p.numel() for _, p in members)
        trainable = sum(p.numel() for _, p in members if p.requires_grad)
        note = f"lr {'/'.join(f'{x:.1e}' for x in sorted(lr_of[part]))}" if part in lr_of else "frozen"
        if part in referenced:
            note += f" (weights from {source(next(n for n, p in members if not p.requires_grad))})"
        elif part in random_frozen:
            note += " (RANDOM weights: benchmark only)"
        lines.append(f"  {part:<14} {trainable / 1e6:10.3f}M / {total / 1e6:10.3f}M  {note}")
    n_all = sum(p.numel() for p in params.values())
    n_train = sum(p.numel() for p in params.values() if p.requires_grad)
    lines.append(f"  {'total':<14} {n_train / 1e6:10.3f}M / {n_all / 1e6:10.3f}M")
    return Stage(groups, referenced, random_frozen, "\n".join(lines))


def flow_seed(seed: int, step: int, micro_batch: int) -> int:
    """Seed of one global micro-batch's draws: (seed, step, rank * accumulation + micro-step)."""
    return ((seed * 1_000_003 + step) * 1_000_033 + micro_batch) % (2**63)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB: the process's peak RSS


class Window:
    """Device-side sums between log steps (no host sync per step)."""

    def __init__(self, device: torch.device, n_losses: int = len(LOSSES)):
        z = lambda n=(): torch.zeros(n, dtype=torch.float64, device=device)  # noqa: E731
        self.local = z(n_losses + 1)  # this rank's share of the global loss sums and of the total loss
        self.counts = z(n_losses)  # global counts of applied steps (equal on every rank)
        self.grad_norm, self.applied, self.steps = z(), z(), 0
        self.max_nonfinite_run, self.nonfinite = z(), z()
        self.host = {"tokens": 0.0, "slots": 0.0, "samples": 0.0, "flops": 0.0, "data_wait": 0.0}
        self.start = time.perf_counter()


class Trainer:
    def __init__(
        self,
        cfg: Config,
        resume: str | None = None,
        overwrite: bool = False,
        loader=None,
        allow_random_frozen: bool = False,
    ):
        """``resume``: ``auto`` (newest checkpoint, else a fresh start), ``latest`` or a checkpoint directory.
        ``loader``: a train loader to use instead of the config's (tests, benchmarks)."""
        self.cfg = cfg
        t = cfg.train
        if t.schedule not in LR_SCHEDULES:
            raise ConfigError(f"train.schedule={t.schedule!r}; known: {sorted(LR_SCHEDULES)}")
        self.precision = get_precision(cfg.engine.precision)
        check_sinks(t.metrics)  # on every rank, before any collective
        self.env = env = init_distributed(need_process_group=cfg.engine.kind == "deepspeed")
        self.rank, self.world, self.device = env.rank, env.world, env.device
        threads = t.threads or (max(1, (os.cpu_count() or 1) // env.world) if env.world > 1 else 0)
        if threads:
            torch.set_num_threads(threads)
        self.run_dir = cfg.run_dir()
        if self.rank == 0:
            ensure_digit_shards(cfg)
            ensure_head_tokenizers(cfg)
        env.barrier()
        ckpt = self._checkpoint_to_resume(resume, overwrite)

        torch.manual_seed(t.seed)  # same init on every rank
        model, self.vocab = build_model(cfg, init=True)
        self.stage = apply_stage(model, cfg, allow_random_frozen)
        self.state_keys = list(model.state_dict().keys())
        self.aliases = _aliases(model)
        self.persistent_buffers = [n for n, _ in model.named_buffers() if n in set(self.state_keys)]
        if cfg.engine.activation_checkpointing:
            model.set_activation_checkpointing(True)
        self.flops = ModelFlops(model)  # before an engine shards the parameters
        self.model = model
        self.losses = tuple(model.loss_weights())  # text, then each image head's losses (LOSSES for the flow head)
        self.engine: Engine = build_engine(model, self.stage.groups, cfg, env, self.precision)
        self.ema = ShardedEMA(self.engine, t.ema_decay) if t.ema_decay > 0 else None
        self.loader = loader or build_train_loader(cfg.data, self.vocab, model.sample_shapes(), env.rank, env.world)
        self.step, self.nonfinite_total = 0, 0
        self.nonfinite_run = torch.zeros((), dtype=torch.float64, device=self.device)
        if ckpt is not None:
            self._load(ckpt)
        key = self.precision.peak_key if self.precision.peak_key != "fp32" else fp32_peak_key()
        self.peak_tflops = device_peak_tflops(self.device, key)
        self.metrics, self.last_plot = None, time.perf_counter()
        self.train_start, self.start_step = time.perf_counter(), self.step
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
            self.metrics = MetricsLogger(self.run_dir, t.metrics, self.step, t.max_steps)

    # ---- checkpoints ----------------------------------------------------------------
    def _checkpoint_to_resume(self, resume: str | None, overwrite: bool) -> Path | None:
        if resume:
            return find_checkpoint(self.run_dir, resume)
        root = checkpoint_root(self.run_dir)
        if root.exists() and any(root.glob("step_*")):
            if not overwrite:
                raise FileExistsError(
                    f"{self.run_dir} already has checkpoints: pass --resume auto (or latest) to continue, "
                    "--overwrite to start over, or run.name=<new> for a new run"
                )
            if self.rank == 0:  # asked for explicitly; said out loud
                print(f"--overwrite: deleting {root}, metrics.jsonl and tensorboard/", flush=True)
                shutil.rmtree(root)
                shutil.rmtree(self.run_dir / "tensorboard", ignore_errors=True)
            self.env.barrier()
        return None

    def save(self) -> Path | None:
        """Every rank writes its part into a staging directory; rank 0 commits it (see mm/train/checkpoint.py)."""
        if self.stage.random_frozen:
            raise RuntimeError(f"random frozen modules {self.stage.random_frozen} (benchmark mode) cannot be saved")
        env, tmp = self.env, staging_dir(self.run_dir, self.step)
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        env.barrier()
        loader_states = env.all_gather_object(self.loader.state_dict())
        weights = self.engine.gather_trainable()  # collectives: every rank takes part
        ema = self.ema.gather() if self.ema is not None else None
        self.engine.save(tmp)
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        torch.save(rng, tmp / f"rng_rank{self.rank}.pt")
        if self.rank == 0:
            buffers = dict(self.model.named_buffers())
            save_tensors(weights | {n: buffers[n] for n in self.persistent_buffers}, tmp / "model.safetensors")
            if ema is not None:
                save_tensors(ema, tmp / "ema.safetensors")
            (tmp / "config.yaml").write_text(to_yaml(self.cfg))
        env.barrier()  # every rank's files are on disk before the directory becomes visible
        if self.rank != 0:
            return None
        meta = {
            "step": self.step,
            "world_size": self.world,
            "grad_accum_steps": self.cfg.train.grad_accum_steps,
            "engine": self.cfg.engine.kind,
            "loaders": loader_states,
            "nonfinite_steps": self.nonfinite_total,
            "referenced": self.stage.referenced,
            "aliases": self.aliases,
            "state_keys": self.state_keys,
        }
        path = commit_checkpoint(self.run_dir, self.step, meta, self.cfg.train.keep_checkpoints)
        print(f"saved {path}", flush=True)
        if self.metrics is not None and time.perf_counter() - self.last_plot > 300:  # matplotlib costs ~1 s
            self.metrics.plot()
            self.last_plot = time.perf_counter()
        return path

    def _load(self, ckpt: Path) -> None:
        meta = read_meta(ckpt)
        for key, now in (("world_size", self.world), ("grad_accum_steps", self.cfg.train.grad_accum_steps)):
            if meta[key] != now:
                raise ValueError(
                    f"{ckpt} was saved with {key}={meta[key]}, resuming with {now}: the data position "
                    f"would not carry over; resume with the same {key}"
                )
        if meta["engine"] != self.cfg.engine.kind:
            raise ValueError(
                f"{ckpt} was written by engine {meta['engine']!r}, not {self.cfg.engine.kind!r}: start a new run "
                f"with train.init_from={ckpt} to switch engines"
            )
        self.engine.load(ckpt)
        if self.ema is not None:
            if (ckpt / "ema.safetensors").is_file():
                self.ema.load(load_tensors(ckpt / "ema.safetensors"))
            else:  # EMA switched on at this resume: it starts at the current weights
                self.ema = ShardedEMA(self.engine, self.cfg.train.ema_decay)
        rng = torch.load(ckpt / f"rng_rank{self.rank}.pt", weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.loader.load_state_dict(meta["loaders"][self.rank])
        self.step, self.nonfinite_total = meta["step"], meta["nonfinite_steps"]
        if self.rank == 0:
            print(f"resumed from {ckpt} at step {self.step}", flush=True)

    # ---- training -----------------------------------------------------------------------
    def train_step(self, batches: Iterator[dict], window: Window) -> None:
        """One optimizer step over ``train.grad_accum_steps`` micro-batches from ``batches``."""
        t, env = self.cfg.train, self.env
        accum = t.grad_accum_steps
        step_start = time.perf_counter()
        micro, wait = [], 0.0
        for _ in range(accum):
            t0 = time.perf_counter()
            micro.append(next(batches))
            wait += time.perf_counter() - t0
        window.host["data_wait"] += wait
        local = [self.model.loss_counts(b) for b in micro]
        counts_t = env.sum_host(torch.tensor([sum(c[k] for c in local) for k in self.losses], dtype=torch.float64))
        counts = dict(zip(self.losses, counts_t.tolist()))  # global: summed over ranks and micro-steps
        for b in micro:
            shape = batch_shape(b, self.flops.num_layers, self.cfg.model.mod)
            window.host["tokens"] += shape.tokens
            window.host["slots"] += b["sample_ids"].numel()
            window.host["samples"] += shape.samples
            window.host["flops"] += self.flops.train_flops(shape)

        schedule = LR_SCHEDULES[t.schedule]
        self.lr_scale = schedule(self.step, t.warmup_steps, t.max_steps, t.min_lr_ratio)
        self.engine.set_lr_scale(self.lr_scale)
        self.model.train()
        step_local = torch.zeros(len(self.losses) + 1, dtype=torch.float64, device=self.device)
        for i, batch in enumerate(micro):
            gen = torch.Generator().manual_seed(flow_seed(t.seed, self.step, self.rank * accum + i))
            batch = self.model.add_flow_inputs(batch, gen)
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            with self.engine.micro_step(last=i == accum - 1):
                with self.precision.autocast(self.device):
                    out = self.engine.forward(batch)
                loss = self.model.combine(out, counts)  # this rank's share of the global loss
                self.engine.backward(loss)
            parts = [out[f"{k}_sum"].detach() * (self.model.loss_weights()[k] > 0) for k in self.losses]
            step_local += torch.stack([*parts, loss.detach()]).double()
        result = self.engine.step()
        if self.ema is not None:
            self.ema.update(result.applied)
        self.step += 1

        applied = result.applied.to(self.device)
        window.local += torch.where(applied, step_local, 0.0)
        window.counts += applied * counts_t.to(self.device)
        window.grad_norm += torch.where(applied, result.grad_norm.to(self.device, torch.float64), 0.0)
        window.applied += applied
        window.nonfinite += ~applied
        self.nonfinite_run = (self.nonfinite_run + 1) * ~applied  # the streak outlives log windows
        window.max_nonfinite_run = torch.maximum(window.max_nonfinite_run, self.nonfinite_run)
        window.steps += 1
        if self.metrics is not None:  # every step: host-side timing, no device sync
            self.metrics.scalar("train/data_wait_step", wait / (time.perf_counter() - step_start), self.step)

    def _log(self, window: Window) -> None:
        """Reduce the window over ranks (one collective), check the non-finite streak, write one record."""
        t, env = self.cfg.train, self.env
        now = time.perf_counter()
        host = window.host
        local = torch.cat(
            [
                window.local,
                torch.tensor(
                    [host["tokens"], host["slots"], host["samples"], host["flops"], host["data_wait"]],
                    dtype=torch.float64,
                    device=self.device,
                ),
            ]
        )
        if env.distributed and self.world > 1:
            dist.all_reduce(local)
        same = torch.stack(
            [*window.counts, window.grad_norm, window.applied, window.max_nonfinite_run, window.nonfinite]
        )
        reduced, same_host = local.tolist(), same.tolist()  # the host waits here, once per log step
        n = len(self.losses)
        sums, total_loss = reduced[:n], reduced[n]
        tokens, slots, samples, flops, data_wait = reduced[n + 1 :]
        counts, grad_norm, applied, max_run, nonfinite = same_host[:n], *same_host[n:]
        self.nonfinite_total += int(nonfinite)
        if max_run >= t.max_nonfinite_steps:
            raise RuntimeError(
                f"{int(max_run)} steps in a row before step {self.step} had a non-finite loss or gradient "
                f"(train.max_nonfinite_steps={t.max_nonfinite_steps}); the updates were skipped. Lower train.lr, "
                f"check the data, or resume from an earlier checkpoint"
            )
        elapsed = now - window.start
        skipped: Counter[str] = Counter()
        for counts_of_rank in env.all_gather_object(self.loader.skip_counts()):
            skipped.update(counts_of_rank)
        rec: dict = {"step": self.step}
        rec["loss"] = total_loss / applied if applied else None
        for k, s, c in zip(self.losses, sums, counts):
            rec[k] = s / c if c > 0 else None  # token/image-weighted over the window's steps that had the task
        rec["grad_norm"] = grad_norm / applied if applied else None
        rec["lr"] = t.lr * self.lr_scale
        for g in self.engine.optimizer.param_groups if len(self.engine.optimizer.param_groups) > 1 else []:
            rec[f"lr/{g['name']}"] = g["lr"]
        rec["tokens_per_s"] = tokens / elapsed
        rec["tokens_per_s_per_device"] = tokens / elapsed / self.world
        rec["samples_per_s"] = samples / elapsed
        rec["samples_per_s_per_device"] = samples / elapsed / self.world
        rec["pack_efficiency"] = tokens / slots  # non-padding share of the rows
        rec["tflops_per_device"] = flops / elapsed / self.world / 1e12
        if self.peak_tflops:
            rec["mfu"] = rec["tflops_per_device"] / self.peak_tflops
        rec["data_wait"] = data_wait / self.world / elapsed  # share of wall time blocked on the loader
        rec["peak_mem_gb"] = peak_memory_gb(self.device)
        rec["skipped"] = dict(skipped)
        rec["nonfinite_steps"] = self.nonfinite_total
        total = time.perf_counter() - self.train_start
        eta = total / max(1, self.step - self.start_step) * (t.max_steps - self.step)
        rec["elapsed_s"], rec["eta_s"] = round(total, 1), round(eta, 1)
        if self.metrics is not None:
            self.metrics.record(rec)

    def train(self, until: int | None = None) -> Path:
        """Train to ``train.max_steps`` (or stop early at ``until``, as an interruption would)."""
        t = self.cfg.train
        stop = min(t.max_steps, until or t.max_steps)
        if self.rank == 0:
            e = self.cfg.engine
            print(self.stage.report, flush=True)
            print(
                f"training {self.run_dir} from step {self.step} to {t.max_steps}: engine {e.kind} ({e.precision}"
                f"{', activation checkpointing' if e.activation_checkpointing else ''}), world {self.world}, "
                f"{t.grad_accum_steps} micro-batch(es) of {self.cfg.data.rows_per_batch}x{self.cfg.data.seq_len} "
                f"tokens per rank and step",
                flush=True,
            )
        self.train_start, self.start_step = time.perf_counter(), self.step
        batches = iter(self.loader)
        window = Window(self.device, len(self.losses))
        while self.step < stop:
            self.train_step(batches, window)
            logged = self.step % t.log_every == 0 or self.step == t.max_steps
            if logged:
                self._log(window)
            if self.step % t.ckpt_every == 0 or self.step == t.max_steps:
                self.save()
            if logged:  # after the save: throughput windows leave checkpoint time out
                window = Window(self.device, len(self.losses))
        if window.steps:  # an early stop between log steps still checks and reports its steps
            self._log(window)
        self.env.barrier()
        if self.metrics is not None:
            self.metrics.plot()
            self.metrics.close()
        return self.run_dir


def _aliases(model: torch.nn.Module) -> dict[str, str]:
    """State-dict keys that share a parameter with an earlier key (tied embeddings), key -> first key."""
    first: dict[int, str] = {}
    out = {}
    for k, v in model.state_dict(keep_vars=True).items():
        if id(v) in first:
            out[k] = first[id(v)]
        else:
            first[id(v)] = k
    return out


def main_cli(cfg: Config, resume: str | None, overwrite: bool) -> None:
    trainer = Trainer(cfg, resume=resume, overwrite=overwrite)
    trainer.train()
    if trainer.env.distributed:
        dist.destroy_process_group()
    if trainer.rank == 0:
        print(f"done: {trainer.run_dir} (evaluate with: python eval.py --run {trainer.run_dir})", file=sys.stderr)
