"""scripts/gpu_check.sh: its --cpu-smoke mode runs every step tiny on the CPU and prints one JSON object.

The GPU mode cannot run here; what can be checked of it without a GPU is: the same steps and scripts run
(the smoke mode), every ``-m gpu`` test is collected and skipped with its reason, and the configuration
the GPU mode trains (JanusFlow-1.3B shapes on the bundled digits, bf16 autocast) is a valid one.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from mm.config import load_config
from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STEPS = {"pytest_gpu", "bench_train", "bench_mod", "bench_gen", "bench_kernels"}


@pytest.mark.skipif(sys.platform != "linux", reason="the bench_kernels step needs triton (Linux wheels only)")
def test_cpu_smoke_runs_every_step_and_prints_one_json():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHON": sys.executable}
    run = subprocess.run(["bash", str(SCRIPT), "--cpu-smoke"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(run.stdout)  # one object: nothing else on stdout
    assert report["mode"] == "cpu-smoke" and report["ok"] is True and set(report["steps"]) == STEPS
    for name, step in report["steps"].items():
        assert step["rc"] == 0 and not step["timed_out"] and step["result"], name
    # every -m gpu test collects on a CPU and is skipped with its reason, none passes or fails
    tests = report["steps"]["pytest_gpu"]["result"]
    assert tests["passed"] == tests["failed"] == 0 and tests["skipped"] >= 10
    assert all("CUDA" in reason for reason in tests["skip_reasons"].values()), tests["skip_reasons"]
    assert any("test_gpu_whole_model_fused_equals_torch" in name for name in tests["skip_reasons"])
    train = {(r["backend"], r["kernels"]): r for r in report["steps"]["bench_train"]["result"]["results"]}
    assert set(train) == {(b, k) for b in ("sdpa", "flex", "flash_attention_2") for k in ("fused", "torch")}
    assert train[("sdpa", "fused")]["tokens_per_s"] > 0 and train[("sdpa", "torch")]["tokens_per_s"] > 0
    assert "CPU" in train[("flex", "fused")]["skipped"] and "flash" in train[("flash_attention_2", "fused")]["skipped"]
    assert report["steps"]["bench_mod"]["result"]["kernels"] == "fused"
    assert report["steps"]["bench_gen"]["result"]["heads"]["flow"]["forward_passes_per_image"] > 0
    kernels = report["steps"]["bench_kernels"]["result"]
    assert kernels["smoke"] and len(kernels["ops"]) == 6 and kernels["attention"]["flatness"]
    summary = report["summary"]
    assert summary["goal_mfu"] == 0.4 and summary["goal_fused_speedup"] == 1.5 and summary["attention_flatness"]


def test_the_gpu_mode_trains_a_valid_config():
    """The GPU branch's bench_train overrides on configs/janusflow_1.3b.yaml load (a typo would cost a GPU run)."""
    text = SCRIPT.read_text()
    gpu = text[text.index('if [ "$MODE" = gpu ]') : text.index("else\n")]
    train = gpu[gpu.index("step bench_train") : gpu.index("step bench_mod")].replace("\\\n", " ")
    config = re.search(r"--config (\S+)", train).group(1)
    overrides = [tok for tok in train.split() if "=" in tok and not tok.startswith(("--", '"'))]
    assert config == "configs/janusflow_1.3b.yaml" and "engine.precision=bf16_autocast" in overrides
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from bench_train import DIGITS  # what --digits adds
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    cfg = load_config(ROOT / config, DIGITS + overrides)
    assert cfg.data.seq_len == 4096 and cfg.model.llm.vocab_size == 102400 and cfg.model.llm.hidden_size == 2048
    for flag in ("--digits", "--allow-random-frozen", "--backends sdpa,flex,flash_attention_2", "--kernels fused"):
        assert flag in train
