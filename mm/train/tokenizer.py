"""Train the frequency-band tokenizer (``mm/model/freq_tokenizer.py``) from a config and report its quality.

The logic lives here so that ``train.py`` can build a missing code-head tokenizer first
(:func:`ensure_image_tokenizers`); ``scripts/train_tokenizer.py`` is the command line. It runs on the model
trainer's pieces: the ``train`` and ``engine`` config sections, the ddp engine (AdamW, clipping, skipped
non-finite steps), the lr schedules and the metric sinks.

    python scripts/train_tokenizer.py --config configs/tokenizer/tiny.yaml [train.max_steps=500 out_dir=/tmp/tok]

Writes ``out_dir`` (default ``runs/tokenizer/<name>``): ``model.safetensors`` + ``tokenizer_config.json`` (load
with ``FreqTokenizer.from_pretrained``), ``train_config.yaml``, ``metrics.jsonl`` (one JSON object per log line),
``reconstructions.png`` (rows: originals, decodes from the first 1..n stages, single-scale decode) and
``report.json``: held-out reconstruction error per number of stages used and in single-scale mode, codebook
usage and perplexity, and for the digits the accuracy of the project's digit classifier on the reconstructions
beside its accuracy on the real held-out digits.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image

from data.bundled.digits import load_digit_split
from data.bundled.judge import DigitJudge, frechet_distance
from data.images import load_image
from data.stream import expand_shards, iter_samples, open_shard
from mm.config import EngineConfig, TrainConfig
from mm.images import generation_preprocess
from mm.model.config import ModelConfig
from mm.model.freq_tokenizer import FreqTokenizer, FreqTokenizerConfig
from mm.schema import ConfigError, dotlist_layer, merge_layers, resolve_path, to_yaml, yaml_layers
from mm.train.engine import DDPEngine, ParamGroup, init_distributed
from mm.train.metrics import MetricsLogger
from mm.train.precision import get_precision
from mm.train.schedule import get_schedule

# ---------------------------------------------------------------------------------------------------------------
# Config: the model trainer's ``train`` and ``engine`` sections, with this trainer's data, loss and report
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class TokenizerDataConfig:
    kind: str = "digits"  # key of DATASETS
    batch_size: int = 128
    train_shards: str = ""  # kind=shards: webdataset shards with a png/jpg per sample (brace pattern), streamed
    heldout_shards: str = ""  # kind=shards: read into memory for the report, up to heldout_images
    heldout_images: int = 1000
    shuffle_buffer: int = 2000  # kind=shards: decoded images held for shuffling
    max_image_pixels: int = 64_000_000  # kind=shards: larger images are skipped (decompression bombs), as data.*


@dataclass
class PerceptualConfig:
    """Optional perceptual term; off by default (no weights are bundled and nothing is downloaded)."""

    kind: str = ""  # "" = off; else a key of PERCEPTUAL_NETS
    weights: str = ""  # local file with the network's state dict (safetensors)
    weight: float = 0.0


@dataclass
class TokenizerLossConfig:
    single_scale_weight: float = 1.0  # weight of the single-scale (raster baseline) objective; 0 = NFIG only


def _train_defaults() -> TrainConfig:
    return TrainConfig(max_steps=2000, min_lr_ratio=0.05, log_every=100, metrics=["console", "jsonl"])


@dataclass
class TokenizerRunConfig:
    name: str = "tiny"
    out_dir: str = ""  # "" = runs/tokenizer/<name>
    model: FreqTokenizerConfig = field(default_factory=FreqTokenizerConfig)
    data: TokenizerDataConfig = field(default_factory=TokenizerDataConfig)
    loss: TokenizerLossConfig = field(default_factory=TokenizerLossConfig)
    train: TrainConfig = field(default_factory=_train_defaults)  # the model trainer's section (schedule, clip, logs)
    engine: EngineConfig = field(default_factory=EngineConfig)  # ddp only; precision fp32 | bf16_autocast
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)
    report_examples: int = 20  # held-out images shown in reconstructions.png


# Keys of the tokenizer trainer's own ``train`` section before it shared the model trainer's.
_OLD_TRAIN_KEYS = {"steps": ("train", "max_steps"), "batch_size": ("data", "batch_size"),
                   "single_scale_weight": ("loss", "single_scale_weight")}  # fmt: skip


def _migrate(layer: Any) -> Any:
    raw = OmegaConf.to_container(layer)
    train = raw.get("train")
    if isinstance(train, dict):
        for old, (section, new) in _OLD_TRAIN_KEYS.items():
            if old in train:
                raw.setdefault(section, {})[new] = train.pop(old)
        train.pop("device", None)  # the engine places the model (cuda when there is one)
        if train.pop("bf16", False):
            raw.setdefault("engine", {})["precision"] = "bf16_autocast"
    return OmegaConf.create(raw)


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> TokenizerRunConfig:
    """Schema defaults <- YAML <- key=value overrides; an unknown key or wrong type fails naming it."""
    layers = yaml_layers(Path(path)) if path is not None else []
    if overrides:
        layers.append(("the command line", dotlist_layer(overrides)))
    cfg = merge_layers(TokenizerRunConfig, [(src, _migrate(layer)) for src, layer in layers])
    if cfg.data.kind not in DATASETS:
        raise ConfigError(f"data.kind={cfg.data.kind!r}; known: {sorted(DATASETS)}")
    if cfg.perceptual.kind and cfg.perceptual.kind not in PERCEPTUAL_NETS:
        raise ConfigError(f"perceptual.kind={cfg.perceptual.kind!r}; known: {sorted(PERCEPTUAL_NETS)}")
    if cfg.data.batch_size < 1:
        raise ConfigError("data.batch_size must be >= 1")
    if cfg.engine.kind != "ddp":
        raise ConfigError(f"engine.kind={cfg.engine.kind!r}: the tokenizer trainer runs on the ddp engine")
    get_schedule(cfg.train.schedule), get_precision(cfg.engine.precision)
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# Data: an endless stream of uint8 training batches [B,C,H,W] and a held-out split in memory
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N,C,H,W]
    labels: np.ndarray | None = None


class MemoryBatches:
    """Random batches from images held in memory; a new permutation each epoch."""

    def __init__(self, images: torch.Tensor, batch_size: int, seed: int):
        if len(images) < batch_size:
            raise ConfigError(f"data.batch_size={batch_size} exceeds the {len(images)} training images")
        self.images, self.batch_size = images, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.skipped: Counter[str] = Counter()

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            order = torch.randperm(len(self.images), generator=self.gen)
            for i in range(0, len(order) - self.batch_size + 1, self.batch_size):
                yield self.images[order[i : i + self.batch_size]]


class ShardBatches:
    """Batches streamed from webdataset shards with the training loader's shard reader (shard order reshuffled
    each epoch, a shuffle buffer of decoded images); a damaged member or a sample without a decodable image
    is skipped and counted by reason in ``skipped``."""

    def __init__(self, pattern: str, cfg: TokenizerRunConfig):
        self.urls, self.cfg = expand_shards(pattern), cfg
        self.skipped: Counter[str] = Counter()

    def _raw(self, urls: list[str]) -> Iterator[dict]:
        def problem(reason: str, message: str) -> None:
            self.skipped[reason] += 1

        for url in urls:
            with open_shard(url) as f:
                for _, raw in iter_samples(f, problem):
                    yield raw

    def _images(self, urls: list[str]) -> Iterator[torch.Tensor]:
        m = self.cfg.model
        spec = generation_preprocess(m.image_size, m.image_channels)  # the training loader's generation targets
        for raw in self._raw(urls):
            data = raw.get("png", raw.get("jpg", raw.get("jpeg")))
            if data is None:
                self.skipped["no_image"] += 1
                continue
            try:
                image = load_image(data, spec, self.cfg.data.max_image_pixels)
            except Exception:  # noqa: BLE001 - any undecodable image is skipped and counted
                self.skipped["undecodable"] += 1
                continue
            yield image

    def __iter__(self) -> Iterator[torch.Tensor]:
        rng = random.Random(self.cfg.train.seed)
        buffer: list[torch.Tensor] = []
        batch: list[torch.Tensor] = []
        while True:
            urls = list(self.urls)
            rng.shuffle(urls)
            n_read = 0
            for image in self._images(urls):
                n_read += 1
                if len(buffer) < self.cfg.data.shuffle_buffer:
                    buffer.append(image)
                    continue
                j = rng.randrange(len(buffer))
                batch.append(buffer[j])
                buffer[j] = image
                if len(batch) == self.cfg.data.batch_size:
                    yield torch.stack(batch)
                    batch = []
            if n_read == 0:
                raise RuntimeError(f"no usable image in {self.cfg.data.train_shards} (skipped {dict(self.skipped)})")


def _digits(cfg: TokenizerRunConfig) -> tuple[Iterable[torch.Tensor], Split]:
    m = cfg.model
    if (m.image_size, m.image_channels) != (8, 1):
        raise ConfigError(f"data.kind=digits needs model.image_size=8, image_channels=1 (got {m.image_size}, "
                          f"{m.image_channels})")  # fmt: skip
    splits = []
    for name in ("train", "heldout"):
        x, y = load_digit_split(name)
        splits.append(Split(torch.from_numpy(np.round(x * 255).astype(np.uint8))[:, None], y))
    return MemoryBatches(splits[0].images, cfg.data.batch_size, cfg.train.seed), splits[1]


def _shards(cfg: TokenizerRunConfig) -> tuple[Iterable[torch.Tensor], Split]:
    if not cfg.data.train_shards or not cfg.data.heldout_shards:
        raise ConfigError("data.kind=shards needs data.train_shards and data.heldout_shards")
    train = ShardBatches(cfg.data.train_shards, cfg)
    heldout_reader = ShardBatches(cfg.data.heldout_shards, cfg)
    images = list(islice(heldout_reader._images(heldout_reader.urls), cfg.data.heldout_images))
    if not images:
        raise ConfigError(f"no usable held-out image in {cfg.data.heldout_shards}")
    return train, Split(torch.stack(images))


DATASETS: dict[str, Callable[[TokenizerRunConfig], tuple[Iterable[torch.Tensor], Split]]] = {
    "digits": _digits,
    "shards": _shards,
}

# ---------------------------------------------------------------------------------------------------------------
# Optional perceptual term (hook): distances between frozen features of a network loaded from local weights
# ---------------------------------------------------------------------------------------------------------------


class VGG16FeatureDistance(torch.nn.Module):
    """Mean squared distance of unit-normalised VGG-16 activations (relu1_2..relu5_3), as LPIPS without its
    learned per-channel weights. ``weights``: a local safetensors file of torchvision's VGG-16 state dict (the
    whole model or its ``features``); loading is strict, so a wrong file fails naming the keys.
    """

    taps = (3, 8, 15, 22, 29)

    def __init__(self, weights: str):
        super().__init__()
        from safetensors.torch import load_file
        from torchvision.models.vgg import cfgs, make_layers

        path = resolve_path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"perceptual.weights: no such file {path}")
        self.net = make_layers(cfgs["D"])[: self.taps[-1] + 1]  # the convolutional trunk only
        state = load_file(str(path))
        state = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier.")}
        self.net.load_state_dict(state)
        self.net.requires_grad_(False).eval()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x.expand(-1, 3, -1, -1) - self.mean) / self.std
        feats = []
        for i, layer in enumerate(self.net):
            x = layer(x)
            if i in self.taps:
                feats.append(F.normalize(x, dim=1))
        return feats

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a, b: [0,1] images [N,C,H,W] (C = 1 or 3)."""
        return sum(F.mse_loss(fa, fb) for fa, fb in zip(self._features(a), self._features(b)))


