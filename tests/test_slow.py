"""The issue's bar: the default `python train.py` then `python eval.py` (minutes on CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_default_training_reaches_the_floors(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    run = tmp_path / "tiny"
    subprocess.run([sys.executable, "train.py", f"run.dir={run}"], cwd=ROOT, env=env, check=True, timeout=1800)
    subprocess.run([sys.executable, "eval.py", "--run", str(run)], cwd=ROOT, env=env, check=True, timeout=600)
    res = json.loads((run / "eval" / "results.json").read_text())
    assert res["digits_vqa"]["accuracy"] >= 0.95
    assert res["digits_t2i"]["classifier_accuracy"] >= 0.90
    t2i = res["digits_t2i"]
    assert t2i["fd_real_floor"] < t2i["fd"] < 0.25 * t2i["fd_noise_ceiling"]
    assert t2i["diversity"] > 0.5 * t2i["real_diversity"]  # not one prototype per digit
