"""Frequency-band tokenizer (NFIG's FR-VAE): bands, spectral resampling, residual stages, codebook, LLM interface."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mm.model.freq_tokenizer import (
    EMACodebook,
    FreqTokenizer,
    FreqTokenizerConfig,
    band_masks,
    frequency_radius,
    resample,
    spectral_resample_matrix,
    split_bands,
)
from mm.schema import ConfigError

ROOT = Path(__file__).resolve().parent.parent
PAPER_STAGES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
# (height, width, stages): the paper's map, the tiny one, odd sizes, a non-square map
BAND_CASES = [(16, 16, PAPER_STAGES), (4, 4, (1, 2, 4)), (8, 8, (1, 2, 3, 4, 6, 8)), (7, 7, (1, 2, 3, 5, 7)),
              (5, 5, (1, 3, 5)), (9, 6, (1, 2, 4, 6))]  # fmt: skip
SMALL = dict(channels=(16, 32), code_dim=8, codebook_size=64)


def _trainer():
    """The tokenizer's trainer (``mm/train/tokenizer.py``; ``scripts/train_tokenizer.py`` is its command line)."""
    from mm.train import tokenizer

    return tokenizer


def _digits(split: str, n: int | None = None) -> torch.Tensor:
    from data.bundled.digits import load_digit_split

    x, _ = load_digit_split(split)
    return torch.from_numpy(x[:n])[:, None]


# --------------------------------------------------------------------------------------------------------------
# Bands
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("h, w, stages", BAND_CASES)
def test_band_masks_partition_the_spectrum_from_low_to_high(h, w, stages):
    masks = band_masks(h, w, stages)
    assert masks.shape == (len(stages), h, w) and masks.dtype == torch.bool
    assert torch.equal(masks.sum(0), torch.ones(h, w, dtype=torch.long))  # every bin in exactly one band
    assert all(m.any() for m in masks)
    radius = frequency_radius(h, w)
    for lo, hi in zip(masks, masks[1:]):  # bands are ordered by frequency
        assert radius[lo].max() < radius[hi].min()
    assert masks[0].nonzero().tolist() == [[0, 0]]  # stage 1 (s=1) is the mean
    # symmetric under k -> -k, so the band of a real map is real
    flipped = torch.roll(torch.flip(masks, dims=(1, 2)), shifts=(1, 1), dims=(1, 2))
    assert torch.equal(masks, flipped)
    for i, s in enumerate(stages[:-1]):  # band i fits the s_i x s_i grid: |k| <= s_i/2 on both axes
        ky, kx = (torch.fft.fftfreq(n, 1.0 / n).abs() for n in (h, w))
        assert (ky[:, None].expand(h, w)[masks[i]] <= s / 2).all() and (kx[None].expand(h, w)[masks[i]] <= s / 2).all()


@pytest.mark.parametrize("h, w, stages", BAND_CASES)
def test_band_decomposition_is_lossless(h, w, stages):
    masks = band_masks(h, w, stages)
    x64 = torch.randn(2, 3, h, w, dtype=torch.float64)
    bands = split_bands(x64, masks)
    assert bands.shape == (len(stages), 2, 3, h, w)
    torch.testing.assert_close(bands.sum(0), x64, rtol=0, atol=1e-12)
    x32 = x64.float()
    torch.testing.assert_close(split_bands(x32, masks).sum(0), x32, rtol=0, atol=1e-5)
    # each band is real: the imaginary part of its inverse FFT vanishes
    spectrum = torch.fft.fft2(x64)
    for m in masks:
        assert torch.fft.ifft2(spectrum * m).imag.abs().max() < 1e-12


def test_stages_that_add_no_frequency_are_rejected():
    with pytest.raises(ValueError, match="adds no frequency"):
        band_masks(1, 8, (1, 2, 3, 8))  # a 1-row map has no frequency with 1 < radius <= 1.5


