"""Run task YAMLs on a model: batched, with a progress bar; results.json, per-sample JSONL, report.md.

For each task: documents from its local dataset -> prompts (``doc_to_text``) and images
(``doc_to_visual``) -> ``UnifiedModel.answer`` (``generate_until``) or
``UnifiedModel.generate`` (``generate_image``) -> ``process_results`` per document ->
each metric's ``aggregation`` over the documents. The same functions run under
lmms-eval (``mm/eval/lmms.py``), so both give the same numbers.

Aggregations may take a ``context`` argument (output folder, eval config, seed) and
may return a mapping of several named numbers (generation tasks compute several
metrics from one set of images).

Results accumulate in one folder: ``results.json`` is merged per task (a rerun replaces
that task's entry, the others stay), ``computed_from`` records for each task the
model, checkpoint, step and eval settings its entry was computed from (use
:func:`results_matching` to keep only those of one checkpoint), and every file is
written atomically after each task, so a crash leaves the tasks finished so far and
never a half-written file. A generation task's image folder is cleared before its
images are regenerated.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import statistics
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from data.bundled.benchmark import BENCH_DATASETS, build_bench
from mm.config import EvalConfig
from mm.eval.generation import write_geneval_layout
from mm.eval.sources import load_task_docs, resolve_data_path
from mm.eval.taskfile import DEFAULT_TASK_DIR, TaskConfig, call_doc_fn, load_tasks
from mm.hf import SAMPLER_KEYS, sampler_kwargs
from mm.schema import REPO_ROOT

DEFAULT_TASKS = ["digits_vqa", "digits_mcq", "digits_pope", "digits_mme", "digits_t2i", "digits_geneval"]
MODEL_NAME = "unified_mm"  # our lmms-eval model id: the key of a task's lmms_eval_specific_kwargs
BENCH_ROOT = REPO_ROOT / "data" / "bench"


@dataclass
class EvalContext:
    """What an aggregation may need besides the per-document results."""

    task: str
    out_dir: Path
    eval: EvalConfig
    seed: int


def task_seed(eval_cfg: EvalConfig, task: str) -> int:
    return eval_cfg.seed * 1_000_003 + zlib.crc32(task.encode())


def ensure_bench_datasets(tasks: list[TaskConfig], build: bool) -> None:
    """Build bundled datasets (``data/bench/<name>``) that a task needs and that are missing."""
    for t in tasks:
        if not (t.dataset_kwargs or {}).get("load_from_disk"):
            continue
        path = resolve_data_path(t.dataset_path, t.yaml_path)
        if path.exists() or path.parent != BENCH_ROOT or path.name not in BENCH_DATASETS:
            continue
        if not build:
            raise FileNotFoundError(
                f"{path} missing: run `python -m data.bundled.benchmark` (or eval.build_if_missing=true)"
            )
        print(f"building bundled benchmark dataset {path}", flush=True)
        build_bench(BENCH_ROOT, [path.name])


# ---------------------------------------------------------------------------------
# Model calls (shared with the lmms-eval adapter)
# ---------------------------------------------------------------------------------


def cut_at(text: str, until: list[str] | str | None) -> str:
    """The answer up to the first stop string (lmms-eval's ``until``)."""
    for stop in [until] if isinstance(until, str) else until or []:
        if stop and stop in text:
            text = text.split(stop)[0]
    return text


def answer_all(
    model,
    processor,
    visuals: list[list],
    prompts: list[str],
    keys: list,
    gen_kwargs: dict,
    batch_size: int,
    desc: str = "answer",
) -> list[str]:
    """Greedy answers, batched by prompt length; ``visuals[i]`` holds question i's images (one or more).

    Rows are ordered by (image count, token length, key), never by arrival order, so the same
    set of requests forms the same batches whoever sends them (our harness or lmms-eval), and
    batched numerics match exactly. Several images go where the prompt's ``<image>`` markers
    are, else before the question (``UnifiedModel.answer``).
    """
    for i, v in enumerate(visuals):
        if not v:
            raise ValueError(f"request {keys[i]!r}: no image; the model answers questions about images")
    max_new = int(gen_kwargs.get("max_new_tokens", 16))
    lengths = [(len(visuals[i]), len(model.vocab.encode(p))) for i, p in enumerate(prompts)]
    order = sorted(range(len(prompts)), key=lambda i: (lengths[i], str(keys[i])))
    out: list[str] = [""] * len(prompts)
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    with torch.no_grad():
        for chunk in tqdm(chunks, desc=desc, unit="batch", dynamic_ncols=True):
            if all(len(visuals[i]) == 1 for i in chunk):  # one image each: one [N,C,H,W] tensor
                images = processor.und_images([visuals[i][0] for i in chunk])
            else:
                images = [processor.und_images(list(visuals[i])) for i in chunk]
            answers = model.answer(images, [prompts[i] for i in chunk], max_new_tokens=max_new)
            for i, a in zip(chunk, answers):
                out[i] = cut_at(a, gen_kwargs.get("until"))
    return out


def sampling_recipe(model, gen_kwargs: dict) -> dict:
    """The image head's sampling settings a generation task runs with (task values over model defaults)."""
    recipes = model.cfg.head_recipes()
    if not recipes:
        raise ValueError("this model has no image head (model.understanding_only): run understanding tasks only")
    head = gen_kwargs.get("head") or next(iter(recipes))
    if head not in recipes:
        raise KeyError(f"image head {head!r} not in this model; it has {sorted(recipes)}")
    recipe = {"head": head, **recipes[head]}

    for k in SAMPLER_KEYS:
        if gen_kwargs.get(k) is not None:
            recipe[k] = gen_kwargs[k]
    return recipe


def generate_all(model, prompts: list[str], per_prompt: int, recipe: dict, seed: int, batch_size: int,
                 desc: str = "generate") -> tuple[list[list[np.ndarray]], list[list[str]]]:  # fmt: skip
    """``per_prompt`` images ([C,H,W] floats in [0,1]) for each prompt, seeded, batched, with ``recipe``'s head;
    and the plan the model wrote before each (none where the head writes no plans)."""
    flat = [i for i in range(len(prompts)) for _ in range(per_prompt)]
    gen = torch.Generator().manual_seed(seed)
    out: list[list[np.ndarray]] = [[] for _ in prompts]
    plans: list[list[str]] = [[] for _ in prompts]
    planned = bool(model.head(recipe.get("head")).template.plan_tokens)
    chunks = [flat[i : i + batch_size] for i in range(0, len(flat), batch_size)]
    with torch.no_grad():
        for chunk in tqdm(chunks, desc=desc, unit="batch", dynamic_ncols=True):
            kwargs = sampler_kwargs(recipe)
            if planned:  # written here (as generate would) to be reported beside the images
                temperature = kwargs.pop("plan_temperature", 0.0)
                kwargs["plans"] = model.plan([prompts[i] for i in chunk], recipe.get("head"), temperature, gen)
                for i, plan in zip(chunk, kwargs["plans"]):
                    plans[i].append(plan)
            images = model.generate([prompts[i] for i in chunk], generator=gen, **kwargs)
            for i, img in zip(chunk, images.float().cpu().numpy()):
                out[i].append(img)
    return out, plans


# ---------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------


def aggregate(task: TaskConfig, per_doc: list[dict], ctx: EvalContext) -> dict[str, Any]:
    """Each metric's aggregation over the documents that returned it (one BLAS thread: see ``run_task``)."""
    with threadpool_limits(1):
        return _aggregate(task, per_doc, ctx)


def _aggregate(task: TaskConfig, per_doc: list[dict], ctx: EvalContext) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in task.metric_list:
        name, agg = m["metric"], m.get("aggregation", "mean")
        values = [r[name] for r in per_doc if name in r]
        if agg == "mean":
            value = float(np.mean([float(v) for v in values])) if values else float("nan")
        elif agg == "median":
            value = float(statistics.median([float(v) for v in values])) if values else float("nan")
        elif isinstance(agg, str):
            raise ValueError(f"{task.yaml_path}: aggregation {agg!r} is neither mean, median nor a !function")
        else:
            fn = agg.resolve() if hasattr(agg, "resolve") else agg
            value = fn(values, context=ctx) if "context" in inspect.signature(fn).parameters else fn(values)
        if isinstance(value, dict):
            out.update(value)
        else:
            out[name] = value
    return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items() if not isinstance(x, np.ndarray | torch.Tensor)}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, str | int | float | bool) or v is None:
        return v
    return repr(v)


