"""transformers' LLaVA (the reference) -> ours -> transformers' LLaVA, understanding only, on a tiny random
LlavaForConditionalGeneration (CLIP tower read at its second-to-last layer, CLS dropped; 2-layer projector).

Also the transformers-shaped identity of our own models: ``forward(input_ids=, pixel_values=, ...)`` equals the
logits ``answer`` computes (dense, and under p-MoD through our decoder loop), ``generate`` equals ``answer``, and a
model with no image head is said explicitly (``model.understanding_only``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, SMALL
from tests.convert_fixtures import tiny_llava

TOL = 1e-4


def _env() -> dict:
    import os

    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("llava")
    src = tiny_llava(base / "hf")
    out = base / "ours"
    p = subprocess.run([sys.executable, "scripts/convert.py", "hf_llava", str(src), str(out)], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    return src, out


def _load(src: Path, out: Path):
    from transformers import AutoModel, AutoTokenizer, LlavaForConditionalGeneration

    import mm  # noqa: F401

    ref = LlavaForConditionalGeneration.from_pretrained(str(src), local_files_only=True).eval()
    ours = AutoModel.from_pretrained(str(out), local_files_only=True).eval()
    return ref, ours, AutoTokenizer.from_pretrained(str(src), local_files_only=True)


def _inputs(tok, ours):
    """LLaVA-1.5's prompt with one image (16 <image> tokens); pixels in [0,1] and CLIP-normalised."""
    image = tok.convert_tokens_to_ids("<image>")
    ids = tok("USER : ", add_special_tokens=True)["input_ids"] + [image] * 16
    ids += tok.encode("what digit is this ? ASSISTANT :", add_special_tokens=False)
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    t = ours.unified.und.tower
    mean, std = torch.tensor(t.mean).view(1, 3, 1, 1), torch.tensor(t.std).view(1, 3, 1, 1)
    return torch.tensor([ids]), pixels, (pixels - mean) / std


def test_config_says_no_image_head_and_keeps_llava_s_image_token(llava):
    src, out = llava
    saved = json.loads((out / "config.json").read_text())
    assert saved["understanding_only"] is True and saved["heads"] == {}
    assert saved["und"]["kind"] == "hf_clip" and saved["und"]["tower"]["feature_layer"] == -2
    assert saved["image_token_id"] == json.loads((src / "config.json").read_text())["image_token_index"] == 4
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["image_head"] is None and gen["image_heads"] == {}


def test_understanding_logits_and_generate_equal_the_reference(llava):
    src, out = llava
    ref, ours, tok = _load(src, out)
    ids, pixels, normalised = _inputs(tok, ours)
    with torch.no_grad():
        a = ref(input_ids=ids, pixel_values=normalised).logits
        b = ours(input_ids=ids, pixel_values=normalised).logits
        ga = ref.generate(input_ids=ids, pixel_values=normalised, max_new_tokens=6, do_sample=False, eos_token_id=None)
        gb = ours.generate(input_ids=ids, pixel_values=normalised, max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert a.shape == b.shape and (a - b).abs().max() <= TOL
    assert torch.equal(ga, gb)


def test_export_to_transformers_llava_gives_the_original_logits(llava, tmp_path):
    from transformers import LlavaForConditionalGeneration

    from mm.convert.llava import export_hf_llava

    src, out = llava
    ref, ours, tok = _load(src, out)
    export_hf_llava(ours.unified, tmp_path / "back", image_token_id=ours.config.image_token_id)
    back = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "back"), local_files_only=True).eval()
    ids, _, normalised = _inputs(tok, ours)
    with torch.no_grad():
        assert (ref(input_ids=ids, pixel_values=normalised).logits
                - back(input_ids=ids, pixel_values=normalised).logits).abs().max() <= TOL  # fmt: skip
    sa, sb = ref.state_dict(), back.state_dict()
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_converted_llava_trains_then_exports(llava, shard_dir, tmp_path):
    from transformers import LlavaForConditionalGeneration

    from mm.config import load_config
    from mm.hf import wrap
    from mm.load import load_run
    from mm.train.launch import launch

    _, out = llava
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""base: {out / "model.yaml"}
run: {{dir: {tmp_path / "run"}}}
data:
  train_shards: {shard_dir}/digits/train-{{000000..000003}}.tar
  sources: [{{name: digits_vqa, kind: conversation, weight: 1.0}}]
  seq_len: 64
  rows_per_batch: 2
  num_workers: 0
