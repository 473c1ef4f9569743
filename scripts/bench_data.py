"""Data benchmark: packing efficiency, loader throughput, packed vs padded step time, data wait. One JSON object.

    python scripts/bench_data.py                       # every section (~5 min on 2 CPU cores)
    python scripts/bench_data.py --only packing,loader
    python scripts/bench_data.py --only step --device cuda --attn sdpa,flash_attention_2

Sections:

* ``packing``: real tokens / row capacity at a 4096 budget on the realistic mix
  (data/bench.py), ours beside padding, HF group_by_length, first fit and FFD
  over 256 samples, on the same samples.
* ``loader``: decoded + preprocessed samples/s with 2 DataLoader workers on 384 px
  JPEG shards made by make_shards from scikit-image/scikit-learn photos: our
  loader (decode, tokenise, pack, collate, resume state) against a plain
  ``webdataset`` + ``DataLoader`` pipeline with the same decode, interleaved.
* ``step``: real tokens/s of training steps (forward + backward + AdamW) of a
  small LLaMA-shaped UnifiedModel, packed rows of 4096 vs padding to the longest in
  random batches of 8, on the realistic mix; plus the matched-size case of the issue
  (8 understanding samples of 76-84 tokens, rows of 256). Attention goes through the
  model's forward (``mm/kernels/attention.py``), so it measures whatever that does.
* ``wait``: share of step time the tiny default run waits on ``next(loader)``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import webdataset as wds  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from data.bundled.digits import ensure_bundled_digits  # noqa: E402
from data.bundled.mixes import (  # noqa: E402
    TEXT_SIGMA,
    ffd_efficiency,
    first_fit_efficiency,
    group_by_length_efficiency,
    packer_efficiency,
    padding_efficiency,
    realistic_mix,
    write_photo_folder,  # noqa: E402
)
from data.config import DataConfig  # noqa: E402
from data.images import load_image  # noqa: E402
from data.loader import TrainLoader  # noqa: E402
from data.pack import pack_all  # noqa: E402
from data.shards import ImageOptions, make_shards  # noqa: E402
from data.sources import SourceConfig  # noqa: E402
from data.stream import expand_shards  # noqa: E402
from mm.batch import PackItem, SampleShapes, collate  # noqa: E402
from mm.config import load_config  # noqa: E402
from mm.images import ImagePreprocess, generation_preprocess  # noqa: E402
from mm.model.unified import build_model  # noqa: E402
from mm.schema import resolve_path  # noqa: E402
from mm.sequence import (  # noqa: E402
    ImageTemplate,
    image_generation_sample,
    load_vocab,
    text_document_samples,
    understanding_sample,
)

BUDGET = 4096


def log(msg: str) -> None:
    print(f"[bench_data] {msg}", file=sys.stderr, flush=True)


# ---- packing ---------------------------------------------------------------------------
def bench_packing(n: int) -> dict:
    items = realistic_mix(n, BUDGET)
    out = {
        "samples": n, "budget": BUDGET, "text_lognormal_sigma": TEXT_SIGMA,
        "padding_random_batches_of_8": padding_efficiency(items),
        "hf_group_by_length": group_by_length_efficiency(items),
        "first_fit": first_fit_efficiency(items, BUDGET),
        "ffd_over_256": ffd_efficiency(items, BUDGET),
        "next_fit": packer_efficiency(items, BUDGET, "next_fit"),
        "ours_best_fit_lookahead_64": packer_efficiency(items, BUDGET, "best_fit", 64),
        "ours_best_fit_lookahead_64_without_text_splits": packer_efficiency(
            [i if not i.splittable else type(i)(i.length) for i in items], BUDGET, "best_fit", 64),
    }  # fmt: skip
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


# ---- loader throughput ---------------------------------------------------------------------
def make_photo_shards(root: Path, n: int) -> str:
    captions = write_photo_folder(root / "src", n)
    totals = make_shards("generation", captions, root / "shards", "photos", max_count=max(1, n // 8),
                         opts=ImageOptions(image_size=384, reencode="jpg", quality=90), progress=False)  # fmt: skip
    log(f"photo shards: {totals['written']} samples, {totals['shards']} shards, {totals['bytes'] / 2**20:.1f} MB")
    return f"{root}/shards/photos-{{000000..{totals['shards'] - 1:06d}}}.tar"


class _Decode:
    """The baseline's per-sample work: the same decode + preprocess our generation kind does."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, sample: dict) -> tuple[torch.Tensor, str]:
        return load_image(sample["jpg"], generation_preprocess(self.size, 3), 64_000_000), sample["txt"].decode()


def _time_samples(it, count, want: int) -> float:
    """samples/s over the next ``want`` samples of an iterator of batches."""
    got, t0 = 0, time.perf_counter()
    while got < want:
        got += count(next(it))
    return got / (time.perf_counter() - t0)


