"""Every scoring rule against cases computed by hand."""

import random

import numpy as np
import pytest

from mm.eval.scoring import (
    circular_accuracy,
    extract_option_letter,
    infer_option,
    infer_text,
    mme_lmms_score,
    mme_parse,
    mme_scores,
    mme_split,
    mmmu_open_correct,
    mmmu_parse_choice,
    mmmu_parse_open,
    pope_lmms_metrics,
    pope_normalize,
    pope_orig_metrics,
    rotate_options,
    vqa_accuracy,
    vqa_normalize,
)

CHOICES = {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}


# VLMEvalKit's can_infer, one case per branch (options total 14 characters: text is searched up to 28)
@pytest.mark.parametrize(
    "answer, expected",
    [
        ("B", "B"),  # a lone letter
        ("(C)", "C"),  # punctuation becomes space
        ("A. cat", "A"),  # the letter wins before the text
        ("The answer is D.", "D"),  # one letter word, among the last four words
        ("I choose Z", "Z"),  # no option letter, a lone Z: none of them
        ("Cannot determine the answer", "Z"),  # a known refusal
        ("A bird sat on the mat today", "C"),  # "A" is the 7th-last word: not taken; the lone option text decides
        ("B is what I would pick for this one", None),  # letter too early, and the answer is too long for the text
        ("B or C", None),  # several letters, no option text
        ("B or C, it is a dog", "B"),  # several letters fall back to the option text
        ("The correct answer is **C**, since the others are wrong", "C"),  # letter too early: "answer is X" decides
        ("The answer is B or maybe C", "B"),  # several letters: "answer is X" decides
        ("the answer is a dog", "A"),  # VLMEvalKit's "answer is" pattern ignores case: the article names A
        ("I think it is a dog", "B"),  # no letter word (lower-case "a" is none): the lone option text
        ("a dog chasing a cat", None),  # two option texts
        ("After looking closely I believe it shows a dog", None),  # over twice the options' length: no text search
        ("Failed to obtain answer via API", None),  # an API failure names no letter
        ("nothing matches", None),
    ],
)
def test_option_letter_extraction(answer, expected):
    assert extract_option_letter(answer, dict(CHOICES)) == expected


def test_option_letter_then_option_text():
    assert infer_option("A cat", CHOICES) == "A" and infer_text("A cat", CHOICES) == "A"
    assert infer_option("dog", CHOICES) is None and infer_text("dog", CHOICES) == "B"
    assert infer_option("Hm. I can't process this file. B", CHOICES) == "Z"  # a refusal inside wins over a letter
    assert infer_option("I can not process this file", CHOICES) is None  # only the listed refusal texts count
    three = {"A": "1", "B": "2", "C": "3"}  # a 3-option question: VLMEvalKit drops the empty D
    assert extract_option_letter("D", three) is None and extract_option_letter("3", three) == "C"
    assert extract_option_letter("the answer is D", three) is None  # "answer is X" only for a listed option


def test_rotation_and_circular_eval():
    opts, idx = rotate_options(["w", "x", "y", "z"], answer_index=1, shift=1)
    assert opts == ["x", "y", "z", "w"] and idx == 0
    opts, idx = rotate_options(["w", "x", "y", "z"], answer_index=1, shift=3)
    assert opts == ["z", "w", "x", "y"] and idx == 2
    records = (
        [{"group": 0, "correct": True}] * 4  # all four rotations right: counts
        + [{"group": 1, "correct": True}] * 3
        + [{"group": 1, "correct": False}]  # one rotation wrong: the question fails
        + [{"group": 2, "correct": False}] * 4
    )
    assert circular_accuracy(records) == pytest.approx(1 / 3)
    assert circular_accuracy([]) == 0.0


@pytest.mark.parametrize(
    "answer, label",
    [
        ("Yes", "yes"),
        ("No", "no"),
        ("no, there is not.", "no"),
        ("There is not a 3 in the image.", "no"),
        ("Yes. No doubt about it.", "yes"),  # only the first sentence counts
        ("3", "yes"),  # anything without no/not is a yes
        ("Nope", "yes"),  # "Nope" is not the word "no"
    ],
)
def test_pope_normalisation(answer, label):
    assert pope_normalize(answer) == label


