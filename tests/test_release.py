"""Release round trip: export -> transformers Auto classes -> identical outputs; the chat/generate CLIs."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def make_tiny_run(base: Path, shard_dir: Path) -> Path:
    """A few training steps of the small test config, with an EMA copy; built once per session, reused by modules."""
    from mm.config import load_config
    from mm.train.launch import launch
    from tests.conftest import SMALL

    run = base / "tiny_run"
    if (run / "done").is_file():
        return run
    cfg = load_config(
        ROOT / "configs" / "tiny.yaml",
        SMALL + [
            f"data.train_shards={shard_dir}/digits/train-{{000000..000003}}.tar",
            f"data.heldout_shards={shard_dir}/digits/heldout-000000.tar",
            f"run.dir={run}", "train.max_steps=10", "train.ckpt_every=10", "train.ema_decay=0.5",
        ],
    )  # fmt: skip
    launch(cfg).train()
    (run / "done").write_text("ok")
    return run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, shard_dir) -> Path:
    return make_tiny_run(tmp_path_factory.getbasetemp(), shard_dir)


def _env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600, **kw)


@pytest.fixture(scope="module")
def release(tiny_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("release") / "tiny"
    p = _run([sys.executable, "scripts/export_release.py", str(tiny_run), str(out)])
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def _lm_head_logits(model, images, questions):
    """Every logits row the greedy decoder computes (captured at the LM head), and the answers."""
    seen = []
    hook = model.llm.get_output_embeddings().register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    try:
        answers = model.answer(images, questions, max_new_tokens=3)
    finally:
        hook.remove()
    return seen, answers


def test_export_then_auto_classes_give_identical_logits_and_images(tiny_run, release):
    from transformers import AutoModel, AutoProcessor

    import mm  # noqa: F401
    from data.bundled.digits import load_digit_split
    from mm.hf import UnifiedMMModel, UnifiedMMProcessor
    from mm.load import load_run

    files = {p.name for p in release.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "generation_config.json",
            "README.md", "release.json"} <= files  # fmt: skip
    for p in release.rglob("*"):  # no pickle anywhere: JSON, YAML, markdown and safetensors only
        assert p.suffix in (".json", ".safetensors", ".md", ".yaml"), p
        assert not p.read_bytes().startswith(b"\x80"), p  # pickle protocol 2+ magic
    assert json.loads((release / "release.json").read_text())["source"]["weights"] == "ema"

    _, original, _, _ = load_run(tiny_run)  # EMA weights, as exported
    hf = AutoModel.from_pretrained(str(release), local_files_only=True).eval()
    assert isinstance(hf, UnifiedMMModel)
    sd_a, sd_b = original.state_dict(), hf.state_dict()
    assert list(sd_a) == list(sd_b)  # the UnifiedModel's keys, unchanged
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)

    processor = AutoProcessor.from_pretrained(str(release), local_files_only=True)
    assert isinstance(processor, UnifiedMMProcessor)
    digits, _ = load_digit_split("heldout")
    pil = [(d * 255).round().astype(np.uint8) for d in digits[:5]]
    images = processor.und_images(pil)
    ref = UnifiedMMProcessor.from_model(original).und_images(pil)
    assert torch.equal(images, ref)
    questions = ["what digit is this ?"] * 5
    logits_a, ans_a = _lm_head_logits(original, images, questions)
    logits_b, ans_b = _lm_head_logits(hf.unified, images, questions)
    assert len(logits_a) == len(logits_b) > 0 and ans_a == ans_b
    assert all(torch.equal(a, b) for a, b in zip(logits_a, logits_b))
    img_a = original.generate(["draw the digit 3", "draw the digit 8"], generator=torch.Generator().manual_seed(7))
    img_b = hf.generate_images(["draw the digit 3", "draw the digit 8"], generator=torch.Generator().manual_seed(7))
    assert torch.equal(img_a, img_b)
    card = (release / "README.md").read_text()
    assert "## Training summary" in card and "ema_decay: 0.5" in card and "steps 60, cfg_scale 1.0" in card


def test_release_is_self_contained_when_parts_came_from_local_weights(tmp_path, vocab):
    """SigLIP tower, diffusers VAE and LLM loaded from local folders; the release loads after they are deleted."""
    from diffusers import AutoencoderKL
    from transformers import AutoModel, LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

    import mm  # noqa: F401
    from mm.config import load_config
    from mm.hf import wrap
    from mm.model.unified import build_model

    torch.manual_seed(0)
    parts = tmp_path / "weights"
    tower = SiglipVisionConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=48)  # fmt: skip
    SiglipVisionModel(tower).save_pretrained(parts / "siglip")
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 8], layers_per_block=1,
                  norm_num_groups=4, down_block_types=["DownEncoderBlock2D"] * 2,
                  up_block_types=["UpDecoderBlock2D"] * 2).save_pretrained(parts / "vae")  # fmt: skip
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=96, tie_word_embeddings=False)
                     ).save_pretrained(parts / "llm")  # fmt: skip
    cfg = load_config(None, [
        "model.und.kind=hf_siglip", f"model.und.tower.weights={parts / 'siglip'}", "model.und.tower.image_size=16",
        "model.und.tower.patch_size=4", "model.heads.flow.autoencoder.kind=diffusers_kl",
        f"model.heads.flow.autoencoder.path={parts / 'vae'}", "model.heads.flow.autoencoder.image_size=16",
        "model.heads.flow.autoencoder.image_channels=3", "model.heads.flow.autoencoder.latent_channels=4",
        "model.heads.flow.autoencoder.downsample=2", "model.heads.flow.codec.channels=16",
        "model.heads.flow.repa_layer=1", "model.heads.flow.repa_hidden=32", f"model.llm.pretrained={parts / 'llm'}",
        "model.llm.num_layers=2",
    ])  # fmt: skip
    model = build_model(cfg.model)
    model.eval()
    out = tmp_path / "release"
    wrap(model, cfg.model).save_pretrained(str(out))
    from mm.hf import UnifiedMMProcessor

    UnifiedMMProcessor.from_model(model).save_pretrained(str(out))
    shutil.rmtree(parts)
    saved = json.loads((out / "config.json").read_text())
    flow = saved["heads"]["flow"]
    assert saved["llm"]["pretrained"] == "" and saved["und"]["tower"]["weights"] == ""
    assert flow["autoencoder"]["path"] == ""
    assert set(saved["part_configs"]) == {"und.tower.model", "heads.flow.autoencoder.vae"}
    hf = AutoModel.from_pretrained(str(out), local_files_only=True).eval()
    assert hf.unified.llm.config.hidden_size == 48 and type(hf.unified.und.tower.model) is SiglipVisionModel
    for k, v in model.state_dict().items():
        assert torch.equal(v, hf.state_dict()[k]), k
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    logits_a, ans_a = _lm_head_logits(model, images, ["what digit is this ?"] * 2)
    logits_b, ans_b = _lm_head_logits(hf.unified, images, ["what digit is this ?"] * 2)
    assert ans_a == ans_b and all(torch.equal(a, b) for a, b in zip(logits_a, logits_b))
    g = torch.Generator
    img_a = model.generate(["draw the digit 1"], generator=g().manual_seed(0), steps=2)
    assert torch.equal(img_a, hf.generate_images(["draw the digit 1"], generator=g().manual_seed(0), steps=2))


def test_release_from_a_newer_version_fails_naming_the_unknown_part(release, tmp_path):
    from transformers import AutoModel

    import mm  # noqa: F401
    from mm.schema import ConfigError

    copy = tmp_path / "newer"
    shutil.copytree(release, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["mm_parts"].append("quantizer")
    cfg["quantizer"] = {"bits": 4}
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="quantizer"):
        AutoModel.from_pretrained(str(copy), local_files_only=True)


def test_chat_streams_and_generate_writes_a_seeded_grid(release, tmp_path):
    from PIL import Image

    args = [sys.executable, "scripts/generate.py", str(release), "--prompt", "draw the digit 7", "--prompt",
            "draw the digit 1", "--n", "3", "--steps", "3", "--batch", "4", "--seed", "5"]  # fmt: skip
    p = _run(args + ["--out", str(tmp_path / "a.png"), "--samples-dir", str(tmp_path / "s")])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "generate" in p.stderr and "head flow" in p.stdout  # progress bar and the recipe used
    grid = Image.open(tmp_path / "a.png")
    assert grid.size == ((3 * 9 + 1) * 8, (2 * 9 + 1) * 8)  # 3 columns x 2 prompts of 8 px, 1 px gaps, x8
    assert len(list((tmp_path / "s").glob("*.png"))) == 6
    # the CLI's images are the model's: same seed in-process gives the same first sample
    from transformers import AutoModel

    import mm  # noqa: F401

    hf = AutoModel.from_pretrained(str(release), local_files_only=True).eval()
    prompts = ["draw the digit 7"] * 3 + ["draw the digit 1"]  # the CLI's first batch of 4
    first = hf.generate_images(prompts, generator=torch.Generator().manual_seed(5), steps=3)[0, 0]
    saved = np.asarray(Image.open(tmp_path / "s" / "0_0.png"), dtype=np.float32) / 255
    assert np.abs(saved - first.numpy()).max() <= 0.5 / 255 + 1e-6
    p = _run([sys.executable, "scripts/chat.py", str(release), "--image", str(tmp_path / "s" / "0_0.png"),
              "--question", "what digit is this ?", "--max-new-tokens", "3"])  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    answer = hf.answer(torch.from_numpy(saved)[None].expand(1, 3, 8, 8), ["what digit is this ?"], max_new_tokens=3)
    assert p.stdout.strip() == f"> {answer[0]}".strip()
    p = _run(
        [sys.executable, "scripts/chat.py", str(release), "--image", str(tmp_path / "nope.png"), "--question", "x"]
    )
    assert p.returncode != 0 and "nope.png" in p.stderr


ZERO_SCRIPT = """
import os, sys
os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT="29593", RANK="0", WORLD_SIZE="1",
                  LOCAL_RANK="0")
