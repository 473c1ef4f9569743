"""digits_mme: existence, count, position and recognition pairs; MME's scores.

* lmms-eval's names, its definitions: ``mme_perception_score`` and ``mme_cognition_score``,
  the sum of the category scores (100 * (acc + acc+), 0..200 each) of each split.
  lmms-eval's MME code calls a category perception when it is one of MME's perception
  categories (existence, count, position here) and cognition otherwise. ``recognition``
  ("Is this the digit d?") is no MME category, so lmms-eval's rule puts it in cognition and
  we keep that assignment, so that both give the same numbers on these documents:
  here ``mme_cognition_score`` is the recognition score alone (0..200), a perception-like
  task, not MME's reasoning subtasks. ``mme_recognition_score`` reports it under its own name.
* Ours: ``mme_total_score`` (every category, = perception + cognition), ``mme_acc`` and
  ``mme_acc_plus`` over all questions / images, and per category ``mme_<category>_acc``,
  ``mme_<category>_acc_plus``, ``mme_<category>_score``.

tests/test_scoring_reference.py runs lmms-eval's ``mme`` functions on these documents and
checks that the lmms-eval names carry exactly its numbers.
"""

from mm.eval.scoring import mme_lmms_score, mme_parse, mme_scores, mme_split

MME_SUFFIX = " Please answer yes or no."
OUR_KEYS = ("mme_total_score", "mme_acc", "mme_acc_plus", "mme_categories")


def doc_to_visual(doc: dict) -> list:
    return [doc["image"]]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """lmms-eval's MME rule: a pre/post prompt replaces the dataset's own " Please answer yes or no."."""
    kw = lmms_eval_specific_kwargs or {}
    q = doc["question"].strip()
    if kw.get("pre_prompt"):
        q = kw["pre_prompt"] + q.replace(MME_SUFFIX, "")
    if kw.get("post_prompt"):
        q = q.replace(MME_SUFFIX, "") + kw["post_prompt"]
    return q


def process_results(doc: dict, results: list[str]) -> dict[str, dict]:
    """Our records under our names; lmms-eval's record under the one key of the document's split."""
    rec = {"category": doc["category"], "image_id": doc["question_id"], "prediction": results[0],
           "label": doc["answer"]}  # fmt: skip
    gt = doc["answer"].lower().strip().replace(".", "")
    lmms = {"question_id": doc["question_id"], "category": doc["category"],
            "score": 1.0 if mme_parse(results[0]) == gt else 0.0}  # fmt: skip
    return {**{k: rec for k in OUR_KEYS}, f"mme_{mme_split(doc['category'])}_score": lmms}


def split_score(results: list[dict]) -> float | dict:
    """lmms-eval's perception or cognition score; nothing when no document of that split was asked
    (lmms-eval leaves such a metric out too)."""
    return mme_lmms_score(results) if results else {}


def total_score(results: list[dict]) -> float:
    return mme_scores(results)["total_score"]


def acc(results: list[dict]) -> float:
    return mme_scores(results)["acc"]


def acc_plus(results: list[dict]) -> float:
    return mme_scores(results)["acc_plus"]


def per_category(results: list[dict]) -> dict[str, float]:
    """One number per category and measure, e.g. ``mme_count_acc_plus``, ``mme_recognition_score``."""
    out = {}
    for cat, s in mme_scores(results)["categories"].items():
        out.update({f"mme_{cat}_acc": s["acc"], f"mme_{cat}_acc_plus": s["acc_plus"], f"mme_{cat}_score": s["score"]})
    return out