@pytest.mark.parametrize("n, s", [(16, 13), (16, 10), (16, 5), (8, 3), (7, 4), (9, 6), (4, 2)])
def test_spectral_resampling_is_exact_on_band_limited_maps(n, s):
    down, up = spectral_resample_matrix(n, s).double(), spectral_resample_matrix(s, n).double()
    y = torch.randn(2, 3, s, s, dtype=torch.float64)
    torch.testing.assert_close(resample(resample(y, up), down), y)  # down(up(y)) == y for any grid
    # a map band-limited below the s-grid's Nyquist survives down then up unchanged
    radius = frequency_radius(n, n)
    x = torch.fft.ifft2(torch.fft.fft2(torch.randn(2, 3, n, n, dtype=torch.float64)) * (radius < s / 2)).real
    torch.testing.assert_close(resample(resample(x, down), up), x)
    const = torch.ones(1, 1, n, n, dtype=torch.float64)  # the mean is preserved (area-consistent scaling)
    torch.testing.assert_close(resample(const, down), torch.ones(1, 1, s, s, dtype=torch.float64))


# --------------------------------------------------------------------------------------------------------------
# Tokenizer: shapes, interface, checkpoints
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok() -> FreqTokenizer:
    torch.manual_seed(0)
    t = FreqTokenizer(FreqTokenizerConfig(**SMALL)).eval()
    t.codebook.update(torch.randn(500, t.code_dim), torch.zeros(500, dtype=torch.long))  # data-dependent init
    return t


def test_code_shapes_per_stage_and_decode(tok):
    images = _digits("heldout", 5)
    codes = tok.encode(images)
    assert [c.shape for c in codes] == [(5, s, s) for s in tok.stages] == [(5, 1, 1), (5, 2, 2), (5, 4, 4)]
    assert all(c.dtype == torch.long and 0 <= int(c.min()) and int(c.max()) < tok.codebook_size for c in codes)
    assert tok.tokens_per_image == 21
    assert [c.shape for c in tok.encode(images, single_scale=True)] == [(5, 4, 4)]
    for k in range(1, len(codes) + 1):  # all stages, or a prefix (a coarse image)
        out = tok.decode(codes[:k])
        assert out.shape == (5, 1, 8, 8) and 0 <= float(out.min()) and float(out.max()) <= 1
    assert tok.decode(tok.encode(images, single_scale=True), single_scale=True).shape == (5, 1, 8, 8)
    uint8 = (images * 255).round().to(torch.uint8)
    assert all(torch.equal(a, b) for a, b in zip(tok.encode(uint8), codes))


def test_bad_inputs_are_named(tok):
    with pytest.raises(ValueError, match=r"images \[N,1,8,8\]"):
        tok.encode(torch.rand(2, 3, 8, 8))
    codes = tok.encode(_digits("heldout", 2))
    with pytest.raises(ValueError, match="stage 1 must be"):
        tok.decode([codes[0], codes[2]])
    with pytest.raises(ValueError, match="outside"):
        tok.decode([codes[0] + tok.codebook_size])
    with pytest.raises(ValueError, match="expected codes of 1..1 stages"):
        tok.decode(codes, single_scale=True)


def test_stage_inputs_shapes_and_causality(tok):
    codes = tok.encode(_digits("heldout", 4))
    inputs = tok.stage_inputs(codes)
    assert [x.shape for x in inputs] == [(4, s * s, tok.code_dim) for s in tok.stages[1:]]
    # input of stage k+1 (inputs[k-1]) depends on stages <= k only
    for j in range(len(codes)):
        changed = [c.clone() for c in codes]
        changed[j] = (changed[j] + 1) % tok.codebook_size
        other = tok.stage_inputs(changed)
        for i, (a, b) in enumerate(zip(inputs, other)):
            if i < j:  # built from stages 1..i+1, all before stage j+1
                assert torch.equal(a, b)
            else:
                assert not torch.allclose(a, b)
    # the stage-1 input is the LLM's own start token: stage_inputs covers stages 2..n
    assert len(inputs) == len(tok.stages) - 1


def test_sampling_one_stage_at_a_time_matches_teacher_forcing(tok):
    codes = tok.encode(_digits("heldout", 3))
    acc = tok.empty_accumulator(3)
    stepwise = []
    for k, c in enumerate(codes):
        acc, nxt = tok.next_stage_input(acc, c, k)
        if nxt is not None:
            stepwise.append(nxt)
    assert nxt is None
    for a, b in zip(stepwise, tok.stage_inputs(codes)):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(tok.decode_features(acc), tok.decode(codes))


