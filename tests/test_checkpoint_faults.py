"""Checkpoints under faults: checksums, fsync order, ``latest`` as the truth, fallbacks with a message, file modes,
pickles that must never run, a changed accumulation on resume."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mm.checkpoint import (
    CheckpointError,
    commit_checkpoint,
    digest_files,
    load_tensors,
    read_meta,
    save_tensors,
    staged_files,
    staging_dir,
    verify_checkpoint,
)
from mm.load import load_run
from mm.train.launch import launch

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shard_dir):
    """6 steps of the small model with an EMA (checkpoints at steps 3 and 6); tests work on copies."""
    from mm.config import load_config
    from tests.conftest import SMALL

    run = tmp_path_factory.mktemp("faults") / "run"
    cfg = load_config(
        ROOT / "configs/tiny.yaml",
        SMALL + [f"data.train_shards={shard_dir}/digits/train-{{000000..000003}}.tar", f"run.dir={run}",
                 "train.ema_decay=0.9", "train.metrics=[jsonl]"],
    )  # fmt: skip
    launch(cfg).train()
    return cfg


def _copy(cfg, tmp_path: Path, name: str = "run"):
    shutil.copytree(cfg.run_dir(), tmp_path / name)
    return replace(cfg, run=replace(cfg.run, dir=str(tmp_path / name)))


def _step(cfg, n: int) -> Path:
    return cfg.run_dir() / "checkpoints" / f"step_{n:08d}"


def test_every_file_is_recorded_and_verified(trained, tmp_path):
    cfg = _copy(trained, tmp_path)
    ckpt = _step(cfg, 6)
    meta = read_meta(ckpt)
    assert set(meta["files"]) == set(staged_files(ckpt)) >= {"model.safetensors", "ema.safetensors", "optimizer.pt"}
    assert verify_checkpoint(ckpt) is None
    data = bytearray((ckpt / "optimizer.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other content
    (ckpt / "optimizer.pt").write_bytes(bytes(data))
    assert "optimizer.pt: sha256 differs" in verify_checkpoint(ckpt)
    assert verify_checkpoint(ckpt, ["model.safetensors", "ema.safetensors"]) is None  # what eval reads is intact
    # the ranks share the hashing: rank 1 of 2 hashes the other half of the files and finds nothing
    share = staged_files(ckpt)
    mine = share[1::2]
    assert ("optimizer.pt" in mine) == (verify_checkpoint(ckpt, None, 1, 2) is not None)


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(trained, tmp_path, capsys):
    cfg = _copy(trained, tmp_path)
    weights = _step(cfg, 6) / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size // 2])
    capsys.readouterr()
    _, _, ckpt, step = load_run(cfg.run_dir())  # eval and export: the previous checkpoint, said out loud
    assert (ckpt.name, step) == ("step_00000003", 3)
    said = capsys.readouterr().out
    assert (
        f"checkpoint: skipped step_00000006: model.safetensors has {size // 2} bytes, trainer.json recorded {size} "
        "(truncated); trying the previous one"
    ) in said
    trainer = launch(cfg, resume="auto")  # resume: the same, and training goes on from step 3
    assert trainer.step == 3 and "skipped step_00000006" in capsys.readouterr().out
    trainer.train()
    assert verify_checkpoint(_step(cfg, 6)) is None and (cfg.run_dir() / "checkpoints/latest").read_text() == (
        "step_00000006"
    )
    records = [json.loads(ln) for ln in (cfg.run_dir() / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))


def test_latest_is_the_truth_for_resume_and_eval(trained, tmp_path, capsys):
    cfg = _copy(trained, tmp_path)
    latest = cfg.run_dir() / "checkpoints" / "latest"
    latest.write_text("step_00000003")  # step 6 complete on disk, but never made current
    capsys.readouterr()
    assert load_run(cfg.run_dir())[3] == 3
    assert "ignoring ['step_00000006']" in capsys.readouterr().out
    assert launch(cfg, resume="auto").step == 3
    latest.write_text("step_00000009")  # points at a checkpoint that is gone
    assert load_run(cfg.run_dir())[3] == 6
    assert "names 'step_00000009', not a complete checkpoint" in capsys.readouterr().out
    latest.write_text("step_00000006")
    data = bytearray((_step(cfg, 6) / "optimizer.pt").read_bytes())
    data[-100] ^= 1
    (_step(cfg, 6) / "optimizer.pt").write_bytes(bytes(data))
    assert load_run(cfg.run_dir())[3] == 6  # eval reads the weights only, and they verify
    assert launch(cfg, resume="latest").step == 3  # resume reads the optimizer too: falls back
    assert "skipped step_00000006: optimizer.pt: sha256 differs" in capsys.readouterr().out
    for n in (3, 6):
        (_step(cfg, n) / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no checkpoint of .* verifies"):
        launch(cfg, resume="auto")  # never a silent fresh start over damaged checkpoints


def test_commit_syncs_every_file_before_the_rename_and_the_parent_after(tmp_path, monkeypatch):
    import mm.checkpoint as ck

    events: list[tuple[str, str]] = []
    real_file, real_dir, real_replace = ck.fsync_file, ck.fsync_dir, os.replace
    monkeypatch.setattr(ck, "fsync_file", lambda p: (events.append(("file", str(p))), real_file(p)))
    monkeypatch.setattr(ck, "fsync_dir", lambda p: (events.append(("dir", str(p))), real_dir(p)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("rename", f"{a}->{b}")), real_replace(a, b)))
    run = tmp_path / "run"
    tmp = staging_dir(run, 5)
    (tmp / "deepspeed").mkdir(parents=True)
    save_tensors({"w": torch.ones(3)}, tmp / "model.safetensors")
    (tmp / "deepspeed" / "zero_pp_rank_0_optim_states.pt").write_bytes(b"x" * 10)
    files = digest_files(tmp)
    final = commit_checkpoint(run, 5, {"step": 5, "files": files}, keep=2)
    assert verify_checkpoint(final) is None
    rename = next(i for i, (kind, what) in enumerate(events) if kind == "rename" and what.endswith("step_00000005"))
    synced = {what for kind, what in events[:rename] if kind == "file"}
    assert {str(tmp / f) for f in staged_files(tmp.parent / final.name)} | {str(tmp / "trainer.json")} <= synced
    assert ("dir", str(tmp)) in events[:rename] and ("dir", str(tmp / "deepspeed")) in events[:rename]
    assert ("dir", str(run / "checkpoints")) in events[rename:]  # the rename itself is durable
    pointer = next(i for i, (kind, what) in enumerate(events) if kind == "rename" and what.endswith("/latest"))
    assert pointer > rename and ("dir", str(run / "checkpoints")) in events[pointer:]


@pytest.mark.parametrize("umask", [0o027, 0o002])
def test_checkpoint_and_release_files_get_the_usual_mode(trained, tmp_path, umask):
    from scripts.export_release import export_release

    old = os.umask(umask)
    try:
        cfg = replace(trained, run=replace(trained.run, dir=str(tmp_path / "run")),
                      train=replace(trained.train, max_steps=2, ckpt_every=2))  # fmt: skip
        launch(cfg).train()
        export_release(cfg.run_dir(), tmp_path / "release")
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    files = [p for p in (tmp_path / "run/checkpoints").rglob("*") if p.is_file()]
    files += [p for p in (tmp_path / "release").rglob("*") if p.is_file()]
    assert any(p.name == "model.safetensors" for p in files) and any(p.name == "ema.safetensors" for p in files)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(want) for p in files}


def test_changed_accumulation_resumes_and_says_so(trained, tmp_path, capsys):
    cfg = _copy(trained, tmp_path)
    shutil.rmtree(_step(cfg, 6))
    (cfg.run_dir() / "checkpoints/latest").write_text("step_00000003")
    more = replace(cfg, train=replace(cfg.train, grad_accum_steps=2))
    capsys.readouterr()
    trainer = launch(more, resume="auto")
    assert trainer.step == 3
    assert "train.grad_accum_steps 1 -> 2: 2 micro-batches per step in all (were 1)" in capsys.readouterr().out
    consumed = trainer.loader.consumed
    trainer.train()
    assert trainer.loader.consumed == consumed + 3 * 2  # the data position went on by micro-batches
    assert read_meta(_step(cfg, 6))["grad_accum_steps"] == 2


# ---- pickles planted in DeepSpeed files never run ---------------------------------------------------------


class Payload:
    """Unpickling this runs ``touch <sentinel>``."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def plant_pickles(folder: Path, sentinel: Path) -> None:
    """DeepSpeed-named files (model states, optimizer states, latest) that run a command when unpickled."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        torch.save({"module": Payload(sentinel), "optimizer_state_dict": Payload(sentinel)}, folder / name)


def test_a_pickle_in_a_deepspeed_folder_never_runs(trained, tmp_path):
    sentinel = tmp_path / "PWNED"
    foreign = tmp_path / "ds_checkpoint" / "global_step1"
    plant_pickles(foreign, sentinel)
    (foreign.parent / "latest").write_text("global_step1")
    run = trained.run_dir()
    for where in (foreign, foreign.parent):
        with pytest.raises(CheckpointError, match=r"refused \(it holds (posix|os)\.system, not an allowed type\)"):
            load_run(run, str(where))  # eval's loader; export and the lmms adapter go through it
    from mm.eval.lmms import UnifiedMMLmms

    with pytest.raises(CheckpointError, match="refused"):
        UnifiedMMLmms(run=str(run), checkpoint=str(foreign.parent))
    p = subprocess.run(
        [sys.executable, "scripts/export_release.py", str(run), str(tmp_path / "rel"), "--checkpoint", str(foreign)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )  # fmt: skip
    assert p.returncode != 0 and "system, not an allowed type" in p.stderr and "Traceback" not in p.stderr
    assert not sentinel.exists()
    # planted inside a checkpoint our trainer wrote: eval reads our safetensors and never touches those files
    ckpt = _step(_copy(trained, tmp_path, "ours"), 6)
    plant_pickles(ckpt / "deepspeed", sentinel)
    _, model, used, step = load_run(ckpt.parent.parent)
    assert used == ckpt and step == 6 and not sentinel.exists()
    ema = load_tensors(ckpt / "ema.safetensors")  # and the EMA weights are the ones used
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ema.items())
