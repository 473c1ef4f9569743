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
batches, same cut at ``until``), so lmms-eval's numbers equal ``eval.py``'s. Only
``generate_until`` is supported: multiple choice is asked by generation, as the bundled
tasks do; text-to-image tasks (``generate_image``) run under ``eval.py`` only.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest

from mm.eval.harness import MODEL_NAME, answer_all
from mm.load import load_release, load_run_model

MANIFEST = ModelManifest(model_id=MODEL_NAME, simple_class_path="mm.eval.lmms.UnifiedMMLmms")


class UnifiedMMLmms(lmms):
    is_simple = True

    def __init__(
        self, pretrained: str | None = None, run: str | None = None, batch_size: int | str = 64, device: str = "cpu",
        loaded=None, checkpoint: str = "latest", **kwargs,
    ):  # fmt: skip
        """``run``: a run directory, read through :func:`mm.load.load_run_model` like ``eval.py --run`` (the
        checkpoint ``latest`` names, verified, EMA weights when kept; ``checkpoint=`` names another, or a folder
        of DeepSpeed files, read without pickle)."""
        super().__init__()
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
            answers = answer_all(self.loaded.model, self.loaded.processor, visuals, prompts, keys, gen_kwargs,
                                 self.batch_size_per_gpu, desc=f"lmms-eval {task}")  # fmt: skip
            for i, a in zip(idx, answers):
                out[i] = a
                self.cache_hook.add_partial("generate_until", (requests[i].args[0], requests[i].args[1]), a)
        return out

    def loglikelihood(self, requests):
        raise NotImplementedError(
            "unified_mm answers by generation; use generate_until tasks (multiple choice included)"
        )

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("unified_mm answers one question per image; multi-round chat is not supported")


def register() -> None:
    """Make ``unified_mm`` known to lmms-eval's model registry without installing the package."""
    from lmms_eval.models import MODEL_REGISTRY_V2

    MODEL_REGISTRY_V2.register_manifest(MANIFEST, overwrite=True)


if __name__ == "__main__":
    register()
    from lmms_eval.cli.dispatch import main

    main()
