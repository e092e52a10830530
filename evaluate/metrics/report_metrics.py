"""Report-generation metrics computed the way pycocoevalcap computes them.

Pipeline (as `pycocoevalcap`'s COCOEvalCap): every text goes through the Stanford PTBTokenizer
(`stanford-corenlp-3.4.1.jar`, options `-preserveLines -lowerCase`), then the tokens in
`PUNCTUATIONS` are dropped. Note that the list holds "-LRB-" in capitals while the lower-cased
output says "-lrb-", so bracket tokens survive: we keep that, since published numbers include it.

- BLEU-1..4: corpus BLEU over all (prediction, references) pairs, clipped n-gram counts summed over
  the corpus, the reference length per item chosen "closest" to the prediction's length (ties to
  the shorter), smoothed exactly as pycocoevalcap: each precision is (correct + 1e-15) /
  (guess + 1e-9), BLEU-n = (p1 * ... * pn) ** (1/n), times exp(1 - r/c) when c < r.
- ROUGE-L: per item, the LCS of the whitespace tokens against each reference; the best precision
  and the best recall (maximized separately) give F = (1 + b^2) P R / (R + b^2 P) with b = 1.2;
  the corpus score is the mean over items.
- CIDEr-D (pycocoevalcap's `Cider`): TF-IDF vectors of 1- to 4-grams, document frequency over
  the references of the evaluated corpus, idf = log(N_items) - log(max(1, df)); per n, the
  hypothesis weight is clipped at the reference weight, the cosine is multiplied by the
  Gaussian length penalty exp(-(l_hyp - l_ref)^2 / (2 * 6^2)) where the "length" is the number
  of bigrams (pycocoevalcap counts n-grams of length 2 there); averaged over n and references,
  times 10, then the mean over items.
- METEOR 1.5: pycocoevalcap's own `Meteor` (the jar, `-l en -norm`), which needs Java.

BLEU, ROUGE-L and CIDEr-D are implemented here (tested equal to pycocoevalcap's scorers to 1e-9).
Tokenization and METEOR need Java and the jars pycocoevalcap ships. Without them METEOR is reported
as failed with `JAVA_HINT` (or `PYCOCO_HINT`), and text is tokenized by `ptb_tokenize_python`, a Python mirror of what the Stanford
lexer does to report text: brackets to -lrb- etc., quotes to `` and '', contractions split
("ca n't", "it 's"), a final period split off unless the word is an initial ("e.g.", "d.") or a
known abbreviation, or punctuation such as "," follows it ("l1.,"), "no." kept before a number,
a sentence-start word after an initial ("b. The") splitting it, words glued by a period kept
whole ("normal.the"). It agrees token for token with the jar on 10,000 generated report lines
(the test checks 1,000 each run, and recorded jar outputs where Java is missing); rules it does not
mirror: numbers glued to letters ("1.5x2.0"), SGML tags, abbreviations outside its short list,
and non-ASCII text beyond curly quotes, dashes and the ellipsis.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import tempfile
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

JAVA_HINT = "METEOR needs Java: apt-get install default-jre (the other metrics are reported without it)"
TOKENIZE_HINT = "the PTB tokenizer needs Java: apt-get install default-jre"
# pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS, case-sensitive as there.
PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
                          "...", ";"])
BLEU_TINY, BLEU_SMALL = 1e-15, 1e-9
ROUGE_BETA = 1.2
CIDER_SIGMA = 6.0


class JavaUnavailable(RuntimeError):
    pass


def java_available() -> bool:
    return shutil.which("java") is not None


PYCOCO_HINT = "the PTB tokenizer and METEOR jars come with pycocoevalcap: pip install pycocoevalcap"


def _pycocoevalcap_dir() -> Path | None:
    try:
        import pycocoevalcap.bleu.bleu as bleu_module
    except ImportError:
        return None
    return Path(bleu_module.__file__).resolve().parents[1]


def _tokenizer_jar() -> Path | None:
    root = _pycocoevalcap_dir()
    jar = root / "tokenizer" / "stanford-corenlp-3.4.1.jar" if root is not None else None
    return jar if jar is not None and jar.exists() else None


# ---------------------------------------------------------------------------------------------
# Tokenization
# ---------------------------------------------------------------------------------------------

def drop_punctuation(tokens: Sequence[str]) -> str:
    return " ".join(t for t in tokens if t not in PUNCTUATIONS)


def ptb_tokenize_java(texts: Sequence[str]) -> list[str]:
    """The Stanford PTBTokenizer over `texts` in one JVM, punctuation dropped as pycocoevalcap does."""
    if not java_available():
        raise JavaUnavailable(TOKENIZE_HINT)
    jar = _tokenizer_jar()
    if jar is None:
        raise JavaUnavailable(PYCOCO_HINT)
    # One line per text, as pycocoevalcap writes them; our own temp folder, not site-packages.
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "sentences.txt"
        source.write_text("\n".join(t.replace("\n", " ") for t in texts), encoding="utf-8")
        done = subprocess.run(["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                               "-lowerCase", str(source)], capture_output=True, check=False)
    if done.returncode != 0:
        detail = done.stderr.decode(errors="replace")[-500:]
        raise RuntimeError(f"PTBTokenizer failed (exit {done.returncode}): {detail}")
    lines = done.stdout.decode("utf-8").split("\n")
    if len(lines) < len(texts):
        raise RuntimeError(f"PTBTokenizer returned {len(lines)} lines for {len(texts)} texts")
    return [drop_punctuation(line.rstrip().split(" ")) for line in lines[: len(texts)]]


_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_UNICODE = {"\u201c": '"', "\u201d": '"', "\u2018": "`", "\u2019": "'", "\u2014": " -- ", "\u2013": " -- ",
            "\u2026": " ... "}
_ABBREVIATIONS = frozenset({"mr.", "mrs.", "ms.", "dr.", "st.", "vs.", "etc.", "jr.", "sr.", "prof.", "inc.",
                            "ltd.", "co.", "corp."})
_INITIALS = re.compile(r"^(?:[a-z]\.){2,}$")
# Capitalised words before which the 3.4.1 lexer ends a sentence after a one-letter initial
# ("b. The" -> "b" "." "The", but "b. Spine" -> "b." "Spine"); observed by probing the jar.
_SENTENCE_STARTERS = frozenset([
    "The", "This", "That", "These", "There", "It", "We", "He", "She", "They", "A", "An", "In", "If", "But",
    "What", "When", "Mr.", "Ms.", "At", "As", "Then", "Now", "So", "After", "Many", "Some", "One", "While",
    "Our", "Her", "Their", "Yet", "Since", "However", "Here", "Once", "Such", "Other",
])
_LEADING = "([{\"`'#$*"
_TRAILING = ")]}\"',;:!?%*"
_CONTRACTION = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
_SPECIAL_SPLITS = {"cannot": ["can", "not"], "gonna": ["gon", "na"], "wanna": ["wan", "na"],
                   "gotta": ["got", "ta"], "'tis": ["'t", "is"], "'twas": ["'t", "was"]}
_INNER_COMMA = re.compile(r"(?<=[^\d]),|,(?=[^\d])")


def _quote(char: str, leading: bool) -> str:
    if char == '"':
        return "``" if leading else "''"
    return char


def _split_core(word: str) -> list[str]:
    if not word:
        return []
    if word in _SPECIAL_SPLITS:
        return list(_SPECIAL_SPLITS[word])
    if len(word) > 1 and word[0] == "." and word[1].isalpha():  # ").there" -> ")" "." "there"
        return ["."] + _split_core(word[1:])
    if "--" in word:
        head, _, tail = word.partition("--")
        return _split_core(head) + ["--"] + _split_core(tail)
    if "," in word and _INNER_COMMA.search(word):
        parts = _INNER_COMMA.split(word)
        out: list[str] = []
        for i, part in enumerate(parts):
            if i:
                out.append(",")
            out += _split_core(part)
        return out
    match = _CONTRACTION.match(word)
    if match and match.group(1) not in ("'", "o"):
        stem, suffix = match.groups()
        return _split_core(stem) + [suffix]
    return [word]


def _single_initial(word: str) -> bool:
    return len(word) == 2 and word[0].isalpha() and word[1] == "."


def _abbreviation(word: str) -> bool:
    return word in _ABBREVIATIONS or _INITIALS.match(word) is not None or _single_initial(word)


def _keeps_period(chunk: str, trailing: list[str], next_chunk: str) -> bool:
    """Where the Stanford lexer leaves a final period on its word."""
    if chunk in _ABBREVIATIONS or _INITIALS.match(chunk):
        return True
    if trailing and trailing[0] in (",", ";", ":"):  # "l1.," -> "l1." ","
        return True
    if _single_initial(chunk):  # kept, unless a sentence starts after it
        if trailing:
            return True  # "d.)" -> "d." ")", where "normal.)" gives "normal" "." ")"
        return next_chunk not in _SENTENCE_STARTERS  # the whole next word: "There;" does not count
    return chunk == "no." and not trailing and next_chunk[:1].isdigit()  # "No. 5"


def _tokenize_chunk(chunk: str, next_chunk: str) -> list[str]:
    leading: list[str] = []
    while chunk and chunk[0] in _LEADING and chunk not in _SPECIAL_SPLITS:
        leading.append(_BRACKETS.get(chunk[0], _quote(chunk[0], True)))
        chunk = chunk[1:]
    trailing: list[str] = []
    while chunk:
        if chunk.endswith("...") and len(chunk) > 3:
            trailing.insert(0, "...")
            # initials keep their own period: "d..." -> "d." "...", "e.g..." -> "e.g." "..."; words do
            # not: "lesions..." -> "lesions" "..."
            chunk = chunk[:-2] if _abbreviation(chunk[:-2]) else chunk[:-3]
        elif chunk[-1] in _TRAILING and not (chunk[-1] == "'" and chunk.endswith("n't")):
            if chunk[-1] == "'" and len(chunk) > 1 and chunk[-2] == "'":
                trailing.insert(0, "''")
                chunk = chunk[:-2]
                continue
            trailing.insert(0, _BRACKETS.get(chunk[-1], _quote(chunk[-1], False)))
            chunk = chunk[:-1]
        elif chunk[-1] == "." and chunk != "..." and not _keeps_period(chunk, trailing, next_chunk):
            trailing.insert(0, ".")
            chunk = chunk[:-1]
        else:
            break
    for key, name in _BRACKETS.items():
        chunk = chunk.replace(key, f" {name} ")
    core = [t for part in chunk.split() for t in _split_core(part)]
    return leading + core + trailing


def ptb_tokenize_python(text: str) -> str:
    """A Python mirror of the PTBTokenizer as pycocoevalcap runs it, punctuation dropped."""
    for char, repl in _UNICODE.items():
        text = text.replace(char, repl)
    text = text.replace("``", ' " ').replace("''", ' " ')
    chunks = text.split()
    following = chunks[1:] + [""]  # original case: the lexer looks at the next word's capital
    tokens = [t for chunk, after in zip(chunks, following) for t in _tokenize_chunk(chunk.lower(), after)]
    return drop_punctuation(tokens)


def tokenize_texts(texts: Sequence[str], tokenizer: str = "auto") -> tuple[list[str], str]:
    """(`texts` tokenized, the tokenizer used): "java", "python", or "auto" (Java when present)."""
    if tokenizer not in ("auto", "java", "python"):
        raise ValueError(f"tokenizer must be auto, java or python, not {tokenizer!r}")
    if tokenizer == "java" or (tokenizer == "auto" and java_available() and _tokenizer_jar() is not None):
        return ptb_tokenize_java(texts), "ptb-java"
    return [ptb_tokenize_python(t) for t in texts], "ptb-python-fallback"


# ---------------------------------------------------------------------------------------------
# Scorers over tokenized text: `hyps[i]` one string, `refs[i]` a list of strings
# ---------------------------------------------------------------------------------------------

def _ngrams(words: Sequence[str], n: int) -> Counter:
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i:i + k])] += 1
    return counts


def bleu(hyps: Sequence[str], refs: Sequence[Sequence[str]], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n (pycocoevalcap's `Bleu(n)` with option "closest")."""
    correct, guess = [0] * n, [0] * n
    test_len = ref_len = 0
    for hyp, references in zip(hyps, refs):
        words = hyp.split()
        counts = _ngrams(words, n)
        max_ref: dict = {}
        ref_lens = []
        for ref in references:
            ref_words = ref.split()
            ref_lens.append(len(ref_words))
            for gram, count in _ngrams(ref_words, n).items():
                max_ref[gram] = max(max_ref.get(gram, 0), count)
        test_len += len(words)
        ref_len += min((abs(length - len(words)), length) for length in ref_lens)[1]
        for k in range(n):
            guess[k] += max(0, len(words) - k)
        for gram, count in counts.items():
            correct[len(gram) - 1] += min(max_ref.get(gram, 0), count)
    scores, product = [], 1.0
    for k in range(n):
        product *= float(correct[k] + BLEU_TINY) / (guess[k] + BLEU_SMALL)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (test_len + BLEU_TINY) / (ref_len + BLEU_SMALL)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l_item(hyp: str, references: Sequence[str], beta: float = ROUGE_BETA) -> float:
    candidate = hyp.split(" ")  # split(" ") as pycocoevalcap: "" is one empty token
    precisions, recalls = [], []
    for ref in references:
        tokens = ref.split(" ")
        common = _lcs(tokens, candidate)
        precisions.append(common / float(len(candidate)))
        recalls.append(common / float(len(tokens)))
    p, r = max(precisions), max(recalls)
    return ((1 + beta ** 2) * p * r) / float(r + beta ** 2 * p) if p != 0 and r != 0 else 0.0