def _visuals(task: TaskConfig, doc: dict, i: int) -> list:
    """The document's images, or an error naming the task and document (a bad image is a bad dataset)."""
    try:
        return list(call_doc_fn(task.doc_to_visual, doc))
    except Exception as e:  # noqa: BLE001 - re-raised with the document named
        raise ValueError(f"task {task.task}: document {i}: doc_to_visual failed: {e!r}") from e


def run_task(task: TaskConfig, loaded, eval_cfg: EvalConfig, out_dir: Path) -> tuple[dict, list[dict]]:
    """(metrics, per-sample records) of one task."""
    docs = load_task_docs(task)
    if eval_cfg.limit:
        docs = docs.select(range(min(eval_cfg.limit, len(docs))))
    kw = task.prompt_kwargs(MODEL_NAME)
    prompts = [call_doc_fn(task.doc_to_text, doc, kw) for doc in docs]
    targets = [call_doc_fn(task.doc_to_target, doc, kw) for doc in docs]
    gen_kwargs = dict(task.generation_kwargs or {})
    model, seed = loaded.model, task_seed(eval_cfg, task.task)
    recipe: dict = {"output_type": task.output_type, "prompt_kwargs": kw}
    samples = []
    if task.process_results is None:
        raise ValueError(f"{task.yaml_path}: task {task.task} has no process_results (our harness needs one)")
    if task.output_type == "generate_until":
        visuals = [_visuals(task, doc, i) for i, doc in enumerate(docs)]
        responses = answer_all(model, loaded.processor, visuals, prompts, list(range(len(docs))), gen_kwargs,
                               eval_cfg.batch_size, desc=task.task)  # fmt: skip
        with threadpool_limits(1):
            per_doc = [task.process_results(doc, [r]) for doc, r in zip(docs, responses)]
        recipe["generation_kwargs"] = {"decoding": "greedy", **gen_kwargs}
        for i, (p, t, r, res) in enumerate(zip(prompts, targets, responses, per_doc)):
            samples.append({"doc_id": i, "prompt": p, "target": t, "response": r, "results": _jsonable(res)})
    else:
        per_prompt = eval_cfg.images_per_prompt or int(gen_kwargs.get("images_per_prompt", 1))
        sampling = sampling_recipe(model, gen_kwargs)
        images, plans = generate_all(model, prompts, per_prompt, sampling, seed, eval_cfg.batch_size, task.task)
        layout = out_dir / task.task
        meta = [json.loads(d["metadata"]) if "metadata" in d else {"prompt": p} for d, p in zip(docs, prompts)]
        clear_image_folder(layout)  # a smaller rerun must not leave the previous run's extra prompts behind
        write_geneval_layout(layout, meta, images)
        with threadpool_limits(1):  # scoring (numpy/scipy/sklearn) gives the same floats whatever the thread settings
            per_doc = [task.process_results(doc, imgs) for doc, imgs in zip(docs, images)]
        recipe["generation_kwargs"] = {**sampling, "images_per_prompt": per_prompt, "seed": seed}
        for i, (p, t, res) in enumerate(zip(prompts, targets, per_doc)):
            paths = [
                str((layout / f"{i:05d}" / "samples" / f"{j:04d}.png").relative_to(out_dir)) for j in range(per_prompt)
            ]
            samples.append(
                {"doc_id": i, "prompt": p, "target": _jsonable(t), "images": paths, "results": _jsonable(res)}
                | ({"plans": plans[i]} if plans[i] else {})
            )
    ctx = EvalContext(task.task, out_dir, eval_cfg, seed)
    metrics = aggregate(task, per_doc, ctx)
    metrics["n"] = len(docs)
    recipe["prompt_example"] = prompts[0] if prompts else ""
    recipe["scoring"] = (task.metadata or {}).get("scoring", "") if isinstance(task.metadata, dict) else ""
    recipe["task_file"] = (
        str(task.yaml_path.relative_to(REPO_ROOT)) if task.yaml_path.is_relative_to(REPO_ROOT) else str(task.yaml_path)
    )
    metrics["recipe"] = recipe
    metrics["examples"] = [{k: s[k] for k in ("target", "response", "images", "plans") if k in s} for s in samples[:10]]
    return metrics, samples


