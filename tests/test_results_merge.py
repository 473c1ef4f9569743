"""eval.py's results folder: merged per task, each entry with the checkpoint it came from, written atomically;
a generation task's image folder is cleared before it is regenerated. The model calls are stubbed (the harness's
file handling is what is tested; tests/test_eval_harness.py runs real models)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import mm.eval.harness as harness
from mm.config import EvalConfig


@dataclass
class Loaded:
    source: dict
    model: object = None
    processor: object = None


def _task_dir(root: Path) -> Path:
    d = root / "tasks"
    d.mkdir()
    (d / "docs.jsonl").write_text("".join(json.dumps({"prompt": f"draw the digit {i}"}) + "\n" for i in range(5)))
    for name in ("alpha", "beta"):
        (d / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs: {{data_files: {{test: docs.jsonl}}}}\n"
            "doc_to_text: prompt\nmetric_list:\n  - metric: score\n"
        )
    return d


def _fake_run_task(calls: list, crash_on: str = ""):
    def run_task(task, loaded, eval_cfg, out_dir):
        calls.append(task.task)
        if task.task == crash_on:
            raise RuntimeError("the model fell over")
        step = loaded.source["step"]
        recipe = {"task_file": str(task.yaml_path), "scoring": "stub", "prompt_example": "p", "generation_kwargs": {}}
        return {"score": step + len(task.task), "n": 5, "recipe": recipe, "examples": []}, [{"doc_id": 0, "step": step}]

    return run_task


def _run(monkeypatch, tasks: Path, out: Path, names: list[str], step: int, crash_on: str = "") -> list[str]:
    calls: list[str] = []
    monkeypatch.setattr(harness, "run_task", _fake_run_task(calls, crash_on))
    loaded = Loaded({"run": "runs/x", "checkpoint": f"runs/x/checkpoints/step_{step}", "step": step})
    harness.evaluate(loaded, names, EvalConfig(task_dirs=[str(tasks)], limit=5), out)
    return calls


def test_a_rerun_of_one_task_keeps_the_others_and_records_where_each_came_from(tmp_path, monkeypatch):
    tasks, out = _task_dir(tmp_path), tmp_path / "eval"
    assert _run(monkeypatch, tasks, out, ["alpha", "beta"], step=10) == ["alpha", "beta"]
    assert _run(monkeypatch, tasks, out, ["alpha"], step=20) == ["alpha"]
    res = json.loads((out / "results.json").read_text())
    assert res["tasks"] == ["alpha", "beta"]  # beta was not rerun and is still there
    assert res["alpha"]["score"] == 25 and res["beta"]["score"] == 14
    assert res["computed_from"]["alpha"]["step"] == 20 and res["computed_from"]["beta"]["step"] == 10
    assert res["computed_from"]["beta"]["checkpoint"].endswith("step_10") and res["step"] == 20  # top level: latest
    assert json.loads((out / "samples_beta.jsonl").read_text())["step"] == 10
    assert json.loads((out / "samples_alpha.jsonl").read_text())["step"] == 20
    report = (out / "report.md").read_text()
    assert "| beta | score | 14 |" in report and "| alpha | score | 25 |" in report
    assert "different checkpoints" in report and "step 10" in report
    # what an exported step-20 checkpoint may show: its own tasks only
    only = harness.results_matching(res, step=20)
    assert only["tasks"] == ["alpha"] and "beta" not in only and only["alpha"] == res["alpha"]


def test_a_crash_keeps_the_tasks_finished_so_far_and_no_half_written_file(tmp_path, monkeypatch):
    tasks, out = _task_dir(tmp_path), tmp_path / "eval"
    _run(monkeypatch, tasks, out, ["alpha", "beta"], step=10)
    with pytest.raises(RuntimeError, match="fell over"):
        _run(monkeypatch, tasks, out, ["beta", "alpha"], step=30, crash_on="alpha")
    res = json.loads((out / "results.json").read_text())  # valid JSON, both tasks
    assert res["computed_from"]["beta"]["step"] == 30 and res["computed_from"]["alpha"]["step"] == 10
    assert sorted(p.name for p in out.iterdir()) == ["report.md", "results.json", "samples_alpha.jsonl",
                                                     "samples_beta.jsonl"]  # fmt: skip


def test_unreadable_or_old_results_are_replaced_with_a_note(tmp_path, monkeypatch, capsys):
    tasks, out = _task_dir(tmp_path), tmp_path / "eval"
    out.mkdir()
    for old in ("{not json", json.dumps({"digits_vqa": {"accuracy": 1.0}})):
        (out / "results.json").write_text(old)
        _run(monkeypatch, tasks, out, ["beta"], step=5)
        assert json.loads((out / "results.json").read_text())["tasks"] == ["beta"]
        assert "note:" in capsys.readouterr().out


def test_a_generation_rerun_clears_its_image_folder(tmp_path, monkeypatch):
    d = _task_dir(tmp_path)
    (d / "gen_utils.py").write_text("def process_results(doc, images):\n    return {'score': float(len(images))}\n")
    (d / "gen.yaml").write_text(
        "task: gen\ndataset_path: json\ndataset_kwargs: {data_files: {test: docs.jsonl}}\noutput_type: generate_image\n"
        "doc_to_text: prompt\nprocess_results: !function gen_utils.process_results\nmetric_list:\n  - metric: score\n"
    )
    monkeypatch.setattr(harness, "sampling_recipe", lambda model, kw: {"head": "stub"})
    monkeypatch.setattr(harness, "generate_all", lambda model, prompts, k, *a, **kw: (
        [[np.full((1, 8, 8), 0.5, np.float32)] * k for _ in prompts], [[] for _ in prompts]))  # fmt: skip
    out = tmp_path / "eval"
    loaded = Loaded({"run": "runs/x", "step": 1})
    for limit in (5, 2):
        harness.evaluate(loaded, ["gen"], EvalConfig(task_dirs=[str(d)], limit=limit, images_per_prompt=2), out)
    assert sorted(p.name for p in (out / "gen").iterdir()) == ["00000", "00001"]  # not 00002..00004 of run one
    assert json.loads((out / "results.json").read_text())["gen"]["n"] == 2
    (out / "gen" / "notes.txt").write_text("mine")  # a folder that holds something else is not deleted
    with pytest.raises(FileExistsError, match="more than generated images"):
        harness.evaluate(loaded, ["gen"], EvalConfig(task_dirs=[str(d)], limit=2), out)
    assert (out / "gen" / "notes.txt").read_text() == "mine"
