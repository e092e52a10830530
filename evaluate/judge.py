"""The GPT judge of PeFoMed, through the `openai` client and any OpenAI-compatible server.

Prompts: PeFoMed's own, from its public evaluation scripts (jinlHe/PeFoMed
`gpt_eval/gpt_eval_medvqa.py` and `gpt_eval/gpt_eval_iuxray.py`), word for word, with only the
whitespace tidied (the indentation of their triple-quoted strings and doubled blank lines removed).
VQA: output 1 when the answer "matches the correct answer or is a good enough answer", else 0,
replying "Correctness: <n>". Reports: a 0-4 rubric (4 = hard to tell from the actual report ...
0 = no consistency), replying "Score: <n>".

Parsing follows theirs: the first number after the label (`Correctness:` / `Score:`); a reply that
is only the number is accepted too. A number outside the scale (2 for VQA, 5 for a report), a
fraction ("3.5", which their `int()` rejected) or no number at all is unparseable, and so is a
malformed response (not JSON, an HTML page, no `choices`, no message text): the request is asked
once more, and if the second reply is unparseable too the item is counted under `n_unparseable`
(with the reason under `unparseable_reasons`) and left unscored, never guessed.

WASM (weighted average score metric, PeFoMed's report score over the 5-point Likert scale):
sum_k w_k * n_k / N over the rubric levels k = 0..4. The PeFoMed text available here names the
metric but not its weights, so the default weights are k / 4 (0, 0.25, 0.5, 0.75, 1): WASM is then
the mean rubric score on a 0-1 scale. `JudgeConfig.wasm_weights` sets other weights.

Operation:
- `JudgeConfig` (a YAML file for `--judge-config`): model, base_url (vLLM or any compatible
  server), concurrency (a thread pool), max_retries, timeout, cache_dir, max_tokens, temperature,
  wasm_weights, stop_after_failures, api_key_env. The key is read from the environment variable
  `api_key_env` names (OPENAI_API_KEY by default); a config that holds a key itself is refused.
  The key goes to the client only: it is never logged, cached or written, and it is blanked out of
  any server message that quotes it.
- Retries are the openai client's own (`max_retries`, `timeout`): 408, 409, 429, 5xx, timeouts and
  connection errors are retried with exponential backoff (0.5 s doubling, at most 8 s, jittered),
  or after the server's `Retry-After` / `retry-after-ms` when it sends one (up to 2 minutes).
- Failures never stop the scoring: an item whose request still fails is counted under `failures`
  by reason (rate_limited, server_error, timeout, connection_error, authentication,
  permission_denied, not_found, bad_request, http_<status>). A refusal that no retry can fix
  (401, 403, 404, 400, ...) stops the judge at once, and so do `stop_after_failures` failed items
  in a row; the items not sent then are counted as `not_sent`, and `stopped` says why. Items
  already judged keep their verdicts, and `evaluate.score` has written the lexical metrics
  before the judge starts.
- Cache: one JSON file per judgment under cache_dir, named by the SHA-256 of (prompt template,
  model, question, reference, prediction): a rerun pays nothing twice. Only parsed verdicts are
  cached, so an unparseable or failed item is asked again on the next run. Each writer writes its
  own temporary file (`tempfile.mkstemp` in cache_dir) and renames it into place, so threads
  judging identical items never collide; an unreadable cache file is treated as a miss.
- Tokens: the prompt and completion tokens of every response (from `usage`) are summed, with the
  HTTP requests sent (retries included). A response without `usage` still gives its verdict and
  is counted under `responses_without_usage`, so the token sums are then lower bounds.
- Credentialed data: PhysioNet's data use agreement for MIMIC-CXR forbids sending it through
  third-party APIs such as OpenAI's and recommends a locally deployed LLM. An item is restricted
  when it carries `restricted: true` (the MIMIC-CXR reader marks its samples, and a dataset spec
  can mark any other) or its image path has MIMIC-CXR's `pNN/pNNNNNNNN/sNNNNNNNN/` layout.
  Restricted items go only to a local endpoint: `base_url`'s host must resolve, and only to
  loopback or private addresses (a name that does not resolve is not local; no `base_url` means
  api.openai.com). Otherwise they are withheld (never sent: no connection is opened for them),
  counted under `n_withheld` with the reason and the fix, and every other item is judged. The
  only override is `restricted_data_ok: "<statement>"` in the judge config, an explicit statement
  that the endpoint keeps no data (e.g. an agreement with the provider), which is logged with the
  endpoint and kept in the judge section of metrics.json.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import re
import socket
import tempfile
import threading
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import urlsplit

from pefomed.errors import UserError
from pefomed.evaluate.metrics.vqa import group_accuracy

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
# Failure reasons of a request whose retries are spent, by HTTP status; other statuses are http_<status>.
STATUS_REASONS = {400: "bad_request", 401: "authentication", 403: "permission_denied", 404: "not_found",
                  408: "timeout", 409: "conflict", 422: "bad_request", 429: "rate_limited"}
# What no retry fixes: the judge stops at the first one.
FATAL_STATUSES = frozenset({400, 401, 403, 404, 422})
REASON_HINTS = {
    "authentication": "the server refused the API key: export a valid one in {env}",
    "permission_denied": "the API key may not use this model or endpoint",
    "not_found": "check `model` and `base_url` in the judge config",
    "bad_request": "the server rejected the request: check `model`, `max_tokens` and `temperature`",
    "connection_error": "no connection to {where}: check the network and `base_url`",
    "timeout": "the server did not answer within `timeout` seconds",
    "rate_limited": "rate limited after every retry: lower `concurrency` or raise `max_retries`",
    "server_error": "the server kept failing (5xx)",
}
NOT_SENT = "not_sent"
WITHHELD = "restricted_data"
# MIMIC-CXR's study folders (p10/p10000032/s50414267/), as its image paths and report files carry them.
_MIMIC_PATH = re.compile(r"(?:^|/)p1\d/p1\d{7}/s\d{8}(?:/|\.txt$)")
MIN_STATEMENT_CHARS = 20


class JudgeError(UserError, RuntimeError):
    """The judge cannot start (a bad config, a missing API key); the message names the fix."""


@dataclass
class JudgeConfig:
    model: str = "gpt-4"
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 4
    max_retries: int = 5
    timeout: float = 60.0
    cache_dir: str = ".judge_cache"
    max_tokens: int = 100
    temperature: float = 0.0
    wasm_weights: tuple[float, ...] = field(default=(0.0, 0.25, 0.5, 0.75, 1.0))
    stop_after_failures: int = 5
    # An explicit statement that the (non-local) endpoint keeps no data, which lets restricted
    # items be sent there; logged and recorded. Leave unset to keep them to local endpoints.
    restricted_data_ok: str | None = None

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise JudgeError(f"judge config: concurrency must be >= 1, got {self.concurrency}")
        if self.max_retries < 0:
            raise JudgeError(f"judge config: max_retries must be >= 0, got {self.max_retries}")
        if self.timeout <= 0:
            raise JudgeError(f"judge config: timeout must be > 0 seconds, got {self.timeout}")
        if self.stop_after_failures < 1:
            raise JudgeError(f"judge config: stop_after_failures must be >= 1, got {self.stop_after_failures}")
        self.wasm_weights = tuple(float(w) for w in self.wasm_weights)
        if len(self.wasm_weights) != 5:
            raise JudgeError(f"judge config: wasm_weights needs 5 weights (levels 0-4), got {len(self.wasm_weights)}")
        if self.restricted_data_ok is not None and (
                not isinstance(self.restricted_data_ok, str) or len(self.restricted_data_ok.strip()) < MIN_STATEMENT_CHARS):
            raise JudgeError(
                f"judge config: restricted_data_ok={self.restricted_data_ok!r} must be a written statement (at least "
                f"{MIN_STATEMENT_CHARS} characters) of why this endpoint may receive credentialed data, e.g. \"Azure "
                "OpenAI deployment under our PhysioNet-approved agreement, no data retention\"; it is logged with every "
                "run. To keep restricted items local, remove it and point base_url at a local server")


def load_judge_config(path: str | Path | None) -> JudgeConfig:
    """A `JudgeConfig` from a YAML file (defaults when `path` is None); unknown fields are errors."""
    if path is None:
        return JudgeConfig()
    import yaml

    path = Path(path)
    if not path.is_file():
        raise JudgeError(f"{path}: judge config not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise JudgeError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise JudgeError(f"{path}: a judge config is a mapping of JudgeConfig fields")
    if "api_key" in data:
        raise JudgeError(f"{path}: do not put the API key in the config; export it and name the variable "
                         "with api_key_env (default OPENAI_API_KEY)")
    known = {f.name for f in fields(JudgeConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise JudgeError(f"{path}: unknown judge config field {unknown[0]!r}; known: {', '.join(sorted(known))}")
    try:
        return JudgeConfig(**data)
    except (TypeError, ValueError) as e:
        raise JudgeError(f"{path}: {e}") from None


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


def read_completion(body: bytes) -> tuple[str | None, dict | None, str | None]:
    """(message text, usage, None) from a chat-completions response body, or (None, None, what is wrong).

    Checked by hand rather than trusted to the client's models, which accept a JSON list, an HTML
    page or `"choices": "abc"` without complaint.
    """
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        return None, None, "html_page" if b"<html" in body[:512].lower() else "not_json"
    if not isinstance(data, dict):
        return None, None, "not_an_object"
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        return None, None, "no_choices"
    message = choices[0].get("message") if isinstance(choices[0], dict) else None
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str):
        return None, None, "no_message_text"
    usage = data.get("usage")
    if not (isinstance(usage, dict) and all(isinstance(usage.get(k), int)
                                            for k in ("prompt_tokens", "completion_tokens"))):
        usage = None
    return content, usage, None


class RequestFailed(Exception):
    """A request that failed for good (the client's retries spent, or a refusal no retry fixes)."""

    def __init__(self, reason: str, detail: str, fatal: bool) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.fatal = reason, detail, fatal


class Judge:
    """Judges items through an OpenAI-compatible chat-completions endpoint; thread-safe counters."""

    def __init__(self, config: JudgeConfig, *, transport=None) -> None:
        """`transport`: an httpx transport for the client's requests (a proxy, or a test's recorder)."""
        try:
            import openai
        except ImportError:
            raise JudgeError("the judge needs the openai client: pip install openai "
                             "(or pip install -e '.[judge]')") from None

        key = secret = os.environ.get(config.api_key_env)
        if not key:
            if config.base_url is None:
                raise JudgeError(f"the judge needs an API key: export {config.api_key_env} (or set api_key_env in "
                                 "the judge config to the variable that holds it)")
            key = "no-key"  # local servers (vLLM) accept any key; the client refuses an empty one
        self.config = config
        self._secret = secret  # blanked out of anything the server echoes back
        self._lock = threading.Lock()
        self._calls = 0
        self._failures_in_a_row = 0
        self.stopped: str | None = None
        self.usage = {"requests": 0, "retries": 0, "prompt_tokens": 0, "completion_tokens": 0, "cache_hits": 0,
                      "responses_without_usage": 0}
        # Every HTTP request the client sends, retries included, passes this hook.
        http_client = openai.DefaultHttpxClient(event_hooks={"request": [lambda _request: self._count(requests=1)]},
                                                **({"transport": transport} if transport is not None else {}))
        self.client = openai.OpenAI(api_key=key, base_url=config.base_url, timeout=config.timeout,
                                    max_retries=config.max_retries, http_client=http_client)
        self.cache_dir = Path(config.cache_dir)
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise JudgeError(f"{self.cache_dir}: cannot create the judge cache folder ({e.strerror}); "
                             "set cache_dir in the judge config") from None

    def close(self) -> None:
        self.client.close()

    # -- one request ---------------------------------------------------------------------------
    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                self.usage[name] += delta

    def tokens(self) -> dict:
        """The usage counters; `retries` are the requests sent beyond one per call."""
        with self._lock:
            return {**self.usage, "retries": self.usage["requests"] - self._calls}

    def _redact(self, text: str) -> str:
        return text.replace(self._secret, "<redacted>") if self._secret else text

    def _failure(self, error: Exception) -> RequestFailed:
        import openai

        if isinstance(error, openai.APITimeoutError):  # a subclass of APIConnectionError
            return RequestFailed("timeout", REASON_HINTS["timeout"], fatal=False)
        if isinstance(error, openai.APIConnectionError):
            detail = REASON_HINTS["connection_error"].format(where=self.config.base_url or "the OpenAI API")
            cause = error.__cause__ or error.__context__
            if cause is not None:
                detail += f" ({type(cause).__name__}: {' '.join(str(cause).split())[:200]})"
            return RequestFailed("connection_error", self._redact(detail), fatal=False)
        status = getattr(error, "status_code", None)
        if not isinstance(status, int):
            return RequestFailed("api_error", self._redact(f"{type(error).__name__}: {error}"[:300]), fatal=False)
        reason = STATUS_REASONS.get(status) or ("server_error" if status >= 500 else f"http_{status}")
        message = " ".join(str(getattr(error, "message", error)).split())[:300]
        hint = REASON_HINTS.get(reason, "").format(env=self.config.api_key_env, where=self.config.base_url)
        detail = f"HTTP {status} from the server: {message}" + (f"; {hint}" if hint else "")
        # The client retries 408, 409, 429 and 5xx; any other 4xx is a refusal no retry fixes.
        fatal = status in FATAL_STATUSES or (400 <= status < 500 and status not in (408, 409, 429))
        return RequestFailed(reason, self._redact(detail), fatal=fatal)

    def complete(self, prompt: str) -> tuple[str | None, str | None]:
        """(reply text, None), or (None, what is malformed in the response); raises RequestFailed.

        The openai client does the retrying (`max_retries`, `timeout`, Retry-After).
        """
        import openai

        with self._lock:
            self._calls += 1
        try:
            raw = self.client.chat.completions.with_raw_response.create(
                model=self.config.model, messages=[{"role": "user", "content": prompt}],
                max_tokens=self.config.max_tokens, temperature=self.config.temperature)
        except openai.APIError as error:
            raise self._failure(error) from None
        text, usage, problem = read_completion(raw.content)
        if problem is None:
            if usage is None:
                self._count(responses_without_usage=1)
            else:
                self._count(prompt_tokens=usage["prompt_tokens"], completion_tokens=usage["completion_tokens"])
        return text, problem

    # -- one item ------------------------------------------------------------------------------
    def _read_cache(self, path: Path) -> dict | None:
        try:
            cached = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            log.warning("judge: %s is not a readable cache entry; asking again", path)
            return None
        if not isinstance(cached, dict) or not isinstance(cached.get("score"), int):
            log.warning("judge: %s is not a cache entry (no score); asking again", path)
            return None
        return cached

    def _write_cache(self, path: Path, verdict: dict) -> None:
        """Atomically: a temporary file of this writer's own, then a rename over the final name."""
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=f"{path.stem}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o644)  # mkstemp's 0600 would make the cache private to this user
            with os.fdopen(fd, "w") as f:
                json.dump(verdict, f)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _note(self, failed: RequestFailed | None) -> None:
        with self._lock:
            if failed is None:
                self._failures_in_a_row = 0
                return
            self._failures_in_a_row += 1
            if self.stopped is not None:
                return
            if failed.fatal:
                self.stopped = f"{failed.reason}: {failed.detail}"
            elif self._failures_in_a_row >= self.config.stop_after_failures:
                self.stopped = (f"{self._failures_in_a_row} items failed in a row, the last with {failed.reason}: "
                                f"{failed.detail}")

    def judge_one(self, kind: str, item: dict) -> dict:
        """{"score": int | None, "status": "ok" | "cached" | "unparseable" | "failed", "reply": str}.

        Failed and unparseable verdicts carry a `reason`.
        """
        path = self.cache_dir / f"{cache_key(kind, self.config.model, item)}.json"
        cached = self._read_cache(path)
        if cached is not None:
            self._count(cache_hits=1)
            return {**cached, "status": "cached"}
        if self.stopped is not None:
            return {"score": None, "status": "failed", "reason": NOT_SENT, "reply": ""}
        prompt = build_prompt(kind, item)
        reply, reason = "", ""
        for _ in range(2):  # an unparseable reply is asked once more
            try:
                text, problem = self.complete(prompt)
            except RequestFailed as failed:
                self._note(failed)
                return {"score": None, "status": "failed", "reason": failed.reason, "reply": failed.detail}
            self._note(None)
            if problem is not None:
                reply, reason = "", f"malformed_response:{problem}"
                continue
            score = parse_reply(kind, text)
            if score is not None:
                verdict = {"score": score, "reply": text}
                try:
                    self._write_cache(path, verdict)
                except OSError as e:  # the verdict stands; only the rerun will pay for it again
                    log.warning("judge: cannot write the cache entry %s (%s)", path, e.strerror or e)
                return {**verdict, "status": "ok"}
            reply, reason = text, "no_score_in_reply"
        return {"score": None, "status": "unparseable", "reason": reason, "reply": self._redact(reply)}

    def judge_items(self, kind: str, items: Sequence[dict]) -> list[dict]:
        if kind not in PROMPTS:
            raise ValueError(f"judge kind must be 'vqa' or 'report', not {kind!r}")
        with ThreadPoolExecutor(max_workers=self.config.concurrency) as pool:
            return list(pool.map(lambda it: self.judge_one(kind, it), items))


# ---------------------------------------------------------------------------------------------
# Credentialed data
# ---------------------------------------------------------------------------------------------

def is_restricted(item: dict) -> bool:
    """Whether an item is credentialed data: marked `restricted`, or imaged from MIMIC-CXR's folders."""
    if item.get("restricted") in (True, "true", "True", 1):
        return True
    return any(isinstance(item.get(k), str) and _MIMIC_PATH.search(item[k].replace("\\", "/"))
               for k in ("image", "image_used"))


def _is_local_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 scope ("fe80::1%eth0") is not part of it
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback or ip.is_private


def endpoint_locality(base_url: str | None) -> tuple[bool, str]:
    """(whether `base_url` is a local endpoint, why): its host resolves to loopback or private addresses only."""
    if base_url is None:
        return False, "no base_url is set, so the judge is the OpenAI API (api.openai.com)"
    parts = urlsplit(base_url if "//" in base_url else f"//{base_url}")
    host = parts.hostname
    if not host:
        return False, f"base_url {base_url!r} names no host"
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, ValueError) as e:  # socket.gaierror is an OSError
        return False, f"its host {host} does not resolve ({e}), so it cannot be shown to be local"
    addresses = sorted({info[4][0] for info in infos})
    outside = [a for a in addresses if not _is_local_address(a)]
    if outside:
        return False, f"its host {host} resolves to {', '.join(outside)}, which is not a loopback or private address"
    return True, f"its host {host} resolves to {', '.join(addresses)} (local)"


