"""digits_pope: "Is there a d in the image?" on three-digit canvases; POPE's metrics."""

from mm.eval.scoring import pope_metrics


def doc_to_visual(doc):
    return [doc["image"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question'].strip()}{kw.get('post_prompt', '')}"


def process_results(doc, results):
    rec = {"question_id": doc["question_id"], "prediction": results[0], "label": doc["answer"]}
    keys = ("accuracy", "precision", "recall", "f1", "yes_ratio", "exact_match_accuracy")
    return {f"pope_{k}": rec for k in keys}


def accuracy(results):
    return pope_metrics(results)["accuracy"]


def precision(results):
    return pope_metrics(results)["precision"]


def recall(results):
    return pope_metrics(results)["recall"]


def f1(results):
    return pope_metrics(results)["f1"]


def yes_ratio(results):
    return pope_metrics(results)["yes_ratio"]


def exact_match_accuracy(results):
    return pope_metrics(results)["exact_match_accuracy"]
