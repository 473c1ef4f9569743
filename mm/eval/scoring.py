"""Scoring rules as the reference toolkits apply them (rule-based: no GPT judge anywhere).

* Multiple choice: VLMEvalKit's rule-based matcher (``can_infer``: the option letter, then
  the option text) and MMBench's CircularEval (a question counts only if every rotation
  of its options is answered correctly).
* POPE, two rule sets under different names: lmms-eval's POPE task (exact yes/no matches;
  its ``yes_ratio`` is the share of yes *labels*) and POPE's own evaluation (first sentence;
  "no"/"not" -> no, else yes; its yes ratio is the share of *predicted* yes).
* MME: Otter/lmms-eval yes/no parsing; acc per question, acc+ per image (both of its
  two questions right); the score of a category is acc + acc+ in percent (0..200);
  lmms-eval's perception and cognition scores sum the categories of each split.
* VQA: the official answer normalisation (punctuation, number words, articles,
  contractions) and the 10-annotator accuracy min(1, matches/3) averaged over the
  leave-one-out subsets.
* MMMU: its multiple-choice parser (bracketed letter, then a bare letter, then option
  text; the last mention wins; a seeded random letter when nothing parses, as MMMU does)
  and its open-answer parser (key sub-responses, numbers, normalised strings).

Every function is pure; tests/test_scoring.py checks each against hand-computed cases and
tests/test_scoring_reference.py against lmms-eval's own task code when it is installed.
"""

from __future__ import annotations

import itertools
import random
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence

# ---------------------------------------------------------------------------------
# Multiple choice (VLMEvalKit rules) and CircularEval (MMBench)
# ---------------------------------------------------------------------------------

_OPTION_PUNCT = ".()[],:;!*#{}"
API_FAILURE = "Failed to obtain answer via API"
REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
# "... answer is B", "The correct answer is **C**": VLMEvalKit's pattern is case-insensitive, so a lower-case
# letter word counts too ("the answer is a dog" names A); kept as the reference has it.
_ANSWER_IS = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")


def infer_option(answer: str, choices: dict[str, str]) -> str | None:
    """VLMEvalKit's ``can_infer_option``: the option letter an answer names as a word, else None.

    A known refusal means "none of them" (``Z``). After ``.()[],:;!*#{}`` become spaces, exactly
    one option letter must be a word, and it must be among the last four words (so a letter early
    in a long sentence, such as the article "A", is not taken); no option letter but a lone ``Z``
    word is ``Z``. Otherwise "answer is <letter>" decides, when it names an option.
    VLMEvalKit's extra check for an article "A" runs only with its VERBOSE switch on, so not here.
    """
    if API_FAILURE in answer:
        return None
    if any(r in answer for r in REFUSALS):
        return "Z"
    text = answer
    for ch in _OPTION_PUNCT:
        text = text.replace(ch, " ")
    words = text.split()
    named = [c for c in choices if c in words]
    if len(named) == 1:
        if words.index(named[0]) > len(words) - 5:
            return named[0]
    elif not named and "Z" in words:
        return "Z"
    m = _ANSWER_IS.search(answer)
    if m and m.group(1).upper() in choices:
        return m.group(1).upper()
    return None


def infer_text(answer: str, choices: dict[str, str]) -> str | None:
    """VLMEvalKit's ``can_infer_text``: the one option whose text occurs in the answer (case-insensitive).

    Answers longer than twice the options' total length are not searched (a long explanation
    mentions several options); two or more options found is no answer.
    """
    low = answer.lower()
    if len(low) > 2 * sum(len(str(t)) for t in choices.values()):
        return None
    hits = [c for c, t in choices.items() if str(t).lower() in low]
    return hits[0] if len(hits) == 1 else None


def extract_option_letter(answer: str, choices: dict[str, str]) -> str | None:
    """VLMEvalKit's rule-based ``can_infer``: the option letter first, then the option text; None if neither.

    ``choices`` maps letters to option texts (NaN/empty options already dropped, as VLMEvalKit's
    ``build_choices`` does). ``"Z"`` means the answer declines every option. With several letters
    named, the letter rule gives nothing (unless "answer is X") and the option text decides.
    Follows ``vlmeval/utils/matching_util.py`` at open-compass/VLMEvalKit e8e78f05 (2026-08).
    """
    answer = str(answer)
    return infer_option(answer, choices) or infer_text(answer, choices)


