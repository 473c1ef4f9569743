"""Runs our trainer wrote under DeepSpeed ZeRO-2 and ZeRO-3 (2 processes, CPU/gloo) are evaluated and exported by
our own code, with their EMA weights; DeepSpeed's files are consolidated without pickle (checked against
DeepSpeed's own ``zero_to_fp32`` and its ``safe_get_full_fp32_param``), and a pickle planted in them never runs.

Each run takes ~50 s on 2 shared cores (two processes importing torch, DeepSpeed's start-up): ZeRO-3 runs in the
default suite, ZeRO-2 with ``-m slow``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mm.checkpoint import load_deepspeed_weights, load_tensors, read_meta, verify_checkpoint
from mm.load import load_run
from tests.conftest import SMALL
from tests.test_checkpoint_faults import Payload

ROOT = Path(__file__).resolve().parent.parent
PORTS = iter(range(29720, 29760))
# resampled sources: a changed process count would re-split them; what stops a ZeRO resume is the optimizer state
RESAMPLED = ("data.sources=[{name: digits_vqa, kind: conversation, resample: true}, "
             "{name: digits_t2i, kind: generation, resample: true}]")  # fmt: skip


def _env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def _overrides(shard_dir: Path, run: Path, stage: int) -> list[str]:
    return SMALL + [
        f"data.train_shards={shard_dir}/digits/train-{{000000..000003}}.tar", f"run.dir={run}", "train.max_steps=4",
        "train.ckpt_every=4", "train.ema_decay=0.9", "train.metrics=[jsonl]", "engine.kind=deepspeed",
        f"engine.deepspeed_config=configs/deepspeed/zero{stage}.json", RESAMPLED,
    ]  # fmt: skip


def _zero_run(stage: int, shard_dir: Path, base: Path) -> Path:
    run = base / f"zero{stage}"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={next(PORTS)}"]
    p = subprocess.run(torchrun + ["train.py", *_overrides(shard_dir, run, stage)], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=900)  # fmt: skip
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return run


def _evaluates_and_exports(stage: int, run: Path, tmp_path: Path) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from scripts.export_release import export_release

    ckpt = run / "checkpoints" / "step_00000004"
    meta = read_meta(ckpt)
    assert meta["world_size"] == 2 and meta["engine"] == "deepspeed" and verify_checkpoint(ckpt) is None
    assert not list(ckpt.glob("zero_to_*.py"))  # DeepSpeed's pickle-loading scripts are not shipped
    model_w, ema_w = load_tensors(ckpt / "model.safetensors"), load_tensors(ckpt / "ema.safetensors")
    # our consolidation of DeepSpeed's partitions == DeepSpeed's own gather (model.safetensors) == zero_to_fp32
    ours, found_stage = load_deepspeed_weights(ckpt / "deepspeed")
    assert found_stage == stage
    reference = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="deepspeed")  # trusted files: our test
    assert set(ours) == set(reference) and all(torch.equal(ours[k], reference[k].float()) for k in ours)
    assert all(torch.equal(ours[k], model_w[k]) for k in ema_w)

    # eval: EMA weights, from our files
    p = subprocess.run([sys.executable, "eval.py", "--run", str(run), "--tasks", "digits_vqa", "eval.limit=8"],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)  # fmt: skip
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert f"loaded ema weights of {ckpt}" in p.stdout
    results = json.loads((run / "eval" / "results.json").read_text())
    assert results["computed_from"]["digits_vqa"]["model"]["weights"] == "ema"
    _, model, used, step = load_run(run)
    assert used == ckpt and step == 4
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in ema_w.items())
    assert any(not torch.equal(ema_w[k], model_w[k]) for k in ema_w)

    # export: the same EMA weights, and the card shows the result computed from them
    out = export_release(run, tmp_path / "release")
    release = load_tensors(out / "model.safetensors")
    assert all(torch.equal(release[k], v) for k, v in ema_w.items())
    assert json.loads((out / "release.json").read_text())["source"]["weights"] == "ema"
    assert "| digits_vqa | accuracy |" in (out / "README.md").read_text()

    # a pickle planted in DeepSpeed's files of this checkpoint: eval, export and lmms read our safetensors only
    sentinel = tmp_path / "PWNED"
    for f in (ckpt / "deepspeed").glob("*.pt"):  # every DeepSpeed file replaced by a payload of the same name
        torch.save({"module": Payload(sentinel), "optimizer_state_dict": Payload(sentinel)}, f)
    load_run(run)
    export_release(run, tmp_path / "release2")
    from mm.eval.lmms import UnifiedMMLmms

    UnifiedMMLmms(run=str(run))
    assert not sentinel.exists()
    problem = verify_checkpoint(ckpt)  # resume would skip this checkpoint before DeepSpeed reads a byte of it
    assert problem is not None and problem.startswith("deepspeed/")


def _world_change_is_refused(run: Path, shard_dir: Path) -> None:
    """1 process resuming ZeRO state of 2: one line, before any engine or model is built."""
    args = [sys.executable, "train.py", *_overrides(shard_dir, run, 3), "--resume", "latest"]
    p = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    err = p.stderr.strip()
    assert p.returncode != 0 and "Traceback" not in err and len(err.splitlines()) == 1, p.stderr[-3000:]
    assert "partitioned over 2 process(es), resuming with 1" in err and "universal checkpoint" in err


def test_zero3_run_evaluates_and_exports_with_our_code(shard_dir, tmp_path):
    run = _zero_run(3, shard_dir, tmp_path)
    _world_change_is_refused(run, shard_dir)
    _evaluates_and_exports(3, run, tmp_path)


@pytest.mark.slow
def test_zero2_run_evaluates_and_exports_with_our_code(shard_dir, tmp_path):
    _evaluates_and_exports(2, _zero_run(2, shard_dir, tmp_path), tmp_path)