def evaluate(loaded, task_names: list[str] | None, eval_cfg: EvalConfig, out_dir: Path) -> dict:
    """Run tasks (default: the whole bundled benchmark); merge them into results.json; write samples_<task>.jsonl
    and report.md. Returns the merged results (earlier tasks of ``out_dir`` included)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    dirs = [DEFAULT_TASK_DIR] + [Path(d) for d in eval_cfg.task_dirs]
    tasks = load_tasks(task_names or eval_cfg.tasks or DEFAULT_TASKS, dirs)
    ensure_bench_datasets(tasks, eval_cfg.build_if_missing)
    t_start = time.time()
    results = read_results(out_dir)
    results.update({"model": loaded.source, "eval_config": asdict(eval_cfg)})
    results.update({k: v for k, v in loaded.source.items() if k in ("checkpoint", "step")})
    for task in tasks:
        t0 = time.time()
        metrics, samples = run_task(task, loaded, eval_cfg, out_dir)
        metrics["seconds"] = round(time.time() - t0, 1)
        write_atomic(_inside(out_dir, f"samples_{task.task}.jsonl"), "".join(json.dumps(s) + "\n" for s in samples))
        merge_task(results, task.task, metrics, loaded.source, eval_cfg)
        write_results(out_dir, results)  # after every task: a crash keeps what is done
        shown = {k: v for k, v in metrics.items() if k not in ("examples", "recipe")}
        print(f"{task.task}: {shown}", flush=True)
    results["eval_seconds"] = round(time.time() - t_start, 1)
    write_results(out_dir, results)
    print(f"wrote {out_dir / 'results.json'}, {out_dir / 'report.md'} ({results['eval_seconds']} s)", flush=True)
    return results


# ---------------------------------------------------------------------------------
# Results on disk: merged per task, with where each entry came from, written atomically
# ---------------------------------------------------------------------------------


def _inside(out_dir: Path, name: str) -> Path:
    """``out_dir/name``, refused if it leaves ``out_dir`` (task names are checked when read; this is the backstop)."""
    path = out_dir / name
    if path.resolve().parent != out_dir.resolve():
        raise ValueError(f"output name {name!r} leaves the output folder {out_dir}")
    return path


def write_atomic(path: Path, text: str) -> None:
    """Write a temporary file beside ``path`` and rename it over ``path``: readers see the old or the new file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_results(out_dir: Path) -> dict:
    """The results already in ``out_dir`` (to merge into); {} when there are none or they are unreadable."""
    path = out_dir / "results.json"
    if not path.is_file():
        return {"tasks": []}
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        print(f"note: {path} is unreadable ({e!r:.120}); it is replaced by this run's results", flush=True)
        return {"tasks": []}
    if not isinstance(old, dict) or not isinstance(old.get("tasks"), list):
        print(f"note: {path} predates per-task results; it is replaced by this run's results", flush=True)
        return {"tasks": []}
    return old


