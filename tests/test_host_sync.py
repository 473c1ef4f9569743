"""Nothing in the layer loop reads a device tensor back to the host.

On a GPU every such read (``.item()``, ``.tolist()``, ``bool(t)``, a boolean-mask index whose output size
depends on the data, ...) waits for the device to finish: once per layer per step it serialises the
whole forward. The varlen metadata (sample runs, ``cu_seqlens``) and the p-MoD routing plan (tokens kept
per routed layer) are computed once per batch on the host (``mm.batch``, ``mm.model.routing.plan_layers``).
This test counts every host read a forward makes inside the decoder, with p-MoD and V2PE on, on a real
packed batch with understanding and generation samples.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from data.loader import TrainLoader
from mm.config import with_overrides
from mm.model.unified import build_model

# torch functions whose result on a device tensor needs the host to wait for the device
SYNCING = {"__bool__", "__int__", "__float__", "__index__", "item", "tolist", "nonzero", "argwhere", "numpy",
           "masked_select", "unique", "unique_consecutive", "repeat_interleave"}  # fmt: skip


class HostReads(TorchFunctionMode):
    """Records the torch calls that read device data back to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        kwargs = kwargs or {}
        data_sized = name != "repeat_interleave" or (len(args) > 1 and isinstance(args[1], torch.Tensor))
        if name in SYNCING and data_sized:
            self.reads.append(name)
        elif name == "__getitem__" and _bool_index(args[1] if len(args) > 1 else None):
            self.reads.append("boolean index")
        elif name == "where" and len(args) + len(kwargs) == 1:
            self.reads.append("where(condition)")
        return func(*args, **kwargs)


def _bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def test_the_counter_sees_host_reads():
    t = torch.arange(6)
    with HostReads() as m:
        int(t[0]), bool(t[1] > 0), t.tolist(), t[t > 2], t.max().item(), t.nonzero()
    assert m.reads == ["__int__", "__bool__", "tolist", "boolean index", "item", "nonzero"]


@pytest.mark.parametrize("backend", ["sdpa", "sdpa_segmented", "eager"])
def test_no_host_sync_inside_the_layer_loop_with_mod_and_v2pe(small_cfg, backend):
    cfg = with_overrides(small_cfg, [
        "model.mod.enabled=true", "model.mod.ratio=0.5", "model.v2pe.enabled=true", "data.seq_len=320",
        "data.rows_per_batch=2", "data.num_workers=0", f"model.llm.attn_implementation={backend}",
    ])  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg.model)
    for p in model.mod_routers.parameters():  # distinct scores: the routed layers really select
        torch.nn.init.normal_(p, std=0.5)
    batch = next(iter(TrainLoader(cfg.data, model.vocab, model.sample_shapes(), 0, 1)))
    assert batch.und_images is not None and "flow" in batch.images and batch.n_samples > 4  # a packed mix
    batch = model.add_draws(batch, torch.Generator().manual_seed(0))
    counter, decode = HostReads(), model.decode

    def counted(*args, **kwargs):
        with counter:
            return decode(*args, **kwargs)

    model.decode = counted
    out = model(batch)
    out["loss"].backward()
    assert counter.reads == [], f"host reads in the layer loop: {counter.reads}"
    assert out["flow"] > 0 and out["text"] > 0
    # the same forward without the host plan reads the kept counts back once per routed layer
    model.decode = lambda *a, spans=None, **k: counted(*a, **k)
    model(batch)
    assert counter.reads.count("__int__") == len(model.mod_routers.routers)
