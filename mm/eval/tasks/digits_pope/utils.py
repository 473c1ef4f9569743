"""digits_pope: "Is there a d in the image?" on three-digit canvases.

Two rule sets on the same answers, each under its own names:

* lmms-eval's POPE task (``pope_accuracy``, ``pope_precision``, ``pope_recall``,
  ``pope_f1_score``, ``pope_yes_ratio``): exact yes/no matches after lower-case and strip;
  ``pope_yes_ratio`` is the share of yes *labels* (0.5 on balanced splits).
* POPE's own evaluation (``pope_orig_*``): the first sentence decides, "no"/"not" -> no and
  anything else (a digit, an empty answer) -> yes; ``pope_orig_predicted_yes_ratio`` is the
  share of answers taken as yes.

tests/test_scoring_reference.py runs lmms-eval's ``pope`` functions on these documents and
checks that the lmms-eval names carry exactly its numbers.
"""

from mm.eval.scoring import pope_lmms_metrics, pope_orig_metrics

LMMS_KEYS = ("accuracy", "precision", "recall", "f1_score", "yes_ratio")
ORIG_KEYS = ("accuracy", "precision", "recall", "f1", "predicted_yes_ratio")


def doc_to_visual(doc: dict) -> list:
    return [doc["image"]]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question'].strip()}{kw.get('post_prompt', '')}"


def process_results(doc: dict, results: list[str]) -> dict[str, dict]:
    rec = {"question_id": doc["question_id"], "prediction": results[0], "label": doc["answer"]}
    return {**{f"pope_{k}": rec for k in LMMS_KEYS}, **{f"pope_orig_{k}": rec for k in ORIG_KEYS}}


# one aggregation per metric: lmms-eval calls each by name from the YAML's metric_list


def accuracy(results: list[dict]) -> float:
    return pope_lmms_metrics(results)["accuracy"]


def precision(results: list[dict]) -> float:
    return pope_lmms_metrics(results)["precision"]


def recall(results: list[dict]) -> float:
    return pope_lmms_metrics(results)["recall"]


def f1_score(results: list[dict]) -> float:
    return pope_lmms_metrics(results)["f1_score"]


def yes_ratio(results: list[dict]) -> float:
    return pope_lmms_metrics(results)["yes_ratio"]


def orig_accuracy(results: list[dict]) -> float:
    return pope_orig_metrics(results)["accuracy"]


def orig_precision(results: list[dict]) -> float:
    return pope_orig_metrics(results)["precision"]


def orig_recall(results: list[dict]) -> float:
    return pope_orig_metrics(results)["recall"]


def orig_f1(results: list[dict]) -> float:
    return pope_orig_metrics(results)["f1"]


def orig_predicted_yes_ratio(results: list[dict]) -> float:
    return pope_orig_metrics(results)["predicted_yes_ratio"]
