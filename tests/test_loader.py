"""The training loader: node x worker split, mixing, exact resume with DataLoader workers, bad shards."""

import json
from dataclasses import fields, replace

import pytest
import torch

from data.config import DataConfig
from data.loader import TrainLoader, WorkerStream
from data.reader import SourceReader, SourceSpec, resolve_sources
from data.shards import ShardWriter
from data.sources import SourceConfig
from data.stream import read_samples
from mm.batch import Batch
from mm.config import load_config
from mm.model.unified import UnifiedModel
from mm.schema import ConfigError


@pytest.fixture
def shapes(small_cfg, vocab):
    return UnifiedModel(small_cfg.model, vocab).sample_shapes()


def digit_sources(shard_dir, text_weight: float = 0.0, resample: bool = False) -> list[SourceConfig]:
    train = f"{shard_dir}/digits/train-{{000000..000003}}.tar"
    sources = [
        SourceConfig(name="vqa", kind="conversation", shards=train, weight=1.0, resample=resample),
        SourceConfig(name="t2i", kind="generation", shards=train, weight=1.0, resample=resample),
    ]
    if text_weight:
        sources.append(SourceConfig(name="facts", kind="text", shards=f"{shard_dir}/digits/text-000000.tar",
                                    weight=text_weight, resample=resample))  # fmt: skip
    return sources