PERCEPTUAL_NETS: dict[str, type[torch.nn.Module]] = {"vgg16": VGG16FeatureDistance}

# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------


def psnr(mse: float) -> float:
    """dB for images in [0,1]."""
    return round(10 * math.log10(1.0 / max(mse, 1e-12)), 2)


def perplexity(counts: torch.Tensor) -> float:
    p = counts.float() / counts.sum().clamp_min(1)
    return float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))


class TokenizerObjective(torch.nn.Module):
    """The tokenizer's training loss on a uint8 batch, as one module for the engine: both modes (NFIG's stages
    and the single-scale baseline), plus the optional perceptual term."""

    def __init__(
        self, tok: FreqTokenizer, loss: TokenizerLossConfig, perceptual: torch.nn.Module | None, weight: float
    ):
        super().__init__()
        self.tok, self.loss_cfg, self.perceptual, self.perceptual_weight = tok, loss, perceptual, weight

    def forward(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.tok(batch, single_scale_weight=self.loss_cfg.single_scale_weight)
        if self.perceptual is not None:
            out["perceptual"] = self.perceptual(out["recon"], batch.float() / 255.0)
            out["loss"] = out["loss"] + self.perceptual_weight * out["perceptual"]
        return out


LOGGED = ("loss", "pixel", "feature", "ss_pixel", "ss_feature", "perceptual")


def train(cfg: TokenizerRunConfig, batches: Iterable[torch.Tensor], out_dir: Path) -> tuple[FreqTokenizer, float]:
    """Train both modes jointly on the ddp engine with the model trainer's schedule and metric sinks; log steps,
    losses, codebook use, speed and ETA; return (tokenizer, seconds)."""
    t = cfg.train
    torch.manual_seed(t.seed)
    gen = torch.Generator().manual_seed(t.seed)
    env = init_distributed()
    tok = FreqTokenizer(cfg.model)
    perceptual = PERCEPTUAL_NETS[cfg.perceptual.kind](cfg.perceptual.weights) if cfg.perceptual.kind else None
    objective = TokenizerObjective(tok, cfg.loss, perceptual, cfg.perceptual.weight)
    precision, schedule = get_precision(cfg.engine.precision), get_schedule(t.schedule)
    groups = [ParamGroup("default", list(tok.parameters()), t.lr, t.weight_decay)]
    engine = DDPEngine(objective, groups, t, cfg.engine, env, precision)
    metrics = MetricsLogger(out_dir, t.metrics, 0, t.max_steps)
    window = torch.zeros(cfg.model.codebook_size, dtype=torch.long)  # code use since the last log line
    sums: dict[str, float] = {}
    restarted, logged_at, t0 = 0, 0, time.perf_counter()
    objective.train()
    for step, batch in zip(range(t.max_steps), batches):
        lr_scale = schedule(step, t.warmup_steps, t.max_steps, t.min_lr_ratio)
        engine.set_lr_scale(lr_scale)
        with engine.micro_step(last=True):
            with precision.autocast(env.device):
                out = engine.forward(batch.to(env.device, non_blocking=True))
            engine.backward(out["loss"])
        result = engine.step()
        restarted += tok.codebook.update(out["vectors"], out["indices"], generator=gen)
        window += torch.bincount(out["indices"].cpu(), minlength=cfg.model.codebook_size)
        for k in (k for k in LOGGED if k in out):
            sums[k] = sums.get(k, 0.0) + float(out[k].detach())
        sums["grad_norm"] = sums.get("grad_norm", 0.0) + float(result.grad_norm)
        done = step + 1
        if done % t.log_every == 0 or done == t.max_steps:
            elapsed = time.perf_counter() - t0
            rec = {"step": done, "loss_names": [k for k in LOGGED[1:] if k in sums],
                   **{k: round(v / (done - logged_at), 5) for k, v in sums.items()}, "lr": t.lr * lr_scale,
                   "codes_used": round(float((window > 0).float().mean()), 4),
                   "perplexity": round(perplexity(window), 1), "codes_restarted": restarted,
                   "skipped": dict(getattr(batches, "skipped", {})), "steps_per_s": round(done / elapsed, 2),
                   "eta_s": round(elapsed / done * (t.max_steps - done), 1),
                   "extra_console": ["codes_used", "perplexity", "codes_restarted", "steps_per_s"]}  # fmt: skip
            metrics.record(rec)
            sums, window, restarted, logged_at = {}, torch.zeros_like(window), 0, done
    metrics.plot()
    metrics.close()
    return tok.eval(), time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(tok: FreqTokenizer, split: Split, batch_size: int = 256) -> dict:
    """Held-out reconstruction error per number of stages used, single-scale error, codebook usage."""
    tok.eval()
    device = tok.codebook.embed.device
    n_stages = len(tok.stages)
    mse = torch.zeros(n_stages, device=device)
    feat_err = torch.zeros(n_stages, device=device)
    ss_mse, ss_feat_err = 0.0, 0.0
    counts = torch.zeros(n_stages, tok.codebook_size, dtype=torch.long)
    ss_counts = torch.zeros(tok.codebook_size, dtype=torch.long)
    recon_nfig, recon_ss = [], []
    for i in range(0, len(split.images), batch_size):
        x = split.images[i : i + batch_size].to(device).float() / 255.0
        f = tok.encoder(x * 2 - 1)
        codes, prefixes, _ = tok.quantize(f)
        f_energy = f.pow(2).sum((1, 2, 3))
        for k in range(n_stages):
            y = tok.decode_features(prefixes[k])
            mse[k] += F.mse_loss(y, x, reduction="none").mean((1, 2, 3)).sum()
            feat_err[k] += ((f - prefixes[k]).pow(2).sum((1, 2, 3)) / f_energy).sum()
            counts[k] += torch.bincount(codes[k].reshape(-1).cpu(), minlength=tok.codebook_size)
        recon_nfig.append(y.cpu())
        ss_codes, ss_hat = tok.quantize_single_scale(f)
        y_ss = tok.decode_features(ss_hat)
        ss_mse += float(F.mse_loss(y_ss, x, reduction="none").mean((1, 2, 3)).sum())
        ss_feat_err += float(((f - ss_hat).pow(2).sum((1, 2, 3)) / f_energy).sum())
        ss_counts += torch.bincount(ss_codes.reshape(-1).cpu(), minlength=tok.codebook_size)
        recon_ss.append(y_ss.cpu())
    n = len(split.images)
    mse, feat_err = mse.cpu() / n, feat_err.cpu() / n
    total = counts.sum(0)
    return {
        "n_images": n,
        "stages": list(tok.stages),
        "tokens_per_image": tok.tokens_per_image,
        "single_scale_tokens_per_image": tok.feature_size**2,
        "per_stages_used": [
            {
                "stages": k + 1,
                "tokens": sum(s * s for s in tok.stages[: k + 1]),
                "pixel_mse": round(float(mse[k]), 6),
                "psnr_db": psnr(float(mse[k])),
                "feature_rel_err": round(float(feat_err[k]), 5),
            }
            for k in range(n_stages)
        ],
        "single_scale": {
            "pixel_mse": round(ss_mse / n, 6),
            "psnr_db": psnr(ss_mse / n),
            "feature_rel_err": round(ss_feat_err / n, 5),
        },
        "codebook": {
            "size": tok.codebook_size,
            "used": round(float(((total + ss_counts) > 0).float().mean()), 4),
            "used_nfig": round(float((total > 0).float().mean()), 4),
            "used_single_scale": round(float((ss_counts > 0).float().mean()), 4),
            "perplexity_nfig": round(perplexity(total), 1),
            "perplexity_single_scale": round(perplexity(ss_counts), 1),
            "used_per_stage": [int((c > 0).sum()) for c in counts],
            "perplexity_per_stage": [round(perplexity(c), 1) for c in counts],
        },
        "_recon_nfig": torch.cat(recon_nfig),
        "_recon_single_scale": torch.cat(recon_ss),
    }


def digit_classifier_report(heldout: Split, recon_nfig: torch.Tensor, recon_ss: torch.Tensor) -> dict:
    """The project's digit judge (``data.bundled.judge.DigitJudge``: MLP(128) on the real training split) on
    the held-out reconstructions of both modes, beside its accuracy on the real held-out digits."""
    judge = DigitJudge.train()
    real = heldout.images.float().numpy()[:, 0] / 255.0
    rows = {"nfig": recon_nfig[:, 0].numpy(), "single_scale": recon_ss[:, 0].numpy()}
    feats_real = judge.features(real)
    out = {"real_heldout_accuracy": round(judge.heldout_accuracy, 4)}
    for name, images in rows.items():
        out[f"{name}_accuracy"] = round(float((judge.predict(images) == heldout.labels).mean()), 4)
        out[f"{name}_fd_to_real"] = round(frechet_distance(judge.features(images), feats_real), 3)
    return out


def save_reconstruction_grid(tok: FreqTokenizer, images: torch.Tensor, path: Path, scale: int = 8) -> None:
    """Rows: originals, decodes from the first 1..n stages, single-scale decode; one column per image."""
    images = images.to(tok.codebook.embed.device)
    with torch.no_grad():
        codes = tok.encode(images)
        rows = [images.float() / 255.0]
        rows += [tok.decode(codes[: k + 1]) for k in range(len(codes))]
        rows.append(tok.decode(tok.encode(images, single_scale=True), single_scale=True))
    rows = [r.cpu() for r in rows]
    n, c, h, w = rows[0].shape
    canvas = torch.full((c, len(rows) * (h + 1) + 1, n * (w + 1) + 1), 0.5)
    for r, row in enumerate(rows):
        for i, im in enumerate(row):
            canvas[:, 1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + i * (w + 1) : 1 + i * (w + 1) + w] = im
    arr = (canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    pil = Image.fromarray(arr[..., 0] if c == 1 else arr)
    scale = max(1, scale if h <= 64 else 1)
    pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST).save(path)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tokenizer/tiny.yaml")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=500")
    args = ap.parse_args(argv)
    cfg = load_run_config(resolve_path(args.config), args.overrides)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    out_dir = resolve_path(cfg.out_dir or f"runs/tokenizer/{cfg.name}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "train_config.yaml").write_text(to_yaml(cfg))
    batches, heldout = DATASETS[cfg.data.kind](cfg)
    print(f"[tok] {cfg.name}: {cfg.data.kind} data, {len(heldout.images)} held-out images, stages "
          f"{list(cfg.model.stages)} ({sum(s * s for s in cfg.model.stages)} tokens; single-scale "
          f"{cfg.model.stages[-1] ** 2}), {cfg.model.codebook_size} codes", flush=True)  # fmt: skip

    tok, train_s = train(cfg, batches, out_dir)
    tok.save_pretrained(out_dir)
    report = evaluate(tok, heldout)
    recon_nfig, recon_ss = report.pop("_recon_nfig"), report.pop("_recon_single_scale")
    report = {"name": cfg.name, "train_wall_s": round(train_s, 1), "train_steps": cfg.train.max_steps,
              "params": sum(p.numel() for p in tok.parameters()), **report}  # fmt: skip
    if heldout.labels is not None:
        report["digit_classifier"] = digit_classifier_report(heldout, recon_nfig, recon_ss)
    save_reconstruction_grid(tok, heldout.images[: cfg.report_examples], out_dir / "reconstructions.png")
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1), flush=True)
    print(f"[tok] wrote {out_dir}", flush=True)
    return report


if __name__ == "__main__":
    main()


def ensure_image_tokenizers(model_cfg: ModelConfig) -> None:
    """Train a code head's image tokenizer first when its directory is missing and ``build_config`` names how."""
    for name, head in model_cfg.heads.items():
        tok = getattr(head, "tokenizer", None)
        if tok is None or not getattr(tok, "path", "") or not getattr(tok, "build_config", ""):
            continue
        out = resolve_path(tok.path)
        if (out / "model.safetensors").is_file():
            continue
        print(f"[{name}] no tokenizer at {out}: training it from {tok.build_config}", flush=True)
        main(["--config", str(resolve_path(tok.build_config)), f"out_dir={out}"])
