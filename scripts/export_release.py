"""Turn a training run into a release folder that loads with transformers' Auto classes.

    python scripts/export_release.py RUN_DIR OUT [--checkpoint latest|PATH] [--no-ema] [--eval]
                                     [--format unified_mm|hf_janus|hf_llava]

OUT holds: ``config.json`` (our ModelConfig per part + the LLM's transformers config),
``model.safetensors`` (every weight, frozen towers and VAE included: self-contained),
the processor (tokenizer files + ``processor_config.json``), ``generation_config.json``
(greedy text decoding; the image head with its sampler, steps and CFG scale),
``release.json`` (where it came from) and ``README.md``: a model card with the eval
results, the exact prompt and sampling recipe behind each number, and the training
config. Weights come from the EMA copy when the run has one. ``--eval`` runs the
bundled benchmark on the exported folder and puts those numbers in the card; without
it the card uses ``RUN_DIR/eval/results.json`` when present. No file is a pickle.

``--format hf_janus`` / ``hf_llava``: a model of Janus or LLaVA architecture (converted with
``scripts/convert.py`` and fine-tuned, say) becomes a folder that ``JanusForConditionalGeneration`` /
``LlavaForConditionalGeneration.from_pretrained`` load with no code of ours; any other model (flow or
next-frequency heads, MoD, V2PE, other towers) is refused with the reason and keeps ``unified_mm``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mm.convert import EXPORTERS, ConversionError  # noqa: E402
from mm.eval.harness import evaluate  # noqa: E402
from mm.hf import UnifiedMMProcessor, generation_config, wrap  # noqa: E402
from mm.load import load_release, load_run, read_weights  # noqa: E402

USAGE = """```python
import mm  # registers the model with transformers' Auto classes
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained("{name}").eval()
processor = AutoProcessor.from_pretrained("{name}")
print(model.answer(processor.und_images([image]), ["what digit is this ?"]))   # image: PIL or array
images = model.generate_images(["draw the digit 7"])                            # [N, C, H, W] in [0, 1]
```

