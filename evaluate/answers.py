"""The rule that takes the answer out of a chatty reply.

1. Cut at the first end-of-sequence marker or blank line, and drop an echoed `[/INST]`.
2. Drop a leading "answer:", "the answer is", "a:".
3. For closed questions, a reply that starts with "yes" or "no" ("Yes, there is a mass.")
   is that word.
4. Strip surrounding whitespace and a trailing period; lower-case.
"""

from __future__ import annotations

import re

_LEADS = re.compile(r"^\s*(the answer is|answer\s*:|a\s*:)\s*", re.IGNORECASE)
_YES_NO = re.compile(r"^\s*(yes|no)\b", re.IGNORECASE)


def extract_answer(reply: str, answer_type: str = "") -> str:
    text = reply.split("</s>")[0].replace("[/INST]", " ")
    text = re.split(r"\n\s*\n", text.strip())[0] if text.strip() else ""
    text = _LEADS.sub("", text).strip()
    if answer_type.upper() == "CLOSED":
        match = _YES_NO.match(text)
        if match:
            return match.group(1).lower()
    return text.strip().rstrip(".").strip().lower()
