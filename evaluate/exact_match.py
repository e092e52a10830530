"""PeFoMed's VQA accuracy: VQA-style normalization (as the official vqaEval.py: punctuation,
number words to digits, articles dropped, contractions restored), then strict equality,
reported for CLOSED, OPEN and overall, and broken down by metadata fields."""

from __future__ import annotations

import re

PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itll": "it'll", "its": "it's", "lets": "let's",
    "mightnt": "mightn't", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't",
    "notve": "not've", "shant": "shan't", "shed": "she'd", "shes": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "thats": "that's", "thered": "there'd", "theres": "there's", "theyd": "they'd",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "wasnt": "wasn't", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've",
    "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "yall": "y'all", "youd": "you'd",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}


def process_punctuation(text: str) -> str:
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out)


def process_digits_and_articles(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_answer(text: str) -> str:
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digits_and_articles(process_punctuation(text))


def exact_match(prediction: str, reference: str | list[str]) -> bool:
    """Strict equality after normalization; with several references, any of them."""
    references = reference if isinstance(reference, list) else [reference]
    return any(normalize_answer(prediction) == normalize_answer(r) for r in references)


def vqa_accuracy(items: list[dict], breakdowns: tuple[str, ...] = ("question_type", "organ", "modality")) -> dict:
    """`items`: dicts with prediction, answer, answer_type and metadata fields."""
    def mean(rows):
        return sum(r["_correct"] for r in rows) / len(rows) if rows else float("nan")

    rows = [{**it, "_correct": exact_match(it["prediction"], it["answer"])} for it in items]
    closed = [r for r in rows if str(r.get("answer_type", "")).upper() == "CLOSED"]
    open_ = [r for r in rows if str(r.get("answer_type", "")).upper() == "OPEN"]
    result = {"n": len(rows), "n_closed": len(closed), "n_open": len(open_),
              "closed": mean(closed), "open": mean(open_), "overall": mean(rows)}
    for field in breakdowns:
        groups: dict[str, list] = {}
        for r in rows:
            if r.get(field):
                groups.setdefault(str(r[field]), []).append(r)
        if groups:
            result[f"by_{field}"] = {k: {"n": len(v), "accuracy": mean(v)} for k, v in sorted(groups.items())}
    return result