def test_pope_metrics_by_hand():
    recs = [
        {"prediction": "yes", "label": "yes"},  # orig TP; lmms TP
        {"prediction": "Yes, there is.", "label": "yes"},  # orig TP; lmms: neither yes nor no (a miss, no TP/FN)
        {"prediction": "no", "label": "yes"},  # FN in both
        {"prediction": "yes", "label": "no"},  # FP in both
        {"prediction": "no", "label": "no"},  # TN in both
        {"prediction": "It is not there.", "label": "no"},  # orig TN; lmms miss
        {"prediction": "3", "label": "no"},  # orig FP (a digit is a yes); lmms miss
        {"prediction": "", "label": "yes"},  # orig TP (empty is a yes); lmms miss
        {"prediction": " No ", "label": "no"},  # TN in both (lmms strips and lower-cases)
    ]
    orig = pope_orig_metrics(recs)  # TP=3 FP=2 TN=3 FN=1
    assert orig["accuracy"] == pytest.approx(6 / 9)
    assert orig["precision"] == pytest.approx(3 / 5) and orig["recall"] == pytest.approx(3 / 4)
    assert orig["f1"] == pytest.approx(2 / 3)
    assert orig["predicted_yes_ratio"] == pytest.approx(5 / 9)  # answers taken as yes
    lmms = pope_lmms_metrics(recs)  # exact: hits 1, 5, 9; TP=1 FP=1 FN=1
    assert lmms["accuracy"] == pytest.approx(3 / 9)
    assert lmms["precision"] == pytest.approx(1 / 2) and lmms["recall"] == pytest.approx(1 / 2)
    assert lmms["f1_score"] == pytest.approx(1 / 2)
    assert lmms["yes_ratio"] == pytest.approx(4 / 9)  # labels that are yes, whatever was answered
    nothing = [{"prediction": "maybe", "label": "yes"}, {"prediction": "", "label": "no"}]
    assert pope_lmms_metrics(nothing)["precision"] == pope_lmms_metrics(nothing)["f1_score"] == 0.0  # undefined: 0


@pytest.mark.parametrize(
    "answer, parsed",
    [("Yes", "yes"), ("no.", "no"), ("y", "yes"), ("N", "no"), ("3", "other"), ("Yes, it is", "yes"),
     ("Not at all", "no"), ("maybe", "other")],
)  # fmt: skip
def test_mme_parse(answer, parsed):
    assert mme_parse(answer) == parsed


def test_mme_acc_and_acc_plus_by_hand():
    recs = [
        # category "count": image a both right, image b one right
        {"category": "count", "image_id": "a", "prediction": "yes", "label": "yes"},
        {"category": "count", "image_id": "a", "prediction": "no", "label": "no"},
        {"category": "count", "image_id": "b", "prediction": "yes", "label": "yes"},
        {"category": "count", "image_id": "b", "prediction": "yes", "label": "no"},
        # category "position": image c both wrong
        {"category": "position", "image_id": "c", "prediction": "no", "label": "yes"},
        {"category": "position", "image_id": "c", "prediction": "maybe", "label": "no"},
    ]
    s = mme_scores(recs)
    assert s["categories"]["count"] == {"acc": 0.75, "acc_plus": 0.5, "score": pytest.approx(125.0)}
    assert s["categories"]["position"] == {"acc": 0.0, "acc_plus": 0.0, "score": 0.0}
    assert s["acc"] == pytest.approx(3 / 6) and s["acc_plus"] == pytest.approx(1 / 3)
    assert s["total_score"] == pytest.approx(125.0)
    with pytest.raises(ValueError, match="two questions per image"):
        mme_scores(recs[:3])


def test_mme_perception_and_cognition_as_lmms_eval_splits_them():
    assert [mme_split(c) for c in ("existence", "count", "position", "OCR")] == ["perception"] * 4
    # lmms-eval: every category outside its perception list is cognition, ours ("recognition") included
    assert [mme_split(c) for c in ("commonsense_reasoning", "recognition", "Existence")] == ["cognition"] * 3
    recs = [
        {"question_id": "a", "category": "count", "score": 1.0},
        {"question_id": "a", "category": "count", "score": 1.0},  # image a: 100 + 100
        {"question_id": "b", "category": "count", "score": 0.0},
        {"question_id": "b", "category": "count", "score": 1.0},  # image b: 50 + 0
        {"question_id": "c", "category": "position", "score": 1.0},
        {"question_id": "c", "category": "position", "score": 0.0},  # image c: 50 + 0
    ]
    assert mme_lmms_score(recs) == pytest.approx(125.0 + 50.0)  # count (200 + 50) / 2, position 50
    with pytest.raises(ValueError, match="image 'c' has 1"):
        mme_lmms_score(recs[:5])


@pytest.mark.parametrize(
    "raw, norm",
    [
        ("Two", "2"),
        ("the cat.", "cat"),
        ("A Dog!", "dog"),
        ("dont", "don't"),
        ("1,000", "1000"),
        ("3.5", "3.5"),
        ("yes, a red-car", "yes red car"),
    ],
)
def test_vqa_normalisation(raw, norm):
    assert vqa_normalize(raw) == norm


