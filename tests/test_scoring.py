"""Every scoring rule against cases computed by hand."""

import random

import pytest

from mm.eval.scoring import (
    circular_accuracy,
    extract_option_letter,
    mme_parse,
    mme_scores,
    mmmu_open_correct,
    mmmu_parse_choice,
    mmmu_parse_open,
    pope_metrics,
    pope_normalize,
    rotate_options,
    vqa_accuracy,
    vqa_normalize,
)

CHOICES = {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("B", "B"),
        ("(C)", "C"),
        ("The answer is D.", "D"),  # one letter word among 4 words: no article "A" present
        ("A. cat", "A"),  # short answer: the letter is the option, not the article
        ("A cat is sitting on the mat", None),  # "A" as article in a long answer: rejected
        ("B or C", None),  # two letters: ambiguous
        ("I think it is a dog", "B"),  # no letter word: the lone option text "dog"
        ("a dog chasing a cat", None),  # two option texts: ambiguous
        ("Cannot determine the answer", "Z"),
        ("Z", "Z"),
        ("nothing matches", None),
    ],
)
def test_option_letter_extraction(answer, expected):
    assert extract_option_letter(answer, CHOICES) == expected


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
        {"prediction": "yes", "label": "yes"},  # TP
        {"prediction": "Yes, there is.", "label": "yes"},  # TP (exact match fails)
        {"prediction": "no", "label": "yes"},  # FN
        {"prediction": "yes", "label": "no"},  # FP
        {"prediction": "no", "label": "no"},  # TN
        {"prediction": "It is not there.", "label": "no"},  # TN (exact match fails)
    ]
    m = pope_metrics(recs)
    # TP=2 FP=1 TN=2 FN=1
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(3 / 6)
    assert m["exact_match_accuracy"] == pytest.approx(2 / 6)


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
