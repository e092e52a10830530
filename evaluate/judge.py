"""The GPT judge of PeFoMed, through the `openai` client and any OpenAI-compatible server.

Prompts: PeFoMed's own, from its public evaluation scripts (jinlHe/PeFoMed
`gpt_eval/gpt_eval_medvqa.py` and `gpt_eval/gpt_eval_iuxray.py`), word for word, with only the
whitespace tidied (the indentation of their triple-quoted strings and doubled blank lines removed). VQA: output 1 when the answer "matches the correct answer or is a
good enough answer", else 0, replying "Correctness: <n>". Reports: a 0-4 rubric (4 = hard to tell
from the actual report ... 0 = no consistency), replying "Score: <n>".

Parsing follows theirs: the first number after the label (`Correctness:` / `Score:`); a reply that
is only the number is accepted too. A number outside the scale (2 for VQA, 5 for a report), a
fraction ("3.5", which their `int()` rejected) or no number at all is unparseable: the request is
asked once more, and if the second reply is unparseable too the item is counted under
`n_unparseable` and left unscored (never guessed).

WASM (weighted average score metric, PeFoMed's report score over the 5-point Likert scale):
sum_k w_k * n_k / N over the rubric levels k = 0..4. The PeFoMed text available here names the
metric but not its weights, so the default weights are k / 4 (0, 0.25, 0.5, 0.75, 1): WASM is then
the mean rubric score on a 0-1 scale. `JudgeConfig.wasm_weights` sets other weights.

Operation:
- `JudgeConfig` (a YAML file for `--judge-config`): model, base_url (vLLM or any compatible
  server), concurrency (a thread pool), max_retries, timeout, backoff_base / backoff_max,
  cache_dir, max_tokens, temperature, wasm_weights, api_key_env. The key is read from the
  environment variable `api_key_env` names (OPENAI_API_KEY by default); a config that holds a key
  itself is refused. The key goes to the client only: it is never logged, cached or written.
- Cache: one JSON file per judgment under cache_dir, named by the SHA-256 of (prompt template,
  model, question, reference, prediction): a rerun pays nothing twice. Only parsed verdicts are
  cached, so an unparseable or failed item is asked again on the next run.
- 429, 5xx, timeouts and connection errors are retried up to max_retries times with exponential
  backoff (backoff_base * 2^attempt, at most backoff_max), or after the server's Retry-After when it
  sends one. Other API errors (bad key, bad model) stop the run with the server's message.
- Tokens: the prompt and completion tokens of every request (from `usage`) are summed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path

from pefomed.errors import UserError

log = logging.getLogger(__name__)

VQA_PROMPT = """Given a question about an medical image, there is a correct answer to the question and an answer to be determined. If the answer to be determined matches the correct answer or is a good enough answer to the question, output 1; otherwise output 0. Evaluate the answer to be determined (1 or 0).

Question:
- question about the medical image: {question}

Answers:
- correct answer(ground truth): {answer}
  answer to be determined: {prediction}

Task:
- Given a question about an medical image, there is a correct answer to the question and an answer to be determined. If the answer to be determined matches the correct answer or is a good enough answer to the question, output 1; otherwise output 0. Evaluate the answer to be determined (1 or 0).

Output Format:
Correctness: your answer
"""

REPORT_PROMPT = """Given a actual medical report on a medical image and a generated medical report that needs to be determined, evaluate the generated report to be determined (0 or 1 or 2 or 3 or 4).

