"""Turn a training run into a release folder that loads with transformers' Auto classes.

    python scripts/export_release.py RUN_DIR OUT [--checkpoint latest|PATH] [--no-ema] [--eval] [--full-train-config]
                                     [--format unified_mm|hf_janus|hf_llava]

OUT holds: ``config.json`` (our ModelConfig per part + the LLM's transformers config),
``model.safetensors`` (every weight, frozen towers and VAE included: self-contained),
the processor (tokenizer files + ``processor_config.json``), ``generation_config.json``
(greedy text decoding; the image head with its sampler, steps and CFG scale),
``release.json`` (where it came from), ``training_summary.yaml`` and ``README.md``: a model
card with the eval results, the exact prompt and sampling recipe behind each number, and
the training summary. Weights come from the EMA copy when the run has one; the checkpoint
is the one ``latest`` names, verified against its checksums (any engine: DDP or DeepSpeed
ZeRO, read from our safetensors; a folder of DeepSpeed's own files is consolidated without
pickle). ``--eval`` runs the bundled benchmark on the exported folder and puts those numbers
in the card; without it the card uses the results of ``RUN_DIR/eval/results.json`` that were
computed from these very weights (same step and checksums), and says when none were.

The training summary keeps numbers, switches and enumerated choices of the train, engine and
data sections: no path, shell command or free text (no user names). ``--full-train-config``
adds the run's whole config (``train_config.yaml``, and in the card) for releases that may
show it. No file is a pickle; files get the usual mode (0666 less the umask).

``--format hf_janus`` / ``hf_llava``: a model of Janus or LLaVA architecture (converted with
``scripts/convert.py`` and fine-tuned, say) becomes a folder that ``JanusForConditionalGeneration`` /
``LlavaForConditionalGeneration.from_pretrained`` load with no code of ours (plus ``release.json`` and
the same redacted ``training_summary.yaml``); any other model (flow or next-frequency heads, MoD, V2PE,
other towers) is refused with the reason and keeps ``unified_mm``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mm.checkpoint import CheckpointError, read_meta, set_file_mode  # noqa: E402
from mm.config import Config  # noqa: E402
from mm.convert import EXPORTERS, ConversionError  # noqa: E402
from mm.eval.harness import evaluate, results_matching  # noqa: E402
from mm.hf import UnifiedMMProcessor, generation_config, wrap  # noqa: E402
from mm.load import (  # noqa: E402
    describe_weights,
    is_deepspeed_folder,
    load_release,
    load_run,
    run_config,
    select_checkpoint,
)
from mm.schema import ConfigError, to_plain  # noqa: E402

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


def _shown_path(path: str) -> str:
    """A repository-relative path as is; anything else by its file name only (a path can name its author)."""
    return path if not Path(path).is_absolute() else Path(path).name


def model_card(out: Path, source: dict, results: dict | None, gen_cfg: dict, train_config: str,
               full_config: bool = False) -> str:  # fmt: skip
    lines = [
        "---", "library_name: transformers", "pipeline_tag: any-to-any",
        "tags: [unified-mm, janusflow, rectified-flow]", "---", "", f"# {out.name}", "",
        "A unified multimodal model: one autoregressive LLM that answers questions about images and "
        "draws images from text (rectified flow inside the LLM, as JanusFlow).", "",
        f"Exported from run `{source.get('run')}`, checkpoint `{source.get('checkpoint')}` (step {source.get('step')}, "
        f"{source.get('weights')} weights).", "", "## Use", "", USAGE.format(name=out.name), "",
        "## Decoding and sampling", "",
        f"- Text: greedy, up to {gen_cfg['max_new_tokens']} new tokens, stops at `<|eos|>`.",
    ]  # fmt: skip
    for head, recipe in gen_cfg["image_heads"].items():
        lines.append(f"- Images, head `{head}`: " + ", ".join(f"{k} {v}" for k, v in recipe.items()))
    lines += ["", "## Evaluation", ""]
    if not results:
        lines.append("Not evaluated: run `python eval.py --model <this folder>` (or export with `--eval`).")
    else:
        lines += [
            f"Measured with `eval.py` on these weights (step {source.get('step')}, {source.get('weights')}); "
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
                f"- **{task}** (`{_shown_path(rec['task_file'])}`, n={results[task]['n']}): {rec['scoring']}",
                f"  - prompt (first document): `{rec['prompt_example']!r}`",
                f"  - generation: `{json.dumps(rec['generation_kwargs'])}`",
            ]
    title = "## Training config" if full_config else "## Training summary"
    lines += ["", title, "", "```yaml", train_config.rstrip(), "```", ""]
    return "\n".join(lines)


# Strings that are enumerated choices (registry keys), safe to show; every other string may be a path, a shell
# command or a person's name and stays out of the summary.
SUMMARY_CHOICES = {"train": {"schedule"}, "engine": {"kind", "precision"}, "data": {"packer", "loss_reduction"}}
SUMMARY_NAMES = {"train": {"frozen", "metrics"}}  # lists of module prefixes or sink names


def _plain_settings(section: str, values: dict) -> dict:
    out = {}
    for k, v in values.items():
        if isinstance(v, bool | int | float) or (isinstance(v, str) and k in SUMMARY_CHOICES.get(section, ())):
            out[k] = v
        elif isinstance(v, list) and all(isinstance(x, int | float) for x in v):
            out[k] = v
        elif isinstance(v, list) and k in SUMMARY_NAMES.get(section, ()):
            out[k] = [str(x) for x in v]
    return out


def training_summary(cfg: Config, meta: dict) -> dict:
    """The training config without anything that names a place or a person: see the module docstring."""
    plain = to_plain(cfg)
    out = {section: _plain_settings(section, plain[section]) for section in ("train", "engine", "data")}
    out["train"]["param_groups"] = [_plain_settings("train", g) | {"modules": list(g["modules"])}
                                    for g in plain["train"]["param_groups"]]  # fmt: skip
    out["train"]["started_from_another_checkpoint"] = bool(cfg.train.init_from)
    shards = {s[0]: s[2] for s in (meta.get("loaders") or [{}])[0].get("sources", [])}
    out["data"]["sources"] = [
        {"name": s.name, "kind": s.kind, "weight": s.weight, "resample": s.resample, "shards": shards.get(s.name)}
        for s in cfg.data.sources
    ]
    skipped: dict[str, int] = {}
    for state in meta.get("loaders", []):
        workers = state.get("worker_states", {}).values()
        for counts in [state.get("skipped", {})] + [w.get("skipped", {}) for w in workers]:
            for k, v in counts.items():
                skipped[k] = skipped.get(k, 0) + v
    out["run"] = {"steps": meta.get("step"), "processes": meta.get("world_size"),
                  "nonfinite_steps": meta.get("nonfinite_steps"), "skipped_samples": skipped}  # fmt: skip
    return out


def card_results(results: dict, source: dict, step: int) -> dict | None:
    """The tasks of ``results`` computed from the exported weights: the same step, and where both record them the
    same weight checksums (else the same checkpoint directory) and the same EMA/raw choice; says what it leaves out."""
    if "tasks" not in results:  # written before task files existed: no recipes to show
        print("note: results.json predates the task format; rerun eval.py", flush=True)
        return None
    same_step = results_matching(results, step=step)
    keep = []
    for task in same_step["tasks"]:
        model = same_step["computed_from"][task].get("model", {})
        if "weights_sha256" in model and "weights_sha256" in source:
            ok = model["weights_sha256"] == source["weights_sha256"]
        else:
            ok = Path(model.get("checkpoint", "")).resolve() == Path(source["checkpoint_path"]).resolve()
            ok = ok and model.get("weights", source["weights"]) == source["weights"]
        keep.append(task) if ok else None
    left = [t for t in results["tasks"] if t not in keep]
    if not keep:
        print(
            f"note: none of the {len(results['tasks'])} task result(s) in results.json were computed from this "
            f"checkpoint (step {step}, {source['weights']} weights): the card says 'Not evaluated'",
            flush=True,
        )
        return None
    if left:
        print(f"note: the card leaves out {left}: computed from another checkpoint, step or weights", flush=True)
    out = dict(same_step)
    out["tasks"] = keep
    return out


def export_release(
    run_dir: Path, out: Path, checkpoint: str = "latest", use_ema: bool = True, run_eval: bool = False,
    overwrite: bool = False, full_train_config: bool = False,
) -> Path:  # fmt: skip
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists: pass --overwrite to replace it")
    run_config(run_dir)  # a run directory, a readable config: checked before any weight is read
    ckpt = select_checkpoint(run_dir, checkpoint)  # latest (or the one named), verified
    cfg, model, ckpt, step = load_run(run_dir, str(ckpt), use_ema=use_ema, verified=True)
    weights = describe_weights(ckpt, use_ema)
    meta = {} if is_deepspeed_folder(ckpt) else read_meta(ckpt)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    hf = wrap(model, cfg.model)
    hf.save_pretrained(str(tmp))
    UnifiedMMProcessor.from_model(model).save_pretrained(str(tmp))
    gen = generation_config(cfg.model, model.vocab)
    gen.save_pretrained(str(tmp))
    # names, not paths: a release travels, and a path can name its author
    source = {"run": run_dir.resolve().name, "checkpoint": ckpt.name, "step": step, **weights}
    (tmp / "release.json").write_text(json.dumps({"source": source}, indent=1))
    summary = yaml.safe_dump(training_summary(cfg, meta), sort_keys=False)
    (tmp / "training_summary.yaml").write_text(summary)
    if full_train_config:
        (tmp / "train_config.yaml").write_text((run_dir / "config.yaml").read_text())
    for f in tmp.rglob("*"):
        if f.is_file():
            set_file_mode(f)  # safetensors writes 0600 whatever the umask
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)

    results = None
    if run_eval:
        loaded = load_release(out)
        results = evaluate(loaded, None, loaded.config.eval, out / "eval")
    elif (run_dir / "eval" / "results.json").is_file():
        results = json.loads((run_dir / "eval" / "results.json").read_text())
        results = card_results(results, {**source, "checkpoint_path": str(ckpt)}, step)
    shown = (run_dir / "config.yaml").read_text() if full_train_config else summary
    card = model_card(out, source, results, gen.to_dict(), shown, full_train_config)
    (out / "README.md").write_text(card)
    print(f"wrote release {out}: {sorted(p.name for p in out.iterdir())}", flush=True)
    return out


FORMATS = ("unified_mm", *EXPORTERS)


def export_transformers_format(run_dir: Path, out: Path, fmt: str, checkpoint: str = "latest", use_ema: bool = True,
                               overwrite: bool = False, full_train_config: bool = False) -> Path:  # fmt: skip
    """A run of Janus or LLaVA architecture -> a folder of transformers' own format (``--format``)."""
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists: pass --overwrite to replace it")
    run_config(run_dir)
    ckpt = select_checkpoint(run_dir, checkpoint)  # latest (or the one named), verified
    cfg, model, ckpt, step = load_run(run_dir, str(ckpt), use_ema=use_ema, verified=True)
    meta = {} if is_deepspeed_folder(ckpt) else read_meta(ckpt)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        EXPORTERS[fmt](model, tmp)
    except ConversionError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SystemExit(f"export_release: {e}") from None
    source = {"run": run_dir.resolve().name, "checkpoint": ckpt.name, "step": step, "format": fmt,
              **describe_weights(ckpt, use_ema)}  # fmt: skip
    (tmp / "release.json").write_text(json.dumps({"source": source}, indent=1))
    (tmp / "training_summary.yaml").write_text(yaml.safe_dump(training_summary(cfg, meta), sort_keys=False))
    if full_train_config:
        (tmp / "train_config.yaml").write_text((run_dir / "config.yaml").read_text())
    for f in tmp.rglob("*"):
        if f.is_file():
            set_file_mode(f)
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
    ap.add_argument("--full-train-config", action="store_true",
                    help="also ship the run's whole config (paths and shell commands included)")  # fmt: skip
    ap.add_argument("--format", choices=FORMATS, default="unified_mm",
                    help="unified_mm (ours, any model) or transformers' own Janus / LLaVA format")  # fmt: skip
    args = ap.parse_args()
    try:
        if args.format != "unified_mm":
            export_transformers_format(args.run_dir, args.out, args.format, args.checkpoint, not args.no_ema,
                                       args.overwrite, args.full_train_config)  # fmt: skip
        else:
            export_release(args.run_dir, args.out, args.checkpoint, not args.no_ema, args.eval, args.overwrite,
                           args.full_train_config)  # fmt: skip
    except (CheckpointError, ConfigError, FileExistsError) as e:
        sys.exit(f"export_release: {e}")


if __name__ == "__main__":
    main()
