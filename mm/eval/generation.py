"""Generation metrics: GenEval's layout and rules, FID/KID on the standard FID Inception, CLIP score.

* GenEval: prompts come as its metadata lines (``tag``, ``include``/``exclude`` with
  ``class`` and ``count``, ``position: [relation, index of the reference include]``);
  images are written as ``<dir>/<NNNNN>/metadata.jsonl`` + ``samples/<SSSS>.png``;
  an image is correct when the detections satisfy every include/exclude rule, with
  GenEval's confidence thresholds (0.3; 0.9 for counting) and its relative-position
  test (box centres, offsets shrunk by 0.1 x the box sizes). The overall score is the
  mean of the per-tag accuracies. A rule the judge cannot check (a ``color``: the digit
  judge sees grey digits and has no colour classifier) makes the image *unsupported*:
  counted, and left out of the accuracies, never guessed.
* ``fid``/``kid``: the standard FID Inception network (the TF-ported 2015-12-05 weights that
  pytorch-fid, torchmetrics and torch-fidelity use, ``pt_inception-2015-12-05-6726825d.pth``)
  through torch-fidelity, loaded strictly from a local file; no file gives
  ``"skipped: weights not found at <path>"`` (nothing is downloaded). Frechet and kernel
  distances on any other extractor's features are ``fd_<name>``/``kd_<name>``, never FID/KID.
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


def unsupported_rules(metadata: dict) -> list[str]:
    """The rules of a GenEval prompt that the digit judge cannot check: colours (it has no colour classifier)."""
    return [f"{req.get('color')} {req.get('class')}" for key in ("include", "exclude")
            for req in metadata.get(key, []) if "color" in req]  # fmt: skip


def geneval_judge(
    metadata: dict, detections: list[Detection], class_names: dict[int, str] | None = None
) -> tuple[bool | None, str]:
    """(correct, reason) of one image under GenEval's rules; (None, "unsupported: ...") for colour rules."""
    unsupported = unsupported_rules(metadata)
    if unsupported:
        return None, f"unsupported: colour rule ({', '.join(unsupported)}): the digit judge has no colour classifier"
    threshold = GENEVAL_COUNTING_THRESHOLD if metadata.get("tag") == "counting" else GENEVAL_THRESHOLD
    by_class: dict[str, list[Detection]] = defaultdict(list)
    for d in sorted(detections, key=lambda d: -d.score):
        if d.score >= threshold:
            by_class[class_names[d.label] if class_names else str(d.label)].append(d)
    correct, reasons, groups = True, [], []
    for req in metadata.get("include", []):
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
    """Per-tag accuracy and their mean (GenEval's overall score). ``records``: ``{"tag", "correct"}`` per image.

    ``correct`` None (a rule the judge cannot check) is counted in ``unsupported`` and left out of
    the accuracies rather than scored as wrong.
    """
    tags: dict[str, list[bool]] = defaultdict(list)
    unsupported = 0
    for r in records:
        if r["correct"] is None:
            unsupported += 1
        else:
            tags[r["tag"]].append(bool(r["correct"]))
    per_tag = {t: sum(v) / len(v) for t, v in sorted(tags.items())}
    overall = sum(per_tag.values()) / len(per_tag) if per_tag else 0.0
    return {"overall": overall, "per_tag": per_tag, "unsupported": unsupported}


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


FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's name; torch-fidelity's is the same file


