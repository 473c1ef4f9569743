"""Digit benchmarks of the tiny config: read held-out digits, draw digits from prompts.

``digits_vqa``: held-out digits + "what digit is this ?" -> exact-match accuracy.
``digits_t2i``: 'draw the digit d' -> images judged by a digit classifier trained
on the real training split (``classifier_accuracy``), plus a Frechet distance on
that classifier's hidden features against held-out real digits (``fd``), shown
beside its real-vs-real floor and a uniform-noise ceiling.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import linalg
from sklearn.neural_network import MLPClassifier

from data.digits import EVAL_QUESTION, digit_prompt, load_digit_split
from data.stream import decode_image, fit_image, read_samples
from mm.config import Config
from mm.model.unified import UnifiedModel


@dataclass
class DigitJudge:
    """A small MLP on the 64 pixels, trained on the real training split."""

    clf: MLPClassifier
    heldout_accuracy: float

    @classmethod
    def train(cls, seed: int = 0) -> DigitJudge:
        x_tr, y_tr = load_digit_split("train")
        x_te, y_te = load_digit_split("heldout")
        clf = MLPClassifier(hidden_layer_sizes=(128,), max_iter=600, random_state=seed)
        clf.fit(x_tr.reshape(len(x_tr), -1), y_tr)
        return cls(clf, float(clf.score(x_te.reshape(len(x_te), -1), y_te)))

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.clf.predict(images.reshape(len(images), -1))

    def features(self, images: np.ndarray) -> np.ndarray:
        """Hidden-layer activations (ReLU), the space the Frechet distance is measured in."""
        x = images.reshape(len(images), -1)
        return np.maximum(0.0, x @ self.clf.coefs_[0] + self.clf.intercepts_[0])


def frechet_distance(a: np.ndarray, b: np.ndarray, eps: float = 1e-6) -> float:
    """||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 sqrt(C_a C_b)); eps*I keeps sqrtm defined for dead ReLU units."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    eye = np.eye(a.shape[1]) * eps
    cov_a, cov_b = np.cov(a, rowvar=False) + eye, np.cov(b, rowvar=False) + eye
    covmean, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


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


def _heldout(cfg: Config) -> tuple[list[torch.Tensor], list[int]]:
    images, labels = [], []
    for raw in read_samples(cfg.data.heldout_shards):
        meta = json.loads(raw["json"])
        images.append(decode_image(raw["png"]))
        labels.append(int(meta["label"]))
    return images, labels


def digits_vqa(model: UnifiedModel, cfg: Config, out_dir: Path, batch_size: int = 128) -> dict:
    images, labels = _heldout(cfg)
    if cfg.eval.vqa_limit:
        images, labels = images[: cfg.eval.vqa_limit], labels[: cfg.eval.vqa_limit]
    u = cfg.model.und
    x = torch.stack([fit_image(im, u.image_size, u.in_channels) for im in images])
    answers: list[str] = []
    for i in range(0, len(x), batch_size):
        chunk = x[i : i + batch_size]
        answers += model.answer(chunk, [EVAL_QUESTION] * len(chunk), max_new_tokens=4)
    correct = [a == str(y) for a, y in zip(answers, labels)]
    examples = [{"label": y, "answer": a} for a, y in list(zip(answers, labels))[:10]]
    return {"accuracy": float(np.mean(correct)), "n": len(correct), "examples": examples}


def digits_t2i(model: UnifiedModel, cfg: Config, out_dir: Path, batch_size: int = 100) -> dict:
    judge = DigitJudge.train()
    per_digit = cfg.eval.t2i_per_digit
    gen = torch.Generator().manual_seed(1234)
    images, labels = [], []
    for d in range(10):
        made = []
        for i in range(0, per_digit, batch_size):
            k = min(batch_size, per_digit - i)
            made.append(model.generate([digit_prompt(d)] * k, generator=gen).cpu())
        x = torch.cat(made)
        gray = torch.stack([fit_image(im, 8, 1)[0] for im in x]).numpy()
        images.append(gray)
        labels += [d] * len(gray)
        save_grid(gray, out_dir / f"samples_digit_{d}.png", cfg.eval.grid_columns)
    images_np, labels_np = np.concatenate(images), np.array(labels)
    cols = cfg.eval.grid_columns
    save_grid(np.concatenate([im[:cols] for im in images]), out_dir / "samples_grid.png", cols)

    real_te, _ = load_digit_split("heldout")
    real_tr, y_tr = load_digit_split("train")
    rng = np.random.default_rng(0)
    n = min(len(images_np), len(real_tr))
    sub = rng.choice(len(real_tr), size=n, replace=False)
    noise = rng.uniform(0, 1, size=(n, 8, 8)).astype(np.float32)
    f_te = judge.features(real_te)
    pred = judge.predict(images_np)
    return {
        "classifier_accuracy": float((pred == labels_np).mean()),
        "fd": frechet_distance(judge.features(images_np), f_te),
        "fd_real_floor": frechet_distance(judge.features(real_tr[sub]), f_te),
        "fd_noise_ceiling": frechet_distance(judge.features(noise), f_te),
        "classifier_heldout_accuracy": judge.heldout_accuracy,
        "diversity": diversity(images_np, labels_np),
        "real_diversity": diversity(real_tr[sub], y_tr[sub]),
        "n": int(len(images_np)),
        "cfg_scale": cfg.model.flow.cfg_scale,
        "sample_steps": cfg.model.flow.sample_steps,
    }


EVAL_TASKS = {"digits_vqa": digits_vqa, "digits_t2i": digits_t2i}
