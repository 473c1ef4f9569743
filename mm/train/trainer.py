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

The trainer is the loop: ``mm/train/launch.py`` composes what it runs (bundled data, image tokenizers,
the model, the loader), the engine runs backward and step (the trainer does not know which one),
``mm/train/stage.py`` decides what trains, ``mm/checkpoint.py`` owns the files.
"""

from __future__ import annotations

import copy
import resource
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from mm.batch import Batch
from mm.checkpoint import (
    CheckpointError,
    RunExistsError,
    checkpoint_root,
    commit_checkpoint,
    digest_files,
    find_checkpoint,
    fsync_file,
    load_tensors,
    read_meta,
    save_tensors,
    staging_dir,
    verify_checkpoint,
)
from mm.config import Config
from mm.model.legacy import FORMAT
from mm.model.unified import UnifiedModel
from mm.schema import to_yaml
from mm.train.engine import DistEnv, Engine, ShardedEMA, engine_class
from mm.train.flops import ModelFlops, batch_shape, device_peak_tflops
from mm.train.metrics import MetricsLogger, check_sinks
from mm.train.precision import fp32_peak_key, get_precision
from mm.train.schedule import get_schedule
from mm.train.stage import apply_stage


def draw_seed(seed: int, step: int, micro_batch: int) -> int:
    """Seed of one global micro-batch's draws: (seed, step, rank * accumulation + micro-step)."""
    return ((seed * 1_000_003 + step) * 1_000_033 + micro_batch) % (2**63)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB: the process's peak RSS


