"""Generation metrics: GenEval's layout and rules, FID/KID with pluggable features, CLIP score.

* GenEval: prompts come as its metadata lines (``tag``, ``include``/``exclude`` with
  ``class`` and ``count``, ``position: [relation, index of the reference include]``);
  images are written as ``<dir>/<NNNNN>/metadata.jsonl`` + ``samples/<SSSS>.png``;
  an image is correct when the detections satisfy every include/exclude rule, with
  GenEval's confidence thresholds (0.3; 0.9 for counting) and its relative-position
  test (box centres, offsets shrunk by 0.1 x the box sizes). The overall score is the
  mean of the per-tag accuracies.
* Frechet and kernel distances on features of a registered extractor. Only the
  Inception-v3 extractor's numbers are called ``fid``/``kid``; a domain extractor's are
  ``fd_<name>``/``kd_<name>``. Inception weights load from a local torchvision
  ``inception_v3`` state dict; absent weights give ``"skipped: weights not found at <path>"``.
* CLIP score (100 x max(cos(image, text), 0), averaged) with a local open_clip checkpoint.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from data.bundled.judge import Detection, frechet_distance, get_judge

GENEVAL_THRESHOLD = 0.3
GENEVAL_COUNTING_THRESHOLD = 0.9
GENEVAL_POSITION_THRESHOLD = 0.1


def skipped(path: str | Path) -> str:
    return f"skipped: weights not found at {path}"


# ---------------------------------------------------------------------------------
# GenEval
# ---------------------------------------------------------------------------------


def relative_position(a: tuple, b: tuple) -> set[str]:
    """Relations of box a to box b (x0, y0, x1, y1): offsets of the centres, shrunk by 10% of the box sizes."""
    boxes = np.array([a, b], dtype=np.float64).reshape(2, 2, 2)
    centre_a, centre_b = boxes.mean(axis=1)
    dim_a, dim_b = np.abs(boxes[:, 1] - boxes[:, 0])
    offset = centre_a - centre_b
    revised = np.maximum(np.abs(offset) - GENEVAL_POSITION_THRESHOLD * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


def geneval_judge(
    metadata: dict, detections: list[Detection], class_names: dict[int, str] | None = None
) -> tuple[bool, str]:
    """(correct, reason) of one image under GenEval's rules (colour rules are not supported)."""
    threshold = GENEVAL_COUNTING_THRESHOLD if metadata.get("tag") == "counting" else GENEVAL_THRESHOLD
    by_class: dict[str, list[Detection]] = defaultdict(list)
    for d in sorted(detections, key=lambda d: -d.score):
        if d.score >= threshold:
            by_class[class_names[d.label] if class_names else str(d.label)].append(d)
    correct, reasons, groups = True, [], []
    for req in metadata.get("include", []):
        if "color" in req:
            raise ValueError("colour rules need a colour classifier; the digit judge has none")
        found = by_class.get(req["class"], [])[: req["count"]]
        matched = len(found) >= req["count"]
        if not matched:
            reasons.append(f"expected {req['class']}>={req['count']}, found {len(found)}")
        elif "position" in req:
            rel, target = req["position"]
            if groups[target] is None:
                matched = False
                reasons.append(f"no target for {req['class']} to be {rel}")
            else:
                for obj in found:
                    for tgt in groups[target]:
                        if rel not in relative_position(obj.box, tgt.box):
                            matched = False
                            found_rel = sorted(relative_position(obj.box, tgt.box))
                            reasons.append(f"expected {req['class']} {rel} target, found {found_rel}")
                            break
                    if not matched:
                        break
        correct &= matched
        groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        if len(by_class.get(req["class"], [])) >= req["count"]:
            correct = False
            reasons.append(f"expected {req['class']}<{req['count']}, found {len(by_class[req['class']])}")
    return correct, "; ".join(reasons)


def geneval_summary(records: list[dict]) -> dict:
    """Per-tag accuracy and their mean (GenEval's overall score). ``records``: ``{"tag", "correct"}`` per image."""
    tags: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        tags[r["tag"]].append(bool(r["correct"]))
    per_tag = {t: sum(v) / len(v) for t, v in sorted(tags.items())}
    return {"overall": sum(per_tag.values()) / len(per_tag) if per_tag else 0.0, "per_tag": per_tag}


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """[C,H,W] or [H,W] floats in [0,1] -> an array PIL can save."""
    a = np.asarray(image)
    if a.ndim == 3:
        a = a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)
    return np.round(np.clip(a, 0, 1) * 255).astype(np.uint8)


def image_grid(images: np.ndarray, columns: int, scale: int = 1, gap: int = 1) -> Image.Image:
    """[N,C,H,W] (C = 1 or 3) floats in [0,1] -> one PIL image, ``columns`` per row, grey gaps, pixels x ``scale``."""
    n, c, h, w = images.shape
    rows = -(-n // columns)
    canvas = np.full((rows * (h + gap) + gap, columns * (w + gap) + gap, c), 0.5, dtype=np.float32)
    for i, img in enumerate(images):
        r, k = divmod(i, columns)
        y, x = gap + r * (h + gap), gap + k * (w + gap)
        canvas[y : y + h, x : x + w] = np.clip(img, 0, 1).transpose(1, 2, 0)
    pil = Image.fromarray(
        np.round(canvas * 255).astype(np.uint8).squeeze(-1) if c == 1 else np.round(canvas * 255).astype(np.uint8)
    )
    return pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST) if scale > 1 else pil


