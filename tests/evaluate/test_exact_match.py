import pytest

from pefomed.evaluate.answers import extract_answer
from pefomed.evaluate.exact_match import normalize_answer, vqa_accuracy


@pytest.mark.parametrize("raw, expected", [
    ("Yes.", "yes"),
    ("Two", "2"),
    ("the left lung", "left lung"),
    ("A mass, in the liver!", "mass in liver"),
    ("dont know", "don't know"),
    ("T2-weighted", "t2 weighted"),
    ("1,000", "1000"),
    ("3.5 cm", "3.5 cm"),
])
def test_vqa_normalization(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize("reply, answer_type, expected", [
    ("Yes, there is a lesion in the left lung.", "CLOSED", "yes"),
    ("no</s>garbage", "CLOSED", "no"),
    ("The answer is right.", "OPEN", "right"),
    ("Answer: chest\n\nExtra words", "OPEN", "chest"),
    ("[/INST] left", "OPEN", "left"),
    ("Normal study.", "CLOSED", "normal study"),
])
def test_answer_extraction(reply, answer_type, expected):
    assert extract_answer(reply, answer_type) == expected


def test_accuracy_breakdown():
    items = [
        {"prediction": "Yes", "answer": "yes", "answer_type": "CLOSED", "organ": "HEAD"},
        {"prediction": "no", "answer": "yes", "answer_type": "CLOSED", "organ": "CHEST"},
        {"prediction": "the left", "answer": "left", "answer_type": "OPEN", "organ": "CHEST"},
    ]
    m = vqa_accuracy(items)
    assert m["closed"] == 0.5 and m["open"] == 1.0 and m["overall"] == pytest.approx(2 / 3)
    assert m["by_organ"]["CHEST"] == {"n": 2, "accuracy": 0.5}


def test_several_references():
    from pefomed.evaluate.exact_match import exact_match

    assert exact_match("Right.", ["left", "the right"]) and not exact_match("up", ["left", "right"])