def reshard(src_pattern: str, out_dir, n_shards: int) -> str:
    """The samples of ``src_pattern`` rewritten into ``n_shards`` shards; returns their pattern."""
    samples = list(read_samples(src_pattern))
    w = ShardWriter(out_dir, "part", max_count=-(-len(samples) // n_shards))
    for s in samples:
        w.write(s)
    paths = w.close()
    assert len(paths) == n_shards
    return f"{out_dir}/part-{{000000..{n_shards - 1:06d}}}.tar"


def _epoch_keys(spec: SourceSpec, cfg: DataConfig, world: int, workers: int, epochs: int) -> dict[int, list[str]]:
    """Keys each (rank, worker) slice reads per epoch, through the shuffle buffer."""
    seen: dict[int, list[str]] = {e: [] for e in range(epochs)}
    for rank in range(world):
        for worker in range(workers):
            reader = SourceReader(spec, cfg, rank, world, worker, workers, "", lambda k, m: None)
            while reader.epoch <= epochs or any(p[0] < epochs for p, _ in reader.buffer):
                (epoch, _, _), raw = reader.next_raw()
                if epoch < epochs:
                    seen[epoch].append(raw["__key__"])
    return seen


@pytest.mark.parametrize("n_shards", [6, 3])  # 6: whole shards per slice; 3 < 4 slices: shards read in parts
def test_node_worker_split_covers_every_sample_once_per_epoch(shard_dir, tmp_path, n_shards):
    pattern = reshard(f"{shard_dir}/digits/train-{{000000..000003}}.tar", tmp_path, n_shards)
    everything = sorted(r["__key__"] for r in read_samples(pattern))
    cfg = DataConfig(sources=[SourceConfig(name="d", shards=pattern)], shuffle_buffer=16)
    (spec,) = resolve_sources(cfg)
    seen = _epoch_keys(spec, cfg, world=2, workers=2, epochs=2)
    for epoch in range(2):
        assert sorted(seen[epoch]) == everything  # every sample exactly once, over 2 nodes x 2 workers
    assert seen[0] != seen[1]  # each epoch has its own order


def test_mixing_weights_hold(shard_dir, vocab, shapes):
    cfg = DataConfig(sources=digit_sources(shard_dir, text_weight=6.0), shuffle_buffer=8, seq_len=96)
    cfg.sources[0].weight, cfg.sources[1].weight = 14.0, 80.0  # JanusFlow stage 2: und:gen:text = 14:80:6
    stream = WorkerStream(resolve_sources(cfg), cfg, vocab, shapes, 0, 1, 0, 1)
    n = 20000
    counts = [0, 0, 0]
    for _ in range(n):
        counts[stream._choose()] += 1
    for c, w in zip(counts, (0.14, 0.80, 0.06)):
        assert abs(c / n - w) < 4 * (w * (1 - w) / n) ** 0.5, counts
    # and in the batches themselves: image samples by source
    loader = TrainLoader(replace(cfg, num_workers=0, rows_per_batch=4), vocab, shapes, 0, 1)
    it = iter(loader)
    per_source = torch.zeros(3)
    for _ in range(40):
        b = next(it)
        per_source += torch.bincount(b.sample_source, minlength=3)[:3]
    und_share = per_source[0] / (per_source[0] + per_source[1])
    assert abs(und_share - 14 / 94) < 0.05, per_source


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(xs: list[Batch], ys: list[Batch]) -> None:
    """Every field of the batches equal: each tensor, each head's images, the draws, the host spans."""
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        for f in fields(Batch):
            if f.name == "_spec":
                continue
            a, b = getattr(x, f.name), getattr(y, f.name)
            if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
                assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), f.name
                assert a.dtype == b.dtype and torch.equal(a, b), f.name
            elif f.name == "images":
                assert a.keys() == b.keys(), f.name
                for head in a:
                    assert torch.equal(a[head].images, b[head].images), (f.name, head)
                    assert torch.equal(a[head].sample_ids, b[head].sample_ids), (f.name, head)
                    assert a[head].placeholder == b[head].placeholder, (f.name, head)
            elif f.name == "draws":
                assert a.keys() == b.keys(), f.name
                for head in a:
                    assert a[head].keys() == b[head].keys(), (f.name, head)
                    for k in a[head]:
                        assert torch.equal(a[head][k], b[head][k]), (f.name, head, k)
            else:  # spans, max_seqlen, und_images=None on both
                assert a == b, f.name


def test_exact_resume_with_two_workers_and_two_ranks(shard_dir, tmp_path, vocab, shapes):
    from tests.test_data import bad_sample_shard  # noqa: F401  (a corrupt source keeps skip counts in play)

    cfg = DataConfig(
        sources=digit_sources(shard_dir, text_weight=0.5), seq_len=96, rows_per_batch=2, shuffle_buffer=32,
        pack_lookahead=16, num_workers=2, prefetch_factor=2,
    )  # fmt: skip
    ranks = []
    for rank in range(2):
        a = TrainLoader(cfg, vocab, shapes, rank, 2)
        it = iter(a)
        first = _take(it, 5)
        state = json.loads(json.dumps(a.state_dict()))  # JSON-serialisable, as the checkpoint stores it
        rest = _take(it, 7)
        b = TrainLoader(cfg, vocab, shapes, rank, 2)
        b.load_state_dict(state)
        _assert_same(rest, _take(iter(b), 7))
        c = TrainLoader(cfg, vocab, shapes, rank, 2)
        _assert_same(first, _take(iter(c), 5))  # deterministic from the start too
        for loader in (a, b, c):
            loader.close()
        images = [x for b in first for x in (b.und_images, *(i.images for i in b.images.values())) if x is not None]
        assert images and all(x.dtype == torch.uint8 for x in images)  # images stay uint8 until the model
        assert len(state["worker_states"]) == 2 and state["consumed"] == 5
        ranks.append(first)
    assert not torch.equal(ranks[0][0].input_ids, ranks[1][0].input_ids)  # ranks read different shards


def test_resume_keeps_skip_counts_and_the_packing_buffer(shard_dir, tmp_path, vocab, shapes):
    from tests.test_data import bad_sample_shard

    bad_sample_shard(tmp_path / "bad.tar")
    sources = digit_sources(shard_dir, text_weight=1.0) + [
        SourceConfig(name="photos", kind="generation", shards=str(tmp_path / "bad.tar"), weight=0.5)
    ]
    cfg = DataConfig(sources=sources, seq_len=96, rows_per_batch=2, shuffle_buffer=4, pack_lookahead=24,
                     num_workers=0, max_image_pixels=10**6)  # fmt: skip
    a = TrainLoader(cfg, vocab, shapes, 0, 1)
    it = iter(a)
    _take(it, 30)
    state = json.loads(json.dumps(a.state_dict()))
    pending = state["worker_states"]["0"]["pending"]
    assert any(start > 0 for *_, start, _ in pending) or any(p[0] == 2 for p in pending)  # text pieces wait too
    rest = _take(it, 10)
    b = TrainLoader(cfg, vocab, shapes, 0, 1)
    b.load_state_dict(state)
    assert b.skip_counts() == {k: v for k, v in state["worker_states"]["0"]["skipped"].items()}
    assert any(k.startswith("photos/") for k in b.skip_counts())
    _assert_same(rest, _take(iter(b), 10))
    assert b.skip_counts() == a.skip_counts()  # nothing counted twice on the way


def test_layout_change_refuses_exact_sources_and_resplits_resampled(shard_dir, vocab, shapes, capsys):
    cfg = DataConfig(sources=digit_sources(shard_dir), seq_len=96, rows_per_batch=2, shuffle_buffer=8, num_workers=0)
    a = TrainLoader(cfg, vocab, shapes, 0, 1)
    _take(iter(a), 3)
    more = TrainLoader(replace(cfg, num_workers=2), vocab, shapes, 0, 1)
    with pytest.raises(ValueError, match="exact epochs.*same world size"):
        more.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="rank 0 given to rank 1"):
        TrainLoader(cfg, vocab, shapes, 1, 1).load_state_dict(a.state_dict())

    res = replace(cfg, sources=digit_sources(shard_dir, resample=True))
    a = TrainLoader(res, vocab, shapes, 0, 1)
    _take(iter(a), 3)
    b = TrainLoader(replace(res, num_workers=2), vocab, shapes, 0, 1)
    b.load_state_dict(a.state_dict())
    assert "re-split" in capsys.readouterr().out
    fresh = _take(iter(TrainLoader(replace(res, num_workers=2), vocab, shapes, 0, 1)), 2)
    resplit = _take(iter(b), 2)
    assert not torch.equal(fresh[0].input_ids, resplit[0].input_ids)  # new seeds: no replay of a fresh run