def write_geneval_layout(out_dir: Path, metadata: list[dict], images: list[list[np.ndarray]]) -> None:
    """``out_dir/<NNNNN>/metadata.jsonl`` (the prompt's metadata line) and ``samples/<SSSS>.png``."""
    for i, (meta, imgs) in enumerate(zip(metadata, images)):
        d = Path(out_dir) / f"{i:05d}"
        (d / "samples").mkdir(parents=True, exist_ok=True)
        (d / "metadata.jsonl").write_text(json.dumps(meta) + "\n")
        for j, img in enumerate(imgs):
            Image.fromarray(_to_uint8(img)).save(d / "samples" / f"{j:04d}.png")


def read_geneval_layout(root: Path) -> list[tuple[dict, list[np.ndarray]]]:
    """(metadata, [H,W(,C)] float images) per prompt folder of a GenEval output directory, in order."""
    out = []
    for d in sorted(p for p in Path(root).iterdir() if p.is_dir() and (p / "metadata.jsonl").is_file()):
        meta = json.loads((d / "metadata.jsonl").read_text().splitlines()[0])
        imgs = [np.asarray(Image.open(p), dtype=np.float32) / 255.0 for p in sorted((d / "samples").glob("*.png"))]
        out.append((meta, imgs))
    return out


# ---------------------------------------------------------------------------------
# Frechet / kernel distances with pluggable feature extractors
# ---------------------------------------------------------------------------------


def kernel_distance(a: np.ndarray, b: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> float:
    """KID's estimator: unbiased MMD^2 with the kernel (x.y / d + 1)^3, averaged over random subsets."""
    rng = np.random.default_rng(seed)
    m = min(subset_size, len(a), len(b))
    d = a.shape[1]
    vals = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)].astype(np.float64)
        y = b[rng.choice(len(b), m, replace=False)].astype(np.float64)
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        off = (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        vals.append(off - 2 * kxy.mean())
    return float(np.mean(vals))


class InceptionFeatures:
    """torchvision Inception-v3 pool features (2048-d) from a local state-dict file."""

    name = "inception"
    is_inception = True

    def __init__(self, weights: str | Path, device: str = "cpu", batch_size: int = 64):
        from torchvision.models import inception_v3

        net = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=False)
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        net.fc = torch.nn.Identity()
        self.net, self.device, self.batch_size = net.eval().to(device), device, batch_size

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        """[N,C,H,W] or [N,H,W] floats in [0,1] -> [N, 2048]."""
        x = torch.as_tensor(images, dtype=torch.float32)
        if x.ndim == 3:
            x = x[:, None]
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        feats = []
        for i in range(0, len(x), self.batch_size):
            chunk = F.interpolate(x[i : i + self.batch_size], size=(299, 299), mode="bilinear", align_corners=False)
            feats.append(self.net(chunk.to(self.device) * 2 - 1).float().cpu())  # Inception expects [-1, 1]
        return torch.cat(feats).numpy()


class DigitFeatures:
    """The digit judge's hidden layer on 8x8 grey images: a domain extractor, never called FID."""

    name = "digit_mlp"
    is_inception = False

    def __init__(self):
        self.judge = get_judge()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.judge.features(to_gray8(images))


def to_gray8(images: np.ndarray) -> np.ndarray:
    """[N,C,H,W] or [N,H,W] floats in [0,1] -> [N,8,8] grey (the judge's input)."""
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    if x.ndim == 3:
        x = x[:, None]
    x = x.mean(1, keepdim=True)
    if x.shape[-1] != 8:
        x = F.interpolate(x, size=(8, 8), mode="bilinear", antialias=True, align_corners=False)
    return x[:, 0].clamp(0, 1).numpy()


FEATURE_EXTRACTORS: dict[str, Callable[..., object]] = {"inception": InceptionFeatures, "digit_mlp": DigitFeatures}


def distance_metrics(fake: np.ndarray, real: np.ndarray, extractor, kid_subset: int = 1000) -> dict[str, float]:
    """``fid``/``kid`` for the Inception extractor, ``fd_<name>``/``kd_<name>`` for any other."""
    f, r = extractor(fake), extractor(real)
    fd_key, kd_key = ("fid", "kid") if extractor.is_inception else (f"fd_{extractor.name}", f"kd_{extractor.name}")
    return {fd_key: frechet_distance(f, r), kd_key: kernel_distance(f, r, subset_size=kid_subset)}


def inception_metrics(fake: np.ndarray, real: np.ndarray, weights: str | Path) -> dict[str, float | str]:
    """FID/KID when the Inception weights file exists, else both say where they were looked for."""
    if not weights or not Path(weights).is_file():
        return {"fid": skipped(weights or "<unset: eval.inception_weights>"),
                "kid": skipped(weights or "<unset: eval.inception_weights>")}  # fmt: skip
    return distance_metrics(fake, real, InceptionFeatures(weights))


# ---------------------------------------------------------------------------------
# CLIP score
# ---------------------------------------------------------------------------------


@torch.no_grad()
def clip_score(
    images: np.ndarray, texts: list[str], arch: str, weights: str | Path, batch_size: int = 64
) -> float | str:
    """Mean of 100 * max(cos(image embedding, text embedding), 0) with a local open_clip checkpoint."""
    if not weights or not Path(weights).is_file():
        return skipped(weights or "<unset: eval.clip_weights>")
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=str(weights))
    tokenizer = open_clip.get_tokenizer(arch)
    model.eval()
    scores = []
    for i in range(0, len(images), batch_size):
        pil = [Image.fromarray(_to_uint8(im)).convert("RGB") for im in images[i : i + batch_size]]
        img = model.encode_image(torch.stack([preprocess(p) for p in pil]))
        txt = model.encode_text(tokenizer(texts[i : i + batch_size]))
        cos = F.cosine_similarity(img.float(), txt.float(), dim=-1)
        scores.append(100 * cos.clamp(min=0))
    return float(torch.cat(scores).mean())