def test_band_and_codebook_math_ignore_autocast(tok):
    """The LLM runs under bf16 autocast: stage inputs and code lookups must stay float32 and unchanged."""
    images = _digits("heldout", 8)
    codes = tok.encode(images)
    f = tok.encoder(images * 2 - 1).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inputs = tok.stage_inputs(codes)
        requantized = tok.quantize(f)[0]
    assert all(x.dtype == torch.float32 for x in inputs)
    for a, b in zip(inputs, tok.stage_inputs(codes)):
        torch.testing.assert_close(a, b)
    assert all(torch.equal(a, b) for a, b in zip(requantized, codes))


def test_code_embedding_is_the_codebook(tok):
    codes = tok.encode(_digits("heldout", 2))
    emb = tok.code_embedding(codes[1])
    assert emb.shape == (2, 4, tok.code_dim)
    assert torch.equal(emb[1, 3], tok.codebook.embed[codes[1][1].reshape(-1)[3]])
    assert torch.equal(tok.code_embedding(codes[1].reshape(2, -1)), emb)
    # the first stage input (stage 2) is stage 1's code vector sampled on the 2x2 grid: a constant map
    first = tok.stage_inputs(codes)[0]
    torch.testing.assert_close(first, tok.code_embedding(codes[0]).expand(-1, 4, -1), atol=1e-5, rtol=1e-5)


def test_save_load_round_trip_gives_identical_codes(tok, tmp_path):
    tok.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["model.safetensors", "tokenizer_config.json"]
    loaded = FreqTokenizer.from_pretrained(tmp_path / "ckpt")
    assert loaded.cfg == tok.cfg
    images = _digits("heldout", 16)
    for single in (False, True):
        a, b = tok.encode(images, single_scale=single), loaded.encode(images, single_scale=single)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        torch.testing.assert_close(tok.decode(a, single_scale=single), loaded.decode(b, single_scale=single))
    with pytest.raises(FileNotFoundError, match="not a tokenizer checkpoint"):
        FreqTokenizer.from_pretrained(tmp_path)


# --------------------------------------------------------------------------------------------------------------
# Codebook
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lookup", ["cosine", "euclidean"])
def test_dead_code_restart_revives_unused_codes(lookup):
    torch.manual_seed(0)
    centres = torch.randn(4, 8) * 3
    data = (centres[:, None] + 0.1 * torch.randn(4, 64, 8)).reshape(-1, 8)

    def run(threshold: float) -> torch.Tensor:
        cb = EMACodebook(size=16, dim=8, lookup=lookup, decay=0.9, dead_threshold=threshold)
        cb.initialized.fill_(True)
        cb.embed.copy_(torch.cat([centres, -centres[:1].expand(12, 8) * 5 + torch.randn(12, 8)]))  # 12 never chosen
        gen = torch.Generator().manual_seed(0)
        for _ in range(5):
            cb.update(data, cb.lookup(data), generator=gen)
        return cb.lookup(data).unique()

    assert len(run(threshold=0.0)) <= 4  # without restarts the far codes stay dead
    assert len(run(threshold=1.0)) > 8  # restarted onto data vectors, they take assignments


def test_ema_moves_codes_to_their_cluster_means():
    cb = EMACodebook(size=2, dim=2, lookup="euclidean", decay=0.0, dead_threshold=0.0)
    cb.initialized.fill_(True)
    cb.embed.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
    x = torch.tensor([[2.0, 1.0], [4.0, 1.0], [-3.0, 0.0]])
    cb.update(x, cb.lookup(x))
    torch.testing.assert_close(cb.embed, torch.tensor([[3.0, 1.0], [-3.0, 0.0]]))


# --------------------------------------------------------------------------------------------------------------
# Training: error falls as stages are added; the script; the configs
# --------------------------------------------------------------------------------------------------------------


