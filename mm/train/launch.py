"""What ``python train.py`` composes, one layer per line: data, tokenizers, model, loader, trainer.

checks      the config's registry keys (engine, schedule, precision, metric sinks) before any work
processes   join the launcher's process group (the engine says whether it needs one alone)
run dir     writable, or one line saying so
data        the bundled shards, built on rank 0 when the config reads them and they are missing; every
            source's shards resolved (a pattern that names no file is one line)
checkpoint  the one to resume (``latest``, verified; a damaged one skipped with a message), checked against
            this run (engine, process count, data workers); or a fresh start that may begin here; and
            ``train.init_from`` found and verified - all before any model is built
tokenizers  a code head's image tokenizer, trained first when its directory is missing
model       built from ``model.*`` on every rank with the same seed, then ``train.init_from``
loader      this rank's share of the packed batches
trainer     the loop (resuming with ``--resume``)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from data.bundled.prepare import ensure_bundled_shards
from data.loader import TrainLoader
from data.reader import resolve_sources
from mm.checkpoint import (
    META,
    WEIGHT_FILES,
    CheckpointError,
    find_checkpoint,
    is_release,
    load_init,
    load_model_weights,
    read_meta,
)
from mm.config import Config
from mm.model.unified import build_model
from mm.schema import ConfigError, resolve_path, unwritable
from mm.train.engine import DistEnv, engine_class, init_distributed
from mm.train.metrics import check_sinks
from mm.train.precision import get_precision
from mm.train.schedule import get_schedule
from mm.train.tokenizer import ensure_image_tokenizers
from mm.train.trainer import Trainer, check_fresh_start, check_resume, rank0_say, select_resume, shared_verify


def launch(
    cfg: Config,
    resume: str | None = None,
    overwrite: bool = False,
    loader: TrainLoader | None = None,
    allow_random_frozen: bool = False,
) -> Trainer:
    """A ready :class:`Trainer` for ``cfg``; ``loader`` replaces the config's (tests, benchmarks)."""
    engine = engine_class(cfg.engine.kind)
    get_schedule(cfg.train.schedule), get_precision(cfg.engine.precision), check_sinks(cfg.train.metrics)
    env = init_distributed(need_process_group=engine.needs_process_group)
    threads = cfg.train.threads or (max(1, (os.cpu_count() or 1) // env.world) if env.world > 1 else 0)
    if threads:
        torch.set_num_threads(threads)
    if env.rank == 0:
        check_run_dir(cfg.run_dir())
        ensure_bundled_shards(cfg.data)
    env.barrier()
    if loader is None:
        check_shards(cfg)
    ckpt, init = preflight_checkpoints(cfg, env, resume, overwrite)
    if env.rank == 0:
        ensure_image_tokenizers(cfg.model)
    env.barrier()
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    model = build_model(cfg.model)
    if init is not None and not (init / META).is_file():
        load_init(model, init)  # a release folder (a converted published model)
    elif init is not None:
        model.load_state_dict(load_model_weights(init, verify=False))  # verified above
    loader = loader or TrainLoader(cfg.data, model.vocab, model.sample_shapes(), env.rank, env.world)
    return Trainer(cfg, model, loader, env, ckpt, overwrite, allow_random_frozen)


def check_run_dir(run_dir: Path) -> None:
    """The run directory exists (made here) and takes a new file; else one line, before anything is built."""
    problem = unwritable(run_dir)
    if problem:
        raise ConfigError(
            f"run.dir={run_dir}: cannot write there ({problem}); set run.dir (or run.name) to a folder this user can "
            "write"
        )


def check_shards(cfg: Config) -> None:
    """Every source's shard pattern names files that exist (brace patterns; globs are not expanded)."""
    try:
        resolve_sources(cfg.data)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None


def preflight_checkpoints(cfg: Config, env: DistEnv, resume: str | None, overwrite: bool) -> tuple:
    """(checkpoint to resume or None, ``train.init_from`` checkpoint or None), chosen, verified and checked."""
    run_dir = cfg.run_dir()
    ckpt = select_resume(run_dir, resume, env) if resume else None
    if ckpt is not None:
        check_resume(read_meta(ckpt), ckpt, cfg, env.world)
    else:
        check_fresh_start(run_dir, overwrite)
    init = None
    if cfg.train.init_from:
        path = resolve_path(cfg.train.init_from)
        if not (path / META).is_file() and is_release(path):
            return ckpt, path  # a release folder carries no checksums: its safetensors headers are checked on read
        verify = shared_verify(env, WEIGHT_FILES)  # the files load_model_weights reads
        try:
            init = find_checkpoint(path, str(path), verify=verify, say=rank0_say(env, "train.init_from: "))
        except CheckpointError as e:
            raise CheckpointError(f"train.init_from: {e}") from None
    return ckpt, init


def main(cfg: Config, resume: str | None, overwrite: bool) -> None:
    trainer = launch(cfg, resume=resume, overwrite=overwrite)
    trainer.train()
    if trainer.env.distributed:
        dist.destroy_process_group()
    if trainer.rank == 0:
        print(f"done: {trainer.run_dir} (evaluate with: python eval.py --run {trainer.run_dir})", file=sys.stderr)
