"""Report metrics: our BLEU / ROUGE-L / CIDEr-D against pycocoevalcap's own scorers, the Python PTB
tokenizer against the Stanford jar, and the Java-less path."""

import contextlib
import io
import random

import pytest

from pefomed.evaluate.metrics import report_metrics as rm

needs_pycoco = pytest.mark.skipif(rm._pycocoevalcap_dir() is None, reason="the oracle is pycocoevalcap")
needs_java = pytest.mark.skipif(not rm.java_available() or rm._tokenizer_jar() is None,
                                reason="needs Java and pycocoevalcap's Stanford PTB tokenizer jar")

WORDS = [
    "heart", "size", "is", "normal", "no", "pleural", "effusion", "or", "pneumothorax", "the", "lungs", "are",
    "clear", "there", "mild", "cardiomegaly", "left", "right", "lower", "upper", "lobe", "opacity",
    "calcified", "granuloma", "degenerative", "changes", "of", "spine", "xxxx", "stable", "atelectasis",
    "bibasilar", "mediastinal", "contour", "within", "limits", "focal", "consolidation", "seen",
]
PUNCT_TAILS = (".", ".", ",", ";", ":", "")
EXTRAS = ("T2-weighted", "and/or", "3.5 cm", "1,000", "(mild)", "there's", "isn't", "can't", "it's", "normal.the",
          "consolidation,effusion", "well-defined", "x-ray", "50%", "e.g.", "10:30", "right-sided", "[see above]",
          "\"nodule\"", "patient's", "--", "...", "ap/pa", "l1.", "No.", "Dr.", "\u201cquoted\u201d", "a.m.", "type b.",
          "vitamin d.")


def report(rng: random.Random) -> str:
    words = []
    for _ in range(rng.randint(4, 18)):
        word = rng.choice(EXTRAS) if rng.random() < 0.2 else rng.choice(WORDS)
        if rng.random() < 0.15:
            word = word.capitalize()
        words.append(word + (rng.choice(PUNCT_TAILS) if rng.random() < 0.2 else ""))
    return " ".join(words) + rng.choice((".", "", " .", "!"))


def corpus(seed: int, n: int):
    rng = random.Random(seed)
    hyps = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 20))) for _ in range(n)]
    hyps[3] = ""  # an empty prediction is scored, not skipped
    refs = [[" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 20))) for _ in range(rng.randint(1, 4))]
            for _ in range(n)]
    return hyps, refs


@needs_pycoco
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scorers_equal_pycocoevalcap(seed):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    hyps, refs = corpus(seed, 60)
    gts, res = dict(enumerate(refs)), {i: [h] for i, h in enumerate(hyps)}
    with contextlib.redirect_stdout(io.StringIO()):
        theirs_bleu, _ = Bleu(4).compute_score(gts, res)
    for ours, theirs in zip(rm.bleu(hyps, refs), theirs_bleu):
        assert ours == pytest.approx(theirs, abs=1e-9, rel=1e-9)
    theirs_rouge, theirs_rouge_items = Rouge().compute_score(gts, res)
    ours_rouge, ours_rouge_items = rm.rouge_l(hyps, refs)
    assert ours_rouge == pytest.approx(float(theirs_rouge), abs=1e-12)
    assert ours_rouge_items == pytest.approx(list(theirs_rouge_items), abs=1e-12)
    theirs_cider, theirs_cider_items = Cider().compute_score(gts, res)
    ours_cider, ours_cider_items = rm.cider_d(hyps, refs)
    assert ours_cider == pytest.approx(float(theirs_cider), abs=1e-9)
    assert ours_cider_items == pytest.approx(list(theirs_cider_items), abs=1e-9)
    assert 0 < ours_cider and 0 < ours_rouge < 1


def test_identical_reports_score_one():
    hyps = ["no acute cardiopulmonary process", "heart size is normal and the lungs are clear"]
    refs = [[h] for h in hyps]
    assert rm.bleu(hyps, refs) == pytest.approx([1.0] * 4, abs=1e-6)
    assert rm.rouge_l(hyps, refs)[0] == pytest.approx(1.0)


@needs_java
def test_java_tokenizer_is_pycocoevalcaps():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    rng = random.Random(5)
    texts = [report(rng) for _ in range(40)]
    ours = rm.ptb_tokenize_java(texts)
    theirs = PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(texts)})
    assert ours == [theirs[i][0] for i in range(len(texts))]


@needs_java
def test_python_tokenizer_agrees_with_the_jar():
    rng = random.Random(11)
    texts = [report(rng) for _ in range(1000)]
    java = rm.ptb_tokenize_java(texts)
    python = [rm.ptb_tokenize_python(t) for t in texts]
    mismatches = [(t, j, p) for t, j, p in zip(texts, java, python) if j != p]
    assert not mismatches, mismatches[:3]
    assert "-lrb-" in " ".join(java)  # the lower-cased bracket tokens survive pycocoevalcap's filter


