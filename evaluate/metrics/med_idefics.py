"""Med-Idefics' VQA scores, defined as csbrendan/CS231N `CODE/eval_*.py` computes them.

Both texts are lower-cased first (the project lower-cased answer and generation).
- exact match (containment): the true answer occurs as a substring of the prediction, so "no"
  counts as found in "normal" and "yes" in "yes, but no";
- F1: over the *sets* of `word_tokenize` tokens: common = set(pred) & set(ref), precision =
  |common| / len(pred tokens), recall = |common| / len(ref tokens) (token lists, repeats counted
  in the denominators), F1 = 2PR / (P + R), and 0 when P + R is 0;
- BLEU-1: nltk `sentence_bleu([ref_tokens], pred_tokens, weights=(1, 0, 0, 0))` with nltk's
  defaults: no smoothing, and the brevity penalty exp(1 - r/c) applies when the prediction is
  shorter than the reference (so "left" against "left lung" scores e^-1 = 0.368, not 1). The
  zero counts of the unused 2- to 4-gram orders only make nltk warn (their weight is 0); the
  score is BP * unigram precision, and 0 when no unigram matches or the prediction is empty.

Tokenization offline: `word_tokenize(text)` splits sentences with the Punkt English model
(`punkt_tab`), which nltk downloads at run time and this machine cannot. When that model is
installed we call `word_tokenize` itself. Otherwise we run what `word_tokenize` runs with an
*untrained* `PunktSentenceTokenizer` (same algorithm, no learned abbreviation list) followed by
`NLTKWordTokenizer` (the Treebank tokenizer `word_tokenize` uses) on each sentence. The two
differ only on abbreviations inside a multi-sentence prediction ("e.g. the"); on all 2,400
published Med-Idefics items they give the same tokens, and per-item F1 and BLEU-1 reproduce the
published values exactly. `TOKENIZER` names the route taken; it is written into metrics.json.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from functools import lru_cache

from pefomed.evaluate.metrics.vqa import references_of


@lru_cache(maxsize=1)
def _tokenizer_route() -> tuple[str, object]:
    import nltk
    from nltk.tokenize import NLTKWordTokenizer, word_tokenize
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return "nltk.word_tokenize (punkt_tab english)", word_tokenize
    except LookupError:
        sentences, words = PunktSentenceTokenizer(), NLTKWordTokenizer()
        return ("untrained PunktSentenceTokenizer + NLTKWordTokenizer (punkt_tab not installed)",
                lambda text: [w for s in sentences.tokenize(text) for w in words.tokenize(s)])


def tokenizer_name() -> str:
    return _tokenizer_route()[0]


def tokenize(text: str) -> list[str]:
    return _tokenizer_route()[1](str(text).lower())


def containment_match(prediction: str, answer: str) -> bool:
    return str(answer).lower() in str(prediction).lower()


def token_set_f1(prediction: str, answer: str) -> float:
    pred, ref = tokenize(prediction), tokenize(answer)
    common = set(pred) & set(ref)
    precision = len(common) / len(pred) if pred else 0.0
    recall = len(common) / len(ref) if ref else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def bleu1(prediction: str, answer: str) -> float:
    from nltk.translate.bleu_score import sentence_bleu

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nltk warns about zero 2-4-gram counts, which weigh 0 here
        return float(sentence_bleu([tokenize(answer)], tokenize(prediction), weights=(1, 0, 0, 0)))


def med_idefics_item(prediction: str, answer: str) -> dict:
    return {"exact_match": containment_match(prediction, answer), "f1_score": token_set_f1(prediction, answer),
            "bleu_score": bleu1(prediction, answer)}


def med_idefics_scores(items: Sequence[dict]) -> dict:
    """Means of containment EM, token-set F1 and BLEU-1 over `{prediction, answer}` items."""
    scored = [med_idefics_item(it["prediction"], references_of(it)[0]) for it in items]
    n = len(scored)

    def mean(key: str) -> float:
        return sum(float(s[key]) for s in scored) / n if n else float("nan")

    return {"n": n, "containment_em": mean("exact_match"), "token_f1": mean("f1_score"), "bleu1": mean("bleu_score"),
            "tokenizer": tokenizer_name()}
