"""VQA normalization (official vqaEval.py rules), PeFoMed accuracy and LLaVA-Med's scores.

Expected strings are worked out by hand from the official rules, one rule per case.
"""

import math

import pytest

from pefomed.evaluate.metrics.llava_med import closed_hit, llava_med_scores, open_recall
from pefomed.evaluate.metrics.normalize import (
    normalize_llava_med,
    normalize_pefomed,
    normalize_vqa,
    process_punctuation,
)
from pefomed.evaluate.metrics.vqa import vqa_accuracy


@pytest.mark.parametrize("raw, expected", [
    ("Yes.", "yes"),                          # period not before a digit: removed
    ("Two", "2"),                             # number words to digits
    ("none", "0"),
    ("the left lung", "left lung"),           # articles dropped
    ("An apple a day", "apple day"),
    ("dont know", "don't know"),              # contractions restored
    ("whats this", "what's this"),
    ("youd've", "you'd've"),
    ("T2-weighted", "t2 weighted"),           # '-' touches no space: becomes a space
    ("left - right", "left right"),           # '-' touches a space: deleted
    ("1,000", "1000"),                        # digit,digit anywhere: every listed mark deleted
    ("3.5 cm", "3.5 cm"),                     # period before a digit kept
    ("5.", "5"),                              # the mistyped look-behind: removed after a digit too
    ("what?", "what"),
    ("A mass, in the liver!", "mass in liver"),
    ("and/or", "and or"),
    ("x-ray", "x ray"),
    ("it's", "it's"),                         # the apostrophe is not in the list
    ("10:30", "10:30"),                       # nor the colon
    ("Im here", "im here"),                   # capitalised table keys never match after lower()
])
def test_official_vqa_normalization(raw, expected):
    assert normalize_vqa(raw) == expected


def test_punctuation_rule_looks_at_the_original_text():
    # ',' has a space after it, so it is deleted; '(' and ')' touch no space, so they become spaces.
    assert process_punctuation("a, b(c)") == "a b c "
    # The digit-comma rule deletes every mark, even the '-' that would otherwise be a space.
    assert process_punctuation("1,5 t2-weighted") == "15 t2weighted"


def test_period_strip_stops_after_32_periods():
    text = "." * 40
    assert process_punctuation(text) == "." * 8


def test_pefomed_and_llava_med_variants():
    assert normalize_pefomed("X ray, chest") == "xray chest"    # comma dropped, "x ray" joined
    assert normalize_pefomed("x-ray") == "xray"
    assert normalize_llava_med("x-ray, chest") == "x ray chest"


def test_pefomed_accuracy_and_breakdowns():
    items = [
        {"prediction": "Yes", "answer": "yes", "answer_type": "CLOSED", "organ": "HEAD", "modality": "CT"},
        {"prediction": "no", "answer": "yes", "answer_type": "CLOSED", "organ": "CHEST", "modality": "CT"},
        {"prediction": "the left", "answer": "left", "answer_type": "OPEN", "organ": "CHEST", "modality": "MRI",
         "question_type": "POS"},
        {"prediction": "X-ray", "answer": ["radiograph", "xray"], "answer_type": "OPEN", "organ": "CHEST"},
    ]
    m = vqa_accuracy(items)
    assert (m["n"], m["n_closed"], m["n_open"]) == (4, 2, 2)
    assert m["closed"] == 0.5 and m["open"] == 1.0 and m["overall"] == 0.75
    assert m["correct"] == [True, False, True, True]
    assert m["by_organ"] == {"CHEST": {"n": 3, "accuracy": 2 / 3}, "HEAD": {"n": 1, "accuracy": 1.0}}
    assert m["by_modality"]["MRI"] == {"n": 1, "accuracy": 1.0}
    assert m["by_question_type"] == {"POS": {"n": 1, "accuracy": 1.0}}


def test_accuracy_of_a_missing_answer_type_is_nan():
    m = vqa_accuracy([{"prediction": "a", "answer": "a", "answer_type": "OPEN"}])
    assert math.isnan(m["closed"]) and m["open"] == 1.0


# LLaVA-Med ---------------------------------------------------------------------------------------

def test_open_recall_is_their_calculate_f1score_recall():
    assert open_recall("the left side", "left lung") == 0.5     # 1 of 2 reference tokens
    assert open_recall("Left lung.", "left lung") == 1.0
    assert open_recall("right", "left lung") == 0.0
    assert open_recall("", "left") == 0.0
    # tp counts the prediction's repeats: 2 / (2 + 1), not 1/2
    assert open_recall("left left", "left lung") == pytest.approx(2 / 3)


ITEMS = [
    {"answer": "yes", "prediction": "yes", "answer_type": "CLOSED"},
    {"answer": "yes", "prediction": "no, it is not", "answer_type": "CLOSED"},   # wrong yes/no
    {"answer": "no", "prediction": "maybe", "answer_type": "CLOSED"},            # neither word: 0
    {"answer": "yes", "prediction": "No.", "answer_type": "CLOSED"},             # wrong yes/no
    {"answer": "left lung", "prediction": "the left side", "answer_type": "OPEN"},
]


def test_closed_accuracy_fixed_versus_published_script():
    fixed, compat = llava_med_scores(ITEMS), llava_med_scores(ITEMS, compat=True)
    assert fixed["closed_accuracy"] == pytest.approx(1 / 4)
    assert fixed["n_closed_counted"] == 4 and fixed["n_closed_dropped"] == 0
    # The published script drops the two wrong yes/no answers from the denominator.
    assert compat["closed_accuracy"] == pytest.approx(1 / 2)
    assert compat["n_closed_counted"] == 2 and compat["n_closed_dropped"] == 2
    assert fixed["open_recall"] == compat["open_recall"] == 0.5


