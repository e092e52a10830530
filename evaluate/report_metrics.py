"""Report-generation metrics as the papers' tables compute them: pycocoevalcap's BLEU-1..4,
METEOR, ROUGE-L and CIDEr over PTB-tokenized text.

pycocoevalcap's PTB tokenizer and METEOR run Java. Without Java, METEOR is reported as failed
with a message saying how to install it, the text is tokenized by a Python stand-in (lower-case,
pycocoevalcap's punctuation list removed, whitespace split; it can differ from the Stanford
tokenizer on contractions and hyphens), and BLEU, ROUGE-L and CIDEr are still reported.
"""

from __future__ import annotations

import re
import shutil

JAVA_HINT = "METEOR needs Java (apt-get install default-jre); the other metrics are computed without it"
# The punctuation pycocoevalcap's PTBTokenizer drops after tokenizing.
PUNCTUATIONS = ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]


def java_available() -> bool:
    return shutil.which("java") is not None


def python_tokenize(text: str) -> str:
    tokens = re.findall(r"\w+(?:'\w+)?|[^\w\s]+", text.lower())
    return " ".join(t for t in tokens if t not in PUNCTUATIONS)


def report_metrics(predictions: list[str], references: list[list[str]]) -> dict:
    """Corpus-level scores; `references[i]` holds the reference reports of prediction i."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts = {i: [{"caption": r} for r in refs] for i, refs in enumerate(references)}
    res = {i: [{"caption": p}] for i, p in enumerate(predictions)}
    java = java_available()
    if java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tokenizer = PTBTokenizer()
        gts, res = tokenizer.tokenize(gts), tokenizer.tokenize(res)
    else:
        gts = {i: [python_tokenize(c["caption"]) for c in caps] for i, caps in gts.items()}
        res = {i: [python_tokenize(c["caption"]) for c in caps] for i, caps in res.items()}
    out: dict = {"n": len(predictions), "tokenizer": "ptb-java" if java else "python-fallback"}
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # pycocoevalcap prints its BLEU statistics
        bleu, _ = Bleu(4).compute_score(gts, res)
    out.update({f"bleu{i + 1}": float(b) for i, b in enumerate(bleu)})
    out["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    out["cider"] = float(Cider().compute_score(gts, res)[0])
    if java:
        from pycocoevalcap.meteor.meteor import Meteor

        out["meteor"] = float(Meteor().compute_score(gts, res)[0])
    else:
        out["meteor"] = None
        out["meteor_error"] = JAVA_HINT
    return out
