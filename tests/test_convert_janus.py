"""transformers' Janus (the reference) -> ours -> transformers' Janus, on a tiny random JanusForConditionalGeneration.

Held against transformers' own model: understanding logits, teacher-forced image-code logits, greedy image codes
under guidance and their VQ-decoded pixels (all fp32, CPU); the prompt format against JanusProcessor; the
export loads in JanusForConditionalGeneration with the original's logits; a converted model trains a few
steps with our trainer and still exports.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT
from tests.convert_fixtures import tiny_janus

TOL = 1e-4


def _env() -> dict:
    import os

    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def janus(tmp_path_factory) -> tuple[Path, Path]:
    """(transformers Janus folder, our converted release), converted through the CLI."""
    base = tmp_path_factory.mktemp("janus")
    src = tiny_janus(base / "hf")
    out = base / "ours"
    p = subprocess.run([sys.executable, "scripts/convert.py", "hf_janus", str(src), str(out)], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    return src, out


def _load(src: Path, out: Path):
    from transformers import AutoModel, AutoTokenizer, JanusForConditionalGeneration

    import mm  # noqa: F401

    ref = JanusForConditionalGeneration.from_pretrained(str(src), local_files_only=True).eval()
    ours = AutoModel.from_pretrained(str(out), local_files_only=True).eval()
    return ref, ours, AutoTokenizer.from_pretrained(str(src), local_files_only=True)


def _und_inputs(tok, n_images: int = 2):
    """Two rows: <bos> <boi> <image>*16 <eoi> question, one image each; pixels in [0,1] and normalised."""
    image, boi, eoi = (
        tok.convert_tokens_to_ids(t) for t in ("<image_placeholder>", "<begin_of_image>", "<end_of_image>")
    )
    rows = [[tok.bos_token_id, boi, *[image] * 16, eoi, *tok.encode(q, add_special_tokens=False)]
            for q in ("what digit is this ?", "what is the cat on ?")]  # fmt: skip
    width = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])  # left padding
    mask = (torch.arange(width)[None] >= torch.tensor([[width - len(r)] for r in rows])).long()
    pixels = torch.rand(n_images, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    return ids, mask, pixels, (pixels - 0.5) / 0.5


def test_release_layout_and_every_tensor_is_the_source_s(janus):
    from safetensors.torch import load_file

    from mm.convert.janus import rules

    src, out = janus
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "generation_config.json",
            "release.json", "model.yaml"} <= {p.name for p in out.iterdir()}  # fmt: skip
    theirs, ours = load_file(str(src / "model.safetensors")), load_file(str(out / "model.safetensors"))
    rename = {r.dst: r.src for r in rules(2)}
    for key, value in ours.items():
        prefix = max((p for p in rename if key.startswith(p)), key=len)
        assert torch.equal(value, theirs[rename[prefix] + key[len(prefix) :]]), key
    assert len(ours) == len(theirs)


def test_understanding_logits_equal_the_reference(janus):
    src, out = janus
    ref, ours, tok = _load(src, out)
    ids, mask, pixels, normalised = _und_inputs(tok)
    with torch.no_grad():
        expected = ref(input_ids=ids, pixel_values=normalised, attention_mask=mask).logits
        got = ours(input_ids=ids, pixel_values=normalised, attention_mask=mask).logits  # the same inputs
    keep = mask.bool()  # transformers' positions count padding, ours restart after it: compare real tokens
    assert got.shape == expected.shape
    assert (got[0] - expected[0]).abs().max() <= TOL  # the longest row has no padding: every position
    unpadded = ref(input_ids=ids[1:, ~keep[1].logical_not()], pixel_values=normalised[1:]).logits
    assert (got[1][keep[1]] - unpadded[0]).abs().max() <= TOL  # the padded row equals itself alone
    # labels: transformers' shifted next-token loss
    labels = ids.masked_fill(~keep, -100)
    with torch.no_grad():
        loss_ref = ref(input_ids=ids[:1], pixel_values=normalised[:1], labels=labels[:1]).loss
        loss = ours(input_ids=ids[:1], pixel_values=normalised[:1], labels=labels[:1]).loss
    assert abs(float(loss - loss_ref)) <= TOL


def test_text_generate_through_transformers_equals_the_reference(janus):
    src, out = janus
    ref, ours, tok = _load(src, out)
    ids, _, pixels, normalised = _und_inputs(tok)
    with torch.no_grad():
        a = ref.generate(input_ids=ids[:1], pixel_values=normalised[:1], max_new_tokens=6, do_sample=False,
                         eos_token_id=None, pad_token_id=tok.pad_token_id)  # fmt: skip
        b = ours.generate(input_ids=ids[:1], pixel_values=normalised[:1], max_new_tokens=6, do_sample=False,
                          eos_token_id=None, pad_token_id=tok.pad_token_id)  # fmt: skip
    assert torch.equal(a, b) and a.shape[1] == ids.shape[1] + 6


def test_generation_prompt_is_janus_s_format(janus):
    from transformers import JanusImageProcessor, JanusProcessor

    src, out = janus
    _, ours, tok = _load(src, out)
    prompts = ["draw a red cat", "draw a blue dog"]
    proc = JanusProcessor(image_processor=JanusImageProcessor(), tokenizer=tok, num_image_tokens=16)
    expected = proc(text=[f"<|User|>: {p}\n\n<|Assistant|>:" for p in prompts], generation_mode="image")
    assert ours.unified.heads["janus"].prompt_ids(prompts) == expected["input_ids"].tolist()


def test_training_samples_are_in_janus_s_prompt_format_and_dropout_is_its_unconditional_row(janus):
    """The janus head trains on the prompt it samples with (Janus's format, JanusProcessor's ids above): a training
    sample is that prefix + the code slots + <end_of_image>, and a dropped prompt becomes the sampler's
    unconditional row (every token between <bos> and <begin_of_image> padded)."""
    from mm.sequence import image_generation_sample

    _, ours, _ = _load(*janus)
    u, head = ours.unified, ours.unified.heads["janus"]
    s = image_generation_sample(u.vocab, head.template, torch.rand(3, 16, 16), "draw a red cat")
    prefix = head.prompt_ids(["draw a red cat"])[0]
    assert s.input_ids == prefix + [u.vocab.gen] * 16 + [u.vocab.eoi]
    dropped = [u.vocab.pad if m else t for t, m in zip(s.input_ids, s.prompt_mask)]  # what add_draws does
    uncond = head.prompt_rows(["draw a red cat"], guided=True)[1].input_ids
    assert dropped[: len(prefix)] == uncond == [prefix[0]] + [u.vocab.pad] * (len(prefix) - 2) + [prefix[-1]]


def test_teacher_forced_image_code_logits_equal_the_reference(janus):
    from mm.batch import left_padded

    src, out = janus
    ref, ours, _ = _load(src, out)
    u, head = ours.unified, ours.unified.heads["janus"]
    prompts = ["draw a red cat", "draw a blue dog"]
    ids = torch.tensor(head.prompt_ids(prompts))
    codes = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        embeds = torch.cat([ref.get_input_embeddings()(ids), ref.prepare_embeddings_for_image_generation(codes)], 1)
        hidden = ref.model.language_model(inputs_embeds=embeds).last_hidden_state
        expected = ref.model.generation_head(hidden[:, ids.shape[1] - 1 :])
        got = head.code_logits(u, left_padded(head.prompt_rows(prompts, guided=False), u.vocab.pad), codes)
    assert got.shape == expected.shape == (2, 17, 64)
    assert (got - expected).abs().max() <= TOL


def test_greedy_image_codes_and_pixels_equal_the_reference(janus):
    src, out = janus
    ref, ours, _ = _load(src, out)
    head = ours.unified.heads["janus"]
    prompts = ["draw a red cat", "draw a blue dog"]
    ids = torch.tensor(head.prompt_ids(prompts))
    with torch.no_grad():
        expected = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_mode="image",
                                do_sample=False, guidance_scale=3.0)  # fmt: skip
        codes, _ = head.sample_codes(ours.unified, prompts, cfg_scale=3.0, top_k=1)
        uncached, _ = head.sample_codes(ours.unified, prompts, cfg_scale=3.0, top_k=1, use_cache=False)
        pixels_ref = (ref.decode_image_tokens(expected).permute(0, 3, 1, 2) + 1) / 2
        images = ours.generate_images(prompts, cfg_scale=3.0, top_k=1)
    assert torch.equal(codes, expected) and torch.equal(uncached, codes)
    assert len(set(codes.flatten().tolist())) > 1  # not a degenerate constant sequence
    assert images.shape == (2, 3, 16, 16) and (images - pixels_ref.clamp(0, 1)).abs().max() <= TOL


def test_export_to_transformers_janus_gives_the_original_logits(janus, tmp_path):
    from transformers import JanusForConditionalGeneration

    from mm.convert.janus import export_hf_janus

    src, out = janus
    ref, ours, tok = _load(src, out)
    export_hf_janus(ours.unified, tmp_path / "back")
    back = JanusForConditionalGeneration.from_pretrained(str(tmp_path / "back"), local_files_only=True).eval()
    ids, mask, _, normalised = _und_inputs(tok)
    with torch.no_grad():
        a = ref(input_ids=ids, pixel_values=normalised, attention_mask=mask).logits
        b = back(input_ids=ids, pixel_values=normalised, attention_mask=mask).logits
    assert (a - b).abs().max() <= TOL
    sa, sb = ref.state_dict(), back.state_dict()
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_converted_janus_trains_then_exports_both_ways(janus, shard_dir, tmp_path):
    """Our trainer fine-tunes the converted folder (understanding and image codes from the bundled digits), then
    --format hf_janus loads in transformers with the trained model's logits."""
    from transformers import AutoModel, JanusForConditionalGeneration

    from mm.config import load_config
    from mm.hf import wrap
    from mm.load import load_run
    from mm.train.launch import launch

    _, out = janus
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""base: {out / "model.yaml"}
run: {{dir: {tmp_path / "run"}}}
data:
  train_shards: {shard_dir}/digits/train-{{000000..000003}}.tar
  sources:
    - {{name: digits_vqa, kind: conversation, weight: 1.0}}
    - {{name: digits_t2i, kind: generation, weight: 1.0}}
  seq_len: 64
  rows_per_batch: 2
  num_workers: 0
