"""Running the fused ops' Triton kernels on a CPU, in Triton's interpreter (tests and ``--cpu-smoke``).

The interpreter must be on before ``triton`` is first imported: triton picks interpreted vs compiled
when a ``@triton.jit`` function is defined, and that includes triton's own library functions
(``tl.zeros``, ``tl.sum``, ``tl.sigmoid`` ... in ``triton.language.standard``), created when triton is
imported. ``import mm`` already imports triton (transformers imports ``torch._dynamo``, which imports
triton), so ``TRITON_INTERPRET=1`` must be in the environment of the process from its start
(``TRITON_INTERPRET=1 python ...``); :func:`enable_cpu_interpreter` checks that and says so otherwise.

It then works around two gaps of the triton 3.8 interpreter that break liger-kernel there although the
compiled kernels are fine:

1. A Python ``float`` kernel argument reaches the kernel as a bare Python float (the interpreter's
   ``_implicit_cvt`` wraps ``int`` and ``bool`` scalars only: "TODO: wrap everything in triton
   tensors"), so liger's ``eps.to(tl.float32)`` (RMSNorm) and ``gate_multiplier.to(tl.float32)``
   (SwiGLU) raise ``AttributeError: 'float' object has no attribute 'to'``. Compiled Triton
   specialises a float argument to an fp32 scalar; the shim does exactly that.
2. liger's RMSNorm imports ``rsqrt`` by name from ``triton.language.extra.libdevice``; the interpreter
   patches ``tl`` / ``tl.math`` only, so that stub returns ``None`` (``cannot convert None ... to
   tensor`` at ``tl.store(rstd)``). The shim rebinds it to ``tl.math.rsqrt``, which the interpreter
   implements (same math).

A third gap has no shim: the interpreter keeps bfloat16 as raw ``uint16`` bits, so arithmetic between
two bf16 values is integer arithmetic on the bits (garbage), and fp32 -> bf16 casts truncate instead
of rounding to nearest. Our own kernels compute in fp32 and only load/store bf16, so they run in bf16
under the interpreter (tolerances allow the truncation); liger's RMSNorm backward (``dY * W``) and
SwiGLU forward (``silu(a).cast(bf16) * b``) multiply bf16 by bf16, so their bf16 tests need a GPU.
"""

from __future__ import annotations

import importlib
import os
import sys

_SHIMMED = False


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's CPU interpreter (read as triton reads it).

    It only works when set before triton is imported: see ``mm/kernels/interpreter.py``.
    """
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on")


def triton_is_interpreted() -> bool:
    """Whether the imported triton's own library functions were created in interpreter mode."""
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(standard.zeros, InterpretedFunction)


def _shim_float_args() -> None:
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as interp

    original = interp._implicit_cvt

    def implicit_cvt(arg):
        if isinstance(arg, float):  # as compiled Triton does: a float argument is an fp32 scalar
            return tl.tensor(interp.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
        return original(arg)

    interp._implicit_cvt = implicit_cvt


def _shim_liger_rsqrt() -> None:
    import triton.language as tl

    try:  # liger is a Linux-only dependency; our own kernels do not need it
        rms = importlib.import_module("liger_kernel.ops.rms_norm")
    except ImportError:
        return
    rms.rsqrt = lambda x: tl.math.rsqrt(x)  # looked up when the kernel runs, after the interpreter patched tl.math


def enable_cpu_interpreter() -> None:
    """Check the interpreter is on for this process and apply the shims (idempotent).

    Sets ``TRITON_INTERPRET=1`` when triton is not imported yet (a script's first lines); raises when
    triton was already imported in compiled mode, since its kernels cannot be made interpreted then.
    """
    global _SHIMMED
    if _SHIMMED:
        return
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
    if not interpreting() or not triton_is_interpreted():
        raise RuntimeError(
            "the Triton interpreter must be on before triton is imported (import mm imports it through "
            "transformers and torch._dynamo): run the process with TRITON_INTERPRET=1 in its environment"
        )
    _shim_float_args()
    _shim_liger_rsqrt()
    _SHIMMED = True
