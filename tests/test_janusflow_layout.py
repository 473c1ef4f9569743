"""JanusFlow-1.3B's released layout, key for key and shape for shape, and parity with its reference code.

``tests/data/janusflow_1.3b_keys.json`` is the key -> shape list of the model JanusFlow's public reference code
(deepseek-ai/Janus, ``janus/janusflow/models``) builds from ``tests/data/janusflow_1.3b_config.json`` (the
released ``config.json`` as assumed offline: ``mm/convert/janusflow.py`` says which values), made with
``scripts/janusflow_reference.py keys``. The parity test runs that reference code whenever it is importable
(``JANUSFLOW_REF_PATH``: the scratch ``PYTHONPATH`` holding it and transformers 4.x; see the script).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT
from tests.convert_fixtures import tiny_janusflow

DATA = ROOT / "tests" / "data"


def _keys() -> dict[str, list[int]]:
    return json.loads((DATA / "janusflow_1.3b_keys.json").read_text())["keys"]


def _ours(model_cfg) -> dict[str, list[int]]:
    """Our model's key -> shape on the meta device, without the SDXL VAE (a separate published model)."""
    from mm.model.unified import UnifiedModel
    from mm.sequence import load_vocab

    with torch.device("meta"):
        model = UnifiedModel(model_cfg, load_vocab(ROOT / "configs" / "tokenizers" / "digits"))
    return {k: list(v.shape) for k, v in model.state_dict().items() if not k.startswith("heads.flow.autoencoder.")}


def _assert_one_to_one(ours: dict, theirs: dict) -> None:
    from mm.convert.common import rename
    from mm.convert.janusflow import RULES

    mapped = dict(zip(rename(theirs, RULES), theirs.values()))  # theirs -> ours
    assert set(mapped) == set(ours), (sorted(set(mapped) - set(ours))[:5], sorted(set(ours) - set(mapped))[:5])
    assert all(mapped[k] == ours[k] for k in ours)
    back = dict(zip(rename(ours, RULES, reverse=True), ours.values()))  # ours -> theirs
    assert back == theirs


def test_the_converted_config_maps_one_to_one_onto_the_released_keys():
    from transformers import LlamaConfig

    from mm.convert.janusflow import model_config
    from mm.model.autoencoder import SDXL_VAE

    config = json.loads((DATA / "janusflow_1.3b_config.json").read_text())
    lc = {k: v for k, v in config["language_config"].items() if k not in ("model_type", "torch_dtype")}
    cfg = model_config(config, LlamaConfig(**lc), 384, [0.5] * 3, [0.5] * 3, SDXL_VAE)
    cfg.llm.tokenizer = "configs/tokenizers/digits"
    theirs = _keys()
    _assert_one_to_one(_ours(cfg), theirs)
    assert len(theirs) == 587
    gen = sum(torch.Size(s).numel() for k, s in theirs.items() if k.startswith("vision_gen_"))
    assert 70e6 < gen < 80e6  # the generation encoder/decoder with their aligners (ours was 42M before)


def test_janusflow_1_3b_yaml_is_the_released_layout():
    from mm.config import load_config

    cfg = load_config(ROOT / "configs" / "janusflow_1.3b.yaml", [
        "model.llm.tokenizer=configs/tokenizers/digits", "model.llm.attn_implementation=sdpa",
        "model.heads.flow.repa_weight=0",  # REPA trains a projector the release does not hold
    ])  # fmt: skip
    _assert_one_to_one(_ours(cfg.model), _keys())


def test_uvit_time_embedding_equals_diffusers_timesteps():
    """The time token: diffusers' Timesteps(flip_sin_to_cos, shift 0) + TimestepEmbedding, JanusFlow's choice."""
    from diffusers.models.embeddings import TimestepEmbedding, Timesteps

    from mm.model.gen_codec import UViTTimeEmbedding

    ours = UViTTimeEmbedding(32, 48)
    ref = TimestepEmbedding(32, 48)
    ref.load_state_dict(ours.state_dict())
    t = torch.tensor([0.0, 0.25, 0.9, 1.0])
    expected = ref(Timesteps(32, flip_sin_to_cos=True, downscale_freq_shift=0)(t * 1000.0))
    torch.testing.assert_close(ours(t), expected, rtol=1e-6, atol=1e-6)