def restricted_policy(items: Sequence[dict], config: JudgeConfig) -> tuple[set[int], dict | None]:
    """(indices of the items to withhold, the record of what was decided, or None when nothing is restricted)."""
    restricted = [i for i, it in enumerate(items) if is_restricted(it)]
    if not restricted:
        return set(), None
    local, why = endpoint_locality(config.base_url)
    where = config.base_url or "the OpenAI API"
    record = {"n_restricted": len(restricted), "endpoint": where, "local": local, "why": why}
    if local:
        return set(), record
    if config.restricted_data_ok:
        record["restricted_data_ok"] = config.restricted_data_ok
        log.warning("judge: sending %d restricted (credentialed) items to %s, which is not local (%s), on the judge "
                    "config's statement restricted_data_ok: %r", len(restricted), where, why, config.restricted_data_ok)
        return set(), record
    record["fix"] = (
        "serve a judge model locally (e.g. vLLM: `vllm serve <model> --port 8000`) and set base_url: "
        "http://127.0.0.1:8000/v1 in the judge config; or, only if this endpoint keeps no data under an agreement "
        "that covers it, state so in restricted_data_ok: \"<statement>\"")
    log.warning("judge: %d of %d items are restricted (credentialed data such as MIMIC-CXR, whose data use agreement "
                "forbids third-party APIs) and are not sent to %s: %s. Every other item is judged. To judge them, %s",
                len(restricted), len(items), where, why, record["fix"])
    return set(restricted), record


