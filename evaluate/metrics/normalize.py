"""Answer normalization as the official VQA evaluation code does it, and the two variants built on it.

Facts taken from GT-Vision-Lab/VQA `PythonEvaluationTools/vqaEvaluation/vqaEval.py` (master, after
the "fixed the apostrophe symbol issue" commit): the contraction table, the number-word map
(`none`/`zero` ... `ten`), the articles `a an the`, the punctuation list and the two regexes.
Behaviour kept on purpose, because the published numbers were computed with it:

- a punctuation mark is *deleted* when it touches a space on either side, or when the text holds a
  digit-comma-digit group anywhere; otherwise it becomes a space;
- the period regex `(?!<=\\d)(\\.)(?!\\d)` is a mistyped look-behind (it is a look-ahead for the
  literal `<=` and a digit, which never matches before a period), so every period not followed by a
  digit is removed, including one that follows a digit ("5." -> "5");
- `re.UNICODE` is passed where `sub` expects `count`, so at most 32 periods are removed;
- number words and articles are handled per whitespace token after lower-casing, so table keys with
  capitals (`Im`, `Ive`) never match.

Variants:
- `normalize_pefomed`: PeFoMed's `MedVQAEval.preprocess_answer` (pefomed/common/medvqa_tools/
  vqa_eval.py): the VQA steps, then every comma removed and "x ray" joined to "xray".
- `normalize_llava_med`: LLaVA-Med's `normalize_word` (llava/eval/eval_metrics/glossary.py): the
  VQA steps on the raw text, then commas removed.
"""

from __future__ import annotations

import re

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!")
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
PERIOD_STRIP_COUNT = re.UNICODE  # the official code passes re.UNICODE (32) as `count`
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}


def process_punctuation(text: str) -> str:
    out = text
    has_digit_comma = COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        # The test looks at the original text, not at `out`: that is how the official code decides.
        if p + " " in text or " " + p in text or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_vqa(text: str) -> str:
    """The official VQA answer processing: whitespace cleanup, punctuation, digits and articles."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def normalize_pefomed(text: str) -> str:
    """PeFoMed's `preprocess_answer`: VQA processing, then commas dropped and "x ray" -> "xray"."""
    out = process_digit_article(process_punctuation(str(text)))
    return out.replace(",", "").replace("x ray", "xray").replace("\n", " ").replace("\t", " ")


def normalize_llava_med(text: str) -> str:
    """LLaVA-Med's `normalize_word`: VQA processing on the raw text, then commas dropped."""
    return process_digit_article(process_punctuation(text)).replace(",", "")
