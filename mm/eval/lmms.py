"""Our model as an lmms-eval model (``lmms_eval.api.model.lmms``), so lmms-eval's evaluator runs it.

Three ways in (lmms-eval is an optional extra: ``pip install -r requirements-eval.txt``):

1. In Python, with any task folder::

       from lmms_eval.evaluator import simple_evaluate
       from lmms_eval.tasks import TaskManager
       from mm.eval.lmms import UnifiedMMLmms
       lm = UnifiedMMLmms(pretrained="release/")            # or run="runs/tiny"
       simple_evaluate(model=lm, tasks=["digits_vqa"], task_manager=TaskManager(include_path="mm/eval/tasks"))

2. Installed (``pip install -e .[eval]``): the ``lmms_eval.models`` entry point in
   pyproject.toml registers ``unified_mm``, so lmms-eval's own CLI works::

       lmms-eval --model unified_mm --model_args pretrained=release/ --tasks digits_pope --include_path mm/eval/tasks

3. Not installed: ``python -m mm.eval.lmms <lmms-eval CLI arguments>`` registers
   ``unified_mm`` and hands over to lmms-eval's CLI.

Requests are answered by the same ``answer_all`` the harness uses (same prompts, same
batches, same cut at ``until``), so lmms-eval's numbers equal ``eval.py``'s.

* ``generate_until`` honours the task's decoding: greedy by default; sampling when the task asks
  (``do_sample: true``, or ``temperature > 0`` without ``do_sample``, as lmms-eval's own models
  read it; ``temperature: 0`` is greedy) with its ``temperature``, ``top_p`` and ``top_k``, drawn
  from a generator seeded by ``seed`` (a model argument, default 0) and the task name.
  ``num_beams > 1`` is refused in one line: no beam search here.
* ``loglikelihood`` (and lmms-eval's ``multiple_choice``, which sends one per choice) gets
  ``(log p(continuation | context, images), greedy)`` from ``UnifiedModel.loglikelihood``, the
  log-probability the API documents. lmms-eval's built-in ``multiple_choice`` scoring takes the
  *argmin* (its LLaVA-family models return a loss there), so a choice task run on us supplies its
  own ``process_results`` (``mm/eval/lmms_tasks/digits_vqa_loglik``); ``output_type: loglikelihood``
  tasks (``perplexity``, ``acc``) run on the built-in scoring as they are.
* Text-to-image tasks (``generate_image``) run under ``eval.py`` only.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from pathlib import Path

import torch
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest

from mm.eval.harness import MODEL_NAME, answer_all
from mm.load import load_release, load_run_model

MANIFEST = ModelManifest(model_id=MODEL_NAME, simple_class_path="mm.eval.lmms.UnifiedMMLmms")


class UnifiedMMLmms(lmms):
    is_simple = True

    def __init__(
        self, pretrained: str | None = None, run: str | None = None, batch_size: int | str = 64, device: str = "cpu",
        loaded=None, checkpoint: str = "latest", seed: int = 0, **kwargs,
    ):  # fmt: skip
        """``run``: a run directory, read through :func:`mm.load.load_run_model` like ``eval.py --run`` (the
        checkpoint ``latest`` names, verified, EMA weights when kept; ``checkpoint=`` names another, or a folder
        of DeepSpeed files, read without pickle)."""
        super().__init__()
        self.seed = int(seed)
        if loaded is None:
            if bool(pretrained) == bool(run):
                raise ValueError("UnifiedMMLmms: give exactly one of pretrained=<release folder> or run=<run dir>")
            loaded = load_release(Path(pretrained)) if pretrained else load_run_model(Path(run), checkpoint=checkpoint)
        self.loaded = loaded
        self.loaded.model.to(device)
        self.batch_size_per_gpu = int(batch_size)

    def generate_until(self, requests) -> list[str]:
        """Answers in request order; each task's requests are batched together, as the harness does."""
        by_task: dict[str, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            by_task[req.args[4]].append(i)
        out: list[str] = [""] * len(requests)
        for task, idx in by_task.items():
            visuals, prompts, keys = [], [], []
            for i in idx:
                ctx, gen_kwargs, doc_to_visual, doc_id, _, split = requests[i].args
                visuals.append(list(doc_to_visual(self.task_dict[task][split][doc_id])))
                prompts.append(ctx)
                keys.append(doc_id)
            gen_kwargs = dict(requests[idx[0]].args[1] or {})
            model = Decoding(self.loaded.model, decoding_options(gen_kwargs, self.seed, task))
            answers = answer_all(model, self.loaded.processor, visuals, prompts, keys, gen_kwargs,
                                 self.batch_size_per_gpu, desc=f"lmms-eval {task}")  # fmt: skip
            for i, a in zip(idx, answers):
                out[i] = a
                self.cache_hook.add_partial("generate_until", (requests[i].args[0], requests[i].args[1]), a)
        return out

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(log p(continuation | context, images), greedy) per request, in request order.

        Requests are ``(context, continuation or doc_to_target, doc_to_visual, doc_id, task, split)``, or
        ``(context, continuation)`` without images (lmms-eval's unconditional requests).
        """
        visuals, contexts, conts = [], [], []
        for req in requests:
            if len(req.args) == 2:
                ctx, cont, images = req.args[0], req.args[1], []
            else:
                ctx, target, doc_to_visual, doc_id, task, split = req.args
                doc = self.task_dict[task][split][doc_id]
                cont = target if isinstance(target, str) else target(doc)  # lmms-eval's rule (LLaVA's adapter)
                images = list(doc_to_visual(doc)) if doc_to_visual is not None else []
            visuals.append(images)
            contexts.append(ctx[0] if isinstance(ctx, list) else ctx)
            conts.append(str(cont[0] if isinstance(cont, list) else cont))
        out = loglikelihood_all(self.loaded.model, self.loaded.processor, visuals, contexts, conts,
                                self.batch_size_per_gpu)  # fmt: skip
        for ctx, cont, res in zip(contexts, conts, out):
            self.cache_hook.add_partial("loglikelihood", (ctx, cont), res)
        return out

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("unified_mm answers one question per image; multi-round chat is not supported")


def decoding_options(gen_kwargs: dict, seed: int = 0, task: str = "") -> dict:
    """A task's generation kwargs -> ``UnifiedModel.answer``'s decoding options (see the module docstring)."""
    beams = int(gen_kwargs.get("num_beams") or 1)
    if beams > 1:
        raise ValueError(f"unified_mm: num_beams={beams} asked by task {task!r}; beam search is not implemented "
                         "(greedy or sampling only)")  # fmt: skip
    temperature = gen_kwargs.get("temperature")
    do_sample = gen_kwargs.get("do_sample")
    if do_sample is None:
        do_sample = temperature is not None and float(temperature) > 0
    if not do_sample or (temperature is not None and float(temperature) == 0):
        return {}
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(task.encode()))
    return {"do_sample": True, "temperature": 1.0 if temperature is None else float(temperature),
            "top_p": float(gen_kwargs.get("top_p") or 1.0), "top_k": int(gen_kwargs.get("top_k") or 0),
            "generator": generator}  # fmt: skip


class Decoding:
    """The model with a task's decoding options bound, as the harness's ``answer_all`` calls it."""

    def __init__(self, model, options: dict):
        self.model, self.options, self.vocab = model, options, model.vocab

    def answer(self, images, questions: list[str], max_new_tokens: int = 8) -> list[str]:
        return self.model.answer(images, questions, max_new_tokens=max_new_tokens, **self.options)


def loglikelihood_all(
    model, processor, visuals: list[list], contexts: list[str], continuations: list[str], batch_size: int
) -> list[tuple[float, bool]]:
    """``model.loglikelihood`` over requests, batched by (image count, length) like ``answer_all``."""
    key = [(len(v), len(model.vocab.encode(c)) + len(model.vocab.encode(k))) for v, c, k in
           zip(visuals, contexts, continuations)]  # fmt: skip
    order = sorted(range(len(contexts)), key=lambda i: key[i])
    out: list[tuple[float, bool]] = [(0.0, True)] * len(contexts)
    for a in range(0, len(order), batch_size):
        chunk = order[a : a + batch_size]
        images = [processor.und_images(list(visuals[i])) if visuals[i] else _no_images(processor) for i in chunk]
        res = model.loglikelihood(images, [contexts[i] for i in chunk], [continuations[i] for i in chunk])
        for i, r in zip(chunk, res):
            out[i] = r
    return out


def _no_images(processor) -> torch.Tensor:
    return torch.zeros(0, processor.und_channels, processor.und_image_size, processor.und_image_size)


def register() -> None:
    """Make ``unified_mm`` known to lmms-eval's model registry without installing the package."""
    from lmms_eval.models import MODEL_REGISTRY_V2

    MODEL_REGISTRY_V2.register_manifest(MANIFEST, overwrite=True)


if __name__ == "__main__":
    register()
    from lmms_eval.cli.dispatch import main

    main()
