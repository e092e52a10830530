"""A GPT-4 judge through the `openai` client: binary for VQA answers, a 0-4 rubric for reports.

PeFoMed's finding is that exact match undercounts generative answers, and a GPT-4 judge agrees
with human raters. The VQA judge outputs 1 when the answer matches the reference "or is a good
enough answer" (PeFoMed's criterion); the report judge scores 0-4 on a 5-point Likert rubric,
and the scores are combined into the weighted average score (WASM): the mean score divided by
the top score 4, so 1.0 means every report got 4. The seeds do not quote PeFoMed's full prompt
text, so the prompts below are written to their stated criteria.

Model, `base_url` (any OpenAI-compatible server, e.g. vLLM) and concurrency come from
`JudgeConfig`; the API key is read from the environment variable it names and is never logged
or written. Judgments are cached on disk under a hash of (prompt, model), so a rerun pays
nothing twice. 429 and 5xx replies are retried with exponential backoff (honouring
Retry-After); a reply that cannot be parsed is retried once, then counted as unparseable and
left unscored, never guessed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

VQA_PROMPT = (
    "You are a medical expert grading the answer of an AI model to a question about a medical image.\n"
    "Question: {question}\nCorrect answer: {answer}\nModel answer: {prediction}\n"
    "Output 1 if the model answer matches the correct answer or is a good enough answer, otherwise output 0. "
    "Reply with the single digit only."
)
REPORT_PROMPT = (
    "You are a radiologist grading a generated radiology report against the reference report.\n"
    "Reference report: {answer}\nGenerated report: {prediction}\n"
    "Score the generated report from 0 to 4: 4 = clinically equivalent; 3 = minor omissions or wording "
    "differences; 2 = some clinically relevant findings missing or wrong; 1 = mostly wrong; 0 = unrelated "
    "or contradicts the reference. Reply with the single digit only."
)
PATTERNS = {"vqa": re.compile(r"^\s*([01])\s*\.?\s*$"), "report": re.compile(r"^\s*([0-4])\s*\.?\s*$")}


@dataclass
class JudgeConfig:
    model: str = "gpt-4"
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 4
    max_retries: int = 5
    timeout: float = 60.0
    backoff_base: float = 1.0
    backoff_max: float = 30.0
    cache_dir: str = ".judge_cache"


class Judge:
    def __init__(self, config: JudgeConfig) -> None:
        import openai

        self.config = config
        key = os.environ.get(config.api_key_env)
        if not key and config.base_url is None:
            raise ValueError(f"the judge needs an API key in ${config.api_key_env} (or a base_url of a local server)")
        self.client = openai.OpenAI(api_key=key or "unused", base_url=config.base_url, max_retries=0,
                                    timeout=config.timeout)
        self.cache = Path(config.cache_dir)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.prompt_tokens = self.completion_tokens = self.requests = 0

    def _key(self, prompt: str) -> str:
        return hashlib.sha256(json.dumps([prompt, self.config.model]).encode()).hexdigest()

    def _ask(self, prompt: str) -> str:
        import openai

        for attempt in range(self.config.max_retries + 1):
            try:
                reply = self.client.chat.completions.create(
                    model=self.config.model, messages=[{"role": "user", "content": prompt}], temperature=0,
                )
            except (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError) as e:
                if attempt == self.config.max_retries:
                    raise
                time.sleep(self._backoff(attempt, e))
                continue
            self.requests += 1
            if reply.usage is not None:
                self.prompt_tokens += reply.usage.prompt_tokens
                self.completion_tokens += reply.usage.completion_tokens
            return reply.choices[0].message.content or ""
        raise RuntimeError("unreachable")

    def _backoff(self, attempt: int, error) -> float:
        response = getattr(error, "response", None)
        retry_after = response.headers.get("retry-after") if response is not None else None
        if retry_after:
            try:
                return min(float(retry_after), self.config.backoff_max)
            except ValueError:
                pass
        return min(self.config.backoff_base * 2**attempt, self.config.backoff_max)

    def judge_one(self, kind: str, item: dict) -> dict:
        template = VQA_PROMPT if kind == "vqa" else REPORT_PROMPT
        prompt = template.format(question=item.get("question", ""), answer=item["answer"], prediction=item["prediction"])
        path = self.cache / f"{self._key(prompt)}.json"
        if path.exists():
            return {**json.loads(path.read_text()), "cached": True}
        result = {"score": None, "error": "unparseable"}
        for _ in range(2):  # one retry for an unparseable reply
            text = self._ask(prompt)
            match = PATTERNS[kind].match(text)
            if match:
                result = {"score": int(match.group(1))}
                break
            result = {"score": None, "error": "unparseable", "reply": text[:200]}
        if result["score"] is not None:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(result))
            tmp.replace(path)
        return {**result, "cached": False}

    def judge_all(self, kind: str, items: list[dict]) -> list[dict]:
        with ThreadPoolExecutor(max_workers=max(self.config.concurrency, 1)) as pool:
            return list(pool.map(lambda it: self.judge_one(kind, it), items))


def summarize(kind: str, items: list[dict], judgments: list[dict], exact: list[bool] | None = None) -> dict:
    scored = [j["score"] for j in judgments if j["score"] is not None]
    out = {"n": len(items), "n_scored": len(scored), "n_unparseable": len(judgments) - len(scored),
           "n_cached": sum(j.get("cached", False) for j in judgments)}
    if kind == "vqa":
        out["judge_accuracy"] = sum(scored) / len(scored) if scored else float("nan")
        if exact is not None:
            table = {"judge1_em1": 0, "judge1_em0": 0, "judge0_em1": 0, "judge0_em0": 0}
            for j, e in zip(judgments, exact):
                if j["score"] is not None:
                    table[f"judge{j['score']}_em{int(e)}"] += 1
            out["agreement_with_exact_match"] = table
    else:
        mean = sum(scored) / len(scored) if scored else float("nan")
        out.update({"mean_score": mean, "wasm": mean / 4, "histogram": {s: scored.count(s) for s in range(5)}})
    return out