def rotate_options(options: Sequence[str], answer_index: int, shift: int) -> tuple[list[str], int]:
    """Options rotated left by ``shift`` and the new index of the answer (CircularEval)."""
    n = len(options)
    rotated = [options[(i + shift) % n] for i in range(n)]
    return rotated, (answer_index - shift) % n


def circular_accuracy(records: Iterable[dict]) -> float:
    """Share of question groups whose every rotation is correct.

    ``records``: ``{"group": id of the original question, "correct": bool}`` per rotation.
    """
    groups: dict = defaultdict(list)
    for r in records:
        groups[r["group"]].append(bool(r["correct"]))
    if not groups:
        return 0.0
    return sum(all(v) for v in groups.values()) / len(groups)


def mean_score(records: Iterable[dict]) -> float:
    """Mean of ``record["correct"]`` (or ``record["score"]``) over records."""
    vals = [float(r["correct"] if "correct" in r else r["score"]) for r in records]
    return sum(vals) / len(vals) if vals else 0.0


# ---------------------------------------------------------------------------------
# POPE
# ---------------------------------------------------------------------------------


def pope_normalize(answer: str) -> str:
    """POPE's official rule: first sentence, commas dropped; "no"/"not"/"No" as a word -> no, else yes."""
    text = answer.split(".")[0] if "." in answer else answer
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    """Precision, recall and F1 (0 where undefined), in lmms-eval's order of operations."""
    precision = tp / (tp + fp) if tp + fp > 0 else 0.0
    recall = tp / (tp + fn) if tp + fn > 0 else 0.0
    f1 = 2 * (precision * recall) / (precision + recall) if precision + recall > 0 else 0.0
    return precision, recall, f1


def pope_orig_metrics(records: Iterable[dict]) -> dict[str, float]:
    """POPE's own evaluation: accuracy, precision, recall, F1 (positive = yes) and the predicted-yes ratio.

    ``records``: ``{"prediction": raw answer, "label": "yes"|"no"}``. Every prediction is first
    normalised with :func:`pope_normalize`, so a digit, an empty or any answer without no/not is a yes.
    """
    records = list(records)
    tp = fp = tn = fn = 0
    for r in records:
        label = r["label"].strip().lower()
        if pope_normalize(r["prediction"]) == "yes":
            tp += label == "yes"
            fp += label == "no"
        else:
            tn += label == "no"
            fn += label == "yes"
    n = len(records)
    precision, recall, f1 = _prf(tp, fp, fn)
    return {"accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall, "f1": f1,
            "predicted_yes_ratio": (tp + fp) / n if n else 0.0}  # fmt: skip


def pope_lmms_metrics(records: Iterable[dict]) -> dict[str, float]:
    """lmms-eval's POPE numbers: exact yes/no matches, no normalisation beyond lower-case and strip.

    ``accuracy``: answer == label. ``precision``/``recall``/``f1_score``: an answer that is
    neither exactly "yes" nor "no" is no positive prediction and no false negative either (it
    only lowers accuracy). ``yes_ratio``: the share of questions whose *label* is yes.
    """
    records = list(records)
    tp = fp = fn = hits = gt_yes = gt_no = 0
    for r in records:
        pred, gt = r["prediction"].lower().strip(), r["label"].lower().strip()
        hits += pred == gt
        tp += gt == "yes" and pred == "yes"
        fp += gt == "no" and pred == "yes"
        fn += gt == "yes" and pred == "no"
        gt_yes += gt == "yes"
        gt_no += gt == "no"
    precision, recall, f1 = _prf(tp, fp, fn)
    return {"accuracy": hits / len(records) if records else 0.0, "precision": precision, "recall": recall,
            "f1_score": f1, "yes_ratio": gt_yes / (gt_yes + gt_no) if gt_yes + gt_no else 0.0}  # fmt: skip


# ---------------------------------------------------------------------------------
# MME
# ---------------------------------------------------------------------------------


