"""Engines: loss parity (DDP, ZeRO-1/2/3, accumulation), killed ranks resume exactly, non-finite steps, precision.

Tolerances (fp32 on CPU, 20 steps of the small model, per-step logged losses and grad norms):
  * 2-process DDP vs 1 process with doubled accumulation: rel 1e-4 (the same sums, reduced in another order)
  * DeepSpeed ZeRO-1/2/3 vs DDP: rel 1e-4; consolidated weights and EMA abs 1e-4
  * DeepSpeed bf16 (fp32 master) vs fp32 DDP: rel 1e-2 on the losses (slow; measured ~1.3e-3)
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mm.batch import collate
from mm.checkpoint import load_model_weights, read_meta
from mm.config import load_config
from mm.model.unified import UnifiedModel, build_model
from mm.sequence import image_generation_sample, understanding_sample
from mm.train.launch import launch
from mm.train.trainer import Trainer
from tests.conftest import SMALL

ROOT = Path(__file__).resolve().parent.parent
STEPS = 20
KEYS = ("loss", "text", "flow", "repa", "grad_norm")
PORTS = iter(range(29640, 29700))


pytestmark = pytest.mark.usefixtures("one_thread")


def _overrides(shard_dir: Path, run: Path, *extra: str) -> list[str]:
    return SMALL + [
        f"data.train_shards={shard_dir}/digits/train-{{000000..000003}}.tar",
        f"data.heldout_shards={shard_dir}/digits/heldout-000000.tar",
        f"run.dir={run}", f"train.max_steps={STEPS}", "train.ckpt_every=20", "train.ema_decay=0.9",
        "train.warmup_steps=5", "train.metrics=[console,jsonl]", *extra,
    ]  # fmt: skip


def _env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def _torchrun(nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={next(PORTS)}"]


def _train_2proc(over: list[str]) -> None:
    p = subprocess.run(
        _torchrun() + ["train.py", *over], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_losses(a: list[dict], b: list[dict], rel: float, keys=KEYS) -> float:
    """Per-step equality of the logged losses; returns the largest relative difference seen."""
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    worst = 0.0
    for ra, rb in zip(a, b):
        for k in keys:
            if ra[k] is None or rb[k] is None:  # a step without that task: both must lack it
                assert ra[k] is rb[k] is None, (ra["step"], k, ra[k], rb[k])
                continue
            assert ra[k] == pytest.approx(rb[k], rel=rel, abs=1e-6), (ra["step"], k, ra[k], rb[k])
            worst = max(worst, abs(ra[k] - rb[k]) / max(abs(rb[k]), 1e-6))
    return worst


def _assert_same_weights(a: Path, b: Path, atol: float) -> None:
    for ema in (False, True):
        wa, wb = load_model_weights(a, ema=ema), load_model_weights(b, ema=ema)
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wa[k].float(), wb[k].float(), rtol=0, atol=atol, msg=f"{k} (ema={ema})")


@pytest.fixture(scope="module")
def ddp_reference(shard_dir, tmp_path_factory) -> Path:
    """20 uninterrupted steps of 2-process DDP (the reference of the parity and kill tests)."""
    run = tmp_path_factory.mktemp("ddp") / "run"
    _train_2proc(_overrides(shard_dir, run))
    return run


class _TwoRankStreams:
    """The batches rank 0 and rank 1 of a 2-process run would see, alternately, for one process."""

    def __init__(self, trainer_cfg, vocab, shapes):
        from data.loader import TrainLoader

        self.streams = [TrainLoader(trainer_cfg.data, vocab, shapes, rank, 2) for rank in range(2)]

    def __iter__(self):
        its = [iter(s) for s in self.streams]
        while True:
            for it in its:
                yield next(it)

    def state_dict(self) -> dict:
        return {"ranks": [s.state_dict() for s in self.streams]}

    def load_state_dict(self, state: dict) -> None:
        for s, st in zip(self.streams, state["ranks"]):
            s.load_state_dict(st)

    def skip_counts(self) -> dict[str, int]:
        return {}


def test_two_processes_equal_one_process_with_doubled_accumulation(ddp_reference, shard_dir, tmp_path):
    """Global loss normalisation: 2 ranks x 1 micro-batch == 1 rank x 2 micro-batches, step by step."""
    cfg = load_config(ROOT / "configs/tiny.yaml", _overrides(shard_dir, tmp_path / "accum", "train.grad_accum_steps=2"))
    model = build_model(cfg.model)
    launch(cfg, loader=_TwoRankStreams(cfg, model.vocab, model.sample_shapes())).train()
    worst = _assert_same_losses(_metrics(tmp_path / "accum"), _metrics(ddp_reference), rel=1e-4)
    print(f"2-process DDP vs 1 process x 2 accumulation: worst relative difference {worst:.2e}")
    _assert_same_weights(
        tmp_path / "accum/checkpoints/step_00000020", ddp_reference / "checkpoints/step_00000020", 1e-4
    )


def _zero_parity(stage: int, ddp_reference: Path, shard_dir: Path, run: Path, *extra: str) -> float:
    ds = ["engine.kind=deepspeed", f"engine.deepspeed_config=configs/deepspeed/zero{stage}.json", *extra]
    _train_2proc(_overrides(shard_dir, run, *ds))
    worst = _assert_same_losses(_metrics(run), _metrics(ddp_reference), rel=1e-4)
    _assert_same_weights(run / "checkpoints/step_00000020", ddp_reference / "checkpoints/step_00000020", 1e-4)
    ckpt = run / "checkpoints/step_00000020"
    from mm.train.engine import deepspeed_safe_types

    for f in ckpt.rglob("*.pt"):  # DeepSpeed's own files load without arbitrary pickle
        with torch.serialization.safe_globals(deepspeed_safe_types()):
            torch.load(f, weights_only=True)
    print(f"ZeRO-{stage} vs DDP: worst relative difference {worst:.2e}")
    return worst


def test_zero3_matches_ddp(ddp_reference, shard_dir, tmp_path):
    _zero_parity(3, ddp_reference, shard_dir, tmp_path / "zero3")


@pytest.mark.slow
def test_zero3_with_mod_and_v2pe_matches_ddp(shard_dir, tmp_path):
    """p-MoD routers and V2PE under ZeRO-3: every rank calls every router whatever its batch holds."""
    extra = ("model.mod.enabled=true", "model.mod.ratio=0.5", "model.v2pe.enabled=true")
    ddp = tmp_path / "ddp"
    _train_2proc(_overrides(shard_dir, ddp, *extra))
    _zero_parity(3, ddp, shard_dir, tmp_path / "zero3", *extra)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_zero_stages_match_ddp(stage, ddp_reference, shard_dir, tmp_path):
    _zero_parity(stage, ddp_reference, shard_dir, tmp_path / f"zero{stage}")


@pytest.mark.slow
def test_zero2_with_optimizer_offload_matches_ddp(ddp_reference, shard_dir, tmp_path):
    _zero_parity(2, ddp_reference, shard_dir, tmp_path / "offload", "engine.offload_optimizer=true")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_bf16_tracks_fp32(stage, ddp_reference, shard_dir, tmp_path):
    """bf16 weights with an fp32 master copy: close to the fp32 run, not equal."""
    run = tmp_path / f"bf16_{stage}"
    _train_2proc(
        _overrides(
            shard_dir,
            run,
            "engine.kind=deepspeed",
            f"engine.deepspeed_config=configs/deepspeed/zero{stage}.json",
            "engine.precision=bf16",
        )  # fmt: skip
    )
    worst = _assert_same_losses(_metrics(run), _metrics(ddp_reference), rel=1e-2, keys=("loss", "text", "flow"))
    print(f"ZeRO-{stage} bf16 vs fp32 DDP: worst relative difference {worst:.2e}")


# ---- fault tolerance ------------------------------------------------------------------------------
def _workers(pid: int) -> list[int]:
    """Child processes of ``pid`` (torchrun's workers)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _kill_during(over: list[str], log: Path, rng: random.Random, mode: str) -> str:
    """Start 2-process training with --resume auto and SIGKILL one worker mid-step or right as it saves."""
    proc = subprocess.Popen(
        _torchrun() + ["train.py", *over, "--resume", "auto"], cwd=ROOT, env=_env(), stdout=log.open("w"),
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    target = rng.randrange(2, STEPS - 1, 2) if mode == "save" else rng.randint(1, STEPS - 2)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            steps = [ln for ln in log.read_text().splitlines() if ln.startswith("step ")]
            last = int(steps[-1].split()[1].split("/")[0]) if steps else 0
            # "save": a checkpoint step's line is printed just before its save starts; kill right then
            if last >= target and (mode == "step" or last % 2 == 0):
                time.sleep(rng.uniform(0.0, 0.3) if mode == "step" else 0.0)
                os.kill(rng.choice(_workers(proc.pid)), signal.SIGKILL)
                proc.wait(timeout=120)
                return f"{mode}: killed a worker after step {last}"
            time.sleep(0.02)
        proc.wait(timeout=120)
        return "finished before the kill"
    finally:
        if proc.poll() is None:
            proc.kill()


def _kill_and_resume(ddp_reference: Path, shard_dir: Path, run: Path, modes: list[str], *extra: str) -> list[str]:
    over = _overrides(shard_dir, run, "train.ckpt_every=2", "train.keep_checkpoints=2", *extra)
    rng = random.Random(0)
    events = [_kill_during(over, run.parent / f"log{i}.txt", rng, m) for i, m in enumerate(modes)]
    print(events)
    _train_2proc(over + ["--resume", "auto"])
    assert read_meta(run / "checkpoints/step_00000020")["step"] == STEPS
    _assert_same_losses(_metrics(run), _metrics(ddp_reference), rel=1e-5)
    return events


def test_killed_rank_resumes_with_the_same_losses(ddp_reference, shard_dir, tmp_path):
    """SIGKILL a worker right as a checkpoint is written; `--resume auto` ends where the uninterrupted run
    ends, step by step (no data position lost, no half-written checkpoint used). Five kills: -m slow."""
    events = _kill_and_resume(ddp_reference, shard_dir, tmp_path / "killed", ["save"])
    assert any(e.startswith("save: killed") for e in events)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "zero2"])