train: {{max_steps: 3, init_from: {out}, log_every: 1, ckpt_every: 3, warmup_steps: 1, lr: 1.0e-3}}
""")
    cfg = load_config(recipe)
    torch.set_num_threads(1)
    launch(cfg).train()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and any(r.get("janus") is not None for r in rows)
    _, trained, _, _ = load_run(tmp_path / "run")
    for fmt in ("hf_janus", "unified_mm"):
        args = ["scripts/export_release.py", str(tmp_path / "run"), str(tmp_path / fmt), "--format", fmt]
        p = subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
    back = JanusForConditionalGeneration.from_pretrained(str(tmp_path / "hf_janus"), local_files_only=True).eval()
    ids = torch.tensor([[trained.vocab.bos, trained.vocab.boi, *[trained.vocab.image] * 16, trained.vocab.eoi, 7, 8]])
    pixels = (torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) - 0.5) / 0.5  # normalised
    ours = AutoModel.from_pretrained(str(tmp_path / "unified_mm"), local_files_only=True).eval()
    with torch.no_grad():
        a = wrap(trained, trained.cfg)(input_ids=ids, pixel_values=pixels).logits
        b = back(input_ids=ids, pixel_values=pixels).logits
        c = ours(input_ids=ids, pixel_values=pixels).logits
    assert (a - b).abs().max() <= TOL and (a - c).abs().max() <= TOL


def test_other_models_are_refused_with_the_reason(tiny_run_model):
    from mm.convert import ConversionError
    from mm.convert.janus import export_hf_janus

    with pytest.raises(ConversionError, match="not exportable as hf_janus: its understanding tower is 'open_clip'"):
        export_hf_janus(tiny_run_model, Path("/nonexistent"))


@pytest.fixture
def tiny_run_model(vocab):
    from mm.config import load_config
    from mm.model.unified import UnifiedModel
    from tests.conftest import SMALL

    return UnifiedModel(load_config(ROOT / "configs" / "tiny.yaml", SMALL).model, vocab)
