"""Med-Idefics' scores, as that project computed them.

- exact match: the lower-cased true answer is contained in the lower-cased prediction
  (containment, not equality: "no" counts as found in "normal");
- F1: the tokens (nltk `word_tokenize`) the two strings share, counted once each (a set
  intersection), over the token counts of the prediction (precision) and the answer (recall);
- BLEU-1: nltk `sentence_bleu` with weights (1, 0, 0, 0) (brevity penalty included, no smoothing).

Tokenization uses `word_tokenize(..., preserve_line=True)`, which skips the sentence splitter
and so needs no downloaded punkt model: the answers are single sentences, where the two agree.
"""

from __future__ import annotations

import warnings


def _tokens(text: str) -> list[str]:
    from nltk.tokenize import word_tokenize

    return word_tokenize(text.lower(), preserve_line=True)


def containment_match(prediction: str, answer: str) -> bool:
    return answer.lower().strip() in prediction.lower()


def token_set_f1(prediction: str, answer: str) -> float:
    pred, ref = _tokens(prediction), _tokens(answer)
    common = set(pred) & set(ref)
    if not common:
        return 0.0
    precision, recall = len(common) / len(pred), len(common) / len(ref)
    return 2 * precision * recall / (precision + recall)


def bleu1(prediction: str, answer: str) -> float:
    from nltk.translate.bleu_score import sentence_bleu

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nltk warns about zero higher-order counts, unused at weight 0
        return float(sentence_bleu([_tokens(answer)], _tokens(prediction), weights=(1, 0, 0, 0)))


def med_idefics_scores(items: list[dict]) -> dict:
    """Mean containment EM, token-set F1 and BLEU-1 over `{prediction, answer}` items."""
    n = len(items)
    em = sum(containment_match(it["prediction"], it["answer"]) for it in items)
    f1 = sum(token_set_f1(it["prediction"], it["answer"]) for it in items)
    bleu = sum(bleu1(it["prediction"], it["answer"]) for it in items)
    return {"n": n, "containment_em": em / n, "token_f1": f1 / n, "bleu1": bleu / n}
