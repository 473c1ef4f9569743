from pathlib import Path

import pytest
import torch

from mm.config import load_config
from mm.model.unified import UnifiedModel, build_model, count_parameters
from mm.schema import ConfigError
from mm.sequence import load_vocab

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_there_are_configs():
    names = {p.name for p in CONFIGS}
    assert {"tiny.yaml", "janusflow_1.3b.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_yaml_loads(path):
    cfg = load_config(path)
    assert cfg.train.max_steps >= 1


def test_overrides_apply_and_keys_users_reach_for_exist():
    over = ["train.max_steps=7", "run.dir=/tmp/x", "model.heads.flow.cfg_scale=3.5"]
    cfg = load_config(ROOT / "configs/tiny.yaml", over)
    assert cfg.train.max_steps == 7 and cfg.run_dir() == Path("/tmp/x") and cfg.model.heads["flow"].cfg_scale == 3.5
    # a key of the layout before image heads owned their parts still reaches the same field
    assert load_config(ROOT / "configs/tiny.yaml", ["model.flow.cfg_scale=3.5"]).model.heads["flow"].cfg_scale == 3.5


@pytest.mark.parametrize(
    "override, named",
    [("train.max_stepz=3", "max_stepz"), ("train.max_steps=abc", "train.max_steps"), ("model.llm.nope=1", "nope")],
)
def test_bad_override_names_the_key(override, named):
    with pytest.raises(ConfigError, match=named):
        load_config(ROOT / "configs/tiny.yaml", [override])


def test_unknown_key_in_yaml_fails_naming_it(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  llm:\n    hiden_size: 64\n")
    with pytest.raises(ConfigError, match="hiden_size"):
        load_config(bad)


def test_cross_field_rule_fails_at_start():
    with pytest.raises(ConfigError, match="REPA"):
        build_model(load_config(ROOT / "configs/tiny.yaml", ["model.und.tower.patch_size=4"]).model)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(ROOT / "configs/nope.yaml")


def test_janusflow_builds_on_meta_and_reports_parameter_counts():
    cfg = load_config(
        ROOT / "configs/janusflow_1.3b.yaml",
        ["model.llm.tokenizer=configs/tokenizers/digits", "model.llm.attn_implementation=sdpa"],
    )
    with torch.device("meta"):
        model = UnifiedModel(cfg.model, load_vocab(ROOT / "configs/tokenizers/digits"))
    counts = count_parameters(model)
    print({k: f"{v / 1e6:.1f}M" for k, v in counts.items()})
    # 24 x 2048 LLaMA with a 102400 vocabulary (untied): 1.23B blocks + 0.42B embeddings.
    assert 1.6e9 < counts["llm"] < 1.7e9
    assert 3.0e8 < counts["und"] < 3.2e8  # SigLIP-L/16 tower + Linear aligner
    assert model.heads["flow"].tokens_per_image == model.und.tokens_per_image == 576  # 24x24 grid on both paths
    assert model.heads["flow"].latent_shape == (4, 48, 48)
    assert model.llm.config.num_hidden_layers == 24 and model.llm.config.hidden_size == 2048


@pytest.mark.parametrize(
    "override, expected",
    [
        (
            "train.max_stepz=3",
            "config error in the command line: unknown key train.max_stepz; did you mean train.max_steps?",
        ),
        ("engine.kindd=ddp", "config error in the command line: unknown key engine.kindd; did you mean engine.kind?"),
        ("train.grad_accum_steps=two", "config error in the command line: train.grad_accum_steps: Value 'two'"),
    ],
)
def test_config_errors_are_one_line_naming_key_source_and_closest_key(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/tiny.yaml", [override])
    assert str(e.value).startswith(expected) and "\n" not in str(e.value)


def test_yaml_errors_name_the_file_even_through_a_base_chain(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  lr: 1.0e-3\n  warmup_step: 5\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain:\n  max_steps: 3\n")
    with pytest.raises(
        ConfigError,
        match=rf"in {tmp_path / 'base.yaml'}: unknown key train.warmup_step; did you mean train.warmup_steps\?",
    ):
        load_config(tmp_path / "child.yaml")
    (tmp_path / "base.yaml").write_text("train:\n  lr: 1.0e-3\n")
    cfg = load_config(tmp_path / "child.yaml", ["train.lr=5e-4"])  # file order: base, child, command line
    assert cfg.train.max_steps == 3 and cfg.train.lr == 5e-4


def test_cli_prints_one_line_without_traceback(tmp_path):
    import os
    import subprocess
    import sys

    p = subprocess.run(
        [sys.executable, "train.py", "train.lr=1e-3", "train.max_stepz=3", f"run.dir={tmp_path}"],
        cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert lines[-1] == "config error in the command line: unknown key train.max_stepz; did you mean train.max_steps?"


def _meta_model(path: str, *overrides: str):
    cfg = load_config(
        ROOT / path,
        ["model.llm.tokenizer=configs/tokenizers/digits", "model.llm.attn_implementation=sdpa", *overrides],
    )
    with torch.device("meta"):
        return cfg, UnifiedModel(cfg.model, load_vocab(ROOT / "configs/tokenizers/digits"))


def test_a_frozen_module_without_weights_is_an_error_at_start():
    """janusflow_1.3b.yaml freezes a tower it has no weights for: loadable and buildable, not trainable."""
    from mm.train.stage import apply_stage

    cfg, model = _meta_model("configs/janusflow_1.3b.yaml")
    # SigLIP-L/16 as timm builds it for JanusFlow: 303M blocks + its (unused, kept) attention-pool head
    with pytest.raises(ConfigError, match=r"und\.tower \(316\.\dM; model\.und\.tower\.weights") as e:
        apply_stage(model, cfg.train)
    assert "heads.flow.autoencoder" in str(e.value)  # the random frozen VAE too
    cfg.model.und.tower.weights = "/models/siglip"
    cfg.model.heads["flow"].autoencoder.path = "/models/sdxl-vae"
    stage = apply_stage(model, cfg.train)
    assert stage.referenced == ["heads.flow.autoencoder", "und.tower"]  # checkpoints reference them, never copy


# JanusFlow's released layout (codec uvit) and REPA's projector; the begin-of-image embedding trains with them
FLOW_PARTS = ("gen_encoder", "gen_encoder_aligner", "gen_decoder_aligner_norm", "gen_decoder_aligner", "gen_decoder")
FLOW_TRAINS = {"und.begin_embed", *(f"heads.flow.{p}" for p in (*FLOW_PARTS, "repa_proj"))}


@pytest.mark.parametrize(
    "stage, trains, frozen",
    [
        (1, {"und.aligner", *FLOW_TRAINS}, {"und.tower", "llm", "heads.flow.autoencoder"}),
        (2, {"und.aligner", *FLOW_TRAINS, "llm"}, {"und.tower", "heads.flow.autoencoder"}),
        (3, {"und.tower", "und.aligner", *FLOW_TRAINS, "llm"}, {"heads.flow.autoencoder"}),
    ],
)
def test_janusflow_stages_switch_by_config(stage, trains, frozen):
    from mm.train.stage import _part, apply_stage

    # the stage configs point at local weights that do not exist here: build the shapes instead
    siglip_l = "{image_size: 384, patch_size: 16, width: 1024, layers: 24, heads: 16, mlp_ratio: 4.0}"
    cfg, model = _meta_model(
        f"configs/janusflow_stage{stage}.yaml", "model.und.kind=open_clip", f"model.und.tower={siglip_l}",
        "model.llm.pretrained=''", "model.heads.flow.autoencoder.path=''",
    )  # fmt: skip
    cfg.train.init_from = ""  # the previous stage's run does not exist here either
    s = apply_stage(model, cfg.train, allow_random_frozen=True)
    by_part: dict[str, set[bool]] = {}
    for n, p in model.named_parameters():
        by_part.setdefault(_part(n), set()).add(p.requires_grad)
    assert {k for k, v in by_part.items() if v == {True}} == trains
    assert {k for k, v in by_part.items() if v == {False}} == frozen
    lrs = {g.name: g.lr for g in s.groups}
    assert all(lr == cfg.train.lr for lr in lrs.values()) and len(s.groups) >= 1