standard :
4: The generated medical report exhibits minimal discrepancy in meaning compared to the actual  report, ensuring complete consistency in critical aspects such as diagnosis and treatment recommendations. It encapsulates all requisite information elements without omissions.
Applicability: This level is pertinent when evaluators face difficulty distinguishing between the generated and actual medical reports.
3: Generated medical reports closely resemble actual reports in critical elements, albeit with minor deviations that do not compromise the overall accuracy and intelligibility. They maintain alignment with the principal diagnosis and recommendations of the authentic reports, despite possible negligible discrepancies in non-essential information. These reports encompass nearly all vital information, with minimal omissions that do not impede comprehensive understanding.
Applicability: This criterion applies when the generated report's overall quality approximates that of the actual report, albeit with slight variances in detail.
2: The generated report diverges significantly from the actual report in several key aspects, yet its primary content and intent remain recognizable. Despite discrepancies in crucial information, the core diagnosis and recommendations are accurate. Omissions of some information elements have a marginal impact on the report's overall comprehensibility.
Applicability: This level is relevant when the report's foundational structure mirrors that of the actual report, despite a notable quantity and severity of inaccuracies or omissions.
1: The generated report is quite different from the actual report in several key aspects, which affects the basic understanding and use of the reports. There are multiple errors or misleading statements of key information. More important information is left out, affecting the completeness and practicality of the report.
Applicability: Although the report retains some basic framework or content, there are many errors, which affect the overall quality.
0: The generated report hardly has any consistency with the actual report and completely deviates from the correct message or purpose. The information in the report is completely inconsistent with the actual report and is full of errors or irrelevant content. It lacks the necessary information elements to serve as an effective medical report.
Applicability: It is applicable when the content of the report is completely inconsistent with the intended goal and it is almost impossible to identify it as a valid medical report.

actual medical report:
- actual medical report: {answer}

generated medical report:
- generated medical report to be determined: {prediction}

Task:
- Given a actual medical report on a medical image and a generated medical report that needs to be determined, evaluate the generated report to be determined (0 or 1 or 2 or 3 or 4).

Output Format(Only "Score:" and a rating number can be output):
Score: your answer
"""

PROMPTS = {"vqa": VQA_PROMPT, "report": REPORT_PROMPT}
LABELS = {"vqa": "Correctness:", "report": "Score:"}
SCALES = {"vqa": (0, 1), "report": (0, 1, 2, 3, 4)}
_NUMBER = re.compile(r"\b[0-9]+(?:\.[0-9]+)?\b")  # PeFoMed searched \b[0-5](?:\.\d+)?\b after the label
_BARE_NUMBER = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*\.?\s*$")
RETRYABLE_STATUS = frozenset({408, 409, 429})


class JudgeError(UserError, RuntimeError):
    """The judge cannot run at all (bad config, missing key, a non-retryable API error)."""


@dataclass
class JudgeConfig:
    model: str = "gpt-4"
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 4
    max_retries: int = 5
    timeout: float = 60.0
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    cache_dir: str = ".judge_cache"
    max_tokens: int = 100
    temperature: float = 0.0
    wasm_weights: tuple[float, ...] = field(default=(0.0, 0.25, 0.5, 0.75, 1.0))

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise JudgeError(f"judge config: concurrency must be >= 1, got {self.concurrency}")
        if self.max_retries < 0:
            raise JudgeError(f"judge config: max_retries must be >= 0, got {self.max_retries}")
        self.wasm_weights = tuple(float(w) for w in self.wasm_weights)
        if len(self.wasm_weights) != 5:
            raise JudgeError(f"judge config: wasm_weights needs 5 weights (levels 0-4), got {len(self.wasm_weights)}")


def load_judge_config(path: str | Path | None) -> JudgeConfig:
    """A `JudgeConfig` from a YAML file (defaults when `path` is None); unknown fields are errors."""
    if path is None:
        return JudgeConfig()
    import yaml

    path = Path(path)
    if not path.exists():
        raise JudgeError(f"{path}: judge config not found")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise JudgeError(f"{path}: a judge config is a mapping of JudgeConfig fields")
    if "api_key" in data:
        raise JudgeError(f"{path}: do not put the API key in the config; export it and name the variable "
                         "with api_key_env (default OPENAI_API_KEY)")
    known = {f.name for f in fields(JudgeConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise JudgeError(f"{path}: unknown judge config field {unknown[0]!r}; known: {', '.join(sorted(known))}")
    return JudgeConfig(**data)


def build_prompt(kind: str, item: dict) -> str:
    answer = item["answer"]
    if isinstance(answer, (list, tuple)):
        answer = " / ".join(str(a) for a in answer)
    return PROMPTS[kind].format(question=item.get("question", ""), answer=answer, prediction=item["prediction"])


def parse_reply(kind: str, text: str | None) -> int | None:
    """The judge's number, or None when the reply is not one number on the scale after the label."""
    if not text:
        return None
    label = LABELS[kind]
    if label in text:
        match = _NUMBER.search(text.split(label, 1)[1])
        value = match.group(0) if match else None
    else:
        bare = _BARE_NUMBER.match(text)
        value = bare.group(1) if bare else None
    if value is None or "." in value or int(value) not in SCALES[kind]:
        return None
    return int(value)


