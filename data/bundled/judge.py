"""The digit judge: a classifier of the real bundled digits, a detector built from it, and the Frechet
distance of its features (the digit-domain FID).

``DigitJudge`` is a small MLP on the 64 pixels, trained on the real training split;
its held-out accuracy is the ceiling any digit-classification metric can show.
``detect_digits`` finds digits in an image of any size: connected components of the
thresholded image (nearby fragments merged), each cropped, padded square, resized to
8x8 and classified; GenEval's rules then run on these detections.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage
from sklearn.neural_network import MLPClassifier
from threadpoolctl import threadpool_limits

from data.bundled.digits import load_digit_split


@dataclass
class DigitJudge:
    """A small MLP on the 64 pixels, trained on the real training split."""

    clf: MLPClassifier
    heldout_accuracy: float

    @classmethod
    def train(cls, seed: int = 0, crops: bool = False) -> DigitJudge:
        """``crops=True`` trains on the detector's normalised crops (tight box, padded square, 8x8)."""
        x_tr, y_tr = load_digit_split("train")
        x_te, y_te = load_digit_split("heldout")
        if crops:
            x_tr, x_te = normalise_frames(x_tr), normalise_frames(x_te)
        clf = MLPClassifier(hidden_layer_sizes=(128,), max_iter=600, random_state=seed)
        with threadpool_limits(1):  # one BLAS thread: the same judge whatever the machine's thread settings
            clf.fit(x_tr.reshape(len(x_tr), -1), y_tr)
        return cls(clf, float(clf.score(x_te.reshape(len(x_te), -1), y_te)))

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.clf.predict(images.reshape(len(images), -1))

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        return self.clf.predict_proba(images.reshape(len(images), -1))

    def features(self, images: np.ndarray) -> np.ndarray:
        """Hidden-layer activations (ReLU): the digit-domain feature space of ``fd``/``kd``."""
        x = images.reshape(len(images), -1)
        return np.maximum(0.0, x @ self.clf.coefs_[0] + self.clf.intercepts_[0])


@functools.lru_cache(maxsize=4)
def get_judge(seed: int = 0, crops: bool = False) -> DigitJudge:
    """The judge is deterministic for a seed; train it once per process.

    ``crops=False``: on whole 8x8 frames (judges generated 8x8 digits); ``crops=True``: on
    the detector's normalised crops (judges detections in images of any size).
    """
    return DigitJudge.train(seed, crops)


def normalise_frames(images: np.ndarray, threshold: float = 0.3) -> np.ndarray:
    """Whole digit frames -> the detector's crops of them (so the crop judge trains on what it sees)."""
    out = []
    for img in images:
        ys, xs = np.nonzero(img > threshold)
        box = [ys.min(), xs.min(), ys.max() + 1, xs.max() + 1] if len(ys) else [0, 0, 8, 8]
        out.append(crop_to_digit(img, box))
    return np.stack(out)


@dataclass
class Detection:
    label: int
    score: float  # the classifier's probability of ``label``
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels (x1, y1 exclusive)


def _merge_boxes(boxes: list[list[int]], gap: int) -> list[list[int]]:
    """Union boxes (y0, x0, y1, x1) closer than ``gap`` px until none are (broken strokes of one digit)."""
    merged = True
    while merged:
        merged = False
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                if a[0] - gap < b[2] and b[0] - gap < a[2] and a[1] - gap < b[3] and b[1] - gap < a[3]:
                    boxes[i] = [min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])]
                    del boxes[j]
                    merged = True
                    break
            if merged:
                break
    return boxes


def crop_to_digit(image: np.ndarray, box: list[int]) -> np.ndarray:
    """The box's pixels padded to a centred square and resized to 8x8 (the judge's input)."""
    y0, x0, y1, x1 = box
    crop = image[y0:y1, x0:x1]
    h, w = crop.shape
    s = max(h, w)
    square = np.zeros((s, s), dtype=np.float32)
    square[(s - h) // 2 : (s - h) // 2 + h, (s - w) // 2 : (s - w) // 2 + w] = crop
    if s == 8:
        return square
    pil = Image.fromarray(square, mode="F").resize((8, 8), Image.BILINEAR)
    return np.clip(np.asarray(pil, dtype=np.float32), 0, 1)


def detect_digits(
    image: np.ndarray, judge: DigitJudge, threshold: float = 0.3, min_area: int = 3, merge_gap: int = 1
) -> list[Detection]:
    """Digits in a [H, W] image in [0, 1]: components of ``image > threshold`` -> crops -> judge."""
    mask = image > threshold
    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
    boxes = []
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is not None and (labels[sl] == k).sum() >= min_area:
            boxes.append([sl[0].start, sl[1].start, sl[0].stop, sl[1].stop])
    boxes = _merge_boxes(boxes, merge_gap)
    if not boxes:
        return []
    crops = np.stack([crop_to_digit(image, b) for b in boxes])
    proba = judge.predict_proba(crops)
    classes = judge.clf.classes_
    out = []
    for b, p in zip(boxes, proba):
        k = int(p.argmax())
        out.append(Detection(int(classes[k]), float(p[k]), (float(b[1]), float(b[0]), float(b[3]), float(b[2]))))
    return out


def frechet_distance(a: np.ndarray, b: np.ndarray, eps: float = 1e-6) -> float:
    """||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 sqrt(C_a C_b)); eps*I keeps sqrtm defined for dead ReLU units."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    eye = np.eye(a.shape[1]) * eps
    cov_a, cov_b = np.cov(a, rowvar=False) + eye, np.cov(b, rowvar=False) + eye
    covmean, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))