def test_five_random_kills_resume_with_the_same_losses(engine, ddp_reference, shard_dir, tmp_path):
    extra = [] if engine == "ddp" else ["engine.kind=deepspeed", "engine.deepspeed_config=configs/deepspeed/zero2.json"]
    modes = ["step", "save", "step", "save", "step"]
    events = _kill_and_resume(ddp_reference, shard_dir, tmp_path / "killed", modes, *extra)
    assert sum(e.startswith(("save: killed", "step: killed")) for e in events) >= 4


# ---- non-finite steps -----------------------------------------------------------------------------
def _poison(trainer: Trainer, bad_steps: set[int]) -> None:
    """Make the loss NaN on the given (1-based) steps, as a diverging run would."""
    combine = trainer.model.combine

    def poisoned(out, counts):
        loss = combine(out, counts)
        return loss * float("nan") if trainer.step + 1 in bad_steps else loss

    trainer.model.combine = poisoned


def test_nonfinite_steps_are_skipped_and_counted(small_cfg):
    cfg = replace(small_cfg, train=replace(small_cfg.train, ema_decay=0.9, max_steps=5, ckpt_every=5))
    trainer = launch(cfg)
    _poison(trainer, {2, 3})
    before = {}

    def snapshot():
        return [p.detach().clone() for _, p in trainer.engine.trainable] + [s.clone() for s in trainer.ema.shards]

    trainer.train(until=1)
    before = snapshot()
    trainer.train(until=3)  # two poisoned steps: nothing moves, not even Adam's step count
    after = snapshot()
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(s["step"] == 1 for s in trainer.engine.optimizer.state.values())
    trainer.train()
    recs = _metrics(cfg.run_dir())
    assert [r["nonfinite_steps"] for r in recs] == [0, 1, 2, 2, 2]
    assert recs[1]["loss"] is None and recs[3]["loss"] > 0  # a window of only skipped steps has no loss
    assert read_meta(cfg.run_dir() / "checkpoints/step_00000005")["nonfinite_steps"] == 2