def cache_key(kind: str, model: str, item: dict) -> str:
    payload = [PROMPTS[kind], model, str(item.get("question", "")), item["answer"], str(item["prediction"])]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class Judge:
    """Judges items through an OpenAI-compatible chat-completions endpoint; thread-safe counters."""

    def __init__(self, config: JudgeConfig, *, sleep: Callable[[float], None] = time.sleep) -> None:
        import openai

        key = os.environ.get(config.api_key_env)
        if not key:
            if config.base_url is None:
                raise JudgeError(f"the judge needs an API key: export {config.api_key_env} (or set api_key_env in "
                                 "the judge config to the variable that holds it)")
            key = "no-key"  # local servers (vLLM) accept any key; the client refuses an empty one
        self.config = config
        self.client = openai.OpenAI(api_key=key, base_url=config.base_url, timeout=config.timeout, max_retries=0)
        self.cache_dir = Path(config.cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._sleep = sleep
        self._lock = threading.Lock()
        self.usage = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "cache_hits": 0, "retries": 0}

    # -- one request ---------------------------------------------------------------------------
    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                self.usage[name] += delta

    def _delay(self, attempt: int, error: Exception) -> float:
        response = getattr(error, "response", None)
        retry_after = response.headers.get("retry-after") if response is not None else None
        if retry_after is not None:
            try:
                return min(max(float(retry_after), 0.0), self.config.backoff_max)
            except ValueError:
                pass  # an HTTP date: fall back to our own backoff
        return min(self.config.backoff_base * 2 ** attempt, self.config.backoff_max)

    def _retryable(self, error: Exception) -> bool:
        import openai

        if isinstance(error, (openai.APIConnectionError, openai.APITimeoutError)):
            return True
        status = getattr(error, "status_code", None)
        return status is not None and (status in RETRYABLE_STATUS or status >= 500)

    def complete(self, prompt: str) -> str:
        """One chat completion, retried on 429 / 5xx / timeouts; raises the last error when spent."""
        import openai

        for attempt in range(self.config.max_retries + 1):
            try:
                reply = self.client.chat.completions.create(
                    model=self.config.model, messages=[{"role": "user", "content": prompt}],
                    max_tokens=self.config.max_tokens, temperature=self.config.temperature)
            except openai.APIError as error:
                if not self._retryable(error):
                    raise JudgeError(f"judge request refused ({getattr(error, 'status_code', '?')}): "
                                     f"{getattr(error, 'message', error)}") from None
                if attempt == self.config.max_retries:
                    raise
                delay = self._delay(attempt, error)
                log.info("judge: %s, retry %d/%d in %.2fs", type(error).__name__, attempt + 1,
                         self.config.max_retries, delay)
                self._count(retries=1)
                self._sleep(delay)
                continue
            usage = reply.usage
            self._count(requests=1, prompt_tokens=usage.prompt_tokens if usage else 0,
                        completion_tokens=usage.completion_tokens if usage else 0)
            return (reply.choices[0].message.content or "") if reply.choices else ""
        raise AssertionError("the retry loop always returns or raises")

    # -- one item ------------------------------------------------------------------------------
    def judge_one(self, kind: str, item: dict) -> dict:
        """{"score": int | None, "status": "ok" | "cached" | "unparseable" | "failed", "reply": str}."""
        import openai

        path = self.cache_dir / f"{cache_key(kind, self.config.model, item)}.json"
        if path.exists():
            self._count(cache_hits=1)
            return {**json.loads(path.read_text()), "status": "cached"}
        prompt = build_prompt(kind, item)
        reply = ""
        for _ in range(2):  # an unparseable reply is asked once more
            try:
                reply = self.complete(prompt)
            except openai.APIError as error:
                return {"score": None, "status": "failed", "reply": f"{type(error).__name__}: "
                                                                  f"{getattr(error, 'message', error)}"}
            score = parse_reply(kind, reply)
            if score is not None:
                verdict = {"score": score, "reply": reply}
                tmp = path.with_name(f"{path.name}.{threading.get_ident()}.tmp")
                tmp.write_text(json.dumps(verdict))
                tmp.replace(path)
                return {**verdict, "status": "ok"}
        return {"score": None, "status": "unparseable", "reply": reply}

    def judge_items(self, kind: str, items: Sequence[dict]) -> list[dict]:
        if kind not in PROMPTS:
            raise ValueError(f"judge kind must be 'vqa' or 'report', not {kind!r}")
        with ThreadPoolExecutor(max_workers=self.config.concurrency) as pool:
            return list(pool.map(lambda it: self.judge_one(kind, it), items))


