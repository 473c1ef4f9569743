"""make_shards: empty and duplicate ids are rejected and counted, image paths stay inside the image root, a non-empty
output folder is refused unless told to replace it, and every command-line error is one line before any work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.shards import make_shards
from data.stream import read_samples

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "make_shards.py"


def _photos(root: Path) -> Path:
    from skimage import data as skdata

    (root / "img").mkdir(parents=True)
    for name in ["astronaut", "coffee", "chelsea", "rocket"]:
        Image.fromarray(np.asarray(getattr(skdata, name)())[:64, :64]).save(root / "img" / f"{name}.png")
    return root


def _captions(root: Path, records: list[dict]) -> Path:
    path = root / "captions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _make(kind: str, captions: Path, out: Path, **kw) -> dict:
    return make_shards(kind, captions, out, "p", image_root=captions.parent, processes=1, progress=False, **kw)


def test_empty_and_duplicate_ids_are_rejected_and_counted(tmp_path):
    src = _photos(tmp_path / "src")
    records = [
        {"id": "a", "image": "img/astronaut.png", "caption": "an astronaut"},
        {"id": "", "image": "img/coffee.png", "caption": "coffee"},  # members '.jpg': no reader takes them
        {"id": None, "image": "img/coffee.png", "caption": "coffee"},
        {"id": "  ", "image": "img/coffee.png", "caption": "coffee"},
        {"id": "a", "image": "img/chelsea.png", "caption": "a cat"},  # the same id twice
        {"id": "x/y", "image": "img/rocket.png", "caption": "a rocket"},
        {"id": "x_y", "image": "img/rocket.png", "caption": "a rocket"},  # another id, the same sample key
        {"image": "img/chelsea.png", "caption": "a cat"},  # no id: one is made from the line number
    ]
    totals = _make("generation", _captions(src, records), tmp_path / "out")
    assert totals["written"] == 3 and totals["rejected_by_reason"] == {"empty_id": 3, "duplicate_id": 2}
    report = [json.loads(ln) for ln in Path(totals["report"]).read_text().splitlines()]
    assert [r["reason"] for r in report] == ["empty_id"] * 3 + ["duplicate_id"] * 2
    assert "line 7" in report[-1]["detail"] and "'x_y'" in report[-1]["detail"] and "line 6" in report[-1]["detail"]
    keys = [s["__key__"] for s in read_samples(f"{tmp_path}/out/p-000000.tar")]
    assert keys == ["a", "x_y", "captions-00000008"]  # every written sample is read back: none lost uncounted


def test_image_paths_must_stay_inside_the_image_root(tmp_path):
    src = _photos(tmp_path / "src")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "outside.png")
    records = [
        {"id": "up", "image": "../outside.png", "caption": "x"},
        {"id": "abs", "image": str(tmp_path / "outside.png"), "caption": "x"},
        {"id": "deep", "image": "img/../../outside.png", "caption": "x"},
        {"id": "fine", "image": "img/../img/astronaut.png", "caption": "an astronaut"},  # '..' that stays inside
        {"id": "num", "image": 5, "caption": "x"},
        {"id": "two", "image": ["img/coffee.png", "img/rocket.png"], "caption": "x"},
    ]
    totals = _make("generation", _captions(src, records), tmp_path / "out")
    assert totals["written"] == 1
    assert totals["rejected_by_reason"] == {"image_outside_root": 3, "bad_image_field": 2}
    convs = [
        {
            "id": "c",
            "image": ["img/coffee.png", "../outside.png"],
            "conversations": [{"from": "human", "value": "<image><image> ?"}, {"from": "gpt", "value": "x"}],
        }
    ]
    (src / "convs.jsonl").write_text(json.dumps(convs[0]) + "\n")  # fmt: skip
    totals = _make("conversation", src / "convs.jsonl", tmp_path / "conv")
    assert totals["written"] == 0 and totals["rejected_by_reason"] == {"image_outside_root": 1}


def test_a_non_empty_out_is_refused_unless_replaced(tmp_path):
    src = _photos(tmp_path / "src")
    five = [{"id": f"s{i}", "image": "img/astronaut.png", "caption": "an astronaut"} for i in range(5)]
    out = tmp_path / "out"
    assert _make("generation", _captions(src, five), out, max_count=2)["shards"] == 3
    with pytest.raises(FileExistsError, match="not empty .*--replace"):
        _make("generation", _captions(src, five[:2]), out, max_count=2)
    totals = _make("generation", _captions(src, five[:2]), out, max_count=2, replace=True)
    assert totals["shards"] == 1
    # the earlier run's extra shards are gone, and sizes.json lists only what is there
    assert sorted(p.name for p in out.iterdir()) == ["p-000000.tar", "p-report.jsonl", "sizes.json"]
    assert json.loads((out / "sizes.json").read_text()) == {"p-000000.tar": 2}
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds more than shards"):
        _make("generation", _captions(src, five[:2]), out, replace=True)
    assert (out / "notes.txt").exists() and (out / "p-000000.tar").exists()  # nothing was removed
    # a generation:<head> kind has generation's layout (it used to be read as text, every record empty)
    assert _make("generation:nextfreq", _captions(src, five[:1]), tmp_path / "head")["written"] == 1


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_every_command_line_error_is_one_line_before_any_work(tmp_path):
    src = _photos(tmp_path / "src")
    captions = _captions(src, [{"id": "a", "image": "img/astronaut.png", "caption": "an astronaut"}])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old-000000.tar").write_bytes(b"")
    cases = {
        "input not found": ["generation", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o1")],
        "--image-root is not a folder": ["generation", str(captions), "--out", str(tmp_path / "o2"),
                                         "--image-root", str(tmp_path / "nowhere")],
        "out of range: --shard-mb": ["generation", str(captions), "--out", str(tmp_path / "o3"), "--shard-mb", "0"],
        "kind 'pictures'": ["pictures", str(captions), "--out", str(tmp_path / "o4")],
        "is not empty": ["generation", str(captions), "--out", str(tmp_path / "full")],
        "invalid int value": ["generation", str(captions), "--out", str(tmp_path / "o5"), "--processes", "two"],
        "required: --out": ["generation", str(captions)],
    }  # fmt: skip
    for expected, args in cases.items():
        p = _cli(*args)
        assert p.returncode == 2 and p.stdout == "", (expected, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("make_shards.py: error: ") and expected in lines[0], p.stderr
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))  # nothing was written
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["old-000000.tar"]
    p = _cli("generation", str(captions), "--out", str(tmp_path / "full"), "--replace", "--processes", "1")
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout.strip().splitlines()[-1])["written"] == 1
    assert sorted(x.name for x in (tmp_path / "full").iterdir()) == ["shard-000000.tar", "shard-report.jsonl",
                                                                     "sizes.json"]  # fmt: skip
