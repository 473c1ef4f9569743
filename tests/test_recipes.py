"""The fine-tuning recipes of configs/recipes/: each loads and validates on top of a converted folder, and runs.

A tiny random transformers Janus / LLaVA (``tests/convert_fixtures.py``) and a JanusFlow-format folder are
converted as ``scripts/convert.py`` does; each recipe's ``/models/<folder>`` is pointed at the converted one (the
recipe text is otherwise as written) and trains a few steps from it with the CPU overrides below, then exports.
The paper hyper-parameters each recipe states are pinned here, so a change to them is seen.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT

RECIPES = ROOT / "configs" / "recipes"
CPU = ["engine.kind=ddp", "engine.precision=fp32", "engine.activation_checkpointing=false",
       "model.llm.attn_implementation=sdpa", "data.num_workers=0", "data.rows_per_batch=2",
       "train.max_steps=2", "train.log_every=1", "train.ckpt_every=2", "train.grad_accum_steps=1"]  # fmt: skip


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, Path]:
    """Converted release folders of ours, by the recipe's folder name."""
    from mm.convert.janus import import_hf_janus
    from mm.convert.janusflow import import_janusflow
    from mm.convert.llava import import_hf_llava
    from tests.convert_fixtures import tiny_janus, tiny_janusflow, tiny_llava

    base = tmp_path_factory.mktemp("recipes")
    janusflow_src, _ = tiny_janusflow(base)
    return {
        "janus-pro-1b-mm": import_hf_janus(tiny_janus(base / "janus"), base / "janus-pro-1b-mm"),
        "llava-1.5-7b-mm": import_hf_llava(tiny_llava(base / "llava"), base / "llava-1.5-7b-mm"),
        "janusflow-1.3b-mm": import_janusflow(
            janusflow_src, base / "janusflow-1.3b-mm", vae=str(base / "vae"), gen_image_size=16
        ),  # fmt: skip
    }


def recipe(name: str, converted: dict[str, Path], shard_dir: Path, tmp_path: Path) -> Path:
    """The recipe with its converted folder and data pointed at the test's (everything else as written)."""
    text = (RECIPES / name).read_text()
    (folder,) = set(re.findall(r"^base: /models/([\w.-]+)/model.yaml$", text, re.M))
    assert f"init_from: /models/{folder}\n" in text  # training starts from the folder the model section is
    text = text.replace(f"/models/{folder}", str(converted[folder]))
    text = re.sub(r"/data/[\w/]+/\{\d+\.\.\d+\}\.tar", f"{shard_dir}/digits/train-{{000000..000003}}.tar", text)
    out = tmp_path / name
    out.write_text(text)
    return out


def _load(name, converted, shard_dir, tmp_path, extra=()):
    from mm.config import load_config

    return load_config(recipe(name, converted, shard_dir, tmp_path), [*CPU, f"run.dir={tmp_path / 'run'}", *extra])


def test_every_recipe_is_tested():
    assert {p.name for p in RECIPES.glob("*.yaml")} == {"janus_pro_sft.yaml", "janusflow_sft.yaml",
                                                        "llava_1.5_mod_sft.yaml"}  # fmt: skip


def test_a_converted_folder_s_model_yaml_builds_its_llm_exactly(converted):
    """model.llm states every architecture field of the converted LLM (rms_norm_eps, tied embeddings, rope, head_dim,
    ...): the LLM its fields build has the release's transformers config, key for key (release.json lists none)."""
    from omegaconf import OmegaConf
    from transformers import AutoConfig

    import mm  # noqa: F401 - AutoConfig learns our release's config class
    from mm.convert.common import NOT_ARCHITECTURE
    from mm.model.backbone import LLMConfig
    from mm.schema import parse_part

    for folder in converted.values():
        assert json.loads((folder / "release.json").read_text())["llm_fields_model_yaml_cannot_state"] == []
        section = OmegaConf.to_container(OmegaConf.load(folder / "model.yaml"))["model"]["llm"]
        text = AutoConfig.from_pretrained(str(folder)).text_config
        built = parse_part(LLMConfig, section, "model.llm").hf_config(text.vocab_size).to_dict()
        theirs = text.to_dict()
        keys = (set(built) | set(theirs)) - NOT_ARCHITECTURE
        assert {k: built.get(k) for k in keys} == {k: theirs.get(k) for k in keys}, folder.name
    llava = OmegaConf.load(converted["llava-1.5-7b-mm"] / "model.yaml").model.llm
    assert llava.rms_norm_eps == 1e-5  # Vicuna's, which LLaMA's transformers default (1e-6) is not