def rouge_l(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> tuple[float, list[float]]:
    per_item = [rouge_l_item(h, r) for h, r in zip(hyps, refs)]
    return sum(per_item) / len(per_item), per_item


def cider_d(hyps: Sequence[str], refs: Sequence[Sequence[str]], n: int = 4,
            sigma: float = CIDER_SIGMA) -> tuple[float, list[float]]:
    """pycocoevalcap's `Cider` (CIDEr-D), document frequencies from this corpus' references."""
    ref_counts = [[_ngrams(r.split(), n) for r in references] for references in refs]
    document_frequency: dict = defaultdict(float)
    for counts in ref_counts:
        for gram in {g for c in counts for g in c}:
            document_frequency[gram] += 1
    log_n = math.log(float(len(refs)))

    def vector(counts: Counter) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [defaultdict(float) for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for gram, tf in counts.items():
            k = len(gram) - 1
            vec[k][gram] = float(tf) * (log_n - math.log(max(1.0, document_frequency[gram])))
            norm[k] += vec[k][gram] ** 2
            if k == 1:
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    scores = []
    for hyp, counts_per_ref in zip(hyps, ref_counts):
        vec, norm, length = vector(_ngrams(hyp.split(), n))
        total = [0.0] * n
        for ref_count in counts_per_ref:
            vec_ref, norm_ref, length_ref = vector(ref_count)
            penalty = math.e ** (-(float(length - length_ref) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                value = sum(min(w, vec_ref[k][g]) * vec_ref[k][g] for g, w in vec[k].items())
                if norm[k] != 0 and norm_ref[k] != 0:
                    value /= norm[k] * norm_ref[k]
                total[k] += value * penalty
        scores.append(sum(total) / n / len(counts_per_ref) * 10.0)
    return sum(scores) / len(scores), scores


def meteor(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """METEOR 1.5 through pycocoevalcap's jar wrapper (Java)."""
    if not java_available():
        raise JavaUnavailable(JAVA_HINT)
    try:
        from pycocoevalcap.meteor.meteor import Meteor
    except ImportError:
        raise JavaUnavailable(PYCOCO_HINT) from None

    scorer = Meteor()
    try:
        score, _ = scorer.compute_score({i: list(r) for i, r in enumerate(refs)}, {i: [h] for i, h in enumerate(hyps)})
    finally:
        del scorer
    return float(score)


# ---------------------------------------------------------------------------------------------
# The whole set
# ---------------------------------------------------------------------------------------------

def report_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]], *, tokenizer: str = "auto",
                   with_meteor: bool = True) -> dict:
    """Corpus scores of `predictions[i]` against the reports `references[i]`.

    METEOR is None (with `meteor_error`) when Java is missing; the others are always computed.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise ValueError("report metrics need at least one prediction")
    if any(len(r) == 0 for r in references):
        raise ValueError("every prediction needs at least one reference report")
    flat_refs = [r for refs in references for r in refs]
    tokenized, used = tokenize_texts(list(predictions) + flat_refs, tokenizer)
    hyps = tokenized[: len(predictions)]
    refs, offset = [], len(predictions)
    for group in references:
        refs.append(tokenized[offset: offset + len(group)])
        offset += len(group)
    out: dict = {"n": len(hyps), "tokenizer": used}
    out.update({f"bleu{k + 1}": s for k, s in enumerate(bleu(hyps, refs))})
    out["rouge_l"] = rouge_l(hyps, refs)[0]
    out["cider"] = cider_d(hyps, refs)[0]
    out["meteor"] = None
    if with_meteor:
        try:
            out["meteor"] = meteor(hyps, refs)
        except JavaUnavailable as missing:
            out["meteor_error"] = str(missing)
    return out
