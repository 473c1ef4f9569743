"""Every CLI checks its arguments and inputs before it loads a model and fails with one line on stderr.

"Before any model load" is shown by a poison: the releases and runs these commands are pointed at cannot be
loaded (a release's ``model.safetensors`` is not a safetensors file; ``train.py`` gets ``model.llm.pretrained``
naming a folder that does not exist, which fails the moment a model is built). A command that reached the model
would fail with that error instead of the one line asked for.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import SMALL

ROOT = Path(__file__).resolve().parent.parent
POISON = "model.llm.pretrained=/nonexistent/poison-llm"  # building a model with it fails at once


def _run(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                          input=stdin)  # fmt: skip


def _one_line(p: subprocess.CompletedProcess, *needles: str) -> str:
    err = p.stderr.strip()
    assert p.returncode != 0, p.stdout[-2000:]
    assert "Traceback" not in p.stderr and len(err.splitlines()) == 1, p.stderr[-3000:]
    assert "poison" not in err and "safetensors" not in err.lower().replace("model.safetensors has", ""), err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    """A release folder whose weights cannot be loaded (model.safetensors is not a safetensors file)."""
    out = tmp_path_factory.mktemp("cli") / "release"
    shutil.copytree(ROOT / "tests/fixtures/legacy_v0/release", out)
    (out / "model.safetensors").write_bytes(b"poison: not a safetensors file")
    return out


def _damaged_checkpoint(ckpt: Path) -> None:
    """A step directory whose model.safetensors is half the size trainer.json recorded."""
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"\0" * 50)
    files = {"model.safetensors": {"bytes": 100, "sha256": "0" * 64}}
    (ckpt / "trainer.json").write_text(json.dumps({"step": 1, "files": files, "engine": "ddp"}))
    (ckpt.parent / "latest").write_text(ckpt.name)


@pytest.fixture(scope="module")
def run(tmp_path_factory, shard_dir) -> Path:
    """A run directory (config.yaml) whose only checkpoint is truncated."""
    from mm.config import load_config
    from mm.schema import to_yaml

    run = tmp_path_factory.mktemp("cli") / "run"
    cfg = load_config(ROOT / "configs/tiny.yaml", SMALL + [f"data.train_shards={shard_dir}/digits/train-000000.tar"])
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(cfg))
    _damaged_checkpoint(run / "checkpoints" / "step_00000001")
    return run


# ---- chat.py and generate.py: checked before torch is even imported --------------------------------------


def test_chat_refuses_a_non_image_an_empty_question_and_bad_numbers(release, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image at all")
    from PIL import Image

    png = tmp_path / "digit.png"
    Image.new("L", (8, 8), 128).save(png)
    chat = ["scripts/chat.py", str(release)]
    _one_line(_run(chat + ["--image", str(text), "--question", "x"]), "notes.png is not an image PIL can read")
    _one_line(_run(chat + ["--image", str(png), "--question", ""]), "--question is empty")
    _one_line(_run(chat + ["--image", str(png), "--question", "  "]), "--question is empty")
    _one_line(_run(chat + ["--image", str(png), "--question", "x", "--max-new-tokens", "0"]), "--max-new-tokens 0")
    _one_line(_run(chat + ["--image", str(tmp_path / "nope.png"), "--question", "x"]), "no such image")
    _one_line(_run(["scripts/chat.py", str(tmp_path / "none"), "--image", str(png), "--question", "x"]),
              "no such release folder")  # fmt: skip


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--steps", "-3"], "--steps -3: give an integer from 1"),
        (["--steps", "0"], "--steps 0: give an integer from 1"),
        (["--n", "0"], "--n 0"),
        (["--batch", "-1"], "--batch -1"),
        (["--seed", "-1"], "--seed -1"),
        (["--cfg", "-1"], "--cfg -1.0"),
        (["--cfg", "nan"], "--cfg nan"),
        (["--head", "nosuch"], "head 'nosuch' not in this release; it has ['flow', 'nextfreq']"),
        (["--head", "nextfreq", "--steps", "5"], "head 'nextfreq' has no sampler steps"),
        (["--out", "grid.txt"], "give an image file name"),
    ],
)
def test_generate_refuses_out_of_range_flags(release, tmp_path, flags, needle):
    args = ["scripts/generate.py", str(release), "--prompt", "draw the digit 7", "--out", str(tmp_path / "g.png")]
    _one_line(_run(args + flags), needle)


# ---- train.py, eval.py, export_release.py ---------------------------------------------------------------
# Importing torch and transformers (``import mm``) costs seconds per process on a shared machine: one command of
# each kind runs as a real process; the other cases run through the same ``__main__`` in one process (DRIVER),
# each with its own argv, stdout and stderr, SystemExit handled as the interpreter does.

DRIVER = r"""
import contextlib, io, json, runpy, sys, traceback
results = []
for argv in json.loads(sys.argv[1]):
    out, err, rc = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        sys.argv = list(argv)
        try:
            runpy.run_path(argv[0], run_name="__main__")
        except SystemExit as e:
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
            rc = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
            rc = 1
    results.append({"returncode": rc, "stdout": out.getvalue(), "stderr": err.getvalue()})