def mme_parse(answer: str) -> str:
    """yes | no | other: the answer itself, a lone y/n, or yes/no within its first 4 characters."""
    a = answer.lower().strip().replace(".", "")
    if a in ("yes", "no"):
        return a
    if len(a) == 1:
        return {"y": "yes", "n": "no"}.get(a, "other")
    head = a[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


# lmms-eval's MME split (``tasks/mme/utils.py``): these categories are perception; every other category,
# whatever it is called, goes to cognition.
MME_PERCEPTION_CATEGORIES = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                             "artwork", "OCR")  # fmt: skip


def mme_split(category: str) -> str:
    """``"perception"`` or ``"cognition"``, as lmms-eval's MME task assigns a category."""
    return "perception" if category in MME_PERCEPTION_CATEGORIES else "cognition"


def _mme_category_score(images: dict[str, list[float]], category: str) -> float:
    """Mean over images of 100 * (share of its questions right) + 100 * (both right): 0..200.

    Summed image by image as lmms-eval does, so the floats are the same; MME pairs two
    questions per image, else ValueError names the image.
    """
    total = 0.0
    for image_id, scores in images.items():
        if len(scores) != 2:
            raise ValueError(
                f"MME needs two questions per image; category {category!r} image {image_id!r} has {len(scores)}"
            )
        acc = sum(scores) / len(scores) * 100.0
        acc_plus = (sum(scores) == 2) * 100.0
        total += acc_plus + acc
    return total / len(images)


def mme_lmms_score(records: Iterable[dict]) -> float:
    """lmms-eval's ``mme_perception_score``/``mme_cognition_score``: the sum of the category scores.

    ``records``: ``{"question_id": image id, "category", "score": 1.0|0.0}`` for the questions of
    one split; categories are summed in order of first appearance, as lmms-eval does.
    """
    by_cat: dict[str, dict[str, list[float]]] = defaultdict(dict)
    for r in records:
        by_cat[r["category"]].setdefault(r["question_id"], []).append(r["score"])
    return sum(_mme_category_score(images, cat) for cat, images in by_cat.items())


def mme_scores(records: Iterable[dict]) -> dict:
    """Per category and overall: acc (per question), acc+ (per image), score = (acc + acc+) * 100.

    ``records``: ``{"category", "image_id", "prediction", "label"}``; every image must
    have exactly two questions (MME's pairing), else ValueError names the image.
    ``total_score`` sums every category's score (MME's perception + cognition when the
    categories are MME's).
    """
    by_cat: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        by_cat[r["category"]][r["image_id"]].append(float(mme_parse(r["prediction"]) == r["label"].strip().lower()))
    out: dict = {"categories": {}}
    all_q, all_img = [], []
    for cat in sorted(by_cat):
        images = by_cat[cat]
        score = _mme_category_score(images, cat)
        q = [c for v in images.values() for c in v]
        img = [sum(v) == 2 for v in images.values()]
        out["categories"][cat] = {"acc": sum(q) / len(q), "acc_plus": sum(img) / len(img), "score": score}
        all_q += q
        all_img += img
    out["acc"] = sum(all_q) / len(all_q) if all_q else 0.0
    out["acc_plus"] = sum(all_img) / len(all_img) if all_img else 0.0
    out["total_score"] = sum(c["score"] for c in out["categories"].values())
    return out


# ---------------------------------------------------------------------------------
# VQA accuracy
# ---------------------------------------------------------------------------------

_CANONICAL_CONTRACTIONS = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't "
    "he'd he'd've he's how'd how'll how's I'd've I'm I've isn't it'd it'd've it'll let's ma'am mightn't "
    "mightn't've might've mustn't must've needn't not've o'clock oughtn't shan't she'd've she's should've "
    "shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've someone'll "
    "someone's something'd something'd've something'll that's there'd there'd've there're there's they'd "
    "they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've "
    "when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't would've "
    "wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've"
).split()


def _contraction_map() -> dict[str, str]:
    """Every spelling with some apostrophes missing -> the canonical contraction."""
    out = {}
    for c in _CANONICAL_CONTRACTIONS:
        slots = [i for i, ch in enumerate(c) if ch == "'"]
        for k in range(1, len(slots) + 1):
            for drop in itertools.combinations(slots, k):
                out["".join(ch for i, ch in enumerate(c) if i not in drop)] = c
    return out


