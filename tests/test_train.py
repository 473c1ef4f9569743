"""Training end to end: exact resume, metrics, checkpoints, eval, bad input, DDP."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mm.train.launch import launch

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_gives_the_same_losses_as_uninterrupted(small_cfg, tmp_path):
    small_cfg = replace(small_cfg, train=replace(small_cfg.train, ema_decay=0.9))
    full = replace(small_cfg, run=replace(small_cfg.run, dir=str(tmp_path / "full")))
    launch(full).train()
    cut = replace(small_cfg, run=replace(small_cfg.run, dir=str(tmp_path / "cut")))
    launch(cut).train(until=3)  # "interrupted" after the step-3 checkpoint
    (tmp_path / "cut" / "metrics.jsonl").open("a").write('{"step": 4, "loss": 123.0}\n')  # logged, not saved
    launch(cut, resume="latest").train()
    a, b = _metrics(tmp_path / "full"), _metrics(tmp_path / "cut")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        for k in ("loss", "text", "flow", "repa", "grad_norm", "lr"):
            if ra[k] is None or rb[k] is None:  # a step without that task (None = no such samples)
                assert ra[k] is rb[k] is None, (ra["step"], k)
                continue
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-7), (ra["step"], k)
    # the EMA weights carried over too, and evaluation loads them

    from mm.checkpoint import load_tensors
    from mm.load import load_run

    ema = [load_tensors(tmp_path / r / "checkpoints/step_00000006/ema.safetensors") for r in ("full", "cut")]
    model = load_tensors(tmp_path / "full/checkpoints/step_00000006/model.safetensors")
    for k in ema[0]:
        torch.testing.assert_close(ema[0][k], ema[1][k], rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(ema[0][k], model[k]) for k in ema[0])
    _, loaded, _, step = load_run(tmp_path / "full")
    assert step == 6
    assert all(torch.equal(v, ema[0].get(k, model.get(k))) for k, v in loaded.state_dict().items())


def test_checkpoints_are_complete_pruned_and_guarded(small_cfg):
    run = small_cfg.run_dir()
    launch(small_cfg).train()
    steps = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert steps == ["step_00000003", "step_00000006"]
    assert (run / "checkpoints" / "latest").read_text() == "step_00000006"
    ckpt = run / "checkpoints" / "step_00000006"
    names = {p.name for p in ckpt.iterdir()}
    assert names >= {"model.safetensors", "optimizer.pt", "rng_rank0.pt", "config.yaml", "trainer.json"}
    meta = json.loads((ckpt / "trainer.json").read_text())
    assert meta["step"] == 6 and len(meta["loaders"]) == 1 and meta["loaders"][0]["consumed"] == 6
    with pytest.raises(FileExistsError, match="--resume auto"):
        launch(small_cfg)
    short = replace(small_cfg, train=replace(small_cfg.train, max_steps=2, ckpt_every=1))
    launch(short, overwrite=True).train()  # starting over leaves no stale step_00000006 behind
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000001", "step_00000002"]
    assert [r["step"] for r in _metrics(run)] == [1, 2]
    launch(small_cfg, overwrite=True).train()
    meta["world_size"] = 2
    (ckpt / "trainer.json").write_text(json.dumps(meta))
    from mm.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="saved with 2 process.*exact epochs"):  # exact-epoch sources
        launch(small_cfg, resume="latest")


def test_metrics_report_every_step_with_task_losses(small_cfg):
    launch(small_cfg).train()
    recs = _metrics(small_cfg.run_dir())
    assert [r["step"] for r in recs] == list(range(1, 7))
    for r in recs:
        assert {"loss", "text", "flow", "repa", "tokens_per_s", "tflops_per_device", "eta_s", "skipped", "lr"} <= set(r)
        assert all(r[k] is None or r[k] >= 0 for k in ("text", "flow")) and 0.5 < r["pack_efficiency"] <= 1
    # a 2-row batch may hold one task only (the best-fit packer groups samples by length): None then
    assert any((r["text"] or 0) > 0 for r in recs) and any((r["flow"] or 0) > 0 for r in recs)


def test_bad_samples_in_training_are_reported_in_metrics(small_cfg, shard_dir, tmp_path):
    from tests.test_data import corrupt_shard

    n_bad = corrupt_shard(f"{shard_dir}/digits/train-000000.tar", tmp_path / "bad.tar", every=3)
    cfg = replace(small_cfg, data=replace(small_cfg.data, train_shards=str(tmp_path / "bad.tar")))
    launch(cfg).train()
    skipped = _metrics(cfg.run_dir())[-1]["skipped"]
    assert 0 < sum(skipped.values()) <= n_bad


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, **kw)


def _cli_overrides(small_cfg) -> list[str]:
    from tests.conftest import SMALL

    d = small_cfg.data
    return SMALL + [f"data.train_shards={d.train_shards}", f"data.heldout_shards={d.heldout_shards}"]


def test_cli_train_then_eval_writes_results_and_pictures(small_cfg, tmp_path):
    run = tmp_path / "cli"
    over = _cli_overrides(small_cfg) + [f"run.dir={run}", "train.max_steps=4", "train.log_every=2"]
    p = _run([sys.executable, "train.py", *over])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "step 4/4" in p.stdout and "tok/s" in p.stdout and "eta" in p.stdout
    p = _run([sys.executable, "eval.py", "--run", str(run), "--tasks", "digits_vqa,digits_t2i", "eval.limit=40",
              "eval.images_per_prompt=4", "model.heads.flow.sample_steps=3"])  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((run / "eval" / "results.json").read_text())
    assert 0 <= res["digits_vqa"]["accuracy"] <= 1 and res["digits_vqa"]["n"] == 40
    t2i = res["digits_t2i"]
    assert {"classifier_accuracy", "fd", "fd_real_floor", "fd_noise_ceiling", "classifier_heldout_accuracy"} <= set(t2i)
    assert t2i["fd_real_floor"] < t2i["fd_noise_ceiling"] and t2i["classifier_heldout_accuracy"] > 0.95
    pngs = {p.name for p in (run / "eval").glob("*.png")}
    assert {"samples_grid.png", "samples_digit_0.png", "samples_digit_9.png", "loss_curve.png"} <= pngs


def test_cli_rejects_bad_config_at_start(tmp_path):
    p = _run([sys.executable, "train.py", "train.max_stepz=3", f"run.dir={tmp_path}"])
    assert p.returncode != 0 and "max_stepz" in p.stderr
    p = _run([sys.executable, "train.py", "data.train_shards=/nonexistent/x-{0..1}.tar", f"run.dir={tmp_path}"])
    assert p.returncode != 0 and "/nonexistent/x-0.tar" in p.stderr


def test_torchrun_ddp_two_processes(small_cfg, shard_dir, tmp_path):
    from tests.test_data import corrupt_shard

    # one corrupt shard: ranks meet different bad samples and must still agree on the skip report
    corrupt_shard(f"{shard_dir}/digits/train-000000.tar", tmp_path / "mixed-0.tar", every=4)
    (tmp_path / "mixed-1.tar").write_bytes((shard_dir / "digits" / "train-000001.tar").read_bytes())
    run = tmp_path / "ddp"
    over = _cli_overrides(small_cfg) + [
        f"run.dir={run}", "train.max_steps=4", "train.ckpt_every=2", f"data.train_shards={tmp_path}/mixed-{{0..1}}.tar"
    ]  # fmt: skip
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533"]
    p = _run(torchrun + ["train.py", *over])
    assert p.returncode == 0, p.stderr[-3000:]
    meta = json.loads((run / "checkpoints" / "step_00000004" / "trainer.json").read_text())
    assert meta["world_size"] == 2 and len(meta["loaders"]) == 2
    assert meta["loaders"][0] != meta["loaders"][1]
    p = _run(torchrun + ["train.py", *over, "train.max_steps=6", "--resume", "latest"])
    assert p.returncode == 0, p.stderr[-3000:]
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 7))
    assert sum(recs[-1]["skipped"].values()) > 0


def test_rgb_photos_train_and_sample_through_the_generic_path(small_cfg, shard_dir, tmp_path):
    """scikit-image photos (RGB, 32 px) resized for a 16 px, 3-channel generation path."""
    over = [
        f"data.train_shards={shard_dir}/smoke/smoke-000000.tar", "data.shuffle_buffer=4", "data.seq_len=64",
        "model.und.tower.image_size=16", "model.und.tower.patch_size=4", "model.heads.flow.autoencoder.image_size=16",
        "model.heads.flow.autoencoder.image_channels=3", "model.heads.flow.autoencoder.latent_channels=3",
        "model.heads.flow.codec.patch_size=4",
        "train.max_steps=3", f"run.dir={tmp_path}/rgb",
    ]  # fmt: skip
    from mm.config import load_config

    cfg = load_config(ROOT / "configs/tiny.yaml", _cli_overrides(small_cfg)[:-2] + over)
    trainer = launch(cfg)
    trainer.train()
    assert all(r["flow"] > 0 and r["text"] > 0 for r in _metrics(cfg.run_dir()))
    images = trainer.model.eval().generate(["a photo of a cat"], steps=2)
    assert images.shape == (1, 3, 16, 16)
    assert trainer.model.answer(images, ["what is in this photo ?"])[0] is not None


def test_resume_auto_starts_fresh_then_skips_a_checkpoint_cut_off_mid_write(small_cfg):
    run = small_cfg.run_dir()
    launch(small_cfg, resume="auto").train(until=3)  # nothing to resume: a fresh start
    staging = run / "checkpoints" / ".tmp_step_00000006"  # a job killed while writing step 6
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"half a file")
    trainer = launch(small_cfg, resume="auto")
    assert trainer.step == 3
    trainer.train()
    assert [r["step"] for r in _metrics(run)] == list(range(1, 7))
    assert (run / "checkpoints" / "step_00000006" / "trainer.json").is_file()


def test_next_stage_starts_from_the_previous_one_and_references_frozen_weights(small_cfg, tmp_path):
    """Stage 2 freezes the LLM it got from stage 1 (train.init_from): its checkpoints hold no LLM weights,
    yet load_model_weights returns them (from stage 1's checkpoint)."""

    from mm.checkpoint import load_model_weights, load_tensors
    from mm.config import ParamGroupConfig

    stage1 = replace(small_cfg, run=replace(small_cfg.run, dir=str(tmp_path / "stage1")))
    launch(stage1).train(until=3)
    t = replace(
        small_cfg.train, init_from=str(tmp_path / "stage1"), frozen=["llm"], max_steps=2,
        param_groups=[ParamGroupConfig(modules=["und.aligner", "heads.flow.repa_proj"], lr=1e-4)],
    )  # fmt: skip
    stage2 = replace(small_cfg, run=replace(small_cfg.run, dir=str(tmp_path / "stage2")), train=t)
    trainer = launch(stage2)
    assert "llm" in trainer.stage.referenced and "(weights from train.init_from)" in trainer.stage.report
    trainer.train()
    rec = _metrics(tmp_path / "stage2")[-1]
    assert rec["lr/und.aligner+heads.flow.repa_proj"] != rec["lr/default"]
    ckpt = tmp_path / "stage2/checkpoints/step_00000002"
    assert not any(k.startswith("llm.") for k in load_tensors(ckpt / "model.safetensors"))
    full, before = load_model_weights(ckpt), load_model_weights(tmp_path / "stage1")
    assert all(torch.equal(full[k], before[k]) for k in full if k.startswith("llm."))  # frozen: unchanged
    assert not torch.equal(full["und.aligner.0.weight"], before["und.aligner.0.weight"])  # trained on
