"""Shards: the bundled digits, the tar reader, bad input of every kind, make_shards."""

import io
import json
import random
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.bundled.digits import DIGIT_NAMES, FACTS, build_digit_shards, load_digit_split
from data.images import decode, load_image
from data.shards import ImageOptions, ShardWriter, make_shards
from data.stream import BadSample, expand_shards, iter_samples, read_samples
from mm.batch import SampleShapes
from mm.images import ImagePreprocess, generation_preprocess, preprocess
from mm.sequence import ImageTemplate

ROOT = Path(__file__).resolve().parent.parent


def test_digit_shards_hold_every_digit_once_with_a_disjoint_heldout(shard_dir):
    train = [r["__key__"] for r in read_samples(f"{shard_dir}/digits/train-{{000000..000003}}.tar")]
    held = [r["__key__"] for r in read_samples(f"{shard_dir}/digits/heldout-000000.tar")]
    assert len(train) + len(held) == 1797 and not set(train) & set(held)
    x, y = load_digit_split("heldout")
    assert len(x) == len(held) and x.shape[1:] == (8, 8) and 0 <= x.min() and x.max() <= 1
    raw = next(iter(read_samples(f"{shard_dir}/digits/heldout-000000.tar")))
    assert decode(raw["png"], 10**6).mode == "L" and decode(raw["png"], 10**6).size == (8, 8)
    meta = json.loads(raw["json"])
    assert meta["split"] == "heldout" and meta["conversations"][1]["value"] == str(meta["label"])
    assert raw["txt"].decode().split()[-1] in (str(meta["label"]), DIGIT_NAMES[meta["label"]])
    sizes = json.loads((shard_dir / "digits" / "sizes.json").read_text())
    assert sizes["heldout-000000.tar"] == len(held) and sum(v for k, v in sizes.items() if "train" in k) == len(train)


def test_digit_shards_are_reproducible(shard_dir, tmp_path):
    build_digit_shards(tmp_path / "again")
    for name in ("train-000000.tar", "heldout-000000.tar", "text-000000.tar"):
        assert (tmp_path / "again" / name).read_bytes() == (shard_dir / "digits" / name).read_bytes(), name


def test_digit_documents_use_only_tokenizer_words(vocab, shard_dir):
    docs = [r["txt"].decode() for r in read_samples(f"{shard_dir}/digits/text-000000.tar")]
    assert len(docs) == 600
    for text in docs[:50] + [f.format(d=7, name="seven") for f in FACTS]:
        assert 1 not in vocab.encode(text)  # <|unk|>


def test_smoke_shard_photos_fit_both_paths(shard_dir):
    raws = list(read_samples(f"{shard_dir}/smoke/smoke-000000.tar"))
    assert len(raws) == 5
    img = decode(raws[0]["png"], 10**6)
    assert img.size == (32, 32) and img.mode == "RGB"
    assert preprocess(img, ImagePreprocess("pad", 16, 3)).shape == (3, 16, 16)
    assert preprocess(img, generation_preprocess(8, 1)).shape == (1, 8, 8)


def test_preprocessing_pads_understanding_and_crops_generation():
    wide = np.zeros((40, 80, 3), dtype=np.uint8)
    wide[:, :, 0] = 200
    png = _png(wide)
    und = load_image(png, ImagePreprocess("pad", 32, 3, fill=(127, 0, 255)), 10**6)
    assert und.dtype == torch.uint8 and und.shape == (3, 32, 32)
    assert und[:, 0, 0].tolist() == [127, 0, 255] and und[0, 16, 16] == 200  # bands above/below, the image between
    assert und[0, 8:24, :].eq(200).all()
    gen = load_image(png, generation_preprocess(32, 1), 10**6)
    assert gen.shape == (1, 32, 32) and gen.min() == gen.max()  # cropped: no padding band


def test_missing_shard_fails_naming_the_path(tmp_path, shard_dir):
    (tmp_path / "nothere-000000.tar").write_bytes((shard_dir / "smoke" / "smoke-000000.tar").read_bytes())
    with pytest.raises(FileNotFoundError, match="nothere-000001.tar"):
        expand_shards(f"{tmp_path}/nothere-{{000000..000001}}.tar")


def test_shell_urls_need_explicit_permission(shard_dir):
    url = f"pipe:cat {shard_dir}/smoke/smoke-000000.tar"
    with pytest.raises(ValueError, match="allow_shell_urls"):
        expand_shards(url)
    with pytest.raises(ValueError, match="pipe:curl"):
        expand_shards("https://example.com/shard-000000.tar")
    assert [r["__key__"] for r in read_samples(url, allow_shell=True)] == [
        r["__key__"] for r in read_samples(f"{shard_dir}/smoke/smoke-000000.tar")
    ]


