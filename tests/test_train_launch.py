"""Launchers run train.py unchanged: the deepspeed launcher, and the Slurm sbatch template (with stub
``srun``/``scontrol`` standing in for a one-node allocation)."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SMALL

ROOT = Path(__file__).resolve().parent.parent


def _over(shard_dir: Path, run: Path) -> list[str]:
    return SMALL + [
        f"data.train_shards={shard_dir}/digits/train-{{000000..000003}}.tar", f"run.dir={run}", "train.max_steps=2",
        "train.metrics=[console,jsonl]",
    ]  # fmt: skip


def _losses(run: Path) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_deepspeed_launcher_and_torchrun_agree(shard_dir, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    ds = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", "29671"]
    over = [
        *_over(shard_dir, tmp_path / "ds"),
        "engine.kind=deepspeed",
        "engine.deepspeed_config=configs/deepspeed/zero1.json",
    ]
    p = subprocess.run(ds + ["train.py", *over], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    tr = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29672"]
    p = subprocess.run(tr + ["train.py", *_over(shard_dir, tmp_path / "tr")], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert _losses(tmp_path / "ds") == pytest.approx(_losses(tmp_path / "tr"), rel=1e-4)


@pytest.mark.slow
def test_slurm_template_starts_torchrun_with_the_rendezvous_from_slurm(shard_dir, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {
        "scontrol": '#!/usr/bin/env bash\n[ "$1 $2" = "show hostnames" ] && echo localhost\n',
        # one task per node: drop srun's own options and run the command once
        "srun": '#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n',
    }
    for name, text in stubs.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    env = dict(
        os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=sys.executable, SLURM_JOB_NODELIST="node[001]",
        SLURM_JOB_NUM_NODES="1", SLURM_JOB_ID="4242", GPUS_PER_NODE="2", MASTER_PORT="29673",
        SLURM_SUBMIT_DIR=str(ROOT),
    )  # fmt: skip
    run = tmp_path / "slurm"
    cmd = ["bash", "scripts/launch_slurm.sh", *_over(shard_dir, run)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "rendezvous=localhost:29673" in p.stdout and "world 2" in p.stdout
    assert [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())] == [1, 2]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)  # a requeue: same line
    assert p.returncode == 0 and "resumed from" in p.stdout, p.stderr[-3000:]
