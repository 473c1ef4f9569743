"""digits_vqa: the question the tiny model is trained on, about held-out digits."""

from mm.eval.scoring import vqa_accuracy


def doc_to_visual(doc):
    return [doc["image"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def process_results(doc, results):
    pred = results[0].strip()
    return {"accuracy": float(pred == doc["answer"]), "normalized_accuracy": vqa_accuracy(pred, [doc["answer"]])}
