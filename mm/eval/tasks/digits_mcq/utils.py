"""digits_mcq: MMBench's prompt layout (hint, question, lettered options) and CircularEval.

Works on the bundled ``load_from_disk`` dataset and on VLMEvalKit TSVs (base64 images,
A-D columns, empty options as NaN), whichever the YAML points at.
"""

from mm.eval.scoring import circular_accuracy as _circular
from mm.eval.scoring import extract_option_letter
from mm.eval.sources import decode_base64_image, is_missing

LETTERS = "ABCD"


def options(doc):
    return {c: str(doc[c]) for c in LETTERS if c in doc and not is_missing(doc[c])}


def doc_to_visual(doc):
    img = doc["image"]
    return [decode_base64_image(img) if isinstance(img, str) else img]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kw = lmms_eval_specific_kwargs or {}
    hint = doc.get("hint")
    text = "" if is_missing(hint) else f"Hint: {hint}\n"
    text += doc["question"] + "".join(f"\n{c}. {o}" for c, o in options(doc).items())
    return f"{kw.get('pre_prompt', '')}{text}{kw.get('post_prompt', '')}"


def process_results(doc, results):
    letter = extract_option_letter(results[0], options(doc))
    correct = letter == doc["answer"]
    rec = {"group": int(doc["circular_group"]), "rotation": int(doc["index"]) % 4, "correct": correct,
           "category": doc["category"]}  # fmt: skip
    return {"circular_accuracy": rec, "vanilla_accuracy": rec, "rotation_accuracy": float(correct),
            "letter_extracted": float(letter is not None)}  # fmt: skip


def circular_accuracy(results):
    return _circular(results)


def vanilla_accuracy(results):
    first = [r["correct"] for r in results if r["rotation"] == 0]
    return sum(first) / len(first) if first else 0.0
