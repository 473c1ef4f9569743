"""eval.py on the whole bundled benchmark: every task runs, files are written, numbers repeat exactly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_release import make_tiny_run

ROOT = Path(__file__).resolve().parent.parent
FAST = ["eval.limit=16", "eval.images_per_prompt=2", "model.heads.flow.sample_steps=2", "eval.threads=1"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, shard_dir) -> Path:
    return make_tiny_run(tmp_path_factory.getbasetemp(), shard_dir)


def _metrics(res: dict) -> dict:
    return {t: {k: v for k, v in res[t].items() if k != "seconds"} for t in res["tasks"]}


def test_eval_cli_runs_the_whole_benchmark_and_writes_results_samples_and_report(tiny_run, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "eval.py", "--run", str(tiny_run), "--out", str(out), *FAST], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    expected = ["digits_vqa", "digits_mcq", "digits_pope_random", "digits_pope_popular", "digits_pope_adversarial",
                "digits_mme", "digits_t2i", "digits_geneval"]  # fmt: skip
    assert res["tasks"] == expected and res["step"] == 10
    assert "%|" in p.stderr  # progress bars
    for t in expected:
        lines = (out / f"samples_{t}.jsonl").read_text().splitlines()
        assert len(lines) == res[t]["n"] == (10 if t == "digits_t2i" else 16)
        assert res[t]["recipe"]["prompt_example"] and res[t]["recipe"]["task_file"].startswith("mm/eval/tasks/")
    assert 0 <= res["digits_mcq"]["circular_accuracy"] <= res["digits_mcq"]["vanilla_accuracy"] <= 1
    assert set(res["digits_pope_random"]) >= {"pope_accuracy", "pope_f1_score", "pope_yes_ratio", "pope_orig_f1"}
    assert 0 <= res["digits_mme"]["mme_total_score"] <= 800 and "mme_existence_acc_plus" in res["digits_mme"]
    t2i = res["digits_t2i"]
    assert t2i["fid"].startswith("skipped: weights not found at") and t2i["clip_score"].startswith("skipped")
    assert t2i["fd_real_floor"] < t2i["fd_noise_ceiling"] and "kd_digit_mlp" in t2i and "fid" not in str(t2i["fd"])
    gen = res["digits_geneval"]
    assert gen["geneval_overall_judge_ceiling"] > 0.8 > gen["geneval_overall_chance_floor"]
    assert json.loads((out / "digits_geneval" / "00000" / "metadata.jsonl").read_text())["tag"] == "single_object"
    assert len(list((out / "digits_geneval" / "00000" / "samples").glob("*.png"))) == 2
    assert (out / "samples_grid.png").is_file() and (out / "samples_digit_9.png").is_file()
    report = (out / "report.md").read_text()
    assert "| digits_mme | mme_acc_plus |" in report and "rule-based" in report

    # a second run gives the same numbers, in-process this time (and through the release folder: same weights)
    import torch

    from mm.config import EvalConfig
    from mm.eval.harness import evaluate
    from mm.load import load_run_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as eval.threads=1 above: float sums depend on the thread count
    try:
        loaded = load_run_model(tiny_run, ["model.heads.flow.sample_steps=2"])
        again = evaluate(loaded, None, EvalConfig(limit=16, images_per_prompt=2), tmp_path / "again")
    finally:
        torch.set_num_threads(threads)
    assert _metrics(again) == _metrics(res)


def test_release_folder_evaluates_to_the_same_numbers_as_its_run(tiny_run, tmp_path):
    from mm.config import EvalConfig
    from mm.eval.harness import evaluate
    from mm.hf import UnifiedMMProcessor, wrap
    from mm.load import load_release, load_run_model

    loaded = load_run_model(tiny_run, ["model.heads.flow.sample_steps=2"])
    wrap(loaded.model, loaded.config.model).save_pretrained(str(tmp_path / "rel"))
    UnifiedMMProcessor.from_model(loaded.model).save_pretrained(str(tmp_path / "rel"))
    cfg = EvalConfig(limit=12, images_per_prompt=2)
    tasks = ["digits_vqa", "digits_mme", "digits_geneval"]
    a = evaluate(loaded, tasks, cfg, tmp_path / "a")
    b = evaluate(load_release(tmp_path / "rel", ["model.heads.flow.sample_steps=2"]), tasks, cfg, tmp_path / "b")
    assert _metrics(a) == _metrics(b)


@pytest.mark.slow  # the default training (~5 min on 2 cores) and the whole benchmark twice
def test_default_run_reaches_the_benchmark_floors_and_repeats_exactly(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    run = tmp_path / "tiny"
    p = subprocess.run([sys.executable, "train.py", f"run.dir={run}"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=1800)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    results = []
    for k in range(2):
        args = [sys.executable, "eval.py", "--run", str(run), "--out", str(tmp_path / f"e{k}"), "eval.threads=1"]
        p = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        results.append(json.loads((tmp_path / f"e{k}" / "results.json").read_text()))
        assert results[-1]["eval_seconds"] < 300
    assert _metrics(results[0]) == _metrics(results[1])
    r = results[0]
    assert r["digits_vqa"]["accuracy"] >= 0.95 and r["digits_t2i"]["classifier_accuracy"] >= 0.9
    assert r["digits_t2i"]["fd"] < 0.2 * r["digits_t2i"]["fd_noise_ceiling"]
    assert (
        r["digits_geneval"]["geneval_single_object"] >= 0.8
        and r["digits_geneval"]["geneval_overall_judge_ceiling"] >= 0.9
    )