def test_uvit_codec_starts_at_zero_velocity_and_keeps_the_grid():
    from mm.model.gen_codec import GenCodecConfig, UViTCodec

    codec = UViTCodec(GenCodecConfig(kind="uvit", channels=16, time_freq_dim=16, patch_size=2), 4, 32)
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([0.1, 0.7])
    tokens, temb, skip = codec.embed(z, t)
    assert tokens.shape == (2, 16, 32) and temb.shape == (2, 32) and skip.shape == (2, 16, 4, 4)
    v = codec.velocity(torch.randn(2, 16, 32), skip, temb)
    assert v.shape == z.shape and v.abs().max() == 0  # the last conv starts at zero


def test_convert_cli_writes_a_release_holding_the_source_tensors(tmp_path):
    """Through scripts/convert.py with a local VAE folder: every tensor of the source and of the VAE lands
    under its renamed key, and the release loads with AutoModel."""
    from diffusers import AutoencoderKL
    from transformers import AutoModel

    import mm  # noqa: F401

    src, theirs = tiny_janusflow(tmp_path)
    out = tmp_path / "ours"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    args = [sys.executable, "scripts/convert.py", "janusflow", str(src), str(out), "--gen-image-size", "16"]
    p = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode != 0 and "--vae" in p.stderr  # the VAE is not in JanusFlow's release: asked for
    p = subprocess.run(args + ["--vae", str(tmp_path / "vae")], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    model = AutoModel.from_pretrained(str(out), local_files_only=True)
    state = model.state_dict()
    from mm.convert.common import rename
    from mm.convert.janusflow import RULES

    for k, v in rename(theirs, RULES).items():
        assert torch.equal(state[k], v), k
    vae = AutoencoderKL.from_pretrained(str(tmp_path / "vae")).state_dict()
    assert all(torch.equal(state[f"heads.flow.autoencoder.vae.{k}"], v) for k, v in vae.items())
    images = model.generate_images(["draw the digit 1"], generator=torch.Generator().manual_seed(0), steps=2)
    assert images.shape == (1, 3, 16, 16)


def _reference_path() -> str | None:
    """The scratch PYTHONPATH that imports JanusFlow's reference code, or None."""
    path = os.environ.get("JANUSFLOW_REF_PATH", "")
    if not path:
        return None
    probe = [sys.executable, "-c", "import janus.janusflow.models"]
    done = subprocess.run(probe, env=dict(os.environ, PYTHONPATH=path), capture_output=True, text=True, timeout=300)
    return path if done.returncode == 0 else None


@pytest.mark.skipif(_reference_path() is None, reason="JanusFlow's reference code is not importable: set "
                    "JANUSFLOW_REF_PATH (scripts/janusflow_reference.py says how to make it)")  # fmt: skip
def test_parity_with_the_reference_implementation(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
    folder = tmp_path / "parity"
    args = [sys.executable, "scripts/janusflow_reference.py", "run", str(folder), "--seed", "0"]
    ref_env = dict(env, PYTHONPATH=_reference_path())
    ref = subprocess.run(args, cwd=ROOT, env=ref_env, capture_output=True, text=True, timeout=900)
    assert ref.returncode == 0, ref.stderr[-3000:]
    ours = subprocess.run([sys.executable, "scripts/janusflow_parity.py", str(folder)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert ours.returncode == 0, ours.stderr[-3000:]
    result = json.loads(ours.stdout[ours.stdout.index("{") :])
    assert result["understanding_logits_max_abs_diff"] <= 1e-4 < result["understanding_logits_max_abs"]
    assert result["velocity_max_abs_diff"] <= 1e-4 < result["velocity_max_abs"]