def test_reconstruction_error_falls_as_stages_are_added(tmp_path):
    script = _trainer()
    cfg = script.load_run_config(
        ROOT / "configs/tokenizer/tiny.yaml",
        [f"model.{k}={list(v) if isinstance(v, tuple) else v}" for k, v in SMALL.items()]
        + ["train.max_steps=120", "data.batch_size=64", "train.warmup_steps=10", "train.log_every=60"],
    )
    batches, heldout = script.DATASETS["digits"](cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # conv steps this small only lose to a second (shared) thread
    try:
        tok, _ = script.train(cfg, batches, tmp_path)
    finally:
        torch.set_num_threads(threads)
    report = script.evaluate(tok, script.Split(heldout.images[:200]))
    pixel = [r["pixel_mse"] for r in report["per_stages_used"]]
    feature = [r["feature_rel_err"] for r in report["per_stages_used"]]
    assert all(b <= a for a, b in zip(pixel, pixel[1:])) and pixel[-1] < 0.5 * pixel[0], pixel
    assert all(b <= a for a, b in zip(feature, feature[1:])) and feature[-1] < feature[0], feature
    assert report["codebook"]["used"] > 0.5
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [60, 120] and lines[-1]["pixel"] < lines[0]["pixel"]
    assert {"loss", "ss_pixel", "codes_used", "perplexity", "eta_s"} <= set(lines[-1])


def test_script_trains_on_shards_and_writes_the_checkpoint_folder(shard_dir, tmp_path):
    script = _trainer()
    out, smoke = tmp_path / "tok", f"{shard_dir}/smoke/smoke-000000.tar"
    report = script.main(
        ["--config", str(ROOT / "configs/tokenizer/tiny.yaml"), f"out_dir={out}", "data.kind=shards",
         f"data.train_shards={smoke}", f"data.heldout_shards={smoke}",
         "data.shuffle_buffer=2", "model.image_size=16", "model.image_channels=3", "model.channels=[8,8,8]",
         "model.stages=[1,2,4]", "model.codebook_size=16", "model.code_dim=4", "train.max_steps=3", "data.batch_size=2",
         "train.log_every=1", "report_examples=3"]
    )  # fmt: skip
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "tokenizer_config.json", "train_config.yaml",
                                               "metrics.jsonl", "report.json", "reconstructions.png"}  # fmt: skip
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    assert report["n_images"] == 5 and len(report["per_stages_used"]) == 3 and "digit_classifier" not in report
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    tok = FreqTokenizer.from_pretrained(out)
    assert [c.shape[1:] for c in tok.encode(torch.rand(1, 3, 16, 16))] == [(1, 1), (2, 2), (4, 4)]


@pytest.mark.parametrize("path", sorted((ROOT / "configs/tokenizer").glob("*.yaml")), ids=lambda p: p.name)
def test_every_tokenizer_config_loads(path):
    cfg = _trainer().load_run_config(path)
    assert cfg.name == path.stem and cfg.model.stages[-1] == cfg.model.image_size // 2 ** (len(cfg.model.channels) - 1)


def test_tiny_config_gives_5x_fewer_passes_than_raster():
    cfg = _trainer().load_run_config(ROOT / "configs/tokenizer/tiny.yaml")
    stages = cfg.model.stages
    assert stages[-1] ** 2 / len(stages) >= 5  # raster: one pass per finest token; NFIG: one per stage


def test_nfig_256_config_has_the_papers_shapes():
    cfg = _trainer().load_run_config(ROOT / "configs/tokenizer/nfig_256.yaml")
    m = cfg.model
    assert m.stages == PAPER_STAGES and m.codebook_size == 4096 and m.image_size == 256
    with torch.device("meta"):
        full = FreqTokenizer(m)
    assert full.tokens_per_image == 680 and full.feature_size == 16
    assert sum(p.numel() for p in full.parameters()) > 50e6  # VAR-sized conv autoencoder
    # the same shapes with narrow convs run for real: codes per stage, decoded size
    import dataclasses

    small = FreqTokenizer(dataclasses.replace(m, channels=(4, 4, 4, 4, 4), blocks_per_level=1)).eval()
    codes = small.encode(torch.rand(1, 3, 256, 256))
    assert [tuple(c.shape) for c in codes] == [(1, s, s) for s in PAPER_STAGES]
    assert [x.shape[1] for x in small.stage_inputs(codes)] == [s * s for s in PAPER_STAGES[1:]]
    assert small.decode(codes[:4]).shape == (1, 3, 256, 256)


@pytest.mark.parametrize(
    "override, named",
    [("model.stages=[1,3,2]", "strictly increasing"), ("model.stages=[1,2,8]", "last stage is 8"),
     ("model.residual_scopes=band", "residual_scopes"), ("data.kind=imagenet", "data.kind")],
)  # fmt: skip
def test_bad_tokenizer_config_names_the_problem(override, named):
    with pytest.raises(ConfigError, match=named):
        _trainer().load_run_config(ROOT / "configs/tokenizer/tiny.yaml", [override])


