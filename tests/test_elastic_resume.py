"""A job requeued on fewer processes: a 2-process DDP run resumed by 1 process.

Resampled sources re-split and continue (said once; the optimizer state, the EMA and every skip count carry over);
exact-epoch sources are refused in one line that says what would work. (DeepSpeed ZeRO's partitioned state:
``tests/test_deepspeed_runs.py``.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from mm.checkpoint import read_meta
from mm.config import load_config
from mm.train.launch import launch
from tests.conftest import SMALL

ROOT = Path(__file__).resolve().parent.parent
RESAMPLED = ("data.sources=[{name: digits_vqa, kind: conversation, resample: true}, "
             "{name: digits_t2i, kind: generation, resample: true}]")  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


def _env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def _overrides(shards: str, run: Path, *extra: str) -> list[str]:
    return SMALL + [f"data.train_shards={shards}", f"run.dir={run}", "train.max_steps=2", "train.ckpt_every=2",
                    "train.ema_decay=0.9", "train.metrics=[jsonl]", *extra]  # fmt: skip


def _two_processes(over: list[str], port: int) -> None:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"]
    p = subprocess.run(torchrun + ["train.py", *over], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=900)  # fmt: skip
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]


def _skips(states: list[dict]) -> Counter:
    total: Counter = Counter()
    for s in states:
        total.update(s["skipped"])
        for w in s["worker_states"].values():
            total.update(w["skipped"])
    return total


def test_two_processes_resume_as_one(shard_dir, tmp_path, capsys):
    from tests.test_data import corrupt_shard

    # one damaged shard, so the ranks saved skip counts that must survive the re-split
    corrupt_shard(f"{shard_dir}/digits/train-000000.tar", tmp_path / "mixed-0.tar", every=3)
    (tmp_path / "mixed-1.tar").write_bytes((shard_dir / "digits" / "train-000001.tar").read_bytes())
    shards = f"{tmp_path}/mixed-{{0..1}}.tar"

    # resampled sources: re-split and continue
    run = tmp_path / "resampled"
    _two_processes(_overrides(shards, run, RESAMPLED), 29771)
    meta = read_meta(run / "checkpoints/step_00000002")
    assert meta["world_size"] == 2 and sum(_skips(meta["loaders"]).values()) > 0
    cfg = load_config(ROOT / "configs/tiny.yaml", _overrides(shards, run, RESAMPLED, "train.max_steps=4"))
    capsys.readouterr()
    trainer = launch(cfg, resume="latest")
    said = capsys.readouterr().out
    assert "resume: saved with 2 process(es) x 1 data worker(s), now 1 x 1: resampled sources re-split" in said
    assert "data: rank 0: re-split for 1 rank(s) x 1 worker(s) (saved with 2 x 1)" in said
    assert trainer.step == 2 and trainer.loader.skip_counts() == dict(_skips(meta["loaders"]))
    steps = [s["step"].item() for s in trainer.engine.optimizer.state.values()]
    assert steps and set(steps) == {2.0}  # AdamW's moments and step counts carried over
    trainer.train()
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all(r["loss"] > 0 for r in records)
    assert read_meta(run / "checkpoints/step_00000004")["world_size"] == 1

    # exact-epoch sources: refused in one line, before any model is built
    run = tmp_path / "exact"
    _two_processes(_overrides(shards, run), 29772)
    p = subprocess.run([sys.executable, "train.py", *_overrides(shards, run, "train.max_steps=4"), "--resume", "auto"],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)  # fmt: skip
    err = p.stderr.strip()
    assert p.returncode != 0 and "Traceback" not in err and len(err.splitlines()) == 1, p.stderr[-3000:]
    assert "saved with 2 process(es) x 1 data worker(s), resuming with 1 x 1" in err
    assert "read exact epochs" in err
    assert "resume with 2 process(es) and data.num_workers=1, or set resample: true" in err
