import pytest

from pefomed.evaluate import report_metrics as rm

PREDS = ["Heart size is normal, no effusion.", "Small left effusion is seen."]
REFS = [["The heart size is normal. No pleural effusion."], ["There is a small left pleural effusion."]]


def bleu1_by_hand(pred_tokens, ref_tokens):
    """Corpus BLEU-1 with pycocoevalcap's closest-length brevity penalty, computed independently."""
    import math
    from collections import Counter

    correct = sum(sum((Counter(p) & Counter(r)).values()) for p, r in zip(pred_tokens, ref_tokens))
    guess = sum(len(p) for p in pred_tokens)
    ref_len = sum(len(r) for r in ref_tokens)
    precision = correct / guess
    bp = 1.0 if guess > ref_len else math.exp(1 - ref_len / guess)
    return bp * precision


@pytest.mark.skipif(not rm.java_available(), reason="needs Java for the PTB tokenizer and METEOR")
def test_scores_with_java():
    m = rm.report_metrics(PREDS, REFS)
    assert m["tokenizer"] == "ptb-java"
    toks_p = [p.lower().replace(",", " ").replace(".", " ").split() for p in PREDS]
    toks_r = [r[0].lower().replace(",", " ").replace(".", " ").split() for r in REFS]
    assert m["bleu1"] == pytest.approx(bleu1_by_hand(toks_p, toks_r), rel=1e-6)
    assert 0 < m["meteor"] < 1 and 0 < m["rouge_l"] < 1 and m["cider"] > 0
    assert m["bleu1"] >= m["bleu2"] >= m["bleu3"] >= m["bleu4"]


def test_without_java_meteor_fails_clearly_and_others_remain(monkeypatch):
    monkeypatch.setattr(rm, "java_available", lambda: False)
    m = rm.report_metrics(PREDS, REFS)
    assert m["meteor"] is None and "Java" in m["meteor_error"]
    assert m["tokenizer"] == "python-fallback"
    assert 0 < m["bleu1"] <= 1 and m["rouge_l"] > 0 and m["cider"] > 0


def test_identical_reports_score_one():
    m = rm.report_metrics(["no acute cardiopulmonary process ."] * 2, [["no acute cardiopulmonary process ."]] * 2)
    assert m["bleu1"] == pytest.approx(1.0) and m["rouge_l"] == pytest.approx(1.0)


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 predictions but 1 reference"):
        rm.report_metrics(PREDS, REFS[:1])
