"""digits_longctx: the digit of the image with a given label in an album of n labelled digits (data/longctx.py)."""

import json


def _check(doc) -> None:
    if "label" not in doc:  # rows of the v1 task ("which image is a d ?") lack it
        raise ValueError(
            "data/bench/digits_longctx was built by an older data/longctx.py: rebuild it with "
            "`python -m data.bundled.benchmark` (or delete the folder; eval.py rebuilds missing datasets)"
        )


def doc_to_visual(doc):
    _check(doc)
    return list(doc["images"])


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    """The album prompt: one ``<image>`` marker per image, each followed by its label, then the question."""
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
