"""digits_longctx: which image of an album of n labelled digits shows the asked digit (data/longctx.py)."""


def doc_to_visual(doc):
    return list(doc["images"])


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    """The album prompt: one ``<image>`` marker per image, each followed by its label, then the question."""
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def process_results(doc, results):
    """Exact match of the two label words; ``in_album``: the answer names some image of the album."""
    words = results[0].split()
    label = int(words[0]) * 10 + int(words[1]) if len(words) == 2 and all(w.isdigit() for w in words) else -1
    return {"accuracy": float(" ".join(words) == doc["answer"]), "in_album": float(0 <= label < doc["n_images"])}