def merge_task(results: dict, task: str, metrics: dict, source: dict, eval_cfg: EvalConfig) -> None:
    """Put one task's entry into ``results`` (replacing an earlier one) and record what it was computed from."""
    if task not in results["tasks"]:
        results["tasks"].append(task)
    results[task] = metrics
    results.setdefault("computed_from", {})[task] = {
        **{k: source[k] for k in ("step", "checkpoint") if k in source},
        "model": dict(source), "eval_config": asdict(eval_cfg), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }  # fmt: skip


def write_results(out_dir: Path, results: dict) -> None:
    write_atomic(out_dir / "results.json", json.dumps(results, indent=1))
    write_atomic(out_dir / "report.md", markdown_report(results))


def results_matching(results: dict, step: int | None = None, checkpoint: str | None = None) -> dict:
    """``results`` with only the tasks computed from this step (and checkpoint, when given): what a model card
    exported from that checkpoint may show. Tasks without a record (older files) are left out."""
    keep = []
    for task in results.get("tasks", []):
        src = results.get("computed_from", {}).get(task)
        if src is not None and (step is None or src.get("step") == step):
            if checkpoint is None or src.get("checkpoint") == checkpoint:
                keep.append(task)
    out = {
        k: v for k, v in results.items() if k not in results.get("tasks", []) and k not in ("tasks", "computed_from")
    }
    out["tasks"] = keep
    out["computed_from"] = {t: results["computed_from"][t] for t in keep}
    out.update({t: results[t] for t in keep})
    return out


