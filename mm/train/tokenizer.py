"""Train the frequency-band tokenizer (``mm/model/freq_tokenizer.py``) from a config and report its quality.

The logic lives here so that the trainer can build a missing code-head tokenizer itself
(``mm/train/trainer.py``); ``scripts/train_tokenizer.py`` is the command line.

    python scripts/train_tokenizer.py --config configs/tokenizer/tiny.yaml [train.steps=500 out_dir=/tmp/tok]

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

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from omegaconf.errors import OmegaConfBaseException  # noqa: E402
from PIL import Image  # noqa: E402

from mm.config import ConfigError, FreqTokenizerConfig, resolve_path  # noqa: E402
from mm.model.freq_tokenizer import FreqTokenizer  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class TokenizerDataConfig:
    kind: str = "digits"  # key of DATASETS
    train_shards: str = ""  # kind=shards: webdataset shards with a png/jpg per sample (brace pattern), streamed
    heldout_shards: str = ""  # kind=shards: read into memory for the report, up to heldout_images
    heldout_images: int = 1000
    shuffle_buffer: int = 2000  # kind=shards: decoded images held for shuffling


@dataclass
class PerceptualConfig:
    """Optional perceptual term; off by default (no weights are bundled and nothing is downloaded)."""

    kind: str = ""  # "" = off; else a key of PERCEPTUAL_NETS
    weights: str = ""  # local file with the network's state dict (safetensors)
    weight: float = 0.0


@dataclass
class TokenizerTrainConfig:
    steps: int = 2000
    batch_size: int = 128
    lr: float = 2e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05  # cosine decay to lr * min_lr_ratio
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    single_scale_weight: float = 1.0  # weight of the single-scale (raster baseline) objective; 0 = NFIG only
    log_every: int = 100
    seed: int = 0
    threads: int = 0  # torch intra-op threads; 0 = torch default
    device: str = "cpu"  # "cuda" for the real config
    bf16: bool = False  # bf16 autocast for the convolutions (the band and codebook math stays float32)


@dataclass
class TokenizerRunConfig:
    name: str = "tiny"
    out_dir: str = ""  # "" = runs/tokenizer/<name>
    model: FreqTokenizerConfig = field(default_factory=FreqTokenizerConfig)
    data: TokenizerDataConfig = field(default_factory=TokenizerDataConfig)
    train: TokenizerTrainConfig = field(default_factory=TokenizerTrainConfig)
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)
    report_examples: int = 20  # held-out images shown in reconstructions.png


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> TokenizerRunConfig:
    """Schema defaults <- YAML <- key=value overrides; an unknown key or wrong type fails naming it."""
    layers = []
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"config file not found: {path}")
        layers.append(OmegaConf.load(path))
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got {bad}")
        layers.append(OmegaConf.from_dotlist(overrides))
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TokenizerRunConfig), *layers))
    except (OmegaConfBaseException, ValueError) as e:  # unknown key, wrong type, or a FreqTokenizerConfig rule
        raise ConfigError(f"invalid tokenizer config{f' in {path}' if path else ''}: {e}") from None
    if cfg.data.kind not in DATASETS:
        raise ConfigError(f"data.kind={cfg.data.kind!r}; known: {sorted(DATASETS)}")
    if cfg.perceptual.kind and cfg.perceptual.kind not in PERCEPTUAL_NETS:
        raise ConfigError(f"perceptual.kind={cfg.perceptual.kind!r}; known: {sorted(PERCEPTUAL_NETS)}")
    if cfg.train.steps < 1 or cfg.train.batch_size < 1:
        raise ConfigError("train.steps and train.batch_size must be >= 1")
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
            raise ConfigError(f"train.batch_size={batch_size} exceeds the {len(images)} training images")
        self.images, self.batch_size = images, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.skipped: Counter[str] = Counter()

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            order = torch.randperm(len(self.images), generator=self.gen)
            for i in range(0, len(order) - self.batch_size + 1, self.batch_size):
                yield self.images[order[i : i + self.batch_size]]


class ShardBatches:
    """Batches streamed from webdataset shards (shard order reshuffled each epoch, a shuffle buffer of decoded
    images); a sample without a decodable image is skipped and counted by reason in ``skipped``."""

    def __init__(self, pattern: str, cfg: TokenizerRunConfig):
        from data.stream import expand_shards

        self.urls, self.cfg = expand_shards(pattern), cfg
        self.skipped: Counter[str] = Counter()

    def _images(self, urls: list[str]) -> Iterator[torch.Tensor]:
        import webdataset as wds

        from data.stream import decode_image, fit_image

        m = self.cfg.model
        for raw in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()):
            data = raw.get("png", raw.get("jpg", raw.get("jpeg")))
            if data is None:
                self.skipped["no_image"] += 1
                continue
            try:
                image = fit_image(decode_image(data), m.image_size, m.image_channels)
            except Exception:  # noqa: BLE001 - any undecodable image is skipped and counted
                self.skipped["undecodable"] += 1
                continue
            yield (image * 255).round().to(torch.uint8)

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
                if len(batch) == self.cfg.train.batch_size:
                    yield torch.stack(batch)
                    batch = []
            if n_read == 0:
                raise RuntimeError(f"no usable image in {self.cfg.data.train_shards} (skipped {dict(self.skipped)})")


def _digits(cfg: TokenizerRunConfig) -> tuple[Iterable[torch.Tensor], Split]:
    from data.digits import load_digit_split

    m = cfg.model
    if (m.image_size, m.image_channels) != (8, 1):
        raise ConfigError(f"data.kind=digits needs model.image_size=8, image_channels=1 (got {m.image_size}, "
                          f"{m.image_channels})")  # fmt: skip
    splits = []
    for name in ("train", "heldout"):
        x, y = load_digit_split(name)
        splits.append(Split(torch.from_numpy(np.round(x * 255).astype(np.uint8))[:, None], y))
    return MemoryBatches(splits[0].images, cfg.train.batch_size, cfg.train.seed), splits[1]


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


def lr_at(step: int, t: TokenizerTrainConfig) -> float:
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def psnr(mse: float) -> float:
    """dB for images in [0,1]."""
    return round(10 * math.log10(1.0 / max(mse, 1e-12)), 2)


def perplexity(counts: torch.Tensor) -> float:
    p = counts.float() / counts.sum().clamp_min(1)
    return float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))


def train(cfg: TokenizerRunConfig, batches: Iterable[torch.Tensor], out_dir: Path) -> tuple[FreqTokenizer, float]:
    """Train both modes jointly; log steps, losses, codebook use, speed and ETA; return (tokenizer, seconds)."""
    t = cfg.train
    torch.manual_seed(t.seed)
    gen = torch.Generator().manual_seed(t.seed)
    device = torch.device(t.device)
    tok = FreqTokenizer(cfg.model).to(device)
    perceptual = PERCEPTUAL_NETS[cfg.perceptual.kind](cfg.perceptual.weights) if cfg.perceptual.kind else None
    if perceptual is not None:
        perceptual.to(device)
    opt = torch.optim.AdamW(tok.parameters(), lr=t.lr, betas=(0.9, 0.95), weight_decay=t.weight_decay)
    window = torch.zeros(cfg.model.codebook_size, dtype=torch.long)  # code use since the last log line
    sums: dict[str, float] = {}
    restarted, logged_at = 0, 0
    metrics = (out_dir / "metrics.jsonl").open("w")
    t0 = time.perf_counter()
    tok.train()
    for step, batch in zip(range(t.steps), batches):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, t)
        batch = batch.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=t.bf16):
            out = tok(batch, single_scale_weight=t.single_scale_weight)
            loss = out["loss"]
            if perceptual is not None:
                out["perceptual"] = perceptual(out["recon"], batch.float() / 255.0)
                loss = loss + cfg.perceptual.weight * out["perceptual"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(tok.parameters(), t.grad_clip)
        opt.step()
        restarted += tok.codebook.update(out["vectors"], out["indices"], generator=gen)
        window += torch.bincount(out["indices"].cpu(), minlength=cfg.model.codebook_size)
        for k in ("loss", "pixel", "feature", "ss_pixel", "ss_feature", "perceptual"):
            if k in out:
                sums[k] = sums.get(k, 0.0) + float(out[k].detach())
        sums["grad_norm"] = sums.get("grad_norm", 0.0) + float(grad_norm)
        done = step + 1
        if done % t.log_every == 0 or done == t.steps:
            elapsed = time.perf_counter() - t0
            rec = {"step": done, **{k: round(v / (done - logged_at), 5) for k, v in sums.items()},
                   "lr": round(lr_at(step, t), 6), "codes_used": round(float((window > 0).float().mean()), 4),
                   "perplexity": round(perplexity(window), 1), "codes_restarted": restarted,
                   "skipped": dict(getattr(batches, "skipped", {})),
                   "steps_per_s": round(done / elapsed, 2),
                   "eta_s": round(elapsed / done * (t.steps - done), 1)}  # fmt: skip
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()
            print(f"[tok] step {done}/{t.steps} loss {rec['loss']:.4f} pixel {rec['pixel']:.4f} "
                  f"ss_pixel {rec.get('ss_pixel', float('nan')):.4f} feature {rec['feature']:.4f} "
                  f"codes used {rec['codes_used']:.2f} ppl {rec['perplexity']:.0f} restarted {restarted} "
                  f"{rec['steps_per_s']:.1f} it/s eta {rec['eta_s']:.0f}s", flush=True)  # fmt: skip
            sums, window, restarted, logged_at = {}, torch.zeros_like(window), 0, done
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
    """The project's digit judge (``mm.eval.digits.DigitJudge``: MLP(128) on the real training split) on the
    held-out reconstructions of both modes, beside its accuracy on the real held-out digits."""
    from mm.eval.digits import DigitJudge, frechet_distance

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
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=500")
    args = ap.parse_args(argv)
    cfg = load_run_config(resolve_path(args.config), args.overrides)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    out_dir = resolve_path(cfg.out_dir or f"runs/tokenizer/{cfg.name}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "train_config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    batches, heldout = DATASETS[cfg.data.kind](cfg)
    print(f"[tok] {cfg.name}: {cfg.data.kind} data, {len(heldout.images)} held-out images, stages "
          f"{list(cfg.model.stages)} ({sum(s * s for s in cfg.model.stages)} tokens; single-scale "
          f"{cfg.model.stages[-1] ** 2}), {cfg.model.codebook_size} codes", flush=True)  # fmt: skip

    tok, train_s = train(cfg, batches, out_dir)
    tok.save_pretrained(out_dir)
    report = evaluate(tok, heldout)
    recon_nfig, recon_ss = report.pop("_recon_nfig"), report.pop("_recon_single_scale")
    report = {"name": cfg.name, "train_wall_s": round(train_s, 1), "train_steps": cfg.train.steps,
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
