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

``--backends sdpa,flex,flash_attention_2`` and ``--kernels torch,fused`` measure each setting on the same
model in turn (one result each; a backend that cannot run here is reported as skipped, an error as its
message, and the rest still run).

``--row-lengths 2048,4096`` instead trains the same model on packed rows of each length at the same
tokens per step (``--step-tokens``; rows per step = step tokens / length), the lengths interleaved block
by block, and reports real tokens per second and fill per length (goal: the longest row at least as fast
per real token as the shortest). The packer must see enough samples to fill the longest row (the JSON
reports each length's fill; the tiny digits samples are ~30 tokens, 64 of them fill only ~2k tokens):

    python scripts/bench_train.py --config configs/tiny.yaml --row-lengths 2048,4096 --step-tokens 8192 \
        train.threads=1 data.pack_lookahead=512
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from data.loader import TrainLoader  # noqa: E402
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


def backend_skip(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot train here, or None."""
    if backend == "flash_attention_2" and (device.type != "cuda" or importlib.util.find_spec("flash_attn") is None):
        return "flash-attn needs CUDA and the flash_attn package (pip install flash-attn)"
    if backend == "flex" and device.type != "cuda":
        return "FlexAttention has no backward on CPU"
    return None


def set_model(trainer: Trainer, backend: str, kernels: str) -> None:
    """Switch the attention backend and kernels of the built model (both are read per forward)."""
    model = trainer.model
    model.cfg = replace(model.cfg, llm=replace(model.cfg.llm, attn_implementation=backend, kernels=kernels))


def one_setting(trainer: Trainer, args, flops: float, tokens: float, backend: str, kernels: str, ac: str) -> dict:
    """Trainer and bare loop of one (backend, kernels, activation checkpointing) setting."""
    res = {"backend": backend, "kernels": kernels, "activation_checkpointing": ac == "on"}
    skip = backend_skip(backend, trainer.device)
    if skip:
        return res | {"skipped": skip}
    set_model(trainer, backend, kernels)
    trainer.model.set_activation_checkpointing(ac == "on")
    log(f"{backend}, kernels {kernels}, activation checkpointing {ac}: {args.warmup} warm-up + {args.steps} steps")
    try:
        sec = measure(trainer, args.steps, args.block, args.warmup)
    except Exception as e:  # one setting failing (OOM, a backend's error) must not lose the others
        log(f"{backend}/{kernels}: {type(e).__name__}: {e}")
        return res | {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    res |= {
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
    return res


def row_lengths(trainer: Trainer, cfg, args) -> dict:
    """Real tokens/s of trainer steps on packed rows of each length at the same tokens per step, interleaved."""
    lengths = [int(x) for x in args.row_lengths.split(",")]
    model, dev = trainer.model, trainer.device
    cached, fill = {}, {}
    for L in lengths:
        if args.step_tokens % L:
            raise SystemExit(f"--step-tokens {args.step_tokens} is not a multiple of the row length {L}")
        data = replace(cfg.data, seq_len=L, rows_per_batch=args.step_tokens // L)
        loader = TrainLoader(data, model.vocab, model.sample_shapes(), 0, 1)
        it = iter(loader)
        cached[L] = [next(it) for _ in range(args.batches)]
        loader.close()
        fill[L] = sum(b.n_tokens for b in cached[L]) / sum(b.sample_ids.numel() for b in cached[L])
    iters = {L: itertools.cycle(b) for L, b in cached.items()}
    window = Window(dev, len(trainer.losses))
    times: dict[int, list[float]] = {L: [] for L in lengths}
    tokens = {L: sum(b.n_tokens for b in cached[L]) / len(cached[L]) for L in lengths}
    for L in lengths:  # warm-up
        for _ in range(args.warmup):
            trainer.train_step(iters[L], window)
    for i in range(args.steps // args.block):
        for L in lengths if i % 2 == 0 else lengths[::-1]:
            sync(dev)
            t0 = time.perf_counter()
            for _ in range(args.block):
                trainer.train_step(iters[L], window)
            sync(dev)
            times[L].append((time.perf_counter() - t0) / args.block)
        log(f"block {i + 1}/{args.steps // args.block}: " + ", ".join(f"{L}: {times[L][-1]:.3f} s" for L in lengths))
    tps = {L: tokens[L] / statistics.median(times[L]) for L in lengths}
    # per block pair (both lengths back to back): the longest's real tokens/s over the shortest's
    longest, shortest = lengths[-1], lengths[0]
    pairs = sorted((tokens[longest] / a) / (tokens[shortest] / b) for a, b in zip(times[longest], times[shortest]))
    return {
        "step_tokens": args.step_tokens, "lengths": lengths,
        "rows": {str(L): {"rows_per_step": args.step_tokens // L, "fill": round(fill[L], 4),
                          "real_tokens_per_step": tokens[L], "step_s": round(statistics.median(times[L]), 4),
                          "real_tokens_per_s": round(tps[L], 1)} for L in lengths},
        "longest_over_shortest": round(tps[lengths[-1]] / tps[lengths[0]], 4),  # of the medians; goal >= 1
        "longest_over_shortest_pairs_median": round(statistics.median(pairs), 4),
        "longest_over_shortest_pairs_iqr": [round(pairs[len(pairs) // 4], 4), round(pairs[3 * len(pairs) // 4], 4)],
    }  # fmt: skip


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--steps", type=int, default=120, help="timed steps per loop and setting")
    ap.add_argument("--block", type=int, default=3, help="steps per interleaved block")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batches", type=int, default=8, help="distinct cached batches")
    ap.add_argument("--digits", action="store_true", help="train on the bundled digits (built if missing)")
    ap.add_argument("--allow-random-frozen", action="store_true", help="frozen modules may keep random weights")
    ap.add_argument("--activation-checkpointing", nargs="+", default=None, choices=["off", "on"])
    ap.add_argument("--backends", default="", help="attention backends, comma-separated (default: the config's)")
    ap.add_argument("--kernels", default="", help="torch,fused or one of them (default: the config's)")
    ap.add_argument("--row-lengths", default="", help="compare packed row lengths instead, e.g. 2048,4096")
    ap.add_argument("--step-tokens", type=int, default=8192, help="--row-lengths: row slots per step")
    ap.add_argument("--json-out", default="", help="also write the report here after every setting (a run cut "
                    "short by a time limit keeps the settings it finished: scripts/gpu_check.sh)")  # fmt: skip
    ap.add_argument("overrides", nargs="*")
    return ap.parse_args()


def main() -> None:
    args = _args()
    run_dir = tempfile.mkdtemp(prefix="bench_train_")
    overrides = (DIGITS if args.digits else []) + args.overrides
    # stdout carries the JSON only: the metric records go to metrics.jsonl/TensorBoard (logging still costs)
    overrides += [f"run.dir={run_dir}", "train.max_steps=1000000000", "train.ckpt_every=1000000000"]
    overrides += ["train.metrics=[jsonl,tensorboard]"]
    cfg = load_config(args.config, overrides)
    log(f"building {args.config} ({cfg.engine.kind}, {cfg.engine.precision})")
    t0 = time.time()
    trainer = launch(cfg, allow_random_frozen=args.allow_random_frozen)
    dev = trainer.device
    head = {
        "config": args.config, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "peak_tflops": trainer.peak_tflops, "engine": cfg.engine.kind,
        "deepspeed_config": cfg.engine.deepspeed_config if cfg.engine.kind == "deepspeed" else None,
        "precision": cfg.engine.precision, "torch": torch.__version__, "threads": torch.get_num_threads(),
    }  # fmt: skip
    if args.row_lengths:
        print(json.dumps(head | {"row_lengths": row_lengths(trainer, cfg, args)}, indent=1))
        return
    log(f"built in {time.time() - t0:.0f} s; caching {args.batches} batches")
    it = iter(trainer.loader)
    trainer.loader = CachedBatches([next(it) for _ in range(args.batches)])
    shapes = [batch_shape(b, trainer.flops.num_layers, trainer.cfg.model.mod) for b in trainer.loader.batches]
    tokens = sum(s.tokens for s in shapes) / len(shapes)
    flops = sum(trainer.flops.train_flops(s) for s in shapes) / len(shapes)
    slots = trainer.loader.batches[0].sample_ids.numel()
    backends = args.backends.split(",") if args.backends else [cfg.model.llm.attn_implementation]
    kernels = args.kernels.split(",") if args.kernels else [cfg.model.llm.kernels]
    acs = args.activation_checkpointing or ["on" if cfg.engine.activation_checkpointing else "off"]
    report = head | {
        "tokens_per_step": tokens, "pack_efficiency": round(tokens / slots, 4), "train_flops_per_step": flops,
        "results": [],
    }  # fmt: skip
    for k, b, ac in itertools.product(kernels, backends, acs):  # the first kernels value for every backend first
        report["results"].append(one_setting(trainer, args, flops, tokens, b, k, ac))
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(report))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
