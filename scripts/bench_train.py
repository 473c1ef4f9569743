"""Training throughput, MFU, and the overhead of our trainer over a bare forward/backward/step loop.

Prints one JSON object (progress goes to stderr).

    python scripts/bench_train.py --config configs/tiny.yaml
    # one GPU, the paper's shapes with random weights (no local weights needed), bundled digits packed to 4096:
    python scripts/bench_train.py --config configs/janusflow_1.3b.yaml --digits --allow-random-frozen \
        --activation-checkpointing off on engine.kind=deepspeed engine.precision=bf16 \
        engine.deepspeed_config=configs/deepspeed/zero2.json model.llm.attn_implementation=sdpa

Both loops drive the same model, engine and cached batches, interleaved in short blocks (which loop
goes first alternates), so machine noise hits both alike; the overhead is the median over block
pairs. The bare loop is what one would write without this trainer: draw the flow inputs, forward,
backward, clip, optimizer step (DeepSpeed: its own forward/backward/step). The trainer adds global
loss counts (a host all-reduce), FLOPs accounting, the non-finite skip, the EMA if configured, and
metric logging every ``train.log_every`` steps. Checkpoints are off. MFU counts model FLOPs (no
activation recomputation) against the device's peak.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from mm.batch import Batch  # noqa: E402
from mm.config import load_config  # noqa: E402
from mm.train.flops import batch_shape  # noqa: E402
from mm.train.launch import launch  # noqa: E402
from mm.train.trainer import Trainer, Window  # noqa: E402

DIGITS = [
    "data.train_shards=data/shards/digits/train-{000000..000003}.tar",
    "data.heldout_shards=data/shards/digits/heldout-000000.tar",
    "data.build_if_missing=true",
    "model.llm.tokenizer=configs/tokenizers/digits",
]


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


class CachedBatches:
    """The same few packed batches over and over: no data loading in either loop."""

    def __init__(self, batches: list[Batch]):
        self.batches = batches

    def __iter__(self):
        return itertools.cycle(self.batches)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def skip_counts(self) -> dict[str, int]:
        return {}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_step(trainer: Trainer, batch: Batch, seed: int) -> None:
    model, engine, dev = trainer.model, trainer.engine, trainer.device
    batch = model.add_draws(batch, torch.Generator().manual_seed(seed)).to(dev, non_blocking=True)
    if hasattr(engine, "ds"):  # DeepSpeed: its own forward/backward/step
        with trainer.precision.autocast(dev):
            out = engine.ds(batch)
        engine.ds.backward(out["loss"])
        engine.ds.step()
        return
    with trainer.precision.autocast(dev):
        out = model(batch)
    out["loss"].backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), trainer.cfg.train.grad_clip)
    engine.optimizer.step()
    engine.optimizer.zero_grad(set_to_none=True)


def measure(trainer: Trainer, steps: int, block: int, warmup: int) -> dict:
    """Interleaved blocks of trainer steps and bare steps; seconds per step of each."""
    dev, log_every = trainer.device, trainer.cfg.train.log_every
    batches = iter(trainer.loader)
    cached = trainer.loader.batches
    window = Window(dev, len(trainer.losses))
    bare_i = 0

    def trainer_block(n: int) -> None:
        nonlocal window
        for _ in range(n):
            trainer.train_step(batches, window)
            if trainer.step % log_every == 0:
                trainer._log(window)
                window = Window(dev, len(trainer.losses))

    def bare_block(n: int) -> None:
        nonlocal bare_i
        for _ in range(n):
            bare_step(trainer, cached[bare_i % len(cached)], bare_i)
            bare_i += 1

    trainer_block(warmup)
    bare_block(warmup)
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    blocks: dict[str, list[float]] = {"trainer": [], "bare": []}
    runs = {"trainer": trainer_block, "bare": bare_block}
    for i in range(steps // block):
        order = ("trainer", "bare") if i % 2 == 0 else ("bare", "trainer")  # neither always goes first
        for name in order:
            sync(dev)
            t0 = time.perf_counter()
            runs[name](block)
            sync(dev)
            blocks[name].append((time.perf_counter() - t0) / block)
        log(f"block {i + 1}/{steps // block}: trainer {blocks['trainer'][-1]:.4f} s/step, "
            f"bare {blocks['bare'][-1]:.4f} s/step")  # fmt: skip
    ratios = sorted(t / b for t, b in zip(blocks["trainer"], blocks["bare"]))
    return {
        # medians: a burst of load from other processes hits a few blocks, not the estimate
        "trainer": statistics.median(blocks["trainer"]),
        "bare": statistics.median(blocks["bare"]),
        "overhead": statistics.median(ratios) - 1,
        "overhead_iqr": (ratios[len(ratios) // 4] - 1, ratios[(3 * len(ratios)) // 4] - 1),
        "peak_mem_gb": torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--steps", type=int, default=120, help="timed steps per loop and setting")
    ap.add_argument("--block", type=int, default=3, help="steps per interleaved block")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batches", type=int, default=8, help="distinct cached batches")
    ap.add_argument("--digits", action="store_true", help="train on the bundled digits (built if missing)")
    ap.add_argument("--allow-random-frozen", action="store_true", help="frozen modules may keep random weights")
    ap.add_argument("--activation-checkpointing", nargs="+", default=None, choices=["off", "on"])
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    run_dir = tempfile.mkdtemp(prefix="bench_train_")
    overrides = (DIGITS if args.digits else []) + args.overrides
    # stdout carries the JSON only: the metric records go to metrics.jsonl/TensorBoard (logging still costs)
    overrides += [f"run.dir={run_dir}", "train.max_steps=1000000000", "train.ckpt_every=1000000000"]
    overrides += ["train.metrics=[jsonl,tensorboard]"]
    cfg = load_config(args.config, overrides)
    log(f"building {args.config} ({cfg.engine.kind}, {cfg.engine.precision})")
    t0 = time.time()
    trainer = launch(cfg, allow_random_frozen=args.allow_random_frozen)
    log(f"built in {time.time() - t0:.0f} s; caching {args.batches} batches")
    it = iter(trainer.loader)
    trainer.loader = CachedBatches([next(it) for _ in range(args.batches)])
    shapes = [batch_shape(b, trainer.flops.num_layers, trainer.cfg.model.mod) for b in trainer.loader.batches]
    tokens = sum(s.tokens for s in shapes) / len(shapes)
    flops = sum(trainer.flops.train_flops(s) for s in shapes) / len(shapes)
    slots = trainer.loader.batches[0].sample_ids.numel()

    results = []
    for ac in args.activation_checkpointing or ["on" if cfg.engine.activation_checkpointing else "off"]:
        trainer.model.set_activation_checkpointing(ac == "on")
        log(f"activation checkpointing {ac}: {args.warmup} warm-up + {args.steps} timed steps per loop")
        sec = measure(trainer, args.steps, args.block, args.warmup)
        res = {
            "activation_checkpointing": ac == "on",
            "trainer_step_s": round(sec["trainer"], 5),
            "bare_step_s": round(sec["bare"], 5),
            "trainer_overhead": round(sec["overhead"], 4),  # median over interleaved block pairs
            "trainer_overhead_iqr": [round(x, 4) for x in sec["overhead_iqr"]],
            "tokens_per_s": round(tokens / sec["trainer"], 1),
            "tflops": round(flops / sec["trainer"] / 1e12, 4),
            "peak_mem_gb": sec["peak_mem_gb"] and round(sec["peak_mem_gb"], 2),
        }
        if trainer.peak_tflops:
            res["mfu"] = round(flops / sec["trainer"] / 1e12 / trainer.peak_tflops, 4)
            res["bare_mfu"] = round(flops / sec["bare"] / 1e12 / trainer.peak_tflops, 4)
        results.append(res)
    dev = trainer.device
    print(
        json.dumps(
            {
                "config": args.config,
                "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                "peak_tflops": trainer.peak_tflops,
                "engine": cfg.engine.kind,
                "deepspeed_config": cfg.engine.deepspeed_config if cfg.engine.kind == "deepspeed" else None,
                "precision": cfg.engine.precision,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "tokens_per_step": tokens,
                "pack_efficiency": round(tokens / slots, 4),
                "train_flops_per_step": flops,
                "results": results,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
