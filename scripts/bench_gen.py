"""NFIG vs raster AR vs the flow head, trained the same number of steps, side by side (JSON on stdout).

    python scripts/bench_gen.py --steps 1500            # trains runs/bench_gen/{nextfreq,raster,flow}, then measures
    python scripts/bench_gen.py --reuse                 # measure the runs already there

Each head trains from scratch on the digits' prompt -> image source alone (configs/tiny_nfig.yaml; the flow
head with configs/tiny.yaml's flow settings), same steps, batch and LLM. Then each draws ``--per-prompt``
images for each "draw the digit d" (the digits_t2i prompts) with its default recipe and reports:

* ``forward_passes_per_image``: LLM forward passes counted by a hook on the decoder, per batch of images
  (images of a batch are drawn in parallel, so this is the sequential depth of one image; prefill included);
* ``wall_s_per_image``: sampling wall time / images, the median of ``--time-rounds`` batches with the heads
  interleaved (one thread, batch ``--batch``);
* ``classifier_accuracy`` and ``fd``: digits_t2i's judge (mm/eval/tasks/digits_t2i/utils.py) on those images.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from data.bundled.digits import EVAL_PROMPT, digit_prompt, load_digit_split  # noqa: E402
from data.bundled.judge import frechet_distance, get_judge  # noqa: E402
from mm.config import load_config  # noqa: E402
from mm.eval.generation import to_gray8  # noqa: E402
from mm.hf import sampler_kwargs  # noqa: E402
from mm.load import load_run  # noqa: E402
from mm.schema import resolve_path  # noqa: E402
from mm.train.launch import launch  # noqa: E402

# configs/tiny_nfig.yaml has the nextfreq head only; the others replace it
TOKENIZER = ["tokenizer.path=runs/tokenizer/tiny", "tokenizer.build_config=configs/tokenizer/tiny.yaml"]
HEAD_OVERRIDES = {
    "nextfreq": [],
    "raster": ["model.heads.nextfreq=null"] + [f"model.heads.raster.{kv}" for kv in TOKENIZER],
    "flow": ["model.heads.nextfreq=null", "model.heads.flow={}"],
}


def train_head(head: str, steps: int, out: Path) -> None:
    over = HEAD_OVERRIDES[head] + [f"train.max_steps={steps}", f"train.ckpt_every={steps}", f"run.dir={out}",
                                   "train.metrics=[jsonl]"]  # fmt: skip
    cfg = load_config(resolve_path("configs/tiny_nfig.yaml"), over)
    launch(cfg, overwrite=True).train()


def sync(device: torch.device) -> None:
    if device.type == "cuda":  # kernels run asynchronously: time what they did, not what was queued
        torch.cuda.synchronize(device)


def measure(
    head: str, run: Path, per_prompt: int, batch: int, seed: int, device: torch.device
) -> tuple[dict, object, dict]:
    _, model, _, step = load_run(run)
    model = model.to(device)
    recipe = {"head": head, **model.cfg.head_recipes()[head]}
    calls = []
    hook = model.llm.get_decoder().norm.register_forward_hook(  # one LLM pass = one final norm
        lambda *a: calls.append(1)
    )
    prompts = [digit_prompt(d, EVAL_PROMPT) for d in range(10) for _ in range(per_prompt)]
    labels = np.repeat(np.arange(10), per_prompt)
    gen = torch.Generator().manual_seed(seed)
    images, batches = [], 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            images.append(model.generate(prompts[i : i + batch], generator=gen, **sampler_kwargs(recipe)).float())
            batches += 1
    sync(device)
    wall = time.perf_counter() - t0
    hook.remove()
    gray = to_gray8(torch.cat(images).cpu().numpy())
    judge = get_judge()
    real_te, _ = load_digit_split("heldout")
    return (
        {
            "train_steps": step,
            "recipe": recipe,
            "forward_passes_per_image": len(calls) / batches,
            "wall_s_per_image_first_pass": wall / len(prompts),
            "images": len(prompts),
            "classifier_accuracy": float((judge.predict(gray) == labels).mean()),
            "fd": frechet_distance(judge.features(gray), judge.features(real_te)),
        },
        model,
        sampler_kwargs(recipe),
    )


def time_heads(models: dict, batch: int, rounds: int, seed: int, device: torch.device) -> dict[str, float]:
    """Median seconds per image of one ``batch`` of prompts, heads interleaved round by round (the
    order alternates), so machine noise hits every head alike."""
    prompts = [f"draw the digit {i % 10}" for i in range(batch)]
    times: dict[str, list[float]] = {h: [] for h in models}
    order = list(models)
    for r in range(rounds):
        for head in order if r % 2 == 0 else order[::-1]:
            model, kwargs = models[head]
            gen = torch.Generator().manual_seed(seed)
            t0 = time.perf_counter()
            with torch.no_grad():
                model.generate(prompts, generator=gen, **kwargs)
            sync(device)
            times[head].append((time.perf_counter() - t0) / batch)
    return {h: statistics.median(v) for h, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--heads", default="nextfreq,raster,flow")
    ap.add_argument("--out", default="runs/bench_gen")
    ap.add_argument("--reuse", action="store_true", help="measure existing runs instead of training")
    ap.add_argument("--per-prompt", type=int, default=50, help="images per digit (digits_t2i: 50)")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-rounds", type=int, default=7, help="interleaved timing rounds (median)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where heads sample")
    args = ap.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    heads = args.heads.split(",")
    out = resolve_path(args.out)
    result: dict = {"steps": args.steps, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
                    else "cpu", "heads": {}}  # fmt: skip
    models = {}
    for head in heads:
        run = out / head
        with contextlib.redirect_stdout(sys.stderr):  # stdout is the JSON object only
            if not args.reuse:
                train_head(head, args.steps, run)
            result["heads"][head], model, kwargs = measure(head, run, args.per_prompt, args.batch, args.seed, device)
            models[head] = (model, kwargs)
    for head, sec in time_heads(models, args.batch, args.time_rounds, args.seed, device).items():
        result["heads"][head]["wall_s_per_image"] = sec
    h = result["heads"]
    if "nextfreq" in h and "raster" in h:
        nf, ra = h["nextfreq"], h["raster"]
        result["nextfreq_vs_raster"] = {
            "fewer_passes_x": ra["forward_passes_per_image"] / nf["forward_passes_per_image"],
            "faster_x": ra["wall_s_per_image"] / nf["wall_s_per_image"],
            "accuracy_delta": nf["classifier_accuracy"] - ra["classifier_accuracy"],
        }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
