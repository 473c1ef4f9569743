"""digits_mme: existence, count, position and recognition pairs; MME's acc and acc+."""

from mm.eval.scoring import mme_scores

MME_SUFFIX = " Please answer yes or no."


def doc_to_visual(doc):
    return [doc["image"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    """lmms-eval's MME rule: a pre/post prompt replaces the dataset's own " Please answer yes or no."."""
    kw = lmms_eval_specific_kwargs or {}
    q = doc["question"].strip()
    if kw.get("pre_prompt"):
        q = kw["pre_prompt"] + q.replace(MME_SUFFIX, "")
    if kw.get("post_prompt"):
        q = q.replace(MME_SUFFIX, "") + kw["post_prompt"]
    return q


def process_results(doc, results):
    rec = {"category": doc["category"], "image_id": doc["question_id"], "prediction": results[0],
           "label": doc["answer"]}  # fmt: skip
    return {k: rec for k in ("mme_total_score", "mme_acc", "mme_acc_plus", "mme_categories")}


def total_score(results):
    return mme_scores(results)["total_score"]


def acc(results):
    return mme_scores(results)["acc"]


def acc_plus(results):
    return mme_scores(results)["acc_plus"]


def per_category(results):
    """One number per category and measure, e.g. ``mme_count_acc_plus``."""
    out = {}
    for cat, s in mme_scores(results)["categories"].items():
        out.update({f"mme_{cat}_acc": s["acc"], f"mme_{cat}_acc_plus": s["acc_plus"], f"mme_{cat}_score": s["score"]})
    return out