_CONTRACTIONS = _contraction_map()
_NUMBER_WORDS = dict(
    zip("none zero one two three four five six seven eight nine ten".split(), "0 0 1 2 3 4 5 6 7 8 9 10".split())
)
_ARTICLES = {"a", "an", "the"}
_VQA_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def vqa_normalize(answer: str) -> str:
    """The VQA challenge's answer normalisation."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _VQA_PUNCT:  # a punctuation mark next to a space (or a digit comma) vanishes, else it splits
        if (p + " " in text or " " + p in text) or re.search(_COMMA_STRIP, text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD_STRIP.sub("", out)
    words = []
    for w in out.lower().split():
        w = _NUMBER_WORDS.get(w, w)
        if w not in _ARTICLES:
            words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """min(1, #other annotators agreeing / 3), averaged over leaving each annotator out.

    With a single reference answer this reduces to normalised exact match.
    """
    pred = vqa_normalize(prediction)
    gts = [vqa_normalize(a) for a in answers]
    if len(gts) == 1:
        return float(pred == gts[0])
    accs = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1 :]
        accs.append(min(1.0, sum(g == pred for g in others) / 3.0))
    return sum(accs) / len(accs)


# ---------------------------------------------------------------------------------
# MMMU
# ---------------------------------------------------------------------------------


def mmmu_parse_choice(response: str, choices: dict[str, str], rng: random.Random | None = None) -> str:
    """MMMU's multiple-choice parser; a seeded random letter when nothing parses (MMMU's own fallback)."""
    for ch in (",", ".", "!", "?", ";", ":", "'"):
        response = response.strip(ch)
    response = f" {response} "
    letters = list(choices)
    bracketed = [c for c in letters if f"({c})" in response]
    cands, how = bracketed, "bracket"
    if not cands:
        cands, how = [c for c in letters if f" {c} " in response], "bare"
    if not cands and len(response.split()) > 5:
        cands, how = [c for c in letters if choices[c].lower() in response.lower()], "text"
    if not cands:
        return (rng or random.Random(0)).choice(letters)
    if len(cands) == 1:
        return cands[0]
    if how == "bracket":
        pos = [response.rfind(f"({c})") for c in cands]
    elif how == "bare":
        pos = [response.rfind(f" {c} ") for c in cands]
    else:
        pos = [response.lower().rfind(choices[c].lower()) for c in cands]
    return cands[max(range(len(cands)), key=lambda i: pos[i])]


_NUM_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_NUM_SCI = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_NUM_SIMPLE = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")


def _numbers(text: str) -> list[str]:
    return _NUM_COMMAS.findall(text) + _NUM_SCI.findall(text) + _NUM_SIMPLE.findall(text)


def _normalize_open(s: str) -> list:
    s = s.strip()
    try:
        return [round(float(s.replace(",", "")), 2)]
    except ValueError:
        s = s.lower()
        return [" " + s, s + " "] if len(s) == 1 else [s]


def mmmu_parse_open(response: str) -> list:
    """Candidate answers of an open response: key sub-responses, the numbers in them, normalised."""
    text = response.strip().strip(".").lower()
    parts = re.split(r"\.\s(?=[A-Z])|\n", text)
    indicators = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]
    keys = []
    for i, part in enumerate(parts):
        inds = indicators + (["="] if i == len(parts) - 1 else [])
        shortest = None
        for ind in inds:
            if ind in part:
                tail = part.split(ind)[-1].strip()
                if shortest is None or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest not in (":", ",", ".", "!", "?", ";", "'"):
            keys.append(shortest)
    keys = keys or [text]
    preds = list(keys)
    for k in keys:
        preds += _numbers(k)
    out = []
    for p in preds:
        for v in _normalize_open(p):
            if v not in out:
                out.append(v)
    return out


def mmmu_open_correct(gold: str | Sequence[str], preds: list) -> bool:
    """A normalised gold string inside a predicted string, or a gold number equal to a predicted number."""
    golds = [gold] if isinstance(gold, str) else list(gold)
    norm = [v for g in golds for v in _normalize_open(g)]
    for p in preds:
        if isinstance(p, str):
            if any(isinstance(g, str) and g in p for g in norm):
                return True
        elif p in norm:
            return True
    return False
