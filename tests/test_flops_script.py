"""scripts/flops.py: prefill FLOPs and KV cache, dense vs p-MoD, for tiny and the LLaVA-1.5-7B shape."""

import json
import sys

import pytest
import torch

from mm.config import load_config
from mm.model.towers import UnderstandingEncoder
from mm.profiling import forward_flops
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
from flops import main as flops_main  # noqa: E402
from flops import report, und_image_flops  # noqa: E402

LLAVA = ROOT / "configs/llava_7b_mod.yaml"
TINY = ROOT / "configs/tiny.yaml"


def _run(monkeypatch, capsys, *args: str) -> dict:
    """The command line in this process (the interpreter and torch start once for the whole file)."""
    monkeypatch.setattr(sys, "argv", ["flops.py", *args])
    flops_main()
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    "args",
    [
        ["--config", str(TINY), "--override", "model.mod.enabled=true", "--text-tokens", "8"],
        ["--config", str(LLAVA)],
    ],
    ids=["tiny", "llava_7b_mod"],
)
def test_script_prints_ratios_in_unit_interval(monkeypatch, capsys, args):
    r = _run(monkeypatch, capsys, *args)
    for key in ("prefill_tflops_ratio", "llm_tflops_ratio", "kv_cache_ratio", "vision_kv_ratio"):
        assert 0 < r[key] < 1, key  # MoD is on in both: strictly cheaper
    assert r["prefill_tflops_mod"] < r["prefill_tflops_dense"]
    assert r["kv_cache_bytes_mod"] < r["kv_cache_bytes_dense"]


def test_llava_7b_against_the_paper():
    """p-MoD (LLaVA-1.5-7B): 8.38 -> 4.92 TFLOPs (58.7%), KV cache 53.8%; our count of the LLM's prefill."""
    cfg = load_config(LLAVA)
    r = report(cfg, text_tokens=64)
    assert r["vision_tokens"] == 576 and r["layers"] == 32 and r["routed_layers"] == 24
    assert r["mean_layer_ratio"] == pytest.approx(0.5375, abs=1e-12)
    # LLM only, 576 + 64 tokens: 8.40 dense (the paper's 8.38 is ~62 text tokens), 4.88 with MoD
    assert r["llm_tflops_dense"] == pytest.approx(8.38, abs=0.03)
    assert r["llm_tflops_mod"] == pytest.approx(4.92, abs=0.06)
    assert r["llm_tflops_ratio"] == pytest.approx(4.92 / 8.38, abs=0.01)
    # the vision tokens' cache: floor(576 * ratio) per layer, 0.5369 against the mean ratio 0.5375
    assert r["vision_kv_ratio"] == pytest.approx(0.538, abs=0.002)
    # the CLIP ViT-L/14-336 tower + MLP aligner adds 0.41 TFLOPs to both
    assert r["vision_tower_tflops"] == pytest.approx(0.406, abs=0.005)
    # KV cache: 2 (K, V) x 32 layers x 4096 x 2 bytes per token, 640 tokens dense
    assert r["kv_cache_bytes_dense"] == 640 * 32 * 2 * 4096 * 2


def test_mod_disabled_is_ratio_one_exactly():
    cfg = load_config(LLAVA, ["model.mod.enabled=false"])
    r = report(cfg)
    assert r["routed_layers"] == 0 and r["layer_ratios"] == [1.0] * 32
    assert r["prefill_tflops_ratio"] == 1.0 and r["llm_tflops_ratio"] == 1.0 and r["kv_cache_ratio"] == 1.0
    assert r["llm_parts_tflops_mod"] == r["llm_parts_tflops_dense"]


def test_tiny_analytic():
    """tiny: hidden 128, MLP 512, 4 heads, 4 layers; 16 vision + 8 text tokens, every layer at ratio 0.5."""
    cfg = load_config(TINY, ["model.mod.enabled=true", "model.mod.ratio=0.5"])
    r = report(cfg, vision_tokens=16, text_tokens=8)
    layer_macs = 4 * 128 * 128 + 3 * 128 * 512  # q, k, v, o + gate, up, down
    pair_macs = 2 * 128  # q.k and p.v over 4 heads x 32
    kept = 8 + 8  # text + floor(16 * 0.5)
    vocab_head = r["llm_parts_tflops_dense"]["head"] * 1e12 / (2 * 128)  # the tokenizer's size
    assert vocab_head == int(vocab_head) and vocab_head > 10
    assert r["llm_parts_tflops_dense"]["layers"] * 1e12 == 2 * layer_macs * 24 * 4
    assert r["llm_parts_tflops_mod"]["layers"] * 1e12 == 2 * layer_macs * kept * 4
    assert r["llm_parts_tflops_dense"]["attention"] * 1e12 == 2 * pair_macs * (24 * 25 / 2) * 4
    assert r["llm_parts_tflops_mod"]["attention"] * 1e12 == 2 * pair_macs * (kept * (kept + 1) / 2) * 4
    assert r["llm_parts_tflops_mod"]["router"] * 1e12 == 2 * 128 * 16 * 4
    assert r["kv_cache_bytes_dense"] == 24 * 4 * (2 * 128) * 2
    assert r["kv_cache_bytes_mod"] == kept * 4 * (2 * 128) * 2
    assert r["kv_cache_ratio"] == kept / 24 and r["vision_kv_ratio"] == 0.5


def test_meta_tower_count_equals_a_real_tower_plus_its_attention():
    """On the meta device FlopCounterMode counts the tower's SDPA; on CPU it has no formula for the CPU
    kernel and counts the rest only. The difference is exactly the attention: per layer, q.k and p.v
    over (patches + class token)^2 pairs, 2 FLOPs per multiply-add."""
    cfg = load_config(TINY)
    meta, tokens = und_image_flops(cfg)
    u = cfg.model.und.tower
    und = UnderstandingEncoder(cfg.model.und, cfg.model.llm.hidden_size)
    real = forward_flops(und, (1, und.channels, u.image_size, u.image_size))
    attention = u.layers * 2 * 2 * (tokens + 1) ** 2 * u.width
    assert tokens == 16 and meta == real + attention


def test_bad_arguments_are_named():
    cfg = load_config(TINY)
    with pytest.raises(KeyError, match="kv-dtype"):
        report(cfg, kv_dtype="int3")
    with pytest.raises(ValueError, match="text-tokens"):
        report(cfg, text_tokens=-1)
    with pytest.raises(ValueError, match="empty"):
        report(cfg, vision_tokens=0, text_tokens=0)
    assert torch.get_default_device().type == "cpu"  # the meta builds left the default device alone