# ---------------------------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------------------------

def _status_counts(verdicts: Sequence[dict]) -> dict:
    failed = Counter(v.get("reason", "unknown") for v in verdicts if v["status"] == "failed")
    unparseable = Counter(v.get("reason", "unknown") for v in verdicts if v["status"] == "unparseable")
    return {"n": len(verdicts), "n_scored": sum(v["score"] is not None for v in verdicts),
            "n_unparseable": sum(unparseable.values()), "n_failed": sum(failed.values()),
            "n_cached": sum(v["status"] == "cached" for v in verdicts),
            "failures": dict(sorted(failed.items())), "unparseable_reasons": dict(sorted(unparseable.items()))}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def summarize_vqa(items: Sequence[dict], verdicts: Sequence[dict], exact: Sequence[bool] | None = None) -> dict:
    """Judge accuracy (CLOSED / OPEN / overall over scored items) and its agreement with exact match."""
    out = _status_counts(verdicts)
    scored = [(it, v["score"]) for it, v in zip(items, verdicts) if v["score"] is not None]
    by_type = {t: [s for it, s in scored if str(it.get("answer_type") or "").upper() == t] for t in ("CLOSED", "OPEN")}
    out.update({"accuracy": _mean([s for _, s in scored]), "closed": _mean(by_type["CLOSED"]),
                "open": _mean(by_type["OPEN"])})
    by_modality = group_accuracy([it for it, _ in scored], [float(s) for _, s in scored], "modality")
    if by_modality:
        out["by_modality"] = by_modality
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


