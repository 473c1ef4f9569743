"""lmms-eval's own evaluator runs our model on a bundled task and gets eval.py's answers and scores."""

import json
from pathlib import Path

import pytest

from tests.test_release import make_tiny_run

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, shard_dir) -> Path:
    return make_tiny_run(tmp_path_factory.getbasetemp(), shard_dir)


@pytest.mark.parametrize("task, limit", [("digits_mcq", 48), ("digits_pope_adversarial", 24)])
def test_lmms_eval_evaluator_equals_eval_py(tiny_run, tmp_path, task, limit):
    pytest.importorskip("lmms_eval", reason="lmms-eval is an optional extra (requirements-eval.txt)")
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from mm.config import EvalConfig
    from mm.eval.harness import evaluate
    from mm.eval.lmms import UnifiedMMLmms, register
    from mm.load import load_run_model

    loaded = load_run_model(tiny_run)
    ours = evaluate(loaded, [task], EvalConfig(limit=limit), tmp_path)[task]
    ours_responses = [
        json.loads(ln)["response"] for ln in (tmp_path / f"samples_{task}.jsonl").read_text().splitlines()
    ]

    # lmms-eval reads our task folder (include_path) and its load_from_disk dataset itself
    register()  # "unified_mm" by name, as the entry point does when the package is installed
    tm = TaskManager("WARNING", include_path=str(ROOT / "mm" / "eval" / "tasks"), include_defaults=False)
    out = simple_evaluate(
        model=UnifiedMMLmms(loaded=loaded), tasks=[task], task_manager=tm, limit=limit, batch_size=64,
        log_samples=True, bootstrap_iters=0,
    )  # fmt: skip
    theirs = out["results"][task]
    metrics = [k.split(",")[0] for k in theirs if k.endswith(",none") and "_stderr" not in k]
    assert metrics and all(theirs[f"{m},none"] == pytest.approx(ours[m], abs=0) for m in metrics)
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    assert [s["resps"][0][0] for s in samples] == ours_responses  # the same answer to every document
    # real answers were generated and compared (the 10-step model answers pope with an immediate end of text)
    assert all(r.strip() for r in ours_responses) or task == "digits_pope_adversarial"
