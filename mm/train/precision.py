"""Precision policies: which dtype the weights live in and which dtype the matmuls run in.

* ``fp32``: fp32 weights, fp32 compute (on GPUs the matmuls may use TF32; MFU then counts against the
  TF32 peak).
* ``bf16_autocast``: fp32 weights and optimizer, the forward under ``torch.autocast(bfloat16)``.
* ``bf16``: bf16 weights and gradients with an fp32 master copy in the optimizer. Only DeepSpeed keeps
  that master copy (in its ZeRO partitions), so this policy needs ``engine.kind=deepspeed``. The
  forward runs under autocast too: images, latents, flow noise and times arrive in fp32 and autocast
  casts them at each matmul instead of the model casting by hand.

What stays fp32 under every policy (the model is written so; ``tests/test_engine.py`` pins it):
position ids and the rotary angles computed from them (V2PE needs fractional positions), the flow
interpolation ``z_t = t*x1 + (1-t)*x0``, its target velocity and the loss reductions. Frozen modules
keep the dtype they were built in (the VAE's own ``model.heads.flow.autoencoder.dtype``); under ``bf16`` DeepSpeed
casts the whole module, frozen parts included.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from mm.schema import ConfigError


@dataclass(frozen=True)
class Precision:
    name: str
    autocast_dtype: torch.dtype | None  # None: no autocast
    weights_bf16: bool  # bf16 weights + fp32 master in the engine's optimizer
    peak_key: str  # which column of the peak table MFU is measured against (mm.train.flops.PEAK_TFLOPS)

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)


PRECISIONS: dict[str, Precision] = {
    "fp32": Precision("fp32", None, weights_bf16=False, peak_key="fp32"),
    "bf16_autocast": Precision("bf16_autocast", torch.bfloat16, weights_bf16=False, peak_key="bf16"),
    "bf16": Precision("bf16", torch.bfloat16, weights_bf16=True, peak_key="bf16"),
}


def get_precision(name: str) -> Precision:
    if name not in PRECISIONS:
        raise ConfigError(f"engine.precision={name!r}; known: {sorted(PRECISIONS)}")
    return PRECISIONS[name]


def fp32_peak_key() -> str:
    """fp32 matmuls on a GPU run on the TF32 tensor cores unless torch is told to keep full precision."""
    return "tf32" if torch.get_float32_matmul_precision() != "highest" else "fp32"