def test_changed_sources_are_refused_on_resume(shard_dir, vocab, shapes):
    cfg = DataConfig(sources=digit_sources(shard_dir), seq_len=96, rows_per_batch=2, shuffle_buffer=8, num_workers=0)
    a = TrainLoader(cfg, vocab, shapes, 0, 1)
    _take(iter(a), 1)
    other = replace(cfg, sources=digit_sources(shard_dir)[:1])
    with pytest.raises(ValueError, match="data.sources changed"):
        TrainLoader(other, vocab, shapes, 0, 1).load_state_dict(a.state_dict())


def test_a_rank_whose_shards_run_dry_keeps_yielding(shard_dir, tmp_path, vocab, shapes):
    samples = list(read_samples(f"{shard_dir}/digits/train-000000.tar"))
    for name, part in (("tiny", samples[:3]), ("big", samples[3:])):
        w = ShardWriter(tmp_path, name)
        for s in part:
            w.write(s)
        w.close()
    pattern = f"{tmp_path}/tiny-000000.tar::{tmp_path}/big-000000.tar"
    cfg = DataConfig(sources=[SourceConfig(name="d", kind="generation", shards=pattern)], seq_len=96,
                     rows_per_batch=2, shuffle_buffer=4, pack_lookahead=8, num_workers=0)  # fmt: skip
    loaders = [TrainLoader(cfg, vocab, shapes, r, 2) for r in range(2)]
    its = [iter(x) for x in loaders]
    for _ in range(25):  # both ranks give a batch at every step
        for it in its:
            assert next(it).input_ids.shape == (2, 96)
    # each epoch one rank gets the 3-sample shard and runs dry at once: it moves on to its next epoch
    epochs = sorted(x.worker_states[0]["sources"][0]["epoch"] for x in loaders)
    assert epochs[1] >= 3 and epochs[0] < epochs[1]


def test_a_shard_that_disappears_is_retried_then_skipped(shard_dir, tmp_path, vocab, shapes, monkeypatch):
    import data.stream

    for k in range(2):
        (tmp_path / f"s-{k}.tar").write_bytes((shard_dir / "digits" / f"train-00000{k}.tar").read_bytes())
    cfg = DataConfig(sources=[SourceConfig(name="d", kind="generation", shards=f"{tmp_path}/s-{{0..1}}.tar")],
                     seq_len=96, rows_per_batch=2, shuffle_buffer=4, pack_lookahead=8, num_workers=0,
                     open_retries=2, retry_delay_s=0.5)  # fmt: skip
    sleeps = []
    monkeypatch.setattr(data.stream.time, "sleep", sleeps.append)
    loader = TrainLoader(cfg, vocab, shapes, 0, 1)
    it = iter(loader)
    next(it)
    reader_shard = loader.worker_states[0]["sources"][0]
    (tmp_path / f"s-{1 - _current_shard(loader, reader_shard)}.tar").unlink()  # the one not being read
    for _ in range(60):
        next(it)
    assert loader.skip_counts().get("d/shard_unavailable", 0) >= 1
    assert sleeps[:2] == [0.5, 1.0]  # retried with backoff before skipping


def _current_shard(loader, reader_state) -> int:
    spec = loader.specs[0]
    reader = SourceReader(spec, loader.cfg, 0, 1, 0, 1, "", lambda k, m: None)
    reader.epoch = reader_state["epoch"]
    return reader.units()[reader_state["unit"]][0]


def test_a_source_with_no_usable_sample_fails_loudly_through_the_workers(tmp_path, vocab, shapes):
    from tests.test_data import _tar

    members = [(f"s{i}.{ext}", b"<html>" if ext == "jpg" else b"a cat") for i in range(5) for ext in ("jpg", "txt")]
    _tar(tmp_path / "allbad.tar", members)
    cfg = DataConfig(sources=[SourceConfig(name="junk", kind="generation", shards=str(tmp_path / "allbad.tar"))],
                     seq_len=96, rows_per_batch=1, shuffle_buffer=2, num_workers=1)  # fmt: skip
    with pytest.raises(RuntimeError, match="'junk' gave no usable sample.*junk/not_an_image"):
        next(iter(TrainLoader(cfg, vocab, shapes, 0, 1)))


