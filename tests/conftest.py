"""Shared fixtures: a tiny config, the bundled shards in a temp dir, real images."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402

from data.bundled.digits import build_digit_shards, build_smoke_shard  # noqa: E402
from mm.config import Config, load_config  # noqa: E402
from mm.sequence import Vocab, load_vocab  # noqa: E402

torch.set_num_threads(2)

# A smaller model than configs/tiny.yaml so each test runs in seconds.
SMALL = [
    "model.llm.hidden_size=64", "model.llm.num_layers=2", "model.llm.num_heads=4", "model.llm.num_kv_heads=2",
    "model.llm.intermediate_size=128", "model.und.tower.width=32", "model.und.tower.layers=1",
    "model.heads.flow.codec.channels=32", "model.heads.flow.repa_layer=1", "model.heads.flow.repa_hidden=64",
    "data.seq_len=96", "data.rows_per_batch=2", "train.max_steps=6", "train.log_every=1", "train.ckpt_every=3",
    "train.warmup_steps=2",
]  # fmt: skip


@pytest.fixture
def one_thread():
    """In-process training on one torch thread: on a shared 2-core machine a 2-thread region waits for a
    descheduled thread at every op of these small models (seconds per step instead of 0.1 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    build_digit_shards(out / "digits")
    build_smoke_shard(out / "smoke")
    return out


@pytest.fixture(scope="session")
def vocab() -> Vocab:
    return load_vocab(ROOT / "configs" / "tokenizers" / "digits")


@pytest.fixture
def small_cfg(shard_dir, tmp_path) -> Config:
    return load_config(
        ROOT / "configs" / "tiny.yaml",
        SMALL
        + [
            f"data.train_shards={shard_dir}/digits/train-{{000000..000003}}.tar",
            f"data.heldout_shards={shard_dir}/digits/heldout-000000.tar",
            f"run.dir={tmp_path}/run",
        ],
    )


def pytest_collection_modifyitems(config, items) -> None:
    """``gpu``-marked tests need CUDA: where there is none (``pytest -m gpu`` on a CPU machine) they are
    collected and skipped with the reason, instead of failing at their first ``.cuda()``."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device: torch.cuda.is_available() is False here")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