def run_judge(items: Sequence[dict], config: JudgeConfig | Judge, *, exact: Sequence[bool] | None = None) -> dict:
    """Judge VQA items (task != "report") and report items; `exact[i]` is item i's exact-match hit.

    Returns {"model", "base_url", "n_items", "n_judged", "failures", "n_withheld", "stopped",
    "vqa": summary, "report": summary, "tokens": usage, "verdicts": per item}, and "restricted"
    (what was decided about credentialed items) when there are any. Request failures are counted,
    never raised; only a judge that cannot start (`JudgeError`) raises, when `config` is a JudgeConfig.
    """
    judge = config if isinstance(config, Judge) else Judge(config)
    try:
        return _run(judge, items, exact)
    finally:
        if judge is not config:
            judge.close()


def _run(judge: Judge, items: Sequence[dict], exact: Sequence[bool] | None) -> dict:
    config = judge.config
    withheld, restricted = restricted_policy(items, config)
    sent = [i for i in range(len(items)) if i not in withheld]
    vqa_index = [i for i in sent if items[i].get("task", "vqa") != "report"]
    report_index = [i for i in sent if items[i].get("task", "vqa") == "report"]
    verdicts: list[dict | None] = [None] * len(items)
    for i in withheld:
        verdicts[i] = {"score": None, "status": "withheld", "reason": WITHHELD, "reply": ""}
    out: dict = {"model": config.model, "base_url": config.base_url}
    if restricted is not None:
        out["restricted"] = restricted
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
    every = _status_counts([v for v in verdicts if v is not None])
    out.update({"n_items": len(items), "n_judged": every["n_scored"], "n_unparseable": every["n_unparseable"],
                "n_failed": every["n_failed"], "failures": every["failures"], "n_withheld": len(withheld),
                "stopped": judge.stopped})
    out["tokens"] = judge.tokens()
    out["verdicts"] = verdicts
    return out


def describe_outcome(judged: dict) -> str | None:
    """One line on what the judge could not do, or None when every item got a verdict."""
    if judged["n_judged"] == judged["n_items"]:
        return None
    parts = [f"{n} {reason}" for reason, n in judged["failures"].items()]
    if judged["n_unparseable"]:
        parts.append(f"{judged['n_unparseable']} unparseable")
    if judged.get("n_withheld"):
        parts.append(f"{judged['n_withheld']} restricted items withheld from a non-local endpoint")
    line = f"judge: {judged['n_judged']} of {judged['n_items']} items judged ({', '.join(parts)})"
    if judged.get("stopped"):
        line += f"; stopped: {judged['stopped']}"
    return line