def test_a_run_of_nonfinite_steps_stops_with_a_clear_message(small_cfg):
    cfg = replace(small_cfg, train=replace(small_cfg.train, max_nonfinite_steps=3, log_every=2))
    trainer = launch(cfg)
    _poison(trainer, set(range(2, 100)))
    with pytest.raises(RuntimeError, match="3 steps in a row .* non-finite"):
        trainer.train()
    assert trainer.step == 4  # noticed at the first log step that saw 3 in a row (no per-step host sync)


# ---- precision ------------------------------------------------------------------------------------
def test_bf16_autocast_keeps_positions_and_flow_in_fp32(small_cfg):
    cfg = replace(small_cfg, engine=replace(small_cfg.engine, precision="bf16_autocast"))
    trainer = launch(cfg)
    seen = {}
    rotary = trainer.model.llm.get_decoder().rotary_emb
    rotary.register_forward_hook(
        lambda m, args, kwargs, out: seen.update(pos=(list(args) + list(kwargs.values()))[1].dtype), with_kwargs=True
    )
    lm_head = trainer.model.llm.get_output_embeddings()
    lm_head.register_forward_hook(lambda m, args, out: seen.update(head=out.dtype))
    batch = next(iter(trainer.loader))
    batch = trainer.model.add_draws(batch, torch.Generator().manual_seed(0))
    with trainer.precision.autocast(trainer.device):
        out = trainer.model(batch)
    assert seen["pos"] == torch.float32  # V2PE: fractional positions never pass through bf16
    assert seen["head"] == torch.bfloat16  # the matmuls do run in bf16
    assert out["flow_per_image"].dtype == torch.float32 and out["text_sum"].dtype == torch.float32
    trainer.train()
    assert all(r["loss"] > 0 for r in _metrics(cfg.run_dir()))