def clear_image_folder(folder: Path) -> None:
    """Remove a task's earlier images (GenEval layout: ``NNNNN/`` prompt folders) before they are regenerated.

    Anything else in the folder is not ours to delete: that is an error naming it.
    """
    if not folder.exists():
        return
    foreign = [p.name for p in folder.iterdir() if not (p.is_dir() and re.fullmatch(r"\d{5}", p.name))]
    if not folder.is_dir() or foreign:
        raise FileExistsError(
            f"{folder} holds more than generated images ({foreign[:3]}); move it away or choose another output folder"
        )
    shutil.rmtree(folder)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def markdown_report(results: dict) -> str:
    """A short report: one table row per task and metric, then the prompts and recipes behind them."""
    src = results.get("model", {})
    lines = ["# Evaluation report", "", f"Model: `{src.get('release') or src.get('run', '?')}`"
             + (f", step {src['step']}" if "step" in src else ""), "",
             "Scoring is rule-based everywhere (no GPT judge).", "",
             "| task | metric | value |", "| --- | --- | --- |"]  # fmt: skip
    for name in results["tasks"]:
        r = results[name]
        for k, v in r.items():
            if k not in ("recipe", "examples", "seconds") and not isinstance(v, dict | list):
                lines.append(f"| {name} | {k} | {_fmt(v)} |")
    lines += ["", "## Prompts and recipes", ""]
    origins = results.get("computed_from", {})
    if len({(o.get("checkpoint"), o.get("step")) for o in origins.values()}) > 1:
        lines[4:4] = ["**These tasks were computed from different checkpoints** (each task's step is below).", ""]
    for name in results["tasks"]:
        rec = results[name]["recipe"]
        step = f", step {origins[name]['step']}" if "step" in origins.get(name, {}) else ""
        lines.append(f"- **{name}** ({rec['task_file']}, {results[name]['seconds']} s{step}): {rec['scoring']}")
        lines.append(f"  - prompt: `{rec['prompt_example']!r}`; generation: `{json.dumps(rec['generation_kwargs'])}`")
    return "\n".join(lines) + "\n"
