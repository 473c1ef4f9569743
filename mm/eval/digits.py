"""Image metrics of the digit benchmark that need no network: diversity and sample grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def diversity(images: np.ndarray, labels: np.ndarray) -> float:
    """Mean per-pixel std within each class: ~0 when every sample of a digit is the same image."""
    return float(
        np.mean([images[labels == d].reshape((labels == d).sum(), -1).std(0).mean() for d in np.unique(labels)])
    )


def save_grid(images: np.ndarray, path: Path, columns: int, scale: int = 8) -> None:
    """[N, H, W] in [0,1] -> one PNG with ``columns`` per row, pixels enlarged ``scale`` times."""
    n, h, w = images.shape
    rows = -(-n // columns)
    canvas = np.ones((rows * (h + 1) + 1, columns * (w + 1) + 1), dtype=np.float32) * 0.5
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        canvas[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = img
    pil = Image.fromarray((canvas * 255).round().astype(np.uint8))
    pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST).save(path)