# ---------------------------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------------------------

def _status_counts(verdicts: Sequence[dict]) -> dict:
    return {"n": len(verdicts), "n_scored": sum(v["score"] is not None for v in verdicts),
            "n_unparseable": sum(v["status"] == "unparseable" for v in verdicts),
            "n_failed": sum(v["status"] == "failed" for v in verdicts),
            "n_cached": sum(v["status"] == "cached" for v in verdicts)}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def summarize_vqa(items: Sequence[dict], verdicts: Sequence[dict], exact: Sequence[bool] | None = None) -> dict:
    """Judge accuracy (CLOSED / OPEN / overall over scored items) and its agreement with exact match."""
    out = _status_counts(verdicts)
    scored = [(it, v["score"]) for it, v in zip(items, verdicts) if v["score"] is not None]
    by_type = {t: [s for it, s in scored if str(it.get("answer_type") or "").upper() == t] for t in ("CLOSED", "OPEN")}
    out.update({"accuracy": _mean([s for _, s in scored]), "closed": _mean(by_type["CLOSED"]),
                "open": _mean(by_type["OPEN"])})
    if exact is not None:
        table = {"judge_1_exact_1": 0, "judge_1_exact_0": 0, "judge_0_exact_1": 0, "judge_0_exact_0": 0}
        for verdict, hit in zip(verdicts, exact):
            if verdict["score"] is not None:
                table[f"judge_{verdict['score']}_exact_{int(bool(hit))}"] += 1
        agree = table["judge_1_exact_1"] + table["judge_0_exact_0"]
        out["vs_exact_match"] = {**table, "agreement": agree / out["n_scored"] if out["n_scored"] else float("nan")}
    return out


def summarize_report(verdicts: Sequence[dict], weights: Sequence[float]) -> dict:
    """The rubric histogram, the mean score and WASM = sum_k w_k n_k / N over scored reports."""
    out = _status_counts(verdicts)
    scores = [v["score"] for v in verdicts if v["score"] is not None]
    histogram = {str(k): scores.count(k) for k in range(5)}
    out.update({"histogram": histogram, "mean_score": _mean(scores),
                "wasm": sum(weights[k] * histogram[str(k)] for k in range(5)) / len(scores) if scores else float("nan"),
                "wasm_weights": list(weights)})
    return out


def run_judge(items: Sequence[dict], config: JudgeConfig, *, exact: Sequence[bool] | None = None,
              sleep: Callable[[float], None] = time.sleep) -> dict:
    """Judge VQA items (task != "report") and report items; `exact[i]` is item i's exact-match hit.

    Returns {"model", "vqa": summary, "report": summary, "tokens": usage, "verdicts": per item}.
    """
    judge = Judge(config, sleep=sleep)
    vqa_index = [i for i, it in enumerate(items) if it.get("task", "vqa") != "report"]
    report_index = [i for i, it in enumerate(items) if it.get("task", "vqa") == "report"]
    verdicts: list[dict | None] = [None] * len(items)
    out: dict = {"model": config.model, "base_url": config.base_url}
    if vqa_index:
        found = judge.judge_items("vqa", [items[i] for i in vqa_index])
        for i, v in zip(vqa_index, found):
            verdicts[i] = v
        out["vqa"] = summarize_vqa([items[i] for i in vqa_index], found,
                                   [exact[i] for i in vqa_index] if exact is not None else None)
    if report_index:
        found = judge.judge_items("report", [items[i] for i in report_index])
        for i, v in zip(report_index, found):
            verdicts[i] = v
        out["report"] = summarize_report(found, config.wasm_weights)
    out["tokens"] = dict(judge.usage)
    out["verdicts"] = verdicts
    return out