def test_without_java_meteor_fails_clearly_and_the_rest_remain(monkeypatch):
    monkeypatch.setattr(rm, "java_available", lambda: False)
    hyps, refs = ["Heart size is normal, no effusion."], [["The heart size is normal. No pleural effusion."]]
    m = rm.report_metrics(hyps, refs)
    assert m["meteor"] is None and m["meteor_error"] == "METEOR needs Java: apt-get install default-jre " \
                                                       "(the other metrics are reported without it)"
    assert m["tokenizer"] == "ptb-python-fallback"
    # hyp "heart size is normal no effusion" (6), ref 8 tokens: all 6 unigrams match, BP = exp(1 - 8/6)
    import math

    assert m["bleu1"] == pytest.approx(math.exp(1 - 8 / 6), rel=1e-9)
    assert m["rouge_l"] > 0 and m["cider"] == 0.0  # one item: idf = log(1) - log(1) = 0
    with pytest.raises(rm.JavaUnavailable, match="apt-get install default-jre"):
        rm.ptb_tokenize_java(["x"])


def test_bad_input():
    with pytest.raises(ValueError, match="2 predictions but 1 reference"):
        rm.report_metrics(["a", "b"], [["a"]], tokenizer="python")
    with pytest.raises(ValueError, match="at least one reference"):
        rm.report_metrics(["a"], [[]], tokenizer="python")
    with pytest.raises(ValueError, match="tokenizer must be"):
        rm.report_metrics(["a"], [["a"]], tokenizer="spacy")


@needs_java
@pytest.mark.slow
def test_meteor_through_the_jar():
    hyps = ["the heart size is normal", "no pleural effusion"]
    refs = [["the heart size is normal"], ["there is a large effusion on the left"]]
    m = rm.report_metrics(hyps, refs)
    assert m["tokenizer"] == "ptb-java"
    assert 0 < m["meteor"] < 1


# Outputs of stanford-corenlp-3.4.1.jar (-preserveLines -lowerCase), recorded, punctuation then
# dropped as pycocoevalcap does: they check the Python tokenizer where no Java is installed.
RECORDED_JAR = [
    ("The heart size is normal. No pleural effusion; no pneumothorax!",
     "the heart size is normal no pleural effusion no pneumothorax"),
    ("He can't say; don't worry, it's fine -- well-defined and/or \"nodule\".",
     "he ca n't say do n't worry it 's fine well-defined and/or nodule"),
    ("heart size normal.no focal consolidation,effusion or pneumothorax.",
     "heart size normal.no focal consolidation effusion or pneumothorax"),
    ("size: 2 x 3cm; grade ii/iv. (see above).there", "size 2 x 3cm grade ii/iv -lrb- see above -rrb- there"),
    ("a l1., b", "a l1. b"),
    ("a No. 5", "a no. 5"),
    ("a b. c", "a b. c"),
    ("a b. The", "a b the"),
    ("type b. Spine", "type b. spine"),
    ("vitamin d.. x", "vitamin d. x"),
    ("E.g... Dr... x", "e.g. dr. x"),
    ("Cannot exclude 1,000 lesions... T2-weighted MRI? 50%", "can not exclude 1,000 lesions t2-weighted mri 50 %"),
]


@pytest.mark.parametrize("text, expected", RECORDED_JAR)
def test_python_tokenizer_on_recorded_jar_output(text, expected):
    assert rm.ptb_tokenize_python(text) == expected


@needs_java
def test_recorded_outputs_are_the_jars():
    assert rm.ptb_tokenize_java([t for t, _ in RECORDED_JAR]) == [e for _, e in RECORDED_JAR]


@pytest.mark.parametrize("tokenizer", ["python", pytest.param("java", marks=needs_java)])
def test_corpus_bleu1_through_the_whole_pipeline(tokenizer):
    preds = ["Heart size is normal, no effusion.", "Small left effusion is seen."]
    refs = [["The heart size is normal. No pleural effusion."], ["There is a small left pleural effusion."]]
    m = rm.report_metrics(preds, refs, tokenizer=tokenizer, with_meteor=False)
    assert m["tokenizer"] == ("ptb-java" if tokenizer == "java" else "ptb-python-fallback")
    # By hand: lower-cased, "," and "." dropped. Prediction 1 (6 words) matches all 6 of "the heart
    # size is normal no pleural effusion" (8); prediction 2 (5 words) matches small, left, effusion,
    # is of "there is a small left pleural effusion" (7), not "seen". p1 = 10 / 11; c = 11 < r = 15,
    # so BP = exp(1 - 15 / 11).
    import math

    assert m["bleu1"] == pytest.approx(math.exp(1 - 15 / 11) * 10 / 11, rel=1e-9)
    assert m["bleu1"] >= m["bleu2"] >= m["bleu3"] >= m["bleu4"] > 0


def test_identical_reports_score_one_through_the_whole_pipeline():
    texts = ["No acute cardiopulmonary process.", "The heart size is normal, the lungs are clear."]
    m = rm.report_metrics(texts, [[t] for t in texts], tokenizer="python", with_meteor=False)
    assert [m[f"bleu{k}"] for k in range(1, 5)] == pytest.approx([1.0] * 4, abs=1e-6)
    assert m["rouge_l"] == pytest.approx(1.0) and m["meteor"] is None and "meteor_error" not in m