def test_bf16_weights_need_deepspeed(small_cfg):
    from mm.schema import ConfigError

    cfg = replace(small_cfg, engine=replace(small_cfg.engine, precision="bf16"))
    with pytest.raises(ConfigError, match="engine.kind=deepspeed"):
        launch(cfg)


def test_deepspeed_json_may_not_set_what_the_yaml_owns(small_cfg, tmp_path):
    from mm.schema import ConfigError
    from mm.train.engine import deepspeed_config
    from mm.train.precision import PRECISIONS

    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 4}))
    cfg = replace(small_cfg, engine=replace(small_cfg.engine, kind="deepspeed", deepspeed_config=str(bad)))
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        deepspeed_config(cfg.train, cfg.engine, 2, PRECISIONS["bf16"], torch.device("cpu"))
    good = replace(
        cfg, engine=replace(cfg.engine, deepspeed_config="configs/deepspeed/zero3.json", offload_optimizer=True)
    )
    ds = deepspeed_config(
        replace(good.train, grad_accum_steps=4), good.engine, 8, PRECISIONS["bf16"], torch.device("cpu")
    )
    assert ds["train_batch_size"] == 32 and ds["gradient_accumulation_steps"] == 4 and ds["bf16"]["enabled"]
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


# ---- ZeRO-3 needs the same modules on every rank ---------------------------------------------------
def test_run_every_module_runs_the_same_modules_whatever_the_batch_holds(small_cfg, vocab):
    """Under DeepSpeed each rank runs every module in one order (ZeRO-3 gathers weights per module with a
    collective), whether its batch holds understanding samples, generation samples or both; the
    placeholders change neither the losses nor the gradients."""
    torch.manual_seed(0)
    model = UnifiedModel(small_cfg.model, vocab)
    gen = [image_generation_sample(vocab, model.heads["flow"].template, torch.rand(1, 8, 8), "draw the digit 3")]
    und = [understanding_sample(vocab, torch.rand(3, 8, 8), model.und.tokens_per_image, "what digit is this ?", "3")]
    batches = {name: collate([[s] for s in samples], 40, vocab.pad) for name, samples in
               {"gen_only": gen, "und_only": und, "both": gen + und}.items()}  # fmt: skip
    order: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: order.append(n)) for n, m in model.named_modules() if n]

    def run(batch, every):
        model.require_every_module(every)
        model.zero_grad()
        order.clear()
        out = model(model.add_draws(batch, torch.Generator().manual_seed(0)))
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out, list(order), grads

    orders = {}
    for name, batch in batches.items():
        plain, _, plain_grads = run(batch, False)
        out, orders[name], grads = run(batch, True)
        assert out["loss"] == plain["loss"]
        for n, g in grads.items():  # modules the batch does not use get zero gradients, the rest the same
            torch.testing.assert_close(g, plain_grads.get(n, torch.zeros_like(g)), rtol=0, atol=0)
    assert orders["gen_only"] == orders["und_only"] == orders["both"]
    for h in hooks:
        h.remove()


@pytest.mark.slow
def test_deepspeed_skips_nonfinite_steps(small_cfg, stage=2):
    """DeepSpeed detects the non-finite gradient itself; the trainer counts it, and nothing moves.
    (One stage per process: DeepSpeed keeps its process groups in module state.)"""
    import torch.distributed as dist

    engine = replace(small_cfg.engine, kind="deepspeed", deepspeed_config=f"configs/deepspeed/zero{stage}.json")
    cfg = replace(small_cfg, engine=engine, train=replace(small_cfg.train, ema_decay=0.9, max_steps=4, ckpt_every=4))
    try:
        trainer = launch(cfg)
        _poison(trainer, {2})
        trainer.train(until=1)
        before = [s.clone() for s in trainer.ema.shards] + [s.clone() for s in trainer.engine.local_shards()]
        trainer.train(until=2)
        after = [s.clone() for s in trainer.ema.shards] + [s.clone() for s in trainer.engine.local_shards()]
        assert all(torch.equal(a, b) for a, b in zip(before, after))
        trainer.train()
        assert [r["nonfinite_steps"] for r in _metrics(cfg.run_dir())] == [0, 1, 1, 1]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