# ---- the tar reader ----------------------------------------------------------------
def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _read(path: Path) -> tuple[list[str], list[tuple[str, str]]]:
    problems = []
    with open(path, "rb") as f:
        keys = [s["__key__"] for _, s in iter_samples(f, lambda r, m: problems.append((r, m)))]
    return keys, problems


def test_reader_matches_tarfile_and_numbers_samples(tmp_path):
    long_dir = "d" * 120  # longer than a ustar name: a pax header carries the path
    members = [(f"a{i}.{ext}", bytes([i]) * (i * 100)) for i in range(6) for ext in ("txt", "json")]
    members += [(f"{long_dir}/b.0.jpg", b"x"), (f"{long_dir}/b.1.jpg", b"y"), ("noext", b"z")]
    path = _tar(tmp_path / "t.tar", members)
    with open(path, "rb") as f:
        samples = list(iter_samples(f, lambda r, m: pytest.fail(m)))
    assert [o for o, _ in samples] == list(range(7))
    assert samples[2][1] == {"__key__": "a2", "txt": b"\x02" * 200, "json": b"\x02" * 200}
    assert samples[6][1] == {"__key__": f"{long_dir}/b", "0.jpg": b"x", "1.jpg": b"y"}
    with open(path, "rb") as f:  # only some wanted: the same ordinals, other payloads never read
        assert [o for o, _ in iter_samples(f, lambda r, m: None, lambda o: o in (1, 6))] == [1, 6]


def test_corrupt_member_is_skipped_and_the_rest_of_the_shard_kept(tmp_path):
    path = _tar(tmp_path / "c.tar", [(f"s{i:02d}.txt", b"hello %d" % i) for i in range(20)])
    data = bytearray(path.read_bytes())
    with tarfile.open(path) as tar:
        victim = tar.getmembers()[7]  # s07.txt
    data[victim.offset + 10] ^= 0xFF  # breaks the header checksum
    path.write_bytes(bytes(data))
    keys, problems = _read(path)
    # s07's header is unreadable; s06 and s08, complete or not (the damaged region might have held a member of
    # either: the name in a damaged header cannot be trusted), are dropped too
    assert keys == [f"s{i:02d}" for i in range(20) if i not in (6, 7, 8)]
    assert [r for r, _ in problems] == ["corrupt_member", "incomplete_sample", "incomplete_sample"]
    with tarfile.open(path) as tar:  # what the standard reader makes of it: the shard silently ends there
        assert len(tar.getmembers()) == 7


def test_truncated_shard_is_reported_and_its_last_sample_dropped(tmp_path):
    path = _tar(tmp_path / "t.tar", [(f"s{i}.{e}", b"x" * 700) for i in range(5) for e in ("txt", "json")])
    with tarfile.open(path) as tar:
        cut = tar.getmembers()[7]  # s3.json
    (tmp_path / "cut.tar").write_bytes(path.read_bytes()[: cut.offset_data + 100])
    keys, problems = _read(tmp_path / "cut.tar")
    assert keys == ["s0", "s1", "s2"] and [r for r, _ in problems] == ["truncated_shard", "incomplete_sample"]
    (tmp_path / "empty.tar").write_bytes(b"")
    assert _read(tmp_path / "empty.tar") == ([], [("truncated_shard", _read(tmp_path / "empty.tar")[1][0][1])])


# ---- bad samples: every kind, each skipped and counted by reason ----------------------
def corrupt_shard(src: str, dst, every: int = 5) -> int:
    """Copy a shard, replacing every ``every``-th PNG with truncated bytes; return how many."""
    n_bad = 0
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for i, member in enumerate(m for m in tin.getmembers() if m.isfile()):
            data = tin.extractfile(member).read()
            if member.name.endswith(".png") and (i // 3) % every == 0:
                data, n_bad = data[:20], n_bad + 1
            info = tarfile.TarInfo(member.name)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))
    return n_bad


def _bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's signature)."""
    png = bytearray(_png(np.zeros((1, 1), dtype=np.uint8)))
    ihdr = png.index(b"IHDR")
    png[ihdr + 4 : ihdr + 12] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    png[ihdr + 17 : ihdr + 21] = zlib.crc32(bytes(png[ihdr : ihdr + 17])).to_bytes(4, "big")
    return bytes(png)