train: {{max_steps: 3, init_from: {out}, log_every: 1, ckpt_every: 3, warmup_steps: 1, lr: 1.0e-3}}
""")
    torch.set_num_threads(1)
    launch(load_config(recipe)).train()
    _, trained, _, _ = load_run(tmp_path / "run")
    assert not trained.heads
    for fmt in ("hf_llava", "unified_mm"):
        args = ["scripts/export_release.py", str(tmp_path / "run"), str(tmp_path / fmt), "--format", fmt]
        p = subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
    args = ["scripts/export_release.py", str(tmp_path / "run"), str(tmp_path / "j"), "--format", "hf_janus"]
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode != 0 and "not exportable as hf_janus: its understanding tower is 'hf_clip'" in p.stderr
    back = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "hf_llava"), local_files_only=True).eval()
    v = trained.vocab
    ids = torch.tensor([[v.bos, v.user, v.boi, *[v.image] * 16, v.eoi, 7, 8, v.assistant]])
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t = trained.und.tower
    normalised = (pixels - torch.tensor(t.mean).view(1, 3, 1, 1)) / torch.tensor(t.std).view(1, 3, 1, 1)
    with torch.no_grad():
        a = wrap(trained, trained.cfg)(input_ids=ids, pixel_values=normalised).logits
        b = back(input_ids=ids, pixel_values=normalised).logits
    assert (a - b).abs().max() <= TOL


def test_an_embedding_table_without_room_for_our_tokens_grows_by_mean_rows(tmp_path):
    """No spare rows (real LLaVA-1.5 and Janus have some): our template's special tokens get the mean row."""
    from mm.convert.llava import import_hf_llava
    from tests.convert_fixtures import llava_tokenizer

    rows = len(llava_tokenizer())
    src = tiny_llava(tmp_path / "hf", vocab_size=rows)
    import_hf_llava(src, tmp_path / "ours")
    ref, ours, tok = _load(src, tmp_path / "ours")
    table = ours.unified.llm.get_input_embeddings().weight
    assert table.shape[0] == len(ours.unified.vocab) > rows
    assert torch.equal(
        table[rows:], ref.get_input_embeddings().weight.mean(0, keepdim=True).expand(len(table) - rows, -1)
    )
    ids, pixels, normalised = _inputs(tok, ours)
    with torch.no_grad():
        a = ref(input_ids=ids, pixel_values=normalised).logits
        b = ours(input_ids=ids, pixel_values=normalised).logits
    assert (a - b[..., :rows]).abs().max() <= TOL  # the original tokens' logits are unchanged


# ---- the transformers-shaped identity of our own models ------------------------------------------------------
@pytest.mark.parametrize("mod", [False, True])
def test_forward_and_generate_equal_answer(vocab, mod):
    """Dense: transformers' LLM forward with its cache; p-MoD: our decoder loop (uncached generate)."""
    from mm.config import load_config
    from mm.hf import UnifiedMMProcessor, wrap
    from mm.model.unified import UnifiedModel
    from mm.sequence import ROLE_USER, conversation_sample

    extra = ["model.mod.enabled=true", "model.mod.dense_above=0.0", "model.mod.min_ratio=0.5"] if mod else []
    cfg = load_config(ROOT / "configs" / "tiny.yaml", SMALL + extra).model
    torch.manual_seed(0)
    model = UnifiedModel(cfg, vocab).eval()
    with torch.no_grad():  # a router that is not zero, so routing decides something
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf = wrap(model, cfg)
    images = torch.randint(0, 256, (1, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    pixel_values = UnifiedMMProcessor.from_model(model).normalize(images)  # what processor(images=...) returns
    seen = []
    hook = model.llm.get_output_embeddings().register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    answer = model.answer(images, ["what digit is this ?"], max_new_tokens=3)
    hook.remove()
    s = conversation_sample(vocab, [(ROLE_USER, "<image>\nwhat digit is this ?")], list(images), 16)
    ids = torch.tensor([s.input_ids])
    with torch.no_grad():
        logits = hf(input_ids=ids, pixel_values=pixel_values).logits
        out = hf.generate(input_ids=ids, pixel_values=pixel_values, max_new_tokens=3, do_sample=False,
                          eos_token_id=None)  # fmt: skip
    assert (logits[0, -1] - seen[0][0]).abs().max() <= 1e-5
    greedy = [int(row[0].argmax()) for row in seen]  # answer's tokens (it stops at <eos>)
    assert out[0, ids.shape[1] :].tolist()[: len(greedy)] == greedy and vocab.decode(greedy) == answer[0]


def test_no_image_head_is_explicit(vocab):
    from mm.config import load_config
    from mm.model.unified import UnifiedModel
    from mm.schema import ConfigError

    cfg = load_config(ROOT / "configs" / "tiny.yaml", SMALL).model
    assert list(cfg.heads) == ["flow"]  # an empty model.heads still means the default flow head
    with pytest.raises(ConfigError, match=r"model.understanding_only=true but model.heads names \['flow'\]"):
        load_config(ROOT / "configs" / "tiny.yaml", SMALL + ["model.understanding_only=true"])
    cfg = load_config(
        ROOT / "configs" / "tiny.yaml", SMALL + ["model.understanding_only=true", "model.heads.flow=null"]
    )
    assert cfg.model.heads == {} and cfg.model.head_recipes() == {}
    model = UnifiedModel(cfg.model, vocab)
    assert not model.heads and model.sample_shapes().gen_templates == {}
    with pytest.raises(KeyError, match="no image head"):
        model.generate(["draw the digit 1"])