def test_the_recipes_state_their_papers_hyper_parameters(converted, shard_dir, tmp_path):
    from mm.config import load_config

    def raw(name):  # the recipe as written (no CPU overrides)
        return load_config(recipe(name, converted, shard_dir, tmp_path))

    janus, flow, llava = raw("janus_pro_sft.yaml"), raw("janusflow_sft.yaml"), raw("llava_1.5_mod_sft.yaml")
    weights = lambda c: {s.kind: s.weight for s in c.data.sources}  # noqa: E731
    assert (janus.train.lr, janus.train.schedule, janus.train.warmup_steps) == (4e-5, "constant", 0)
    assert weights(janus) == {"conversation": 5.0, "text": 1.0, "generation": 4.0}
    assert not janus.model.und.freeze and list(janus.model.heads) == ["janus"]
    assert (flow.train.lr, flow.train.max_steps, flow.train.ema_decay) == (2e-5, 26000, 0.99)
    assert weights(flow) == {"conversation": 21.0, "generation": 70.0, "text": 9.0} and not flow.model.und.freeze
    assert (llava.train.lr, llava.train.schedule, llava.train.max_steps, llava.train.warmup_steps) == (
        2e-5, "cosine", 5197, 156)  # fmt: skip
    assert llava.model.und.freeze and llava.model.mod.enabled and llava.model.understanding_only
    assert (llava.model.mod.dense_above, llava.model.mod.min_ratio, llava.model.mod.tanh_scale) == (0.85, 0.15, 0.2)
    for c in (janus, flow, llava):
        assert c.train.betas == (0.9, 0.95) or c is llava
        assert c.train.weight_decay == 0.0 and c.train.grad_clip == 1.0 and c.train.init_from


@pytest.mark.parametrize(
    "name, extra, formats",
    [
        ("janus_pro_sft.yaml", ["data.seq_len=64"], ("hf_janus", "unified_mm")),
        ("llava_1.5_mod_sft.yaml", ["data.seq_len=64", "train.warmup_steps=1"], ("unified_mm",)),
        ("janusflow_sft.yaml", ["data.seq_len=64"], ("unified_mm",)),
    ],
)
def test_a_recipe_fine_tunes_its_converted_folder_then_exports(name, extra, formats, converted, shard_dir, tmp_path,
                                                               capsys):  # fmt: skip
    import subprocess
    import sys

    from mm.train.launch import launch
    from tests.test_convert_janus import _env

    cfg = _load(name, converted, shard_dir, tmp_path, extra)
    torch.set_num_threads(1)
    trainer = launch(cfg)
    report = trainer.stage.report
    if not cfg.model.und.freeze:  # the pretrained tower fine-tunes at train.lr, said
        assert f"fine-tunes at lr {cfg.train.lr:.1e}" in report and "train.init_from=" in report
    trainer.train()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[-1]["nonfinite_steps"] == 0 and rows[-1]["loss"] > 0
    out = capsys.readouterr().out
    if cfg.model.mod.enabled:  # p-MoD's routers are not in the converted folder: they start at zero, said
        assert "no weights for mod_routers" in out
    for fmt in formats:
        args = ["scripts/export_release.py", str(tmp_path / "run"), str(tmp_path / fmt), "--format", fmt]
        p = subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
    if cfg.model.mod.enabled:  # LLaVA with p-MoD has no transformers LLaVA form: refused with the reason
        args = ["scripts/export_release.py", str(tmp_path / "run"), str(tmp_path / "x"), "--format", "hf_llava"]
        p = subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
        assert p.returncode != 0 and "routes tokens (p-MoD)" in p.stderr