def bad_sample_shard(path: Path) -> dict[str, int]:
    """A shard with good samples and one of each bad kind; returns the expected skip reasons."""
    rng = np.random.default_rng(0)
    photo = (rng.random((48, 64, 3)) * 255).astype(np.uint8)
    good_jpg = _jpeg(photo)
    members = []
    for i in range(6):
        members += [(f"good{i}.jpg", good_jpg), (f"good{i}.txt", b"a photo of a cat")]
    members += [("trunc.jpg", good_jpg[: len(good_jpg) // 2]), ("trunc.txt", b"a photo of a cat")]
    members += [("html.jpg", b"<!DOCTYPE html><html><body>404 not found</body></html>"), ("html.txt", b"a cat")]
    members += [("nocap.jpg", good_jpg)]
    members += [("blank.jpg", good_jpg), ("blank.txt", b"   ")]
    members += [("empty.jpg", b""), ("empty.txt", b"a photo of a cat")]
    members += [("bomb.png", _bomb_png(30000, 30000)), ("bomb.txt", b"a photo of a cat")]
    members += [("corrupt.jpg", good_jpg), ("corrupt.txt", b"a photo of a cat")]
    _tar(path, members)
    data = bytearray(path.read_bytes())
    with tarfile.open(path) as tar:
        victim = next(m for m in tar.getmembers() if m.name == "corrupt.txt")
    data[victim.offset + 3] ^= 0xFF
    path.write_bytes(bytes(data))
    return {"truncated_image": 1, "not_an_image": 1, "missing_caption": 2, "empty_file": 1,
            "decompression_bomb": 1, "corrupt_member": 1, "incomplete_sample": 1}  # fmt: skip


def test_each_bad_sample_kind_is_skipped_and_counted(tmp_path, vocab, monkeypatch):
    from data.config import DataConfig
    from data.loader import WorkerStream
    from data.reader import resolve_sources
    from data.sources import SourceConfig

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # the loader sets it; restore after
    expected = bad_sample_shard(tmp_path / "bad.tar")
    cfg = DataConfig(
        sources=[SourceConfig(name="photos", kind="generation", shards=str(tmp_path / "bad.tar"))],
        seq_len=64, rows_per_batch=1, shuffle_buffer=4, pack_lookahead=2, max_image_pixels=10**6,
    )  # fmt: skip
    shapes = SampleShapes(ImagePreprocess("pad", 16, 3), 16, {"flow": ImageTemplate("flow", 16, 3, (16,), begin="bog")})
    stream = WorkerStream(resolve_sources(cfg), cfg, vocab, shapes, 0, 1, 0, 1)
    batches = iter(stream)
    for _ in range(40):  # several epochs of the 6 good samples
        batch, state = next(batches)
        assert len(batch.images["flow"].images) == len(batch.sample_source)  # only good samples reach a batch
    epochs = stream.readers[0].epoch
    assert epochs >= 3
    assert all(k.startswith("photos/") for k in state["skipped"])
    counts = {k.split("/")[1]: v for k, v in state["skipped"].items()}
    assert set(counts) == set(expected)
    for reason, n in expected.items():  # each bad sample is met once per epoch
        assert n * (epochs - 1) <= counts[reason] <= n * (epochs + 1), (reason, counts)


# ---- make_shards -----------------------------------------------------------------------
def _photo_folder(root: Path) -> Path:
    from skimage import data as skdata

    (root / "img").mkdir(parents=True)
    lines = []
    for name in ["astronaut", "coffee", "chelsea", "rocket", "camera", "coins"]:
        Image.fromarray(getattr(skdata, name)()).save(root / "img" / f"{name}.png")
        lines.append({"image": f"img/{name}.png", "caption": f"a photo: {name}"})
    (root / "img" / "page.jpg").write_bytes(b"<html>not an image</html>")
    lines += [{"image": "img/page.jpg", "caption": "html"}, {"image": "img/gone.png", "caption": "missing"},
              {"image": "img/coffee.png", "caption": "  "}]  # fmt: skip
    Image.fromarray(np.zeros((3000, 3000), dtype=np.uint8)).save(root / "img" / "huge.png")
    lines.append({"image": "img/huge.png", "caption": "too many pixels"})
    (root / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    return root / "captions.jsonl"


def test_make_shards_validates_reports_and_sizes(tmp_path):
    captions = _photo_folder(tmp_path / "src")
    opts = ImageOptions(image_size=64, max_pixels=4_000_000, reencode="jpg")
    totals = make_shards("generation", captions, tmp_path / "out", "photos", max_count=4, opts=opts, processes=2,
                         progress=False)  # fmt: skip
    assert totals["written"] == 6 and totals["shards"] == 2
    assert totals["rejected_by_reason"] == {"unreadable_image": 1, "missing_file": 1, "empty_caption": 1,
                                            "image_over_pixel_cap": 1, "bad_json": 1}  # fmt: skip
    report = [json.loads(ln) for ln in Path(totals["report"]).read_text().splitlines()]
    assert {r["reason"] for r in report} == set(totals["rejected_by_reason"]) and report[0]["line"] == 7
    assert json.loads((tmp_path / "out" / "sizes.json").read_text()) == {"photos-000000.tar": 4, "photos-000001.tar": 2}
    samples = list(read_samples(f"{tmp_path}/out/photos-{{000000..000001}}.tar"))
    assert [s["txt"].decode() for s in samples][:2] == ["a photo: astronaut", "a photo: coffee"]
    img = Image.open(io.BytesIO(samples[1]["jpg"]))
    assert img.format == "JPEG" and min(img.size) == 64  # resized (shorter side) and re-encoded


def test_make_shards_conversations_and_text_through_the_cli(tmp_path, vocab):
    from data.sources import BuildContext, SourceConfig, build_samples

    captions = _photo_folder(tmp_path / "src")
    convs = [
        {"id": "two", "image": ["img/astronaut.png", "img/coffee.png"], "conversations": [
            {"from": "human", "value": "<image>\n<image>\nwhat is in this photo ?"}, {"from": "gpt", "value": "a cup"},
            {"from": "human", "value": "what is in this photo ?"}, {"from": "gpt", "value": "a man with a camera"}]},
        {"id": "mismatch", "image": "img/rocket.png", "conversations": [
            {"from": "human", "value": "<image> <image> what ?"}, {"from": "gpt", "value": "a rocket"}]},
    ]  # fmt: skip
    (tmp_path / "convs.jsonl").write_text("\n".join(json.dumps(c) for c in convs) + "\n")
    (tmp_path / "docs.txt").write_text("the digit 7 is seven\n\nthe number one is 1\n\n")
    cli = [sys.executable, str(ROOT / "scripts" / "make_shards.py"), "conversation", str(tmp_path / "convs.jsonl"),
           "--image-root", str(tmp_path / "src"), "--out", str(tmp_path / "conversation"), "--processes", "1",
           "--image-size", "32"]  # fmt: skip
    p = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    totals = json.loads(p.stdout.strip().splitlines()[-1])
    assert totals["written"] == 1 and totals["rejected_by_reason"] == {"image_count_mismatch": 1}
    text = make_shards("text", tmp_path / "docs.txt", tmp_path / "text", processes=1, progress=False)
    assert text["written"] == 2 and text["rejected"] == 0
    raw = next(iter(read_samples(f"{tmp_path}/conversation/shard-000000.tar")))
    assert sorted(raw) == ["0.jpg", "1.jpg", "__key__", "json"]
    shapes = SampleShapes(ImagePreprocess("pad", 8, 3), 4, {"flow": ImageTemplate("flow", 8, 1, (4,), begin="bog")})
    ctx = BuildContext(vocab, shapes, 256, 10**6, random.Random(0))
    (s,) = build_samples(SourceConfig(name="conversation", kind="conversation"), raw, ctx)
    assert len(s.und_images) == 2 and s.input_ids.count(vocab.image) == 8
    assert "image_count_mismatch" in (tmp_path / "conversation" / "shard-report.jsonl").read_text()
    assert captions.exists()
    docs = [r["txt"].decode() for r in read_samples(f"{tmp_path}/text/shard-000000.tar")]
    assert docs == ["the digit 7 is seven", "the number one is 1"]


def test_shard_writer_rolls_by_size(tmp_path):
    w = ShardWriter(tmp_path, "x", max_bytes=10_000)
    for i in range(10):
        w.write({"__key__": f"k{i}", "bin": bytes(3000)})
    paths = w.close()
    assert len(paths) == 5 and all(p.stat().st_size < 16_000 for p in paths)  # 2 samples of ~4 KB per shard
    assert sum(json.loads((tmp_path / "sizes.json").read_text()).values()) == 10


def test_bad_sample_carries_its_reason():
    e = BadSample("missing_caption", "no txt")
    assert e.reason == "missing_caption" and "no txt" in str(e)