def test_vqa_accuracy_by_hand():
    answers = ["2"] * 3 + ["3"] * 7
    # leave-one-out over 10 annotators: removing one of the three "2"s leaves 2 matches (2/3),
    # removing one of the seven "3"s leaves 3 matches (1): (3 * 2/3 + 7 * 1) / 10 = 0.9
    assert vqa_accuracy("two", answers) == pytest.approx(0.9)
    assert vqa_accuracy("3", answers) == pytest.approx(1.0)
    assert vqa_accuracy("4", answers) == 0.0
    assert vqa_accuracy("The Two.", ["2"]) == 1.0  # one reference: normalised exact match


def test_mmmu_choice_parser():
    choices = {"A": "0.5", "B": "1.5", "C": "2.5", "D": "3.5"}
    assert mmmu_parse_choice("(B)", choices) == "B"
    assert mmmu_parse_choice("I pick (A) not (C)", choices) == "C"  # the last bracketed letter wins
    assert mmmu_parse_choice("The answer is C.", choices) == "C"
    assert mmmu_parse_choice("B is wrong, so D", choices) == "D"  # bare letters: the last one wins
    assert mmmu_parse_choice("after some thought the value must be 2.5 here", choices) == "C"
    # nothing parses: MMMU's random fallback, seeded
    assert mmmu_parse_choice("no idea", choices, random.Random(1)) == random.Random(1).choice(list("ABCD"))


def test_mmmu_open_parser():
    preds = mmmu_parse_open("First we add. So the total is 1,234 units")
    assert preds == ["1,234 units", 1234.0, 234.0]  # key sub-response after "is ", its numbers (MMMU finds 234 too)
    assert mmmu_open_correct("1234", preds) and mmmu_open_correct("1,234", preds)
    assert not mmmu_open_correct("123", preds)
    # MMMU's regexes split "1,234.5" into 1,234 and 234.5 (its known quirk, kept)
    assert mmmu_parse_open("it is 1,234.5")[1:] == [1234.0, 234.5]
    preds = mmmu_parse_open("Therefore the answer is Paris")
    assert "paris" in preds
    assert mmmu_open_correct(["paris", "Paris, France"], preds)
    assert mmmu_parse_open("x = 7") == [7.0]  # the last sentence also splits at "="; numbers normalise to floats


def test_geneval_colour_prompts_are_unsupported_and_counted():
    from data.bundled.judge import Detection
    from mm.eval.generation import geneval_judge, geneval_summary

    dets = [Detection(3, 0.99, (0, 0, 8, 8))]
    colour = {"tag": "colors", "include": [{"class": "3", "count": 1, "color": "red"}], "prompt": "a red 3"}
    ok, reason = geneval_judge(colour, dets)  # grey digits, no colour classifier: no verdict, no exception
    assert ok is None and reason.startswith("unsupported:") and "red 3" in reason
    attr = {"tag": "color_attr", "include": [{"class": "3", "count": 1}], "exclude": [{"class": "5", "count": 1,
            "color": "blue"}]}  # fmt: skip
    assert geneval_judge(attr, dets)[0] is None  # a colour in an exclude rule too
    plain = {"tag": "single_object", "include": [{"class": "3", "count": 1}]}
    assert geneval_judge(plain, dets) == (True, "")
    s = geneval_summary([{"tag": "colors", "correct": None}, {"tag": "single_object", "correct": True},
                         {"tag": "single_object", "correct": False}])  # fmt: skip
    assert s == {"overall": 0.5, "per_tag": {"single_object": 0.5}, "unsupported": 1}  # left out, not scored wrong


def test_geneval_task_counts_unsupported_prompts():
    import json

    from mm.eval.taskfile import load_tasks

    task = load_tasks(["digits_geneval"])[0]
    blank = [np.zeros((1, 32, 32), dtype=np.float32)]
    docs = [{"metadata": json.dumps(m)} for m in (
        {"tag": "colors", "include": [{"class": "3", "count": 1, "color": "red"}], "prompt": "a red 3"},
        {"tag": "single_object", "include": [{"class": "3", "count": 1}], "prompt": "draw the digit 3"},
        {"tag": "single_object", "include": [{"class": "5", "count": 1}], "prompt": "draw the digit 5"},
    )]  # fmt: skip
    per_doc = [task.process_results(d, blank) for d in docs]
    assert per_doc[0]["geneval"]["correct"] == [None] and per_doc[1]["geneval"]["correct"] == [False]
    agg = task.metric_list[0]["aggregation"]
    out = (agg.resolve() if hasattr(agg, "resolve") else agg)([r["geneval"] for r in per_doc])
    assert out["geneval_unsupported_prompts"] == 1 and "geneval_colors" not in out
    assert out["geneval_overall"] == out["geneval_single_object"] == 0.0  # blank images: the scorable prompts fail
    colour_only = (agg.resolve() if hasattr(agg, "resolve") else agg)([per_doc[0]["geneval"]])
    assert colour_only["geneval_overall"].startswith("unsupported")