class Window:
    """Device-side sums between log steps (no host sync per step)."""

    def __init__(self, device: torch.device, n_losses: int):
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
        model: UnifiedModel,
        loader,
        env: DistEnv,
        resume: str | None = None,
        overwrite: bool = False,
        allow_random_frozen: bool = False,
    ):
        """``resume``: ``auto`` (the checkpoint ``latest`` names, else a fresh start), ``latest`` or a checkpoint
        directory (a string: chosen and verified here, see :func:`select_resume`), or a ``Path`` that
        :func:`mm.train.launch.launch` already chose, verified and checked. ``--overwrite`` deletes an existing
        run's checkpoints only after everything else was built."""
        self.cfg, self.env, self.loader = cfg, env, loader
        t = cfg.train
        self.schedule = get_schedule(t.schedule)
        self.precision = get_precision(cfg.engine.precision)
        check_sinks(t.metrics)
        self.rank, self.world, self.device = env.rank, env.world, env.device
        self.run_dir = cfg.run_dir()
        ckpt = resume if isinstance(resume, Path) else select_resume(self.run_dir, resume, env) if resume else None
        self.resume_notes = check_resume(read_meta(ckpt), ckpt, cfg, self.world) if ckpt is not None else []
        self.stage = apply_stage(model, t, allow_random_frozen)
        self.state_keys = list(model.state_dict().keys())
        self.aliases = _aliases(model)
        self.persistent_buffers = [n for n, _ in model.named_buffers() if n in set(self.state_keys)]
        if cfg.engine.activation_checkpointing:
            model.set_activation_checkpointing(True)
        self.flops = ModelFlops(model)  # before an engine shards the parameters
        self.model = model
        self.losses = tuple(model.loss_weights())  # text, then each image head's losses
        engine = engine_class(cfg.engine.kind)
        self.engine: Engine = engine(model, self.stage.groups, t, cfg.engine, env, self.precision)
        self.ema = ShardedEMA(self.engine, t.ema_decay, t.ema_warmup) if t.ema_decay > 0 else None
        self.step, self.nonfinite_total = 0, 0
        self.nonfinite_run = torch.zeros((), dtype=torch.float64, device=self.device)
        if ckpt is not None:
            self._load(ckpt)
        else:
            self._start_fresh(overwrite)
        key = self.precision.peak_key if self.precision.peak_key != "fp32" else fp32_peak_key()
        self.peak_tflops = device_peak_tflops(self.device, key)
        self.metrics, self.last_plot = None, time.perf_counter()
        self.train_start, self.start_step = time.perf_counter(), self.step
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
            self.metrics = MetricsLogger(self.run_dir, t.metrics, self.step, t.max_steps)

    # ---- checkpoints ----------------------------------------------------------------
    def _start_fresh(self, overwrite: bool) -> None:
        """A fresh start in a directory with checkpoints needs ``--overwrite``; they go only now, when the
        config, model, engine and data have all been built without error."""
        root = checkpoint_root(self.run_dir)
        if root.exists() and any(root.glob("step_*")):
            check_fresh_start(self.run_dir, overwrite)
            if self.rank == 0:  # asked for explicitly; said out loud
                print(f"--overwrite: deleting {root}, metrics.jsonl and tensorboard/", flush=True)
                shutil.rmtree(root)
                shutil.rmtree(self.run_dir / "tensorboard", ignore_errors=True)
            self.env.barrier()

    def save(self) -> Path | None:
        """Every rank writes (and fsyncs) its part into a staging directory and hashes its share of the files;
        rank 0 records the checksums in ``trainer.json`` and commits (see mm/checkpoint.py)."""
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
        fsync_file(tmp / f"rng_rank{self.rank}.pt")
        if self.rank == 0:
            buffers = dict(self.model.named_buffers())
            save_tensors(weights | {n: buffers[n] for n in self.persistent_buffers}, tmp / "model.safetensors")
            if ema is not None:
                save_tensors(ema, tmp / "ema.safetensors")
            (tmp / "config.yaml").write_text(to_yaml(self.cfg))
            fsync_file(tmp / "config.yaml")
        env.barrier()  # every rank's files are on disk before they are hashed
        files: dict[str, dict] = {}
        for share in env.all_gather_object(digest_files(tmp, self.rank, self.world)):
            files.update(share)
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
            "format": FORMAT,
            "files": files,
        }
        path = commit_checkpoint(self.run_dir, self.step, meta, self.cfg.train.keep_checkpoints)
        print(f"saved {path}", flush=True)
        if self.metrics is not None and time.perf_counter() - self.last_plot > 300:  # matplotlib costs ~1 s
            self.metrics.plot()
            self.last_plot = time.perf_counter()
        return path

    def _load(self, ckpt: Path) -> None:
        """Continue from ``ckpt`` (chosen, verified and checked by :func:`select_resume` and :func:`check_resume`)."""
        meta = read_meta(ckpt)
        self.engine.load(ckpt)
        if self.ema is not None:
            if (ckpt / "ema.safetensors").is_file():
                self.ema.load(load_tensors(ckpt / "ema.safetensors"))  # full tensors: sliced for this layout
            else:  # EMA switched on at this resume: it starts at the current weights
                self.ema = ShardedEMA(self.engine, self.cfg.train.ema_decay, self.cfg.train.ema_warmup)
        old_world = len(meta["loaders"])
        rng = torch.load(ckpt / f"rng_rank{self.rank % old_world}.pt", weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.loader.load_state_dict(loader_state_for(meta["loaders"], self.rank, self.world))
        self.step, self.nonfinite_total = meta["step"], meta["nonfinite_steps"]
        if self.rank == 0:
            for note in self.resume_notes:
                print(note, flush=True)
            print(f"resumed from {ckpt} at step {self.step}", flush=True)

    # ---- training -----------------------------------------------------------------------
    def train_step(self, batches: Iterator[Batch], window: Window) -> None:
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
        for i, b in enumerate(micro):  # the draws first: prompt dropout removes a dropped plan's text targets
            gen = torch.Generator().manual_seed(draw_seed(t.seed, self.step, self.rank * accum + i))
            micro[i] = self.model.add_draws(b, gen)
        local = [self.model.loss_counts(b) for b in micro]
        counts_t = env.sum_host(torch.tensor([sum(c[k] for c in local) for k in self.losses], dtype=torch.float64))
        counts = dict(zip(self.losses, counts_t.tolist()))  # global: summed over ranks and micro-steps
        for b in micro:
            shape = batch_shape(b, self.flops.num_layers, self.cfg.model.mod)
            window.host["tokens"] += shape.tokens
            window.host["slots"] += b.sample_ids.numel()
            window.host["samples"] += shape.samples
            window.host["flops"] += self.flops.train_flops(shape)

        self.lr_scale = self.schedule(self.step, t.warmup_steps, t.max_steps, t.min_lr_ratio)
        self.engine.set_lr_scale(self.lr_scale)
        self.model.train()
        step_local = torch.zeros(len(self.losses) + 1, dtype=torch.float64, device=self.device)
        for i, batch in enumerate(micro):
            batch = batch.to(self.device, non_blocking=True)
            with self.engine.micro_step(last=i == accum - 1):
                with self.precision.autocast(self.device):
                    out = self.engine.forward(batch)
                loss = self.model.combine(out, counts)  # this rank's share of the global loss
                self.engine.backward(loss)
            parts = [out[f"{k}_sum"].detach() * (self.model.loss_weights()[k] > 0) for k in self.losses]
            step_local += torch.stack([*parts, loss.detach()]).double()
        result = self.engine.step()
        if self.ema is not None:
            self.ema.update(result.applied, self.step)
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
        rec: dict = {"step": self.step, "loss_names": list(self.losses)}
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


def shared_verify(env: DistEnv, files: tuple[str, ...] | None = None):
    """A checkpoint check for :func:`mm.checkpoint.find_checkpoint` that the ranks share: each hashes every
    world-th file, and all learn the first problem any rank found (a collective: every rank calls it)."""

    def verify(ckpt: Path) -> str | None:
        problems = [p for p in env.all_gather_object(verify_checkpoint(ckpt, files, env.rank, env.world)) if p]
        return problems[0] if problems else None

    return verify


def rank0_say(env: DistEnv, prefix: str = ""):
    return (lambda msg: print(prefix + msg, flush=True)) if env.rank == 0 else (lambda msg: None)


def select_resume(run_dir: Path, resume: str, env: DistEnv) -> Path | None:
    """``--resume auto|latest|DIR``: the checkpoint to continue from. ``latest`` names it; one that does not verify
    (every file's size and sha256 against ``trainer.json``, the ranks hashing a share each) is skipped with one
    line saying why, and the previous one is tried."""
    return find_checkpoint(run_dir, resume, verify=shared_verify(env), say=rank0_say(env))


def check_fresh_start(run_dir: Path, overwrite: bool) -> None:
    root = checkpoint_root(run_dir)
    if root.exists() and any(root.glob("step_*")) and not overwrite:
        raise RunExistsError(
            f"{run_dir} already has checkpoints: pass --resume auto (or latest) to continue, "
            "--overwrite to start over, or run.name=<new> for a new run"
        )


def check_resume(meta: dict, ckpt: Path, cfg: Config, world: int) -> list[str]:
    """Refuse in one line what cannot continue from ``ckpt``; return notes on what changes (rank 0 prints them).

    * another engine: refused (``train.init_from`` starts a new run from the weights);
    * another number of processes or data workers: resampled sources re-split (new seeds per rank and worker,
      nothing owed), the optimizer state and EMA carry over (DDP's optimizer state is whole on every rank, the
      EMA is saved whole); exact-epoch sources are refused (their positions cannot be re-split without
      replaying or dropping samples), and so is another process count under DeepSpeed ZeRO (below);
    * another ``train.grad_accum_steps``: allowed; the loader counts micro-batches, so the data position carries
      over exactly; the global batch changes and the schedule continues by optimizer step.
    """
    if meta["engine"] != cfg.engine.kind:
        raise CheckpointError(
            f"{ckpt} was written by engine {meta['engine']!r}, not {cfg.engine.kind!r}: start a new run "
            f"with train.init_from={ckpt} to switch engines"
        )
    notes = []
    old_world, new_workers = meta["world_size"], max(1, cfg.data.num_workers)
    old_workers = meta["loaders"][0].get("workers", new_workers)
    if (old_world, old_workers) != (world, new_workers):
        was = f"{old_world} process(es) x {old_workers} data worker(s)"
        exact = [s.name for s in cfg.data.sources if not s.resample]
        if exact:
            raise CheckpointError(
                f"{ckpt} was saved with {was}, resuming with {world} x {new_workers}: sources {exact} read exact "
                f"epochs, whose positions cannot be re-split without replaying or dropping samples; resume with "
                f"{old_world} process(es) and data.num_workers={old_workers}, or set resample: true on those sources"
            )
        if old_world != world and cfg.engine.kind == "deepspeed":
            # DeepSpeed re-partitions ZeRO state only through its universal checkpoint, whose converter and loader
            # unpickle with weights_only=False: not a path this code runs.
            raise CheckpointError(
                f"{ckpt} holds DeepSpeed ZeRO state partitioned over {old_world} process(es), resuming with {world}: "
                "re-partitioning goes through DeepSpeed's universal checkpoint, which unpickles arbitrary objects "
                f"and is not run here; resume with {old_world} process(es), or start a new run from these weights "
                f"with train.init_from={ckpt} (optimizer moments and data position restart)"
            )
        notes.append(
            f"resume: saved with {was}, now {world} x {new_workers}: resampled sources re-split with new seeds; the "
            "optimizer state and EMA carry over"
        )
    if meta["grad_accum_steps"] != cfg.train.grad_accum_steps:
        a, b = meta["grad_accum_steps"], cfg.train.grad_accum_steps
        notes.append(
            f"resume: train.grad_accum_steps {a} -> {b}: {b * world} micro-batches per step in all (were "
            f"{a * old_world}); the data position carries over (it counts micro-batches), the schedule continues "
            "by optimizer step"
        )
    return notes


def loader_state_for(states: list[dict], rank: int, world: int) -> dict:
    """This rank's loader state. After a change of process count the loader re-splits the saved position
    (``TrainLoader.load_state_dict``); every skip count is kept once: a rank beyond the old world starts from a
    copy without counts, rank 0 carries the counts of ranks that are gone."""
    if len(states) == world:
        return states[rank]
    state = copy.deepcopy(states[rank % len(states)])
    if rank >= len(states):
        state["skipped"] = {}
        for w in state["worker_states"].values():
            w["skipped"] = {}
    if rank == 0:
        carried = Counter(state["skipped"])
        for gone in states[world:]:
            carried.update(gone["skipped"])
            for w in gone["worker_states"].values():
                carried.update(w["skipped"])
        state["skipped"] = dict(carried)
    return state


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