def test_shell_urls_only_when_allowed(shard_dir, small_cfg, vocab, shapes):
    url = f"pipe:cat {shard_dir}/digits/train-000000.tar"
    with pytest.raises(ConfigError, match="allow_shell_urls"):
        load_config(None, [f"data.train_shards={url}"])
    sources = [SourceConfig(name="d", kind="generation", shards=url)]
    with pytest.raises(ConfigError, match="allow_shell_urls"):  # refused when the data config is built
        DataConfig(sources=sources, seq_len=96, rows_per_batch=2, shuffle_buffer=4, num_workers=0)
    cfg = DataConfig(sources=sources, seq_len=96, rows_per_batch=2, shuffle_buffer=4, num_workers=0,
                     allow_shell_urls=True)  # fmt: skip
    cfg.allow_shell_urls = False  # past the config's own check: the loader refuses on its own too
    with pytest.raises(ValueError, match="allow_shell_urls"):
        TrainLoader(cfg, vocab, shapes, 0, 1)
    batch = next(iter(TrainLoader(replace(cfg, allow_shell_urls=True), vocab, shapes, 0, 1)))
    assert len(batch.images["flow"].images) > 0


def test_shuffle_buffer_pointers_are_stored_compactly_and_in_order():
    from data.reader import decode_pointers, encode_pointers

    rng = torch.Generator().manual_seed(0)
    ordinals = sorted(set(torch.randint(0, 5000, (1500,), generator=rng).tolist()))
    pointers = [(0, 3, o) for o in ordinals] + [(1, 2, 5), (1, 2, 9), (1, 0, 1), (1, 2, 7)]  # read order
    runs = encode_pointers(pointers)
    assert decode_pointers(json.loads(json.dumps(runs))) == pointers
    assert len(json.dumps(runs)) < len(json.dumps(pointers)) / 10


def test_an_empty_shard_is_a_counted_skip_not_the_end_of_its_source(shard_dir, tmp_path, vocab, shapes):
    """Two digits shards and one empty tar, two workers: the worker whose epoch share is the empty tar goes on."""
    import tarfile

    for k in range(2):
        (tmp_path / f"s-{k}.tar").write_bytes((shard_dir / "digits" / f"train-00000{k}.tar").read_bytes())
    tarfile.open(tmp_path / "s-2.tar", "w").close()  # a valid tar with no member
    source = SourceConfig(name="d", kind="generation", shards=f"{tmp_path}/s-{{0..2}}.tar")
    cfg = DataConfig(sources=[source], seq_len=96, rows_per_batch=2, shuffle_buffer=4, pack_lookahead=8,
                     num_workers=2)  # fmt: skip
    spec = resolve_sources(cfg)[0]
    # a seed whose first epoch gives worker 1 nothing but the empty shard (the case that used to stop the run)
    cfg = next(c for c in (replace(cfg, seed=s) for s in range(50))
               if SourceReader(spec, c, 0, 1, 1, 2, "", lambda k, m: None).units() == [(2, 0)])  # fmt: skip
    loader = TrainLoader(cfg, vocab, shapes, 0, 1)
    it = iter(loader)
    for _ in range(6):
        assert next(it).input_ids.shape == (2, 96)
    loader.close()
    assert loader.skip_counts().get("d/empty_shard", 0) >= 1
    # a source none of whose shards yields a sample still stops, saying so
    only_empty = replace(cfg, sources=[replace(source, shards=str(tmp_path / "s-2.tar"))], num_workers=0)
    with pytest.raises(RuntimeError, match="none of its 1 shard"):
        next(iter(TrainLoader(only_empty, vocab, shapes, 0, 1)))


def test_a_stalled_worker_is_named_with_the_shard_it_was_reading(vocab, shapes):
    """A pipe: shard whose command produces nothing: after data.worker_timeout_s, one line names where it hangs."""
    cfg = DataConfig(sources=[SourceConfig(name="slow", kind="generation", shards="pipe:sleep 12")], seq_len=96,
                     rows_per_batch=2, shuffle_buffer=2, num_workers=1, allow_shell_urls=True,
                     worker_timeout_s=3)  # fmt: skip
    with pytest.raises(RuntimeError) as e:
        next(iter(TrainLoader(cfg, vocab, shapes, 0, 1)))
    message = str(e.value)
    assert "\n" not in message and "rank 0 DataLoader worker 0" in message and "no batch in 3 s" in message
    assert "pipe:sleep 12 (source 'slow')" in message and "data.worker_timeout_s" in message