def bench_loader(rounds: int, n_photos: int, per_round: int) -> dict:
    vocab = load_vocab(resolve_path("configs/tokenizers/digits"))
    gen_size = 256
    with tempfile.TemporaryDirectory() as tmp:
        pattern = make_photo_shards(Path(tmp), n_photos)
        urls = expand_shards(pattern)
        cfg = DataConfig(sources=[SourceConfig(name="photos", kind="generation", shards=pattern)], seq_len=BUDGET,
                         rows_per_batch=1, shuffle_buffer=64, num_workers=2, prefetch_factor=4)  # fmt: skip
        flow = ImageTemplate("flow", gen_size, 3, (256,), begin="bog")
        shapes = SampleShapes(ImagePreprocess("pad", gen_size, 3), und_tokens=256, gen_templates={"flow": flow})

        def ours():
            return iter(TrainLoader(cfg, vocab, shapes, 0, 1)), lambda b: len(b.images["flow"])

        def baseline():
            ds = wds.WebDataset(urls, resampled=True, shardshuffle=False).shuffle(64).map(_Decode(gen_size))
            dl = DataLoader(ds, batch_size=8, num_workers=2, prefetch_factor=4)
            return iter(dl), lambda b: len(b[0])

        rates: dict[str, list[float]] = {"ours": [], "webdataset": []}
        for r in range(rounds):
            for name, make in (("ours", ours), ("webdataset", baseline)):
                it, count = make()
                _time_samples(it, count, 64)  # start-up and warm-up
                rates[name].append(_time_samples(it, count, per_round))
                del it
                log(f"loader round {r}: {name} {rates[name][-1]:.1f} samples/s")
    ours_rate, base_rate = statistics.median(rates["ours"]), statistics.median(rates["webdataset"])
    return {
        "photos": n_photos, "image_px": 384, "gen_size": gen_size, "workers": 2, "rounds": rounds,
        "samples_per_round": per_round, "ours_samples_per_s": round(ours_rate, 1),
        "webdataset_samples_per_s": round(base_rate, 1), "overhead": round(1 - ours_rate / base_rate, 4),
        "ours_all": [round(x, 1) for x in rates["ours"]], "webdataset_all": [round(x, 1) for x in rates["webdataset"]],
    }  # fmt: skip


# ---- packed vs padded training step ---------------------------------------------------------
STEP_MODEL = [
    "model.und.tower.image_size=48", "model.und.tower.patch_size=2", "model.und.tower.width=32",
    "model.und.tower.layers=1", "model.und.tower.heads=2", "model.heads.flow.autoencoder.image_size=48",
    "model.heads.flow.autoencoder.image_channels=3", "model.heads.flow.autoencoder.latent_channels=3",
    "model.heads.flow.codec.channels=32", "model.heads.flow.codec.patch_size=2", "model.heads.flow.repa_hidden=64",
    "model.llm.hidden_size=256", "model.llm.num_layers=2", "model.llm.num_heads=4", "model.llm.num_kv_heads=4",
    "model.llm.intermediate_size=688", "model.llm.max_position_embeddings=4096",
]  # fmt: skip
FLOW_576 = ImageTemplate("flow", 48, 3, (576,), begin="bog")  # STEP_MODEL's flow head: a 24x24 token grid


