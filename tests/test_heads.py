"""Image heads: block-causal attention, code heads' training and cached sampling, packing, registry."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from data.sources import BuildContext, SourceConfig, build_samples, source_kind
from data.stream import read_samples
from mm.batch import collate
from mm.config import load_config
from mm.kernels.attention import block_causal_mask
from mm.model.freq_tokenizer import FreqTokenizer, FreqTokenizerConfig
from mm.model.heads import IMAGE_HEADS
from mm.model.heads.codes import CFG_SCHEDULES, sample_logits
from mm.model.unified import UnifiedModel
from mm.schema import ConfigError
from mm.sequence import image_generation_sample, understanding_sample
from tests.conftest import ROOT, SMALL

TOK = FreqTokenizerConfig(channels=(8, 16), code_dim=8, codebook_size=32, stages=(1, 2, 4))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    torch.manual_seed(0)
    tok = FreqTokenizer(TOK)
    with torch.no_grad():  # spread the codebook so random images use many codes
        tok.codebook.embed.normal_()
    out = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(out)
    return out


def _cfg(tok_dir, tmp_path, heads="nextfreq", extra=()):
    """The small config with exactly ``heads`` (comma-separated, in order); code heads read ``tok_dir``."""
    names = heads.split(",")
    over = [f"model.heads.{h}=null" for h in ("flow", "nextfreq", "raster") if h not in names]
    for h in names:
        over.append(f"model.heads.{h}.tokenizer.path={tok_dir}" if h != "flow" else "model.heads.flow.cfg_scale=2.0")
    over = SMALL + [o for o in over if not o.startswith("model.heads.flow.") or "flow" in names]
    over += [f"run.dir={tmp_path}/run", *extra]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", over)
    assert list(cfg.model.heads) == names
    return cfg


def _trained_looking(model):
    torch.manual_seed(3)
    for name in ("nextfreq", "raster"):
        if name in model.heads:  # sharper logits than the init gives, so prompts matter
            torch.nn.init.normal_(model.heads[name].out.weight, std=0.5)
    return model.eval()


# ---- attention ----------------------------------------------------------------------------------
def test_block_causal_mask_is_exact():
    # row: sample 0 = 2 text tokens, stage A (2 tokens), stage B (3 tokens), 1 text token; then sample 1 with a
    # 2-token block; then padding
    sid = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, -1]])
    bid = torch.tensor([[-1, -1, 0, 0, 1, 1, 1, -1, -1, 0, 0, -1]])
    m = block_causal_mask(sid, bid)[0, 0]
    L = sid.shape[1]
    for i in range(L):
        for j in range(L):
            same = sid[0, i] == sid[0, j]
            block = bid[0, i] >= 0 and bid[0, i] == bid[0, j]
            assert m[i, j] == (same and (j <= i or block)), (i, j)
    assert m[2, 3] and m[4, 6] and not m[3, 4]  # full within a stage, nothing of a later stage
    assert m[5, 2] and m[5, 3]  # stage B sees stage A
    assert not m[9, 0] and not m[9, 4] and m[9, 10]  # the second sample's block sees nothing of the first
    assert torch.equal(block_causal_mask(sid, torch.full_like(sid, -1)), block_causal_mask(sid))


@pytest.mark.parametrize("backend", ["sdpa", "sdpa_dense", "eager", "flash_attention_2"])
def test_every_cpu_backend_computes_the_block_pattern(backend):
    """The spec the model hands every backend carries the blocks; each computes the same attention
    (flash-attn cannot express full blocks: it falls back to SDPA, so the pattern holds there too)."""
    from mm.kernels.attention import AttentionSpec, attention

    sid = torch.tensor([[0, 0, 0, 0, 1, 1]])
    bid = torch.tensor([[-1, 0, 0, -1, -1, -1]])
    spec = AttentionSpec.packed(sid, bid)
    assert torch.equal(spec.mask(), block_causal_mask(sid, bid)) and spec.mask()[0, 0, 1, 2]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 8, generator=g) for _ in range(3))
    probs = torch.softmax((q @ k.transpose(-1, -2) * 0.5).masked_fill(~spec.mask(), float("-inf")), -1)
    torch.testing.assert_close(attention(backend, q, k, v, spec, 0.5), probs @ v)


def test_llm_block_attention_matches_reference(tok_dir, tmp_path, vocab):
    """A stage's first token sees its later tokens: changing a later slot changes the earlier slot's output."""
    torch.manual_seed(0)
    model = UnifiedModel(_cfg(tok_dir, tmp_path).model, vocab).eval()
    s = image_generation_sample(vocab, model.heads["nextfreq"].template, torch.rand(1, 8, 8), "draw the digit 3")
    batch = collate([[s]], len(s), vocab.pad)
    with torch.no_grad():
        emb = model.llm.get_input_embeddings()(batch.input_ids)
        first = len(s) - 1 - 21
        emb2 = emb.clone()
        emb2[0, first + 1 + 3] += 1.0  # the last token of stage 2 (stages 1, 2, 4: slots 1..4 are stage 2)
        from mm.kernels.attention import AttentionSpec

        def run(e):
            spec = AttentionSpec.packed(batch.sample_ids, batch.block_ids)
            return model.decode(e, batch.position_ids, spec).last_hidden_state[0]

        a, b = run(emb), run(emb2)
    diff = (a - b).abs().amax(-1)
    assert diff[first + 1] > 1e-4  # stage 2's first token sees the stage's last token
    assert diff[: first + 1].max() == 0  # prompt and stage 1 do not


# ---- code heads: training ----------------------------------------------------------------------------
def test_nextfreq_template_and_collate(tok_dir, tmp_path, vocab):
    model = UnifiedModel(_cfg(tok_dir, tmp_path).model, vocab)
    t = model.heads["nextfreq"].template
    assert t.blocks == (1, 4, 16) and t.full_blocks and t.end
    s = image_generation_sample(vocab, t, torch.rand(1, 8, 8), "draw the digit 3")
    assert s.input_ids[-1] == vocab.eoi and s.input_ids[-23] == vocab.boi
    assert s.block_ids[-22:-1] == [0] + [1] * 4 + [2] * 16 and s.head == "nextfreq"
    und = understanding_sample(vocab, torch.rand(3, 8, 8), 16, "what digit is this ?", "3")
    batch = collate([[und, s]], 96, vocab.pad)
    assert list(batch.images) == ["nextfreq"] and batch.images["nextfreq"].images.shape == (1, 1, 8, 8)
    assert batch.images["nextfreq"].sample_ids.tolist() == [1]
    assert (batch.block_ids[0, : len(und)] == -1).all()
    assert batch.block_ids[0, len(und) :][: len(s)].tolist() == [-1] * (len(s) - 22) + s.block_ids[-22:]
    assert collate([[und]], 96, vocab.pad).block_ids is None  # no full block anywhere: none to mask


def _code_samples(model, vocab, n=3, head="nextfreq"):
    g = torch.Generator().manual_seed(0)
    prompts = ["draw the digit 3", "an image of the number seven", "a handwritten 1"]
    return [
        image_generation_sample(vocab, model.heads[head].template, torch.rand(1, 8, 8, generator=g), prompts[i % 3])
        for i in range(n)
    ]


@pytest.mark.parametrize("head", ["nextfreq", "raster"])
def test_code_head_packed_equals_alone(tok_dir, tmp_path, vocab, head):
    torch.manual_seed(0)
    model = UnifiedModel(_cfg(tok_dir, tmp_path, head).model, vocab).eval()
    samples = _code_samples(model, vocab, 3, head)
    und = understanding_sample(vocab, torch.rand(3, 8, 8), model.und.tokens_per_image, "what digit is this ?", "3")
    seq_len = sum(len(s) for s in samples) + len(und) + 5
    packed = model(collate([[samples[0], und, samples[1], samples[2]]], seq_len, vocab.pad))
    alone = [model(collate([[s]], len(s), vocab.pad))[f"{head}_per_image"] for s in samples]
    torch.testing.assert_close(packed[f"{head}_per_image"], torch.cat(alone), rtol=1e-5, atol=1e-5)
    assert packed[head].item() > 0 and packed["text"].item() > 0


def test_code_head_learns_and_gets_gradient(tok_dir, tmp_path, vocab):
    torch.manual_seed(0)
    model = UnifiedModel(_cfg(tok_dir, tmp_path).model, vocab)
    batch = collate([[s] for s in _code_samples(model, vocab, 4)], 40, vocab.pad)
    batch = model.add_draws(batch, torch.Generator().manual_seed(0))
    assert model.loss_counts(batch)["nextfreq"] == 4 * 21
    out = model(batch)
    assert abs(out["nextfreq"].item() - torch.log(torch.tensor(32.0)).item()) < 1.0  # ~uniform at init
    out["loss"].backward()
    net = model.heads["nextfreq"]
    assert net.in_proj.weight.grad.abs().sum() > 0 and net.start.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.tokenizer.parameters())  # frozen
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = out["nextfreq"].item()
    for _ in range(30):
        opt.zero_grad()
        out = model(batch)
        out["loss"].backward()
        opt.step()
    assert out["nextfreq"].item() < 0.5 * first  # it can fit its codes


def test_both_heads_in_one_model_train_on_their_own_samples(tok_dir, tmp_path, vocab):
    torch.manual_seed(0)
    model = UnifiedModel(_cfg(tok_dir, tmp_path, "flow,nextfreq").model, vocab)
    names = {n for n, _ in model.named_modules()}
    assert {"heads.flow.gen_encoder", "heads.nextfreq.tokenizer"} <= names  # each head owns its parts
    flow = image_generation_sample(vocab, model.heads["flow"].template, torch.rand(1, 8, 8), "draw the digit 3")
    code = _code_samples(model, vocab, 1)[0]
    batch = model.add_draws(collate([[flow, code]], 80, vocab.pad), torch.Generator().manual_seed(0))
    out = model(batch)
    assert out["flow_count"].item() == 1 and out["nextfreq_count"].item() == 21
    assert set(model.loss_weights()) == {"text", "flow", "repa", "nextfreq"}
    batch = replace(batch, images={"flow": batch.images["flow"]})
    with pytest.raises(ValueError, match="generation placeholders"):
        model(batch)


def test_run_every_module_placeholders_reach_every_head(tok_dir, tmp_path, vocab):
    torch.manual_seed(0)
    model = UnifiedModel(_cfg(tok_dir, tmp_path, "flow,nextfreq").model, vocab)
    model.require_every_module()
    und = understanding_sample(vocab, torch.rand(3, 8, 8), model.und.tokens_per_image, "what digit is this ?", "3")
    out = model(collate([[und]], 40, vocab.pad))
    out["loss"].backward()
    net, flow = model.heads["nextfreq"], model.heads["flow"]
    for p in (net.in_proj.weight, net.out.weight, net.start, flow.gen_decoder.out.weight, flow.repa_proj[0].weight):
        assert p.grad is not None and p.grad.abs().sum() == 0  # in the graph, times 0


# ---- code heads: sampling ----------------------------------------------------------------------------
@pytest.mark.parametrize("head,schedule", [("nextfreq", "constant"), ("nextfreq", "linear"), ("raster", "constant")])
def test_cached_sampling_equals_uncached(tok_dir, tmp_path, vocab, head, schedule):
    torch.manual_seed(0)
    model = _trained_looking(UnifiedModel(_cfg(tok_dir, tmp_path, head).model, vocab))
    h = model.heads[head]
    prompts = ["draw the digit 3", "an image of the number seven", "a handwritten 1"]  # different lengths
    kw = dict(cfg_scale=3.0, cfg_schedule=schedule, temperature=1.0, top_k=20, top_p=0.9)
    calls = []
    hook = model.llm.get_decoder().norm.register_forward_hook(  # one LLM pass = one final norm
        lambda *a: calls.append(1)
    )
    s1, c1, l1 = h.sample_codes(model, prompts, torch.Generator().manual_seed(5), use_cache=True, **kw)
    passes = len(calls)
    s2, c2, l2 = h.sample_codes(model, prompts, torch.Generator().manual_seed(5), use_cache=False, **kw)
    hook.remove()
    assert passes == len(h.blocks)  # NFIG: one pass per stage; raster: one per code
    for a, b in zip(l1, l2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(c1, c2))
    img = h.images(s1)
    assert img.shape == (3, 1, 8, 8) and 0 <= img.min() and img.max() <= 1
    assert not torch.allclose(l1[-1][0], l1[-1][1])  # prompts change the logits


def test_nfig_passes_and_left_padding(tok_dir, tmp_path, vocab):
    torch.manual_seed(0)
    model = _trained_looking(UnifiedModel(_cfg(tok_dir, tmp_path).model, vocab))
    h = model.heads["nextfreq"]
    assert h.passes_per_image == 3 and model.head().name == "nextfreq"
    _, _, alone = h.sample_codes(model, ["draw the digit 3"], torch.Generator().manual_seed(1), top_k=1)
    _, _, batched = h.sample_codes(model, ["draw the digit 3", "an image of the number seven"],
                                   torch.Generator().manual_seed(1), top_k=1)  # fmt: skip
    for a, b in zip(alone, batched):
        torch.testing.assert_close(a[0], b[0], rtol=1e-4, atol=1e-4)
    imgs = model.generate(["draw the digit 3"], torch.Generator().manual_seed(0), head="nextfreq")
    assert imgs.shape == (1, 1, 8, 8)
    with pytest.raises(KeyError, match="not in this model"):
        model.generate(["x"], head="flow")


def test_sampling_filters():
    logits = torch.tensor([[[3.0, 2.0, 1.0, -5.0]]])
    g = torch.Generator().manual_seed(0)
    assert (sample_logits(logits.expand(1, 200, 4), 1.0, 1, 1.0, g) == 0).all()  # top-1 is greedy
    draws = sample_logits(logits.expand(1, 2000, 4), 1.0, 2, 1.0, g)
    assert set(draws.unique().tolist()) == {0, 1}  # top-2
    p = torch.softmax(logits[0, 0], -1)  # 0.705, 0.259, 0.035, 0.000
    draws = sample_logits(logits.expand(1, 2000, 4), 1.0, 0, float(p[0]) + 0.01, g)
    assert set(draws.unique().tolist()) == {0, 1}  # nucleus: the codes up to the first past top_p
    assert CFG_SCHEDULES["linear"](3.0, 0, 3) == 1.0 and CFG_SCHEDULES["linear"](3.0, 2, 3) == 3.0


# ---- registry, config, data --------------------------------------------------------------------------
def test_registry_and_config_errors(tok_dir, tmp_path, vocab):
    assert {"flow", "nextfreq", "raster"} <= set(IMAGE_HEADS)
    for h in IMAGE_HEADS:  # any head name is a generation source's shorthand argument
        assert source_kind(f"generation:{h}")[1] == h and SourceConfig("g", f"generation:{h}").options.head == h
    with pytest.raises(ConfigError, match="model.heads"):
        load_config(ROOT / "configs" / "tiny.yaml", SMALL + ["model.heads.flows={}"])
    with pytest.raises(ConfigError, match="lacks"):
        _cfg(tok_dir, tmp_path, "flow", ["data.sources=[{name: g, kind: 'generation:nextfreq'}]"])
    with pytest.raises(ConfigError, match="cfg_schedule"):
        _cfg(tok_dir, tmp_path, extra=["model.heads.nextfreq.cfg_schedule=cosine"])
    with pytest.raises(ConfigError, match=r"model.heads.nextfreq.tokenizer.patth; did you mean .*path\?"):
        _cfg(tok_dir, tmp_path, extra=["model.heads.nextfreq.tokenizer.patth=x"])
    cfg = _cfg(tok_dir, tmp_path, extra=[f"model.heads.nextfreq.tokenizer.path={tmp_path}/none"])
    with pytest.raises(FileNotFoundError, match="model.heads.nextfreq.tokenizer"):
        UnifiedModel(cfg.model, vocab)


def test_generation_source_builds_the_heads_layout(tok_dir, tmp_path, vocab, shard_dir):
    model = UnifiedModel(_cfg(tok_dir, tmp_path, "nextfreq,raster").model, vocab)
    raw = next(iter(read_samples(f"{shard_dir}/digits/train-000000.tar")))
    ctx = BuildContext(vocab, model.sample_shapes(), 128, 10**6, random.Random(0))
    (default,) = build_samples(SourceConfig("g", "generation"), raw, ctx)
    (raster,) = build_samples(SourceConfig("r", "generation:raster"), raw, ctx)
    assert default.head == "nextfreq" and raster.head == "raster"
    assert default.input_ids.count(vocab.gen) == 21 and raster.input_ids.count(vocab.gen) == 16
    assert raster.block_ids == [] and max(default.block_ids) == 2
    with pytest.raises(ValueError, match="has no .flow. head"):
        build_samples(SourceConfig("f", "generation:flow"), raw, ctx)


def test_release_with_code_heads_mod_and_v2pe_round_trips(tok_dir, tmp_path, vocab):
    """Export -> AutoModel: the same weights, answers (MoD + V2PE on) and next-frequency images per seed;
    the release carries the code tokenizer and needs no path to it."""
    import shutil

    from transformers import AutoModel

    import mm  # noqa: F401  (registers the Auto classes)
    from mm.hf import UnifiedMMProcessor, wrap

    extra = ("model.mod.enabled=true", "model.mod.ratio=0.5", "model.v2pe.enabled=true")
    cfg = _cfg(tok_dir, tmp_path, "flow,nextfreq", extra)
    torch.manual_seed(0)
    model = _trained_looking(UnifiedModel(cfg.model, vocab))
    for p in model.mod_routers.parameters():
        torch.nn.init.normal_(p, std=0.5)
    out = tmp_path / "release"
    wrap(model, cfg.model).save_pretrained(str(out))
    UnifiedMMProcessor.from_model(model).save_pretrained(str(out))
    shutil.rmtree(tok_dir)  # the tokenizer's weights travel inside the release
    try:
        hf = AutoModel.from_pretrained(str(out), local_files_only=True).eval()
        for k, v in model.state_dict().items():
            assert torch.equal(v, hf.state_dict()[k]), k
        images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
        questions = ["what digit is this ?", "digit ?"]
        assert model.answer(images, questions, max_new_tokens=3) == hf.answer(images, questions, max_new_tokens=3)
        g = torch.Generator
        a = model.generate(["draw the digit 4"], generator=g().manual_seed(2), head="nextfreq")
        b = hf.generate_images(["draw the digit 4"], generator=g().manual_seed(2), head="nextfreq")
        assert torch.equal(a, b)
    finally:
        FreqTokenizer(TOK).save_pretrained(tok_dir)  # the module's fixture stays usable (weights differ)
