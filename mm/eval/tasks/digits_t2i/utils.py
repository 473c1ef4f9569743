"""digits_t2i: metrics of images drawn from "draw the digit d" (any image head: only generate() is called)."""

import numpy as np

from data.bundled.digits import load_digit_split
from data.bundled.judge import frechet_distance, get_judge
from mm.eval.digits import diversity, save_grid
from mm.eval.generation import DigitFeatures, clip_score, distance_metrics, inception_metrics, to_gray8


def process_results(doc, images):
    return {"t2i": {"label": int(doc["label"]), "name": doc["name"], "prompt": doc["prompt"],
                    "images": np.stack(images)}}  # fmt: skip


def aggregate(results, context):
    judge = get_judge()
    gray = [to_gray8(r["images"]) for r in results]
    images = np.concatenate(gray)
    labels = np.concatenate([[r["label"]] * len(g) for r, g in zip(results, gray)])
    cols = context.eval.grid_columns
    for r, g in zip(results, gray):
        save_grid(g, context.out_dir / f"samples_{r['name']}.png", cols)
    save_grid(np.concatenate([g[:cols] for g in gray]), context.out_dir / "samples_grid.png", cols)

    real_te, _ = load_digit_split("heldout")
    real_tr, y_tr = load_digit_split("train")
    rng = np.random.default_rng(0)
    n = min(len(images), len(real_tr))
    sub = rng.choice(len(real_tr), size=n, replace=False)
    noise = rng.uniform(0, 1, size=(n, 8, 8)).astype(np.float32)
    f_te = judge.features(real_te)
    out = {
        "classifier_accuracy": float((judge.predict(images) == labels).mean()),
        "fd": frechet_distance(judge.features(images), f_te),
        "fd_real_floor": frechet_distance(judge.features(real_tr[sub]), f_te),
        "fd_noise_ceiling": frechet_distance(judge.features(noise), f_te),
        "classifier_heldout_accuracy": judge.heldout_accuracy,
        "diversity": diversity(images, labels),
        "real_diversity": diversity(real_tr[sub], y_tr[sub]),
    }
    out["kd_digit_mlp"] = distance_metrics(images, real_te, DigitFeatures())["kd_digit_mlp"]
    out["kd_digit_mlp_real_floor"] = distance_metrics(real_tr[sub], real_te, DigitFeatures())["kd_digit_mlp"]
    raw = np.concatenate([r["images"] for r in results])
    out.update(inception_metrics(raw, real_te, context.eval.inception_weights))
    prompts = [r["prompt"] for r, g in zip(results, gray) for _ in range(len(g))]
    out["clip_score"] = clip_score(raw, prompts, context.eval.clip_arch, context.eval.clip_weights)
    return out
