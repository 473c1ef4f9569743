"""digits_geneval: GenEval's metadata and rules with a digit detector.

A prompt with a rule the judge cannot check (a colour: the digits are grey and the judge has
no colour classifier) is judged None ("unsupported"), counted in ``geneval_unsupported_prompts``
and left out of every accuracy, the judge's ceiling and the chance floor included.
"""

import json

import numpy as np

from data.bundled.benchmark import Sampler, render_geneval
from data.bundled.judge import detect_digits, get_judge
from mm.eval.generation import geneval_judge, geneval_summary


def doc_to_metadata(doc):
    return json.loads(doc["metadata"])


def _gray(image):
    a = np.asarray(image, dtype=np.float32)
    return a.mean(0) if a.ndim == 3 else a


def judge_images(metadata, images):
    judge = get_judge(crops=True)
    return [geneval_judge(metadata, detect_digits(_gray(im), judge)) for im in images]


def process_results(doc, images):
    meta = doc_to_metadata(doc)
    verdicts = judge_images(meta, images)
    return {"geneval": {"tag": meta["tag"], "metadata": meta, "correct": [c for c, _ in verdicts],
                        "reasons": [r for _, r in verdicts], "size": int(np.asarray(images[0]).shape[-1])}}  # fmt: skip


def aggregate(results):
    model = geneval_summary([{"tag": r["tag"], "correct": c} for r in results for c in r["correct"]])
    n_unsupported = sum(any(c is None for c in r["correct"]) for r in results)
    overall = model["overall"] if model["per_tag"] or not n_unsupported else "unsupported: no prompt can be judged"
    out = {"geneval_overall": overall, **{f"geneval_{t}": v for t, v in model["per_tag"].items()}}
    out["geneval_unsupported_prompts"] = n_unsupported
    # ceiling: real canvases that satisfy each prompt; floor: real canvases of another prompt with the same tag
    sampler = Sampler("heldout", "digits_geneval_reference")
    metas = [r["metadata"] for r in results]
    ceiling, floor = [], []
    for i, m in enumerate(metas):
        same_tag = [k for k, o in enumerate(metas) if o["tag"] == m["tag"] and o["prompt"] != m["prompt"]]
        other = metas[same_tag[i % len(same_tag)]] if same_tag else m
        for _ in range(len(results[i]["correct"])):
            real = render_geneval(m, sampler).astype(np.float32) / 255
            wrong = render_geneval(other, sampler).astype(np.float32) / 255
            ceiling.append({"tag": m["tag"], "correct": judge_images(m, [real])[0][0]})
            floor.append({"tag": m["tag"], "correct": judge_images(m, [wrong])[0][0]})
    ceil, flo = geneval_summary(ceiling), geneval_summary(floor)
    out["geneval_overall_judge_ceiling"] = ceil["overall"]
    out.update({f"geneval_{t}_judge_ceiling": v for t, v in ceil["per_tag"].items()})
    out["geneval_overall_chance_floor"] = flo["overall"]
    out["generated_image_size"] = results[0]["size"] if results else 0  # canvases are 32 px: smaller can't hold them
    return out
