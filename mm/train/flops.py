"""Analytic training FLOPs of the LLM backbone, and MFU against a per-device peak table.

Counts the transformer blocks only (6 FLOPs per parameter per token for
forward + backward, plus causal attention scores); the vision towers and the
gen encoder/decoder are small next to the LLM at real sizes and are left out.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Dense bf16 peak TFLOP/s per device (no sparsity).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def llm_train_flops_per_token(llm: torch.nn.Module) -> Callable[[float], float]:
    """Per-token training FLOPs as a function of the mean attended context (parameters counted once):
    6 * block params + causal attention scores (12 * layers * width * context / 2)."""
    cfg = llm.config
    embed = llm.get_input_embeddings().weight.numel()
    head = llm.get_output_embeddings().weight.numel() if llm.get_output_embeddings() is not None else 0
    blocks = sum(p.numel() for p in llm.parameters()) - embed - head
    per_context = 12 * cfg.num_hidden_layers * cfg.hidden_size / 2  # causal: half the scores

    def flops(mean_context: float) -> float:
        return 6 * blocks + per_context * mean_context

    return flops


def device_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
