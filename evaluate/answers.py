"""The rule that takes the answer out of a model's reply, before any scoring.

Chat models answer "Yes, there is a mass in the left lung." where the reference is "yes", and
sometimes echo the prompt first. Scoring is exact match, so the answer is extracted by this
documented rule, the same for every checkpoint and every ablation:

1. Cut at the first end-of-sequence marker (`</s>`, `<|eot_id|>`, `<|end_of_text|>`) and drop
   other special-token text (`<s>`, `<pad>`, `<unk>`, `<ImageHere>`).
2. Template echo: keep only what follows the last `[/INST]`; then drop a leading `[vqa]`-style
   task tag, a leading copy of a prompt instruction ("Based on the image, respond to this
   question with a short answer:", the expert variant's preamble) and a leading copy of the
   question itself.
3. Keep the first paragraph (text before a blank line). For CLOSED questions keep only its
   first line, and of that the first sentence (a `.`, `!` or `?` followed by a space; "3.5 cm"
   is not cut).
4. Drop a leading "The answer is", "Answer:", "Short answer:", "A:" (repeatedly).
5. CLOSED questions whose reply starts with the word "yes" or "no" ("Yes, there is a lesion.")
   become that word.
6. Strip surrounding whitespace and quotes and trailing punctuation (`. , ; : ! ?`); lower-case.

Reports are not shortened: `clean_reply` applies steps 1-2 only and keeps the case. Where no
answer_type is known (one question to `evaluate.ask`), `guess_answer_type` calls a question that
opens with an auxiliary verb ("is", "are", "does", "can", ...) CLOSED and any other OPEN.
"""

from __future__ import annotations

import re

from pefomed.engine.data.prompts import VQA_INSTRUCTIONS

EOS_MARKERS = ("</s>", "<|eot_id|>", "<|end_of_text|>", "<|im_end|>", "<end_of_utterance>")
SPECIAL_TEXT = re.compile(r"<s>|<pad>|<unk>|<ImageHere>|<Img>|</Img>")
TASK_TAG = re.compile(r"^\s*\[(vqa|caption|report|refer|grounding|identify)\]\s*", re.IGNORECASE)
LEADS = re.compile(r"^\s*(the\s+(short\s+)?answer\s+is\s*:?|(short\s+)?answer\s*:|a\s*:)\s*", re.IGNORECASE)
YES_NO = re.compile(r"^\s*(yes|no)\b", re.IGNORECASE)
BLANK_LINE = re.compile(r"\n\s*\n")
SENTENCE_END = re.compile(r"(?<=[.!?])\s")
YES_NO_OPENERS = re.compile(
    r"^\s*(is|are|was|were|does|do|did|can|could|has|have|had|will|would|should|shall|may|might|must)\b",
    re.IGNORECASE)
TRAILING = ".,;:!? \t\n\"'`"
LEADING = " \t\n\"'`"

# The instruction texts of every prompt variant, without their question slot, so an echoed
# "Based on the image, respond to this question with a short answer: ..." is recognized.
INSTRUCTION_PREFIXES = tuple(
    sorted({t.split("{q}")[0].strip() for t in VQA_INSTRUCTIONS.values() if t.split("{q}")[0].strip()},
           key=len, reverse=True)
)


def _strip_prefix(text: str, prefix: str) -> str:
    if prefix and text.lower().startswith(prefix.lower()):
        return text[len(prefix):].lstrip()
    return text


def clean_reply(reply: str, question: str | None = None) -> str:
    """Steps 1-2: the reply up to its end of sequence, without special tokens or prompt echo."""
    text = reply
    for marker in EOS_MARKERS:
        text = text.split(marker)[0]
    text = SPECIAL_TEXT.sub(" ", text)
    if "[/INST]" in text:
        text = text.rsplit("[/INST]", 1)[1]
    text = TASK_TAG.sub("", text).strip()
    for prefix in INSTRUCTION_PREFIXES:
        text = _strip_prefix(text, prefix)
    if question:
        text = _strip_prefix(text, question.strip())
    return text.strip()


def _first_sentence(text: str) -> str:
    line = text.strip().split("\n", 1)[0]
    return SENTENCE_END.split(line.strip(), maxsplit=1)[0]


def extract_answer(reply: str, answer_type: str = "", question: str | None = None) -> str:
    """The short answer in `reply`, by the rule in this module's docstring."""
    text = clean_reply(reply, question)
    text = BLANK_LINE.split(text, maxsplit=1)[0] if text else ""
    closed = answer_type.upper() == "CLOSED"
    if closed:
        text = _first_sentence(text)
    previous = None
    while previous != text:
        previous, text = text, LEADS.sub("", text)
    if closed:
        match = YES_NO.match(text)
        if match:
            return match.group(1).lower()
    return text.strip(LEADING).rstrip(TRAILING).strip(LEADING).lower()


def guess_answer_type(question: str | None) -> str:
    """CLOSED for a yes/no question ("is there ...?", "does the ...?"), OPEN otherwise."""
    return "CLOSED" if question and YES_NO_OPENERS.match(question) else "OPEN"
