"""digits_longctx: the digit of the marked image in an album of n digits (data/bundled/longctx.py)."""

import json


def _check(doc) -> None:
    if "marked" not in doc["question"]:  # rows of the earlier tasks (labels, "which image is a d ?")
        raise ValueError(
            "data/bench/digits_longctx was built by an older data/bundled/longctx.py: rebuild it with "
            "`python -m data.bundled.benchmark` (or delete the folder; eval.py rebuilds missing datasets)"
        )


def doc_to_visual(doc):
    _check(doc)
    return list(doc["images"])


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    """The album prompt: one ``<image>`` line per image, the marked one followed by "marked", then the question."""
    _check(doc)
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def process_results(doc, results):
    """Exact match of the digit; ``neighbour``: a wrong answer that is the digit of an adjacent image."""
    answer = results[0].strip()
    digits, i = json.loads(doc["digits"]), doc["index"]
    near = {str(digits[j]) for j in (i - 1, i + 1) if 0 <= j < len(digits)}
    right = answer == doc["answer"]
    return {"accuracy": float(right), "neighbour": float(not right and answer in near)}