def _fid_network(weights: str | Path) -> torch.nn.Module:
    """torch-fidelity's FID Inception with the state dict of ``weights``, loaded strictly; ValueError if it differs.

    The file is read with ``weights_only=True`` first (tensors only, no code), then handed to
    torch-fidelity, which loads it with ``load_state_dict(strict=True)``: a missing, extra or
    differently shaped tensor fails, naming the keys.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    state = torch.load(weights, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{weights}: not a state dict of tensors (expected FID's Inception, {FID_WEIGHTS_FILE})")
    hint = ""
    if any(k.startswith("AuxLogits.") for k in state):
        hint = " (this looks like torchvision's ImageNet inception_v3, a different network from FID's)"
    try:
        return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights))
    except RuntimeError as e:
        raise ValueError(
            f"{weights} is not the FID Inception state dict (the TF-ported 2015-12-05 weights, {FID_WEIGHTS_FILE}, "
            f"used by pytorch-fid, torchmetrics and torch-fidelity){hint}: {e}"
        ) from e


class FIDInceptionFeatures:
    """The standard FID Inception's 2048-d pool features (torch-fidelity's network) from a local weights file."""

    name = "fid_inception"

    def __init__(self, weights: str | Path, device: str = "cpu", batch_size: int = 64):
        self.net, self.device, self.batch_size = _fid_network(weights).to(device), device, batch_size

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        """[N,C,H,W] or [N,H,W] floats in [0,1] -> [N, 2048].

        Images go in as 8-bit RGB, as FID's reference pipeline reads PNGs; the network resizes
        them to 299 px itself (TF1-style bilinear) and scales to [-1, 1].
        """
        x = torch.as_tensor(np.ascontiguousarray(images), dtype=torch.float32)  # views (x[::-1]) too
        if x.ndim == 3:
            x = x[:, None]
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
        feats = []
        for i in range(0, len(x), self.batch_size):
            feats.append(self.net(x[i : i + self.batch_size].to(self.device))[0].cpu())  # (features,) per batch
        return torch.cat(feats).numpy()  # float32, as torch-fidelity's own pipeline hands them to its metrics


class DigitFeatures:
    """The digit judge's hidden layer on 8x8 grey images: a domain extractor, never called FID."""

    name = "digit_mlp"

    def __init__(self):
        self.judge = get_judge()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.judge.features(to_gray8(images))


def to_gray8(images: np.ndarray) -> np.ndarray:
    """[N,C,H,W] or [N,H,W] floats in [0,1] -> [N,8,8] grey (the judge's input)."""
    x = torch.as_tensor(np.ascontiguousarray(images), dtype=torch.float32)  # views (x[::-1]) too
    if x.ndim == 3:
        x = x[:, None]
    x = x.mean(1, keepdim=True)
    if x.shape[-1] != 8:
        x = F.interpolate(x, size=(8, 8), mode="bilinear", antialias=True, align_corners=False)
    return x[:, 0].clamp(0, 1).numpy()


FEATURE_EXTRACTORS: dict[str, Callable[..., object]] = {"fid_inception": FIDInceptionFeatures,
                                                       "digit_mlp": DigitFeatures}  # fmt: skip


def fid_kid(fake: np.ndarray, real: np.ndarray) -> dict[str, float]:
    """FID and KID of two sets of FID Inception features ([N, 2048] float32), by torch-fidelity's own functions.

    KID: 100 subsets of min(1000, both set sizes) samples, torch-fidelity's polynomial kernel and seed.
    """
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, kid_features_to_metric

    if min(len(fake), len(real)) < 2:
        raise ValueError(f"FID/KID need at least 2 images per set, got {len(fake)} and {len(real)}")
    f, r = torch.as_tensor(fake), torch.as_tensor(real)
    fid = fid_statistics_to_metric(fid_features_to_statistics(f), fid_features_to_statistics(r), verbose=False)
    kid = kid_features_to_metric(f, r, kid_subset_size=min(1000, len(f), len(r)), verbose=False)
    return {"fid": fid[KEY_METRIC_FID], "kid": kid[KEY_METRIC_KID_MEAN]}


def distance_metrics(fake: np.ndarray, real: np.ndarray, extractor, kid_subset: int = 1000) -> dict[str, float]:
    """``fid``/``kid`` for the FID Inception, ``fd_<name>``/``kd_<name>`` (our estimators) for any other extractor."""
    f, r = extractor(fake), extractor(real)
    if isinstance(extractor, FIDInceptionFeatures):
        return fid_kid(f, r)
    fd_key, kd_key = f"fd_{extractor.name}", f"kd_{extractor.name}"
    return {fd_key: frechet_distance(f, r), kd_key: kernel_distance(f, r, subset_size=kid_subset)}


def inception_metrics(fake: np.ndarray, real: np.ndarray, weights: str | Path) -> dict[str, float | str]:
    """FID/KID when the FID Inception weights file exists, else both say where they were looked for."""
    if not weights or not Path(weights).is_file():
        return {"fid": skipped(weights or "<unset: eval.inception_weights>"),
                "kid": skipped(weights or "<unset: eval.inception_weights>")}  # fmt: skip
    return distance_metrics(fake, real, FIDInceptionFeatures(weights))


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