print("@@results@@" + json.dumps(results))
"""


def _run_many(cases: list[list[str]]) -> list[SimpleNamespace]:
    p = _run(["-c", DRIVER, json.dumps(cases)])
    assert "@@results@@" in p.stdout, p.stderr[-3000:]
    return [SimpleNamespace(**r) for r in json.loads(p.stdout.split("@@results@@")[-1])]


def _train(shard_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["train.py", *SMALL, f"data.train_shards={shard_dir}/digits/train-000000.tar", f"run.dir={run_dir}",
            POISON, *extra]  # fmt: skip


def test_train_checks_run_dir_data_checkpoint_and_overrides_before_the_model(shard_dir, tmp_path):
    # overrides after --resume are overrides (argparse used to reject them): the typo is the config's error
    _one_line(_run(_train(shard_dir, tmp_path / "r", "--resume", "auto", "train.max_stepz=5")), "max_stepz")
    (tmp_path / "a_file").write_text("")
    damaged = tmp_path / "d"
    _damaged_checkpoint(damaged / "checkpoints" / "step_00000001")
    cases = [
        (["--resume", "auto", "train.max_steps=0"], "train.max_steps=0 must be >= 1"),
        ([f"run.dir={tmp_path}/a_file/run"], "cannot write there"),
        ([f"data.train_shards={tmp_path}/missing-{{0..1}}.tar"], "missing-0.tar"),
        ([f"data.train_shards={shard_dir}/digits/*.tar"], "glob patterns are not supported"),
        (["data.num_workers=-1"], "data.num_workers"),
        (["--resume", "latest"], "no checkpoint in"),
        (["--resume", ""], "--resume is empty"),
        ([f"run.dir={damaged}", "--resume", str(damaged / "checkpoints/step_00000001")], "has 50 bytes"),
        ([f"run.dir={damaged}", "--resume", "auto"], "no checkpoint of"),
        ([f"run.dir={damaged}"], "already has checkpoints"),  # a fresh start would overwrite them
    ]
    results = _run_many([_train(shard_dir, tmp_path / "r", *extra) for extra, _ in cases])
    for (_, needle), p in zip(cases, results):
        _one_line(p, needle)
    assert "skipped step_00000001: model.safetensors has 50 bytes, trainer.json recorded 100" in results[-2].stdout


def test_eval_checks_tasks_datasets_overrides_and_checkpoint_before_the_model(run, release, tmp_path):
    tasks = tmp_path / "tasks" / "lost"
    tasks.mkdir(parents=True)
    (tasks / "lost.yaml").write_text(
        "task: lost\ndataset_path: nowhere/lost_set\ndataset_kwargs: {load_from_disk: true}\n"
        "output_type: generate_until\ndoc_to_text: '{{ q }}'\ndoc_to_target: a\n"
    )
    _one_line(_run(["eval.py", "--run", str(run), "--tasks", "nosuch"]), "unknown task 'nosuch'")
    cases = [
        (["--run", str(run), "--tasks", "../x"], "unknown task '../x'"),
        (["--run", str(run), "--tasks", ""], "--tasks is empty"),
        (["--run", str(run), "--task-dir", str(tmp_path / "tasks"), "--tasks", "lost"], "dataset not found"),
        (["--run", str(run), "--tasks", "digits_vqa", "eval.limit=-5"], "eval.limit=-5 must be >= 0"),
        (["--run", str(tmp_path), "--tasks", "digits_vqa"], "not a run directory"),
        (["--run", str(run), "--tasks", "digits_vqa", f"--out={tmp_path}/tasks/lost/lost.yaml"], "cannot write"),
        (["--model", str(release), "--tasks", "nosuch"], "unknown task 'nosuch'"),
        (["--model", str(release), "model.llm.hidden_size=8"], "only eval.* and model.heads.flow"),
        (["--model", str(release), "model.heads.flow.sample_steps=0"], "sample_steps='0': expected an integer >= 1"),
        (["--run", str(run), "--tasks", "digits_vqa"], "no checkpoint of"),  # the only checkpoint is truncated
    ]
    results = _run_many([["eval.py", *args] for args, _ in cases])
    for (_, needle), p in zip(cases, results):
        _one_line(p, needle)
    assert "skipped step_00000001: model.safetensors has 50 bytes, trainer.json recorded 100 (truncated)" in (
        results[-1].stdout
    )


def test_export_checks_run_and_checkpoint_before_the_model(run, tmp_path):
    step = run / "checkpoints" / "step_00000001"
    p = _run(["scripts/export_release.py", str(run), str(tmp_path / "rel"), "--checkpoint", str(step)])
    _one_line(p, "is damaged: model.safetensors has 50 bytes")
    (tmp_path / "exists").mkdir()
    cases = [
        ([str(tmp_path), str(tmp_path / "rel")], "not a run directory"),
        ([str(run), str(tmp_path / "exists")], "pass --overwrite"),
        ([str(run), str(tmp_path / "rel")], "no checkpoint of"),
    ]
    for (_, needle), p in zip(cases, _run_many([["scripts/export_release.py", *a] for a, _ in cases])):
        _one_line(p, needle)
