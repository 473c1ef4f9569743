"""The README's "A real run" block, as written, on library-saved stand-ins of the folders it names (a Qwen2 with its
tokenizer and chat template, a SiglipVisionModel at SigLIP-L/16@384's grid, an AutoencoderKL with SDXL-VAE's
downsampling; ``tests/pretrained_fixtures.py``): it trains a few steps with the default engine, evaluates and
exports, and the exported release generates and chats.

Changed from the block, and only these: the ``/models/`` and ``/data/`` paths (the stand-ins and the bundled
digits shards), and what a CPU test needs (SDPA instead of flash-attn, fp32 instead of bf16 autocast, no loader
workers, two steps of one 1400-token row).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT
from tests.pretrained_fixtures import stand_ins

CPU = ["model.llm.attn_implementation=sdpa", "engine.precision=fp32", "data.num_workers=0", "data.seq_len=1400",
       "train.max_steps=2", "train.log_every=1", "train.ckpt_every=2", "train.warmup_steps=1"]  # fmt: skip


def readme_block() -> str:
    """The YAML block of the README's "A real run" section."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## A real run") :]
    return re.search(r"```yaml\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, shard_dir) -> Path:
    """The README's block with its folders pointed at the stand-ins (made under the names it gives them)."""
    root = tmp_path_factory.mktemp("real")
    names = set(re.findall(r"/models/([\w.-]+)", readme_block()))
    made = stand_ins(root / "models")
    assert names == {p.name for p in made.values()}, names  # the block names exactly the stand-ins' folders
    text = readme_block().replace("/models/", f"{root}/models/")
    text = re.sub(r"/data/\w+/\{\d+\.\.\d+\}\.tar", f"{shard_dir}/digits/train-{{000000..000003}}.tar", text)
    (root / "real_run.yaml").write_text(text)
    return root


def test_the_readme_block_is_configs_real_run_yaml():
    assert readme_block() == (ROOT / "configs" / "real_run.yaml").read_text()


def test_a_contradicting_shape_key_fails_in_one_line_naming_it(real_run):
    from mm.config import load_config
    from mm.schema import ConfigError

    for key, value in [("model.und.tower.patch_size", 14), ("model.heads.flow.autoencoder.downsample", 16),
                       ("model.llm.num_layers", 4)]:  # fmt: skip
        with pytest.raises(ConfigError) as e:
            load_config(real_run / "real_run.yaml", [f"{key}={value}"])
        assert "\n" not in str(e.value) and f"{key}={value} contradicts" in str(e.value)


def test_the_readme_real_run_trains_evaluates_and_exports(real_run, tmp_path):
    from transformers import AutoModel, AutoProcessor

    import mm  # noqa: F401
    from mm.config import load_config
    from mm.eval.harness import evaluate
    from mm.hf import UnifiedMMProcessor, wrap
    from mm.load import load_run_model
    from mm.train.launch import launch

    run = tmp_path / "run"
    cfg = load_config(real_run / "real_run.yaml", CPU + [f"run.dir={run}"])
    torch.set_num_threads(2)
    launch(cfg).train()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["flow"] > 0 for r in rows if r.get("flow") is not None)
    saved = (run / "config.yaml").read_text()  # the run's config records the loaded LLM, not our defaults
    assert "model_type: qwen2" in saved and "num_layers: 8" in saved and "hidden_size: 64" in saved
    assert "rms_norm_eps: 1.0e-05" in saved and "tie_word_embeddings: true" in saved

    loaded = load_run_model(run, ["model.heads.flow.sample_steps=2", "eval.limit=2", "eval.images_per_prompt=1"])
    results = evaluate(loaded, ["digits_vqa", "digits_t2i"], loaded.config.eval, tmp_path / "eval")
    assert results["digits_vqa"]["n"] == 2 and results["digits_t2i"]["n"] == 2

    release = tmp_path / "release"
    wrap(loaded.model, loaded.config.model).save_pretrained(str(release))
    UnifiedMMProcessor.from_model(loaded.model).save_pretrained(str(release))
    hf = AutoModel.from_pretrained(str(release), local_files_only=True).eval()
    proc = AutoProcessor.from_pretrained(str(release), local_files_only=True)
    assert proc.tokenizer.chat_template == loaded.model.vocab.tokenizer.chat_template  # the LLM's own travels
    images = proc.und_images([torch.rand(3, 64, 64)])
    assert images.shape == (1, 3, 384, 384)
    assert hf.answer(images, ["what digit is this ?"], max_new_tokens=2) == loaded.model.answer(
        images, ["what digit is this ?"], max_new_tokens=2
    )
    g = torch.Generator().manual_seed(0)
    drawn = hf.generate_images(["draw the digit 7"], generator=g, steps=2)
    assert drawn.shape == (1, 3, 384, 384)


def _env() -> dict:
    import os

    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


@pytest.mark.slow
def test_the_readme_real_run_through_the_command_lines(real_run, tmp_path):
    """train.py, eval.py, export_release.py, generate.py and chat.py as a user runs them."""
    run, release = tmp_path / "run", tmp_path / "release"

    def cli(*args: str) -> str:
        p = subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                           timeout=900)  # fmt: skip
        assert p.returncode == 0, p.stderr[-3000:]
        return p.stdout

    out = cli("train.py", "--config", str(real_run / "real_run.yaml"), *CPU, f"run.dir={run}")
    assert "its own chat template" in out and "model.und.freeze=true" not in out  # the tower is frozen here
    cli("eval.py", "--run", str(run), "--tasks", "digits_vqa", "eval.limit=2")
    cli("scripts/export_release.py", str(run), str(release))
    cli("scripts/generate.py", str(release), "--prompt", "draw the digit 7", "--n", "1", "--steps", "2", "--out",
        str(tmp_path / "grid.png"), "--samples-dir", str(tmp_path / "samples"))  # fmt: skip
    image = next((tmp_path / "samples").glob("*.png"))
    out = cli("scripts/chat.py", str(release), "--image", str(image), "--question", "what digit is this ?",
              "--max-new-tokens", "2")  # fmt: skip
    assert out.strip()
