"""The one switch that picks reference or fused ops, and when a fused op may actually run.

``impl`` (the config's ``model.llm.kernels``, read by ``mm/model/decoder.py`` and the text loss) is one of
:data:`KERNEL_IMPLS`:

* ``"torch"`` - the pure-PyTorch reference everywhere (what every fused op is tested against);
* ``"fused"`` - liger-kernel (RMSNorm, SwiGLU, linear cross-entropy) and our own Triton kernels
  (rotary from float positions, p-MoD gather/scatter) where they can run: on CUDA tensors, or on CPU
  tensors while the Triton interpreter is on (``TRITON_INTERPRET=1``, the tests). Anywhere else
  (a CPU training run) the reference runs: that is the CPU fallback, so ``"fused"`` is always safe.

Nothing here imports triton or liger: the kernel modules are imported on first use, so a machine
without them (or without a GPU) never pays for or depends on them.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from mm.kernels.interpreter import enable_cpu_interpreter, interpreting

KERNEL_IMPLS = ("torch", "fused")


def check_impl(impl: str) -> None:
    if impl not in KERNEL_IMPLS:
        raise ValueError(f"kernel impl {impl!r}; known: {list(KERNEL_IMPLS)}")


def use_kernels(impl: str, *tensors: torch.Tensor) -> bool:
    """True when ``impl`` asks for fused ops and they can run on these tensors (see the module docstring)."""
    check_impl(impl)
    if impl == "torch":
        return False
    if all(t.is_cuda for t in tensors):
        return True
    return interpreting() and all(t.device.type == "cpu" for t in tensors)


def kernel_module(name: str, device: torch.device) -> ModuleType:
    """Import a kernel module on first use; on CPU, first check the interpreter and apply its shims."""
    if device.type == "cpu":
        enable_cpu_interpreter()
    return importlib.import_module(name)