def test_perceptual_hook_loads_local_weights_only(tmp_path):
    from safetensors.torch import save_file
    from torchvision.models.vgg import cfgs, make_layers

    script = _trainer()
    with pytest.raises(FileNotFoundError, match="perceptual.weights"):
        script.VGG16FeatureDistance(str(tmp_path / "missing.safetensors"))
    torch.manual_seed(0)
    trunk = make_layers(cfgs["D"])
    save_file({f"features.{k}": v for k, v in trunk.state_dict().items()}, str(tmp_path / "vgg.safetensors"))
    dist = script.VGG16FeatureDistance(str(tmp_path / "vgg.safetensors"))
    a, b = torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16)
    assert float(dist(a, a)) == 0.0 and float(dist(a, b)) > 0.0
    b.requires_grad_(True)
    dist(a, b).backward()
    assert b.grad is not None and b.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------------------
# GPU: same codes as on CPU; the band/codebook math stays float32 under bf16 autocast; the paper's size trains
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_codes_match_cpu_and_autocast_keeps_the_band_math_in_float32(tok):
    images = _digits("heldout", 64)
    cuda = FreqTokenizer(tok.cfg)
    cuda.load_state_dict(tok.state_dict())
    cuda = cuda.cuda().eval()
    cpu_codes, gpu_codes = tok.encode(images), cuda.encode(images.cuda())
    agree = torch.cat([(a == b.cpu()).float().reshape(-1) for a, b in zip(cpu_codes, gpu_codes)]).mean()
    assert agree > 0.98  # conv round-off may flip a near tie, nothing more
    with torch.autocast("cuda", dtype=torch.bfloat16):
        codes = cuda.encode(images.cuda())
        inputs = cuda.stage_inputs(codes)
        out = cuda.train()(images.cuda())
        out["loss"].backward()
    assert all(x.dtype == torch.float32 for x in inputs) and torch.isfinite(out["loss"])
    cuda.codebook.update(out["vectors"], out["indices"])
    assert torch.isfinite(cuda.codebook.embed).all()


@pytest.mark.gpu
def test_nfig_256_trains_a_step_at_full_size_on_gpu():
    from skimage import data as skdata

    from mm.images import as_unit_float, generation_preprocess, preprocess

    cfg = _trainer().load_run_config(ROOT / "configs/tokenizer/nfig_256.yaml")
    spec = generation_preprocess(256, 3)
    photos = [getattr(skdata, n)() for n in ("astronaut", "coffee", "chelsea")]
    images = as_unit_float(torch.stack([preprocess(p, spec) for p in photos])).cuda()
    tok = FreqTokenizer(cfg.model).cuda()
    opt = torch.optim.AdamW(tok.parameters(), lr=1e-4)
    for _ in range(2):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = tok(images)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        tok.codebook.update(out["vectors"], out["indices"])
    assert torch.isfinite(out["loss"])
    codes = tok.eval().encode(images)
    assert [tuple(c.shape) for c in codes] == [(3, s, s) for s in PAPER_STAGES]
    assert tok.decode(codes).shape == (3, 3, 256, 256)


# --------------------------------------------------------------------------------------------------------------
# Slow: the tiny config end to end, judged by the digit classifier
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_tokenizer_reconstructions_are_recognised(tmp_path):
    report = _trainer().main(["--config", str(ROOT / "configs/tokenizer/tiny.yaml"), f"out_dir={tmp_path}"])
    judge = report["digit_classifier"]
    assert judge["nfig_accuracy"] >= 0.95 and judge["single_scale_accuracy"] >= 0.95, judge
    assert judge["real_heldout_accuracy"] - judge["nfig_accuracy"] < 0.03
    pixel = [r["pixel_mse"] for r in report["per_stages_used"]]
    assert all(b <= a for a, b in zip(pixel, pixel[1:])) and pixel[-1] < 0.1 * pixel[0]
    assert report["codebook"]["used"] > 0.9
    tok = FreqTokenizer.from_pretrained(tmp_path)
    assert [tuple(c.shape[1:]) for c in tok.encode(_digits("heldout", 2))] == [(1, 1), (2, 2), (4, 4)]