def test_closed_hit_uses_substrings_like_the_script():
    assert closed_hit("yes there is", "yes") == 1.0
    assert closed_hit("normal", "no") == 1.0          # "no" is inside "normal"
    assert closed_hit("no", "yes", compat=True) is None and closed_hit("no", "yes") == 0.0


def test_several_references_any_one_counts():
    # "Right." -> "right"; "the right" -> "right": equal to the second reference.
    items = [{"prediction": "Right.", "answer": ["left", "the right"], "answer_type": "OPEN"},
             {"prediction": "up", "answer": ["left", "right"], "answer_type": "OPEN"}]
    assert vqa_accuracy(items)["correct"] == [True, False]


# LLaVA-Med, item by item. Their run_eval.py lower-cases both texts and applies `normalize_word`
# (VQA punctuation, number words to digits, articles dropped, commas removed); calculate_f1score
# normalizes again and splits on whitespace into word counts. recall = tp / (tp + fn), where tp sums
# the prediction's counts of the shared words and fn the reference's counts of the words the
# prediction lacks. The expected values below are worked out by hand from those rules.
@pytest.mark.parametrize("prediction, reference, expected", [
    # "5.5cm": the period is followed by a digit, so it stays, and there is no space: one word
    # "5.5cm". The reference splits into "5.5" and "cm". No shared word: tp = 0, recall 0. (A regex
    # tokenizer splitting on non-alphanumerics sees "5 5 cm" in both and would give 1.)
    ("5.5cm", "5.5 cm", 0.0),
    ("5.5 cm", "5.5cm", 0.0),
    # The final period is not followed by a digit: removed. "5.5 cm" vs "5.5 cm": tp = 2, fn = 0.
    ("5.5 cm.", "5.5 cm", 1.0),
    # Number words become digits: "three lesions" -> "3 lesions" against "3": tp = 1, fn = 0 -> 1.
    # (A tokenizer without the number map shares nothing: 0.)
    ("three lesions", "3", 1.0),
    # The other way round: the reference "3 lesions"; tp = 1 ("3"), fn = 1 ("lesions") -> 1/2.
    ("3", "three lesions", 0.5),
    # '-' touches no space, so it becomes one: "left sided effusion"; vs "left sided": tp 2, fn 0 -> 1.
    ("left-sided effusion", "left sided", 1.0),
    # A digit-comma-digit group deletes every listed punctuation mark: "1000 ml" vs "1000 ml" -> 1.
    ("1,000 ml", "1000 ml", 1.0),
    # Articles dropped: "liver" vs "liver" -> 1.
    ("The liver", "a liver", 1.0),
    # tp counts the prediction's repeats: "left left" vs "left lung": tp = 2, fn = 1 -> 2/3.
    ("left left", "left lung", 2 / 3),
    # "none" and "zero" both map to "0" -> 1.
    ("none", "zero", 1.0),
    # Nothing left after normalization ("the" is an article): an empty prediction scores 0.
    ("the", "liver", 0.0),
])
def test_llava_med_open_recall_items(prediction, reference, expected):
    assert open_recall(prediction, reference) == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize("prediction, reference, fixed, compat", [
    # "Yes." -> "yes": holds "yes" and the reference "yes" -> 1.
    ("Yes.", "yes", 1.0, 1.0),
    # The reference is normalized too: "Yes." -> "yes", a substring of "yes there is" -> 1. (Raw
    # text would look for "yes." in "yes, there is" and miss.)
    ("yes, there is", "Yes.", 1.0, 1.0),
    # "None" -> "0", which holds neither "yes" nor "no" -> 0, in both modes (their script appended
    # 0 here). On the raw text "none" holds "no" and the reference: a hit.
    ("None", "no", 0.0, 0.0),
    # Substrings, not words: "no" is inside "not seen" -> 1.
    ("not seen", "no", 1.0, 1.0),
    # A wrong yes/no: "no it is not" holds "no" but not "yes" -> 0; the published script appended
    # nothing (dropped).
    ("No, it is not.", "yes", 0.0, None),
    # Neither "yes" nor "no": 0 in both modes.
    ("maybe", "yes", 0.0, 0.0),
])
def test_llava_med_closed_items_on_normalized_text(prediction, reference, fixed, compat):
    assert closed_hit(prediction, reference) == fixed
    assert closed_hit(prediction, reference, compat=True) == compat


def test_llava_med_aggregates_the_items_above():
    items = [{"prediction": "5.5cm", "answer": "5.5 cm", "answer_type": "OPEN"},
             {"prediction": "3", "answer": "three lesions", "answer_type": "OPEN"},
             {"prediction": "three lesions", "answer": "3", "answer_type": "OPEN"},
             {"prediction": "None", "answer": "no", "answer_type": "CLOSED"},
             {"prediction": "yes, there is", "answer": "Yes.", "answer_type": "CLOSED"},
             {"prediction": "No, it is not.", "answer": "yes", "answer_type": "CLOSED"}]
    fixed, compat = llava_med_scores(items), llava_med_scores(items, compat=True)
    assert fixed["open_recall"] == pytest.approx((0 + 0.5 + 1) / 3)
    assert fixed["closed_accuracy"] == pytest.approx(1 / 3)      # 0, 1, 0
    assert compat["closed_accuracy"] == pytest.approx(1 / 2)     # 0, 1 (the wrong yes/no dropped)
    assert compat["n_closed_dropped"] == 1
