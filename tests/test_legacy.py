"""Runs and releases written before image heads owned their parts (format 1) still load and compute the same.

``tests/fixtures/legacy_v0`` was written by the code of commit 5c77965 (``make_fixture.py`` there): a small run
with the flow and next-frequency heads, p-MoD, V2PE and an EMA, its release folder, and the outputs that code
computed from them (``expected.safetensors``). Its weights and configs use the old names (``gen_encoder.*``,
``nextfreq.*``, ``model.flow``, ``model.heads: [flow, nextfreq]``); ``mm.model.legacy`` maps them.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from mm.checkpoint import load_model_weights
from mm.config import load_config
from tests.conftest import ROOT

FIXTURE = ROOT / "tests" / "fixtures" / "legacy_v0"
PROMPTS = ["draw the digit 3", "draw the digit 5"]


def _outputs(model) -> dict[str, torch.Tensor]:
    """What make_fixture.py computed, recomputed with today's code."""
    expected = load_file(str(FIXTURE / "expected.safetensors"))
    seen = []
    hook = model.llm.get_output_embeddings().register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    with torch.no_grad():
        model.answer(expected["und_images"], ["what digit is this ?"] * 3, max_new_tokens=3)
    hook.remove()
    flow = model.generate(PROMPTS, head="flow", steps=3, noise=expected["flow_noise"])
    nf = model.generate(PROMPTS, head="nextfreq", generator=torch.Generator().manual_seed(0))
    return {"answer_logits": torch.cat(seen), "flow_images": flow, "nextfreq_images": nf}


def _assert_same(got: dict[str, torch.Tensor]) -> None:
    expected = load_file(str(FIXTURE / "expected.safetensors"))
    for k, v in got.items():
        torch.testing.assert_close(v, expected[k], rtol=1e-5, atol=1e-5, msg=k)


def test_old_run_config_migrates():
    cfg = load_config(FIXTURE / "run" / "config.yaml")
    assert list(cfg.model.heads) == ["flow", "nextfreq"]
    assert cfg.model.heads["nextfreq"].tokenizer.path == "tests/fixtures/legacy_v0/tokenizer"
    assert cfg.model.heads["flow"].repa_layer == 1 and cfg.model.und.tower.width == 16
    assert cfg.model.mod.enabled and cfg.model.v2pe.enabled


def test_old_checkpoint_loads_with_mapped_names_and_computes_the_same():
    from mm.load import load_run

    weights = load_model_weights(FIXTURE / "run", ema=True)
    assert "heads.flow.gen_encoder.patchify.weight" in weights and "heads.nextfreq.slot_embed" in weights
    assert not any(k.startswith(("gen_encoder.", "nextfreq.")) for k in weights)
    _, model, _, step = load_run(FIXTURE / "run")
    assert step == 4
    _assert_same(_outputs(model))


def test_old_release_loads_through_the_auto_classes_and_computes_the_same():
    from transformers import AutoModel, AutoProcessor

    import mm  # noqa: F401  (registers the Auto classes)

    saved = json.loads((FIXTURE / "release" / "config.json").read_text())
    assert "flow" in saved["mm_parts"] and "mm_format" not in saved  # written before format 2
    hf = AutoModel.from_pretrained(str(FIXTURE / "release"), local_files_only=True).eval()
    AutoProcessor.from_pretrained(str(FIXTURE / "release"), local_files_only=True)
    assert list(hf.unified.heads) == ["flow", "nextfreq"]
    _assert_same(_outputs(hf.unified))


def test_an_old_checkpoint_starts_a_new_run(small_cfg, tmp_path):
    """train.init_from a format-1 checkpoint: the weights arrive under today's names."""
    from mm.checkpoint import load_init
    from mm.model.unified import build_model

    model = build_model(load_config(FIXTURE / "run" / "config.yaml").model)
    load_init(model, str(FIXTURE / "run"))
    state = model.state_dict()
    old = load_file(str(FIXTURE / "run/checkpoints/step_00000004/model.safetensors"))
    assert torch.equal(state["heads.flow.repa_proj.0.weight"], old["repa_proj.0.weight"])
    assert torch.equal(state["heads.nextfreq.out.weight"], old["nextfreq.out.weight"])
