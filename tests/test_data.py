"""Shards from bundled real images; the resumable packed stream; bad input."""

import io
import json
import tarfile
from dataclasses import replace

import pytest
import torch

from data.digits import load_digit_split
from data.stream import PackedStream, StreamState, decode_image, expand_shards, fit_image, read_samples
from mm.model.unified import UnifiedModel


def _shapes(cfg, vocab):
    return UnifiedModel(cfg.model, vocab).sample_shapes()


def test_digit_shards_hold_every_digit_once_with_a_disjoint_heldout(shard_dir):
    train = [r["__key__"] for r in read_samples(f"{shard_dir}/digits/train-{{000000..000003}}.tar")]
    held = [r["__key__"] for r in read_samples(f"{shard_dir}/digits/heldout-000000.tar")]
    assert len(train) + len(held) == 1797 and not set(train) & set(held)
    x, y = load_digit_split("heldout")
    assert len(x) == len(held) and x.shape[1:] == (8, 8) and 0 <= x.min() and x.max() <= 1
    raw = next(iter(read_samples(f"{shard_dir}/digits/heldout-000000.tar")))
    img = decode_image(raw["png"])
    assert img.shape == (1, 8, 8)
    assert json.loads(raw["json"])["split"] == "heldout"


def test_smoke_shard_photos_fit_both_paths(shard_dir):
    raws = list(read_samples(f"{shard_dir}/smoke/smoke-000000.tar"))
    assert len(raws) == 5
    img = decode_image(raws[0]["png"])
    assert img.shape == (3, 32, 32)
    assert fit_image(img, 16, 3).shape == (3, 16, 16)
    assert fit_image(img, 8, 1).shape == (1, 8, 8)


def test_missing_shard_fails_naming_the_path(tmp_path, shard_dir):
    (tmp_path / "nothere-000000.tar").write_bytes((shard_dir / "smoke" / "smoke-000000.tar").read_bytes())
    with pytest.raises(FileNotFoundError, match="nothere-000001.tar"):
        expand_shards(f"{tmp_path}/nothere-{{000000..000001}}.tar")


def _take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def test_stream_is_deterministic_and_resumes_exactly(small_cfg, vocab):
    shapes = _shapes(small_cfg, vocab)
    a = PackedStream(small_cfg.data, vocab, shapes)
    it = iter(a)
    first = [next(it) for _ in range(3)]
    state = a.state
    rest = [next(it) for _ in range(3)]
    again = _take(PackedStream(small_cfg.data, vocab, shapes), 3)
    for x, y in zip(first, again):
        assert torch.equal(x["input_ids"], y["input_ids"])
    resumed = _take(PackedStream(small_cfg.data, vocab, shapes, state=StreamState(**vars(state))), 3)
    for x, y in zip(rest, resumed):
        for k in x:
            assert torch.equal(x[k], y[k]), k


def test_stream_crosses_epochs_with_a_new_order(small_cfg, vocab):
    cfg = replace(small_cfg.data, train_shards=small_cfg.data.train_shards.replace("{000000..000003}", "000000"))
    stream = PackedStream(cfg, vocab, _shapes(small_cfg, vocab))
    it = iter(stream)
    while stream.state.epoch == 0:
        next(it)
    assert stream.state.epoch == 1


def test_ranks_split_samples_disjointly(small_cfg, vocab):
    shapes = _shapes(small_cfg, vocab)
    keys = []
    for rank in range(2):
        s = PackedStream(small_cfg.data, vocab, shapes, rank=rank, world=2)
        keys.append([smp.key for _, (_, _, smp) in zip(range(40), s._samples())])
    assert not set(keys[0]) & set(keys[1]) and len(keys[0]) == len(keys[1])


def corrupt_shard(src: str, dst, every: int = 5) -> int:
    """Copy a shard, replacing every ``every``-th PNG with truncated bytes; return how many."""
    n_bad = 0
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for i, member in enumerate(m for m in tin.getmembers() if m.isfile()):
            data = tin.extractfile(member).read()
            if member.name.endswith(".png") and (i // 2) % every == 0:
                data, n_bad = data[:20], n_bad + 1
            info = tarfile.TarInfo(member.name)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))
    return n_bad


def test_corrupt_images_are_skipped_and_counted(small_cfg, vocab, shard_dir, tmp_path):
    n_bad = corrupt_shard(f"{shard_dir}/digits/train-000000.tar", tmp_path / "bad.tar")
    n_all = len(list(read_samples(str(tmp_path / "bad.tar"))))
    cfg = replace(small_cfg.data, train_shards=str(tmp_path / "bad.tar"))
    stream = PackedStream(cfg, vocab, _shapes(small_cfg, vocab))
    kept = []
    for epoch, _, sample in stream._samples():
        if epoch == 1:
            break
        kept.append(sample.key)
    assert len(kept) == n_all - n_bad and n_bad > 0  # every good sample once, every bad one skipped
    # counted by reason (the count may already include bad samples at the start of epoch 1)
    assert sum(v for k, v in stream.skipped.items() if k.startswith("bad_sample")) >= n_bad


def test_truncated_tar_is_counted_once_even_across_a_resume(small_cfg, vocab, shard_dir, tmp_path):
    src = shard_dir / "digits" / "train-000001.tar"
    good = src.read_bytes()
    with tarfile.open(src) as tar:
        members = tar.getmembers()
    # Cut inside a member's data. (Python < 3.11.10 can hang on a pax header cut in half: CVE-2024-6232.)
    mid = members[len(members) // 2]
    (tmp_path / "part-0.tar").write_bytes(good[: mid.offset_data + mid.size // 2])
    (tmp_path / "part-1.tar").write_bytes(good)
    cfg = replace(small_cfg.data, train_shards=f"{tmp_path}/part-{{0..1}}.tar", shuffle_buffer=8)
    shapes = _shapes(small_cfg, vocab)
    a = PackedStream(cfg, vocab, shapes)
    it = iter(a)
    for _ in range(3):
        next(it)
    saved = StreamState(**vars(a.state))
    while a.state.epoch == 0:
        next(it)
    whole = dict(a.skipped)
    assert whole.get("unreadable", 0) >= 1
    b = PackedStream(cfg, vocab, shapes, state=saved)
    it = iter(b)
    while b.state.epoch == 0:
        next(it)
    assert dict(b.skipped) == whole
    # every rank reads the bad member; only rank 0 counts it, so the summed report counts it once
    r1 = PackedStream(cfg, vocab, shapes, rank=1, world=2)
    it = iter(r1)
    while r1.state.epoch == 0:
        next(it)
    assert "unreadable" not in r1.skipped


def test_a_stream_where_every_sample_is_bad_fails_loudly(small_cfg, vocab, shard_dir, tmp_path):
    corrupt_shard(f"{shard_dir}/digits/train-000000.tar", tmp_path / "allbad.tar", every=1)
    cfg = replace(small_cfg.data, train_shards=str(tmp_path / "allbad.tar"))
    with pytest.raises(RuntimeError, match="no usable sample.*bad_sample"):
        next(iter(PackedStream(cfg, vocab, _shapes(small_cfg, vocab))))
