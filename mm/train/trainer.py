"""The training loop: one step = pack -> forward (all tasks) -> backward -> AdamW.

Runs as one process on CPU, or under ``torchrun`` with DDP (gloo on CPU, NCCL
on GPU). Rank 0 logs and saves. Everything a resume needs is in the
checkpoint: model (+EMA), optimizer, scheduler, step, every rank's data
position and skip counts, RNG states. Per-step randomness (flow t, noise,
prompt dropout) comes from a generator seeded by (seed, step, rank), so a
resumed run draws exactly what the uninterrupted run drew.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data.digits import ensure_bundled_digits
from data.loader import build_train_loader
from mm.config import Config, resolve_path, to_yaml
from mm.model.unified import UnifiedModel, count_parameters
from mm.sequence import Vocab, load_vocab
from mm.train.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from mm.train.flops import device_peak_tflops, llm_train_flops_per_token


def constant_schedule(step: int, warmup: int, total: int, min_ratio: float) -> float:
    return min(1.0, (step + 1) / max(1, warmup))


def cosine_schedule(step: int, warmup: int, total: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


LR_SCHEDULES = {"constant": constant_schedule, "cosine": cosine_schedule}


def ensure_digit_shards(cfg: Config) -> None:
    """Build the bundled digits shards when the default paths are missing."""
    if not cfg.data.build_if_missing:
        return
    wanted = [cfg.data.train_shards, cfg.data.heldout_shards] + [s.shards for s in cfg.data.sources if s.shards]
    if all(w.startswith("data/shards/digits/") for w in wanted):
        ensure_bundled_digits("data/shards/digits")


def build_model(cfg: Config) -> tuple[UnifiedModel, Vocab]:
    vocab = load_vocab(resolve_path(cfg.model.llm.tokenizer))
    return UnifiedModel(cfg.model, vocab), vocab


def format_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Trainer:
    def __init__(self, cfg: Config, resume: str | None = None, overwrite: bool = False):
        self.cfg = cfg
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = (
            torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        threads = cfg.train.threads or (max(1, (os.cpu_count() or 1) // self.world) if self.world > 1 else 0)
        if threads:
            torch.set_num_threads(threads)
        self.peak_tflops = device_peak_tflops(self.device)
        self.run_dir = cfg.run_dir()
        if self.rank == 0:
            ensure_digit_shards(cfg)
        if self.world > 1:
            dist.barrier()

        torch.manual_seed(cfg.train.seed)  # same init on every rank
        self.model, self.vocab = build_model(cfg)
        self.model.to(self.device)
        self.flops_per_token = llm_train_flops_per_token(self.model.llm)
        self.ema = copy.deepcopy(self.model).requires_grad_(False) if cfg.train.ema_decay > 0 else None
        params = [p for p in self.model.parameters() if p.requires_grad]
        t = cfg.train
        self.optimizer = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
        if t.schedule not in LR_SCHEDULES:
            raise KeyError(f"train.schedule={t.schedule!r}; known: {sorted(LR_SCHEDULES)}")
        schedule = LR_SCHEDULES[t.schedule]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: schedule(s, t.warmup_steps, t.max_steps, t.min_lr_ratio)
        )
        self.step = 0
        loader_state = None
        if resume:
            loader_state = self._load(find_checkpoint(self.run_dir, resume))
        elif (self.run_dir / "checkpoints").exists():
            if not overwrite:
                raise FileExistsError(
                    f"{self.run_dir} already has checkpoints: pass --resume latest to continue, "
                    "--overwrite to start over, or run.name=<new> for a new run"
                )
            if self.rank == 0:  # asked for explicitly; said out loud
                print(f"--overwrite: deleting {self.run_dir / 'checkpoints'} and metrics.jsonl", flush=True)
                shutil.rmtree(self.run_dir / "checkpoints")
            if self.world > 1:
                dist.barrier()
        self.loader = build_train_loader(cfg.data, self.vocab, self.model.sample_shapes(), self.rank, self.world)
        if loader_state is not None:
            self.loader.load_state_dict(loader_state)
        self.ddp = self.model
        if self.world > 1:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.model,
                find_unused_parameters=True,  # a batch may hold no image of one task
            )
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
            self.metrics_path = self.run_dir / "metrics.jsonl"
            self._truncate_metrics(after_step=self.step if resume else 0)

    # ---- checkpointing ----------------------------------------------------------
    def _truncate_metrics(self, after_step: int) -> None:
        """Keep logged steps <= the resumed step, so a resumed run never logs a step twice."""
        if not self.metrics_path.exists():
            return
        keep = [ln for ln in self.metrics_path.read_text().splitlines() if ln and json.loads(ln)["step"] <= after_step]
        self.metrics_path.write_text("".join(ln + "\n" for ln in keep))

    def _gather_stream_states(self) -> list[dict]:
        state = self.loader.state_dict()
        if self.world == 1:
            return [state]
        states: list = [None] * self.world
        dist.all_gather_object(states, state)
        return states

    def save(self) -> None:
        states = self._gather_stream_states()  # collective: every rank takes part
        if self.rank != 0:
            return
        tensors = {
            "model": self.model.state_dict(),
            "optim": {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
        }
        if self.ema is not None:
            tensors["ema"] = self.ema.state_dict()
        meta = {"step": self.step, "world_size": self.world, "streams": states, "config": to_yaml(self.cfg)}
        path = save_checkpoint(self.run_dir, self.step, tensors, meta, self.cfg.train.keep_checkpoints)
        print(f"saved {path}", flush=True)

    def _load(self, path: Path) -> dict:
        tensors, meta = load_checkpoint(path)
        if meta["world_size"] != self.world:
            raise ValueError(
                f"{path} was saved with world_size={meta['world_size']}, resuming with {self.world}: "
                "the data position would not carry over; resume with the same number of processes"
            )
        self.model.load_state_dict(tensors["model"])
        if self.ema is not None:
            self.ema.load_state_dict(tensors.get("ema", tensors["model"]))
        self.optimizer.load_state_dict(tensors["optim"]["optimizer"])
        self.scheduler.load_state_dict(tensors["optim"]["scheduler"])
        torch.set_rng_state(tensors["rng"]["torch"])
        random.setstate(tensors["rng"]["python"])
        np.random.set_state(tensors["rng"]["numpy"])
        self.step = meta["step"]
        if self.rank == 0:
            print(f"resumed from {path} at step {self.step}", flush=True)
        return meta["streams"][self.rank]

    # ---- training -----------------------------------------------------------------
    def train_step(self, batch: dict) -> dict[str, float]:
        gen = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + self.step * self.world + self.rank)
        batch = self.model.add_flow_inputs(batch, gen)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        self.model.train()
        losses = self.ddp(batch)
        losses["loss"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            with torch.no_grad():
                d = self.cfg.train.ema_decay
                for pe, pm in zip(self.ema.parameters(), self.model.parameters()):
                    pe.lerp_(pm, 1 - d)
        self.step += 1
        out = {k: float(v.detach()) for k, v in losses.items() if v.ndim == 0}
        out["grad_norm"] = float(grad_norm)
        out["tokens"] = float((batch["sample_ids"] >= 0).sum())
        out["row_slots"] = float(batch["sample_ids"].numel())
        out["samples"] = float(int(batch["sample_ids"].max()) + 1)
        # a token attends within its own sample: the token-weighted mean sample length is sum(n^2) / sum(n)
        lengths = torch.bincount(batch["sample_ids"][batch["sample_ids"] >= 0].flatten()).float()
        context = float((lengths**2).sum() / lengths.sum())
        out["flops"] = float(lengths.sum()) * self.flops_per_token(context)
        return out

    def _reduce(self, sums: dict[str, float]) -> dict[str, float]:
        """Sum each logged quantity over ranks (losses are then averaged by the caller)."""
        if self.world == 1:
            return sums
        keys = sorted(sums)
        t = torch.tensor([sums[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(t)
        return dict(zip(keys, t.tolist()))

    def _total_skipped(self) -> dict[str, int]:
        """Skip counts by reason, summed over ranks (ranks may have met different reasons)."""
        local = self.loader.skip_counts()
        if self.world == 1:
            return local
        per_rank: list = [None] * self.world
        dist.all_gather_object(per_rank, local)
        total: Counter[str] = Counter()
        for counts in per_rank:
            total.update(counts)
        return dict(total)

    def train(self, until: int | None = None) -> Path:
        """Train to ``train.max_steps`` (or stop early at ``until``, as an interruption would)."""
        t = self.cfg.train
        stop = min(t.max_steps, until or t.max_steps)
        if self.rank == 0:
            print(f"params: {count_parameters(self.model)}", flush=True)
            print(f"training {self.run_dir} from step {self.step} to {t.max_steps} (world {self.world})", flush=True)
        window: dict[str, float] = defaultdict(float)
        n_window, start, start_step, last_log = 0, time.time(), self.step, time.time()
        it = iter(self.loader)
        while self.step < stop:
            t_wait = time.perf_counter()
            batch = next(it)
            window["data_wait_s"] += time.perf_counter() - t_wait
            out = self.train_step(batch)
            n_window += 1
            for k, v in out.items():
                window[k] += v
            if self.step % t.log_every == 0 or self.step == t.max_steps:
                sums = self._reduce(dict(window))
                now = time.time()
                rec = {"step": self.step}
                for k in ("loss", "text", "flow", "repa", "grad_norm"):
                    rec[k] = sums[k] / (n_window * self.world)
                rec["lr"] = self.scheduler.get_last_lr()[0]
                rec["tokens_per_s"] = sums["tokens"] / (now - last_log)
                rec["samples_per_s"] = sums["samples"] / (now - last_log)
                rec["pack_efficiency"] = sums["tokens"] / sums["row_slots"]  # non-padding share of the rows
                rec["tflops_per_device"] = sums["flops"] / (now - last_log) / self.world / 1e12
                if self.peak_tflops:
                    rec["mfu"] = rec["tflops_per_device"] / self.peak_tflops
                rec["data_wait"] = sums["data_wait_s"] / self.world / (now - last_log)  # share of step time
                rec["skipped"] = self._total_skipped()
                elapsed = now - start
                eta = elapsed / (self.step - start_step) * (t.max_steps - self.step)
                rec["elapsed_s"], rec["eta_s"] = round(elapsed, 1), round(eta, 1)
                if self.rank == 0:
                    with self.metrics_path.open("a") as fh:
                        fh.write(json.dumps(rec) + "\n")
                    skip = f" | skipped {sum(rec['skipped'].values())}" if rec["skipped"] else ""
                    mfu = f" (MFU {rec['mfu']:.1%})" if "mfu" in rec else ""
                    print(
                        f"step {self.step}/{t.max_steps} | loss {rec['loss']:.4f} text {rec['text']:.4f} "
                        f"flow {rec['flow']:.4f} repa {rec['repa']:.4f} | lr {rec['lr']:.2e} | "
                        f"{rec['tokens_per_s']:.0f} tok/s {rec['tflops_per_device']:.3f} TFLOP/s{mfu} | "
                        f"data wait {rec['data_wait']:.1%}{skip} | "
                        f"eta {format_seconds(eta)}",
                        flush=True,
                    )
                window, n_window, last_log = defaultdict(float), 0, now
            if self.step % t.ckpt_every == 0 or self.step == t.max_steps:
                self.save()
        if self.world > 1:
            dist.barrier()
        return self.run_dir


def main_cli(cfg: Config, resume: str | None, overwrite: bool) -> None:
    trainer = Trainer(cfg, resume=resume, overwrite=overwrite)
    trainer.train()
    if trainer.world > 1:
        dist.destroy_process_group()
    if trainer.rank == 0:
        print(f"done: {trainer.run_dir} (evaluate with: python eval.py --run {trainer.run_dir})", file=sys.stderr)
