"""lmms-eval's own evaluator runs our model on a bundled task and gets eval.py's answers and scores."""

import json
from pathlib import Path

import pytest
import torch

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


def test_decoding_options_follow_the_task():
    pytest.importorskip("lmms_eval", reason="lmms-eval is an optional extra (requirements-eval.txt)")
    from mm.eval.lmms import decoding_options

    assert decoding_options({"max_new_tokens": 4, "do_sample": False}) == {}  # greedy, today's default
    assert decoding_options({"temperature": 0}) == {} == decoding_options({"temperature": 0, "do_sample": True})
    assert decoding_options({"temperature": 0.7, "do_sample": False}) == {}  # do_sample decides when given
    opts = decoding_options({"temperature": 0.7, "top_p": 0.9, "top_k": 5}, seed=1, task="t")
    assert (opts["do_sample"], opts["temperature"], opts["top_p"], opts["top_k"]) == (True, 0.7, 0.9, 5)
    again = decoding_options({"temperature": 0.7}, seed=1, task="t")["generator"]
    assert torch.equal(opts["generator"].get_state(), again.get_state())  # seeded by (seed, task)
    assert decoding_options({"do_sample": True})["temperature"] == 1.0  # transformers' default
    assert decoding_options({"num_beams": 1}) == {}
    with pytest.raises(ValueError, match="num_beams=3 .*beam search is not implemented"):
        decoding_options({"num_beams": 3}, task="t")


def _simple_evaluate(loaded, tasks, include_path, limit, **model_kw):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from mm.eval.lmms import UnifiedMMLmms, register

    register()
    tm = TaskManager("WARNING", include_path=include_path, include_defaults=False)
    return simple_evaluate(
        model=UnifiedMMLmms(loaded=loaded, **model_kw), tasks=tasks, task_manager=tm, limit=limit, batch_size=64,
        log_samples=True, bootstrap_iters=0,
    )  # fmt: skip


def test_sampling_tasks_are_sampled_and_seeded(tiny_run, tmp_path):
    """A task asking for temperature sampling gets sampled answers, the same for the same seed."""
    pytest.importorskip("lmms_eval", reason="lmms-eval is an optional extra (requirements-eval.txt)")
    from data.bundled.benchmark import build_bench
    from mm.eval.harness import BENCH_ROOT
    from mm.load import load_run_model

    build_bench(BENCH_ROOT, ["digits_vqa"])
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "sampled.yaml").write_text(
        f"include: {ROOT / 'mm' / 'eval' / 'tasks' / 'digits_vqa' / 'digits_vqa.yaml'}\ntask: digits_vqa_sampled\n"
        "generation_kwargs:\n  max_new_tokens: 4\n  temperature: 1.5\n  top_p: 0.95\n"
    )
    loaded = load_run_model(tiny_run)

    def responses(task, path, **kw):
        out = _simple_evaluate(loaded, [task], path, 40, **kw)
        return [s["resps"][0][0] for s in sorted(out["samples"][task], key=lambda s: s["doc_id"])]

    greedy = responses("digits_vqa", str(ROOT / "mm" / "eval" / "tasks"))
    a, b = responses("digits_vqa_sampled", str(tasks)), responses("digits_vqa_sampled", str(tasks))
    c = responses("digits_vqa_sampled", str(tasks), seed=1)
    assert a == b and a != c and a != greedy


def test_loglikelihood_tasks_run_end_to_end(tiny_run):
    """lmms-eval loglikelihood and multiple_choice requests: its numbers == direct UnifiedModel.loglikelihood calls."""
    pytest.importorskip("lmms_eval", reason="lmms-eval is an optional extra (requirements-eval.txt)")
    import ast
    import math

    import datasets

    from data.bundled.benchmark import build_bench
    from mm.eval.harness import BENCH_ROOT
    from mm.load import load_run_model

    build_bench(BENCH_ROOT, ["digits_vqa"])
    loaded, limit = load_run_model(tiny_run), 12
    out = _simple_evaluate(loaded, ["digits_vqa_loglik", "digits_vqa_choice"], str(ROOT / "mm" / "eval" / "lmms_tasks"),
                           limit)  # fmt: skip
    docs = datasets.load_from_disk(str(BENCH_ROOT / "digits_vqa"))["test"].select(range(limit))
    images = loaded.processor.und_images([d["image"] for d in docs])
    questions = [d["question"] for d in docs]
    model = loaded.model
    with torch.no_grad():
        answer = model.loglikelihood(images, questions, [d["answer"] for d in docs])
        per_choice = [model.loglikelihood(images, questions, [str(k)] * limit) for k in range(10)]
    choice_acc = sum(max(range(10), key=lambda k: per_choice[k][i][0]) == d["label"] for i, d in enumerate(docs))
    res = out["results"]
    assert res["digits_vqa_choice"]["acc,none"] == pytest.approx(choice_acc / limit, abs=1e-9)
    assert res["digits_vqa_loglik"]["acc,none"] == pytest.approx(sum(g for _, g in answer) / limit, abs=1e-9)
    ppl = math.exp(-sum(ll for ll, _ in answer) / limit)
    assert res["digits_vqa_loglik"]["perplexity,none"] == pytest.approx(ppl, rel=1e-4)
    # lmms-eval 0.7.3 logs (and scores) str() of the pair (mm/eval/lmms_tasks/digits_vqa_loglik/utils.py)
    resps = [s["resps"][0][0] for s in sorted(out["samples"]["digits_vqa_loglik"], key=lambda s: s["doc_id"])]
    lls = [ast.literal_eval(r)[0] if isinstance(r, str) else r[0] for r in resps]
    assert lls == pytest.approx([ll for ll, _ in answer], abs=1e-4) and all(ll < 0 for ll in lls)