from pathlib import Path
import deepspeed, torch
from safetensors.torch import save_file
from mm.config import load_config
from mm.schema import to_yaml
from mm.model.unified import build_model
from tests.conftest import SMALL
run = Path(sys.argv[1])
cfg = load_config("configs/tiny.yaml", SMALL)
torch.manual_seed(3)
model = build_model(cfg.model)
run.mkdir(parents=True)
(run / "config.yaml").write_text(to_yaml(cfg))
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run / "reference.safetensors"))
deepspeed.init_distributed(dist_backend="gloo")
ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2},
      "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                  config=ds)
engine.save_checkpoint(str(run / "checkpoints" / "zero"), tag="global_step1")
"""


@pytest.mark.slow  # DeepSpeed builds a CPU op on first use (~1 min)
def test_zero_checkpoint_exports_consolidated_weights(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModel

    import mm  # noqa: F401

    run = tmp_path / "zero_run"
    p = _run([sys.executable, "-c", ZERO_SCRIPT, str(run)])
    assert p.returncode == 0, p.stderr[-3000:]
    # DeepSpeed's own files, no trainer.json: read with weights_only=True and an allow-list, consolidated by
    # mm.checkpoint.load_deepspeed_weights (DeepSpeed's zero_to_fp32, which unpickles anything, never runs)
    p = _run([sys.executable, "scripts/export_release.py", str(run), str(tmp_path / "rel"), "--checkpoint",
              str(run / "checkpoints" / "zero")])  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert "ZeRO" in json.loads((tmp_path / "rel" / "release.json").read_text())["source"]["weights"]
    ref = load_file(str(run / "reference.safetensors"))
    got = AutoModel.from_pretrained(str(tmp_path / "rel"), local_files_only=True).state_dict()
    assert set(ref) == set(got) and all(torch.equal(ref[k], got[k]) for k in ref)