def realistic_samples(vocab, n: int, seed: int = 0) -> list:
    """Real template-built samples with the realistic mix's lengths (576-token images, random words)."""
    rng = random.Random(seed)
    words = [w for w in vocab.tokenizer.get_vocab() if not w.startswith("<")]
    img = torch.zeros(3, 48, 48, dtype=torch.uint8)

    def text(k: int) -> str:
        return " ".join(rng.choice(words) for _ in range(max(1, k)))

    out = []
    for item in realistic_mix(n, BUDGET, seed):
        if item.splittable:
            out += text_document_samples(vocab, text(item.length - 2), BUDGET)
        elif rng.random() < 5 / 9:  # understanding : generation = 50 : 40
            k = item.length - 576
            out.append(understanding_sample(vocab, img, 576, text(k // 2), text(k - k // 2)))
        else:
            out.append(image_generation_sample(vocab, FLOW_576, img, text(item.length - 576)))
    return out[:n]


def _steps(model, opt, batches, device) -> tuple[float, int]:
    """Seconds and real tokens of one training step per batch."""
    gen = torch.Generator().manual_seed(0)
    total, tokens = 0.0, 0
    for batch in batches:
        batch = model.add_draws(batch, gen).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        total += time.perf_counter() - t0
        tokens += batch.n_tokens
    return total, tokens


def _packed_and_padded(samples, budget: int, pad: int, rows_per_step: int) -> tuple[list, list]:
    items = [PackItem(len(s), s, splittable=s.task == "text") for s in samples]
    packed = [collate(rows, budget, pad) for rows in pack_all(items, budget, rows_per_step)]
    order = list(range(len(samples)))
    random.Random(1).shuffle(order)
    padded = []
    for i in range(0, len(order), 8):
        chunk = [samples[j] for j in order[i : i + 8]]
        padded.append(collate([[s] for s in chunk], max(len(s) for s in chunk), pad))
    return packed, padded


def matched_samples(vocab, seed: int = 0) -> list:
    """The issue's matched case: 8 understanding samples of 76-84 tokens (16-token images)."""
    rng = random.Random(seed)
    img = torch.zeros(3, 8, 8, dtype=torch.uint8)
    out = []
    for _ in range(8):
        n = rng.randint(76, 84) - 22  # text tokens: the template takes 6 and the image 16
        out.append(understanding_sample(vocab, img, 16, " ".join(["seven"] * (n - 6)), " ".join(["7"] * 6)))
    assert all(76 <= len(s) <= 84 for s in out)
    return out


def bench_step(n_samples: int, rounds: int, device: torch.device, attn: list[str]) -> dict:
    cpu = f"cpu ({torch.get_num_threads()} threads)"
    out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else cpu,
           "model": "LLaMA 2 layers x 256 wide, 4 heads (+ 1-layer towers); forward + backward + AdamW"}  # fmt: skip
    small_images = ["model.und.tower.image_size=8", "model.heads.flow.autoencoder.image_size=8"]  # 16 tokens/image
    cases = {"realistic_4096": ([], BUDGET, 1), "matched_8x80_rows_256": (small_images, 256, 3)}
    for backend in attn:
        for name, (over, budget, rows) in cases.items():
            cfg = load_config(resolve_path("configs/tiny.yaml"),
                              STEP_MODEL + over + [f"model.llm.attn_implementation={backend}"])  # fmt: skip
            torch.manual_seed(0)
            model = build_model(cfg.model).to(device).train()
            vocab = model.vocab
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            samples = realistic_samples(vocab, n_samples) if not over else matched_samples(vocab)
            packed, padded = _packed_and_padded(samples, budget, vocab.pad, rows)
            _steps(model, opt, packed[:1] + padded[:1], device)  # warm-up
            res = {"packed": [0.0, 0], "padded": [0.0, 0]}
            for _ in range(rounds if not over else 5 * rounds):  # interleaved; the small case is cheap: more rounds
                for kind, batches in (("packed", packed), ("padded", padded)):
                    sec, tok = _steps(model, opt, batches, device)
                    res[kind][0] += sec
                    res[kind][1] += tok
            tps = {k: v[1] / v[0] for k, v in res.items()}
            fill = {k: float(np.mean([b.n_tokens / b.sample_ids.numel() for b in batches]))
                    for k, batches in (("packed", packed), ("padded", padded))}  # fmt: skip
            out[f"{backend}/{name}"] = {
                "packed_tokens_per_s": round(tps["packed"], 1), "padded_tokens_per_s": round(tps["padded"], 1),
                "packed_over_padded": round(tps["packed"] / tps["padded"], 3),
                "fill_packed": round(fill["packed"], 3), "fill_padded": round(fill["padded"], 3),
                "samples": len(samples), "packed_steps": len(packed), "padded_steps": len(padded),
            }  # fmt: skip
            log(f"step {backend}/{name}: {out[f'{backend}/{name}']}")
    return out


# ---- data wait of the tiny default ------------------------------------------------------------
def bench_wait(steps: int, workers: list[int]) -> dict:
    ensure_bundled_digits()
    out = {}
    for nw in workers:
        cfg = load_config(resolve_path("configs/tiny.yaml"), [f"data.num_workers={nw}"])
        torch.manual_seed(0)
        model = build_model(cfg.model).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        loader = TrainLoader(cfg.data, model.vocab, model.sample_shapes(), 0, 1)
        it = iter(loader)
        gen = torch.Generator().manual_seed(0)
        wait = total = 0.0
        first = None
        for step in range(steps + 5):
            t0 = time.perf_counter()
            batch = next(it)
            t1 = time.perf_counter()
            if first is None:
                first = t1 - t0
            loss = model(model.add_draws(batch, gen))["loss"]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step >= 5:  # after the first batches (worker start-up)
                wait += t1 - t0
                total += time.perf_counter() - t0
        loader.close()
        out[f"workers_{nw}"] = {"data_wait_share": round(wait / total, 4), "step_ms": round(1000 * total / steps, 1),
                                "first_batch_s": round(first, 3)}  # fmt: skip
        log(f"wait workers={nw}: {out[f'workers_{nw}']}")
    out["steps"] = steps
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="packing,loader,step,wait")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--attn", default="sdpa", help="attention backends for the step section, comma-separated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--step-samples", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    only = set(args.only.split(","))
    result: dict = {"torch": torch.__version__}
    if "packing" in only:
        result["packing"] = bench_packing(20000)
        log(f"packing: {result['packing']}")
    if "loader" in only:
        result["loader"] = bench_loader(args.rounds, 400, 384)
    if "step" in only:
        device = torch.device(args.device)
        result["step"] = bench_step(args.step_samples, args.rounds, device, args.attn.split(","))
    if "wait" in only:
        result["wait"] = bench_wait(150, [1, 2, 0])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
