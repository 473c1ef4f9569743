"""What a release says about its training and its numbers: a redacted training summary (no path, shell command or
user name unless --full-train-config), and only eval results computed from the exported weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from mm.eval.harness import evaluate
from mm.load import load_run_model
from mm.train.launch import launch
from scripts.export_release import export_release

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory, shard_dir) -> Path:
    """A run that read its shards through a `pipe:` command and started from another run (train.init_from), with
    the bundled VQA task evaluated on its step-6 checkpoint (EMA weights)."""
    from mm.config import load_config
    from tests.conftest import SMALL

    base = tmp_path_factory.mktemp("card")
    shards = base / "secret_data_of_alice"
    shutil.copytree(shard_dir / "digits", shards)
    over = SMALL + ["train.ema_decay=0.9", "train.metrics=[jsonl]", "data.allow_shell_urls=true",
                    f"data.train_shards=pipe:cat {shards}/train-{{000000..000001}}.tar"]  # fmt: skip
    first = load_config(ROOT / "configs/tiny.yaml", over + [f"run.dir={base}/first", "train.max_steps=1"])
    launch(first).train()
    cfg = load_config(ROOT / "configs/tiny.yaml", over + [f"run.dir={base}/run", f"train.init_from={base}/first"])
    launch(cfg).train()
    loaded = load_run_model(base / "run")
    evaluate(loaded, ["digits_vqa"], loaded.config.eval.__class__(limit=8), base / "run" / "eval")
    return base / "run"


def _texts(folder: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in folder.rglob("*") if p.suffix in (".json", ".yaml", ".md"))


def test_release_carries_a_redacted_summary_and_the_matching_results(run, tmp_path, capsys):
    out = export_release(run, tmp_path / "rel")
    texts = _texts(out)
    base = str(run.parent)
    for secret in (base, "secret_data_of_alice", "pipe:", "cat ", str(Path.home()), "/tmp/"):
        assert secret not in texts, secret
    assert not (out / "train_config.yaml").exists()
    summary = yaml.safe_load((out / "training_summary.yaml").read_text())
    assert summary["train"]["ema_decay"] == 0.9 and summary["train"]["started_from_another_checkpoint"] is True
    assert summary["run"] == {"steps": 6, "processes": 1, "nonfinite_steps": 0, "skipped_samples": {}}
    assert summary["data"]["sources"][0] == {"name": "digits_vqa", "kind": "conversation", "weight": 1.0,
                                             "resample": False, "shards": 2}  # fmt: skip
    assert summary["engine"]["kind"] == "ddp" and "deepspeed_config" not in summary["engine"]
    card = (out / "README.md").read_text()
    assert "## Training summary" in card and "| digits_vqa | accuracy |" in card
    assert json.loads((out / "release.json").read_text())["source"]["checkpoint"] == "step_00000006"

    full = export_release(run, tmp_path / "full", full_train_config=True)  # asked for: the whole config
    assert (
        "pipe:cat" in (full / "train_config.yaml").read_text()
        and "## Training config" in (full / "README.md").read_text()
    )


def test_results_of_other_weights_stay_out_of_the_card(run, tmp_path, capsys):
    capsys.readouterr()
    out = export_release(run, tmp_path / "step3", checkpoint=str(run / "checkpoints/step_00000003"))
    card = (out / "README.md").read_text()
    assert "Not evaluated" in card and "| digits_vqa |" not in card
    assert "none of the 1 task result(s) in results.json were computed from this checkpoint (step 3" in (
        capsys.readouterr().out
    )
    out = export_release(run, tmp_path / "raw", use_ema=False)  # step 6, but the raw weights, not the EMA
    assert "Not evaluated" in (out / "README.md").read_text()
    results = json.loads((run / "eval/results.json").read_text())
    other = dict(results)  # a result of the same step that another run's weights gave
    other["computed_from"] = {"digits_vqa": {**results["computed_from"]["digits_vqa"]}}
    other["computed_from"]["digits_vqa"]["model"] = {**other["computed_from"]["digits_vqa"]["model"],
                                                     "weights_sha256": {"model.safetensors": "0" * 64}}  # fmt: skip
    (run / "eval/results.json").write_text(json.dumps(other))
    try:
        out = export_release(run, tmp_path / "other")
    finally:
        (run / "eval/results.json").write_text(json.dumps(results))
    assert "Not evaluated" in (out / "README.md").read_text()
