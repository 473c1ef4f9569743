"""digits_vqa as lmms-eval loglikelihood tasks (lmms-eval only; see the YAML files).

Both tasks score with these functions, not lmms-eval's built-in ones: lmms-eval 0.7.3 turns every
model output that is not text into its ``str()`` before scoring (``api/instance.py:
unwrap_generation_output``), so a ``(log p, greedy)`` pair arrives as ``"(-0.01, True)"``, which its
built-in loglikelihood scoring cannot unpack, and its multiple_choice scoring takes the argmin of
what it expects to be losses. :func:`pair` reads either form back.
"""

import ast
import math

import numpy as np


def doc_to_visual(doc):
    return [doc["image"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def pair(result) -> tuple[float, bool]:
    """A ``(log p, greedy)`` response, as the model returned it or as lmms-eval's ``str()`` of it."""
    value = ast.literal_eval(result) if isinstance(result, str) else result
    ll, greedy = value
    if not isinstance(greedy, bool) or not math.isfinite(float(ll)):
        raise ValueError(f"not a (log p, greedy) response: {result!r}")
    return float(ll), greedy


def loglik_results(doc, results):
    """One request per document: its log p feeds perplexity (exp(-mean)), its greedy flag acc."""
    ll, greedy = pair(results[0])
    return {"perplexity": ll, "acc": float(greedy)}


def choice_results(doc, results):
    """One (log p, greedy) per choice, in doc_to_choice order; the most likely choice is the answer."""
    lls = [pair(r)[0] for r in results]
    return {"acc": float(int(np.argmax(lls)) == int(doc["label"]))}
