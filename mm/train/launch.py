"""What ``python train.py`` composes, one layer per line: data, tokenizers, model, loader, trainer.

    checks      the config's registry keys (engine, schedule, precision, metric sinks) before any work
    processes   join the launcher's process group (the engine says whether it needs one alone)
    data        the bundled shards, built on rank 0 when the config reads them and they are missing
    tokenizers  a code head's image tokenizer, trained first when its directory is missing
    model       built from ``model.*`` on every rank with the same seed, then ``train.init_from``
    loader      this rank's share of the packed batches
    trainer     the loop (resuming with ``--resume``)
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from data.bundled.prepare import ensure_bundled_shards
from data.loader import TrainLoader
from mm.checkpoint import load_init
from mm.config import Config
from mm.model.unified import build_model
from mm.train.engine import engine_class, init_distributed
from mm.train.metrics import check_sinks
from mm.train.precision import get_precision
from mm.train.schedule import get_schedule
from mm.train.tokenizer import ensure_image_tokenizers
from mm.train.trainer import Trainer


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
        ensure_bundled_shards(cfg.data)
        ensure_image_tokenizers(cfg.model)
    env.barrier()
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    model = build_model(cfg.model)
    if cfg.train.init_from:
        load_init(model, cfg.train.init_from)
    loader = loader or TrainLoader(cfg.data, model.vocab, model.sample_shapes(), env.rank, env.world)
    return Trainer(cfg, model, loader, env, resume, overwrite, allow_random_frozen)


def main(cfg: Config, resume: str | None, overwrite: bool) -> None:
    trainer = launch(cfg, resume=resume, overwrite=overwrite)
    trainer.train()
    if trainer.env.distributed:
        dist.destroy_process_group()
    if trainer.rank == 0:
        print(f"done: {trainer.run_dir} (evaluate with: python eval.py --run {trainer.run_dir})", file=sys.stderr)