From the repository: `python scripts/chat.py {name} --image x.png --question "..."` and
`python scripts/generate.py {name} --prompt "..." --out grid.png`."""


def model_card(out: Path, source: dict, results: dict | None, gen_cfg: dict, train_config: str) -> str:
    lines = [
        "---", "library_name: transformers", "pipeline_tag: any-to-any",
        "tags: [unified-mm, janusflow, rectified-flow]", "---", "", f"# {out.name}", "",
        "A unified multimodal model: one autoregressive LLM that answers questions about images and "
        "draws images from text (rectified flow inside the LLM, as JanusFlow).", "",
        f"Exported from run `{source.get('run')}`, checkpoint `{source.get('checkpoint')}` (step {source.get('step')}, "
        f"{source.get('weights')} weights).", "", "## Use", "", USAGE.format(name=out), "",
        "## Decoding and sampling", "",
        f"- Text: greedy, up to {gen_cfg['max_new_tokens']} new tokens, stops at `<|eos|>`.",
    ]  # fmt: skip
    for head, recipe in gen_cfg["image_heads"].items():
        lines.append(f"- Images, head `{head}`: " + ", ".join(f"{k} {v}" for k, v in recipe.items()))
    lines += ["", "## Evaluation", ""]
    if not results:
        lines.append("Not evaluated: run `python eval.py --model <this folder>` (or export with `--eval`).")
    else:
        src = results.get("model", {})
        lines += [
            f"Measured with `eval.py` on {src.get('release') or src.get('run')} (step {results.get('step', '?')}); "
            "scoring is rule-based (no GPT judge). Each number's prompt and recipe follows the table.", "",
            "| task | metric | value |", "| --- | --- | --- |",
        ]  # fmt: skip
        for task in results["tasks"]:
            for k, v in results[task].items():
                if k not in ("recipe", "examples", "seconds") and not isinstance(v, dict | list):
                    lines.append(f"| {task} | {k} | {f'{v:.4g}' if isinstance(v, float) else v} |")
        lines += ["", "### Prompts and recipes", ""]
        for task in results["tasks"]:
            rec = results[task]["recipe"]
            lines += [
                f"- **{task}** (`{rec['task_file']}`, n={results[task]['n']}): {rec['scoring']}",
                f"  - prompt (first document): `{rec['prompt_example']!r}`",
                f"  - generation: `{json.dumps(rec['generation_kwargs'])}`",
            ]
    lines += ["", "## Training config", "", "```yaml", train_config.rstrip(), "```", ""]
    return "\n".join(lines)


def export_release(run_dir: Path, out: Path, checkpoint: str = "latest", use_ema: bool = True,
                   run_eval: bool = False, overwrite: bool = False) -> Path:  # fmt: skip

    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists: pass --overwrite to replace it")
    cfg, model, ckpt, step = load_run(run_dir, checkpoint, use_ema=use_ema)
    _, which = read_weights(ckpt, use_ema)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    hf = wrap(model, cfg.model)
    hf.save_pretrained(str(tmp))
    UnifiedMMProcessor.from_model(model).save_pretrained(str(tmp))
    gen = generation_config(cfg.model, model.vocab)
    gen.save_pretrained(str(tmp))
    source = {"run": str(run_dir), "checkpoint": str(ckpt), "step": step, "weights": which}
    (tmp / "release.json").write_text(json.dumps({"source": source}, indent=1))
    (tmp / "train_config.yaml").write_text((run_dir / "config.yaml").read_text())
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)

    results = None
    if run_eval:
        loaded = load_release(out)
        results = evaluate(loaded, None, loaded.config.eval, out / "eval")
    elif (run_dir / "eval" / "results.json").is_file():
        results = json.loads((run_dir / "eval" / "results.json").read_text())
        if "tasks" not in results:  # written before task files existed: no recipes to show
            print(f"note: {run_dir}/eval/results.json predates the task format; rerun eval.py", flush=True)
            results = None
        elif results.get("step") != step:
            print(f"note: {run_dir}/eval/results.json is from step {results.get('step')}, not {step}", flush=True)
    card = model_card(out, source, results, gen.to_dict(), (run_dir / "config.yaml").read_text())
    (out / "README.md").write_text(card)
    print(f"wrote release {out}: {sorted(p.name for p in out.iterdir())}", flush=True)
    return out


FORMATS = ("unified_mm", *EXPORTERS)


def export_transformers_format(run_dir: Path, out: Path, fmt: str, checkpoint: str = "latest", use_ema: bool = True,
                               overwrite: bool = False) -> Path:  # fmt: skip
    """A run of Janus or LLaVA architecture -> a folder of transformers' own format (``--format``)."""
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists: pass --overwrite to replace it")
    cfg, model, ckpt, step = load_run(run_dir, checkpoint, use_ema=use_ema)
    _, which = read_weights(ckpt, use_ema)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        EXPORTERS[fmt](model, tmp)
    except ConversionError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SystemExit(f"export_release: {e}") from None
    source = {"run": str(run_dir), "checkpoint": str(ckpt), "step": step, "weights": which, "format": fmt}
    (tmp / "release.json").write_text(json.dumps({"source": source}, indent=1))
    (tmp / "train_config.yaml").write_text((run_dir / "config.yaml").read_text())
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    print(f"wrote {fmt} folder {out}: {sorted(p.name for p in out.iterdir())}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--checkpoint", default="latest", help="'latest' or a checkpoint directory")
    ap.add_argument("--no-ema", action="store_true", help="export the raw weights even when an EMA copy exists")
    ap.add_argument("--eval", action="store_true", help="evaluate the exported folder on the bundled benchmark")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--format", choices=FORMATS, default="unified_mm",
                    help="unified_mm (ours, any model) or transformers' own Janus / LLaVA format")  # fmt: skip
    args = ap.parse_args()
    if args.format != "unified_mm":
        export_transformers_format(args.run_dir, args.out, args.format, args.checkpoint, not args.no_ema,
                                   args.overwrite)  # fmt: skip
        return
    export_release(args.run_dir, args.out, args.checkpoint, not args.no_ema, args.eval, args.overwrite)


if __name__ == "__main__":
    main()
