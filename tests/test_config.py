from pathlib import Path

import pytest
import torch

from mm.config import ConfigError, load_config
from mm.model.unified import UnifiedModel, count_parameters
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
    cfg = load_config(ROOT / "configs/tiny.yaml", ["train.max_steps=7", "run.dir=/tmp/x", "model.flow.cfg_scale=3.5"])
    assert cfg.train.max_steps == 7 and cfg.run_dir() == Path("/tmp/x") and cfg.model.flow.cfg_scale == 3.5


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
        load_config(ROOT / "configs/tiny.yaml", ["model.und.patch_size=4"])
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
    assert model.gen_tokens_per_image == model.und.tokens_per_image == 576  # 24x24 grid on both paths
    assert model.latent_shape == (4, 48, 48)
    assert model.llm.config.num_hidden_layers == 24 and model.llm.config.hidden_size == 2048
