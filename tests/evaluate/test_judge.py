"""The judge through the real `openai` client against a real HTTP server on 127.0.0.1.

The server speaks `/v1/chat/completions` in the OpenAI schema (with `usage`) and replies from a
script; it runs in a thread on a free port and is shut down by the fixture. It records every
request it receives (arrival time, the client's `x-stainless-retry-count` header), so retries and
Retry-After are observed on the server side, where they happen.
"""

import json
import logging
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("openai")

from pefomed.evaluate.judge import (
    REPORT_PROMPT,
    VQA_PROMPT,
    Judge,
    JudgeConfig,
    JudgeError,
    load_judge_config,
    parse_reply,
    run_judge,
    summarize_report,
)
from pefomed.evaluate.score import score_predictions

SECRET = "sk-test-0123456789-never-log-this"


def completion(content, model="judge-model", usage=True) -> bytes:
    payload = {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": model,
               "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}]}
    if usage:
        payload["usage"] = {"prompt_tokens": 100, "completion_tokens": 3, "total_tokens": 103}
    return json.dumps(payload).encode()


class FakeOpenAI:
    """Replies in order from `script`, then with `default` forever.

    An entry is (status, content[, headers]): a chat completion with `content` for 200, an OpenAI
    error whose message is `content` otherwise (the text "{auth}" in it is replaced by the request's
    Authorization header, as a server that quotes the key it refused would do); or
    ("raw", status, content_type, body bytes) for a malformed response.
    `gate`: the first `gate` requests are held until that many are in flight together (or 5 s pass).
    """

    def __init__(self, script=(), default=(200, "Correctness: 1"), gate: int = 0, delay: float = 0.0):
        self.script, self.default, self.delay = list(script), default, delay
        self.requests, self.lock = [], threading.Lock()
        self.in_flight = self.max_in_flight = 0
        self.gate, self.gate_open = gate, threading.Event()
        if not gate:
            self.gate_open.set()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        # A client that hangs up early (after a 401 it needs no more) makes the reply's write fail;
        # socketserver would print that to stderr, which the CLI tests read. Keep it here instead.
        self.errors = []
        self.server.handle_error = lambda request, address: self.errors.append(sys.exc_info()[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization"),
                                          "retry_count": self.headers.get("x-stainless-retry-count"),
                                          "time": time.monotonic()})
                    entry = fake.script.pop(0) if fake.script else fake.default
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                    if fake.in_flight >= fake.gate:
                        fake.gate_open.set()
                try:
                    fake.gate_open.wait(timeout=5)
                    time.sleep(fake.delay)
                    self._reply(body, entry)
                finally:
                    with fake.lock:
                        fake.in_flight -= 1

            def _reply(self, body, entry):
                headers = {}
                if entry[0] == "raw":
                    _, status, content_type, data = entry
                else:
                    status, content = entry[0], entry[1]
                    headers = entry[2] if len(entry) > 2 else {}
                    content_type = "application/json"
                    if status == 200:
                        data = completion(content, body["model"])
                    else:
                        message = content.replace("{auth}", self.headers.get("Authorization", ""))
                        data = json.dumps({"error": {"message": message, "type": "error", "code": None}}).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

        return Handler

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"


def config(url, tmp_path, **kw):
    defaults = {"model": "judge-model", "base_url": url, "cache_dir": str(tmp_path / "cache"), "timeout": 10,
                "max_retries": 3, "concurrency": 1}
    return JudgeConfig(**{**defaults, **kw})


def closed_port_url() -> str:
    """A loopback URL where nothing listens: the connection is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


FAST_RETRY = {"retry-after-ms": "5"}  # the client waits 5 ms instead of its 0.5 s backoff

VQA_ITEMS = [
    {"question": "is there an effusion?", "answer": "yes", "prediction": "yes", "answer_type": "CLOSED"},
    {"question": "where is the mass?", "answer": "left lung", "prediction": "in the left lung", "answer_type": "OPEN"},
    {"question": "is it normal?", "answer": "no", "prediction": "yes", "answer_type": "CLOSED"},
]


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)


def test_correct_replies_accuracy_agreement_and_tokens(tmp_path):
    script = [(200, "Correctness: 1"), (200, "Correctness: 1"), (200, "Correctness: 0")]
    with FakeOpenAI(script) as server:
        out = run_judge(VQA_ITEMS, config(server.url, tmp_path), exact=[True, False, False])
    vqa = out["vqa"]
    assert vqa["n_scored"] == 3 and vqa["n_unparseable"] == 0 and vqa["n_failed"] == 0 and vqa["failures"] == {}
    assert vqa["accuracy"] == pytest.approx(2 / 3) and vqa["closed"] == 0.5 and vqa["open"] == 1.0
    assert vqa["vs_exact_match"] == {"judge_1_exact_1": 1, "judge_1_exact_0": 1, "judge_0_exact_1": 0,
                                     "judge_0_exact_0": 1, "agreement": pytest.approx(2 / 3)}
    assert (out["n_items"], out["n_judged"], out["stopped"]) == (3, 3, None)
    assert out["tokens"] == {"requests": 3, "retries": 0, "prompt_tokens": 300, "completion_tokens": 9,
                             "cache_hits": 0, "responses_without_usage": 0}
    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions" and request["body"]["model"] == "judge-model"
    assert request["body"]["messages"][0]["content"] == VQA_PROMPT.format(**VQA_ITEMS[0])
    assert request["auth"] == f"Bearer {SECRET}"  # the key reaches the server, and nothing else


def test_cache_hits_send_no_second_request(tmp_path):
    with FakeOpenAI() as server:
        first = run_judge(VQA_ITEMS, config(server.url, tmp_path))
        assert len(server.requests) == 3
        second = run_judge(VQA_ITEMS, config(server.url, tmp_path))
        assert len(server.requests) == 3  # the server saw nothing new
        third = run_judge(VQA_ITEMS, config(server.url, tmp_path, model="other-model"))
        assert len(server.requests) == 6  # the model is part of the key
    assert [v["score"] for v in second["verdicts"]] == [v["score"] for v in first["verdicts"]]
    assert second["vqa"]["n_cached"] == 3 and second["tokens"]["cache_hits"] == 3
    assert second["tokens"]["requests"] == 0 and second["tokens"]["prompt_tokens"] == 0
    assert third["vqa"]["n_cached"] == 0


def test_a_corrupt_cache_file_is_a_miss(tmp_path):
    with FakeOpenAI() as server:
        run_judge(VQA_ITEMS[:1], config(server.url, tmp_path))
        (entry,) = (tmp_path / "cache").glob("*.json")
        entry.write_text('{"score": ')  # cut short
        out = run_judge(VQA_ITEMS[:1], config(server.url, tmp_path))
    assert len(server.requests) == 2 and out["verdicts"][0]["status"] == "ok"
    assert json.loads(entry.read_text()) == {"score": 1, "reply": "Correctness: 1"}


def test_a_cache_that_cannot_be_written_keeps_the_verdict(tmp_path, monkeypatch, caplog):
    import errno

    from pefomed.evaluate import judge as judge_module

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(judge_module.tempfile, "mkstemp", full_disk)
    caplog.set_level(logging.WARNING)
    with FakeOpenAI() as server:
        out = run_judge(VQA_ITEMS[:1], config(server.url, tmp_path))
    assert out["verdicts"][0] == {"score": 1, "status": "ok", "reply": "Correctness: 1"}
    assert "No space left on device" in caplog.text and not list((tmp_path / "cache").iterdir())


@pytest.mark.parametrize("status", [429, 500, 503])
def test_the_client_retries_rate_limits_and_server_errors(tmp_path, status):
    script = [(status, "busy", FAST_RETRY), (status, "busy", FAST_RETRY), (200, "Correctness: 1")]
    with FakeOpenAI(script) as server:
        out = run_judge(VQA_ITEMS[:1], config(server.url, tmp_path))
    assert out["verdicts"][0]["score"] == 1
    # One call, three HTTP requests: the openai client's own retries, numbered by its header.
    assert [r["retry_count"] for r in server.requests] == ["0", "1", "2"]
    assert out["tokens"]["requests"] == 3 and out["tokens"]["retries"] == 2


def test_retry_after_is_honoured(tmp_path):
    # Without the header the client's first backoff is at most 0.5 s; with it, 1 s.
    with FakeOpenAI([(429, "slow down", {"Retry-After": "1"}), (200, "Correctness: 0")]) as server:
        out = run_judge(VQA_ITEMS[:1], config(server.url, tmp_path))
    first, second = server.requests
    assert second["time"] - first["time"] >= 0.95
    assert out["verdicts"][0]["score"] == 0


def test_max_retries_bounds_the_requests(tmp_path):
    with FakeOpenAI(default=(500, "down", FAST_RETRY)) as server:
        out = run_judge(VQA_ITEMS[:1], config(server.url, tmp_path, max_retries=2))
    assert len(server.requests) == 3
    assert out["verdicts"][0]["status"] == "failed" and out["verdicts"][0]["reason"] == "server_error"
    assert out["vqa"]["failures"] == {"server_error": 1} and out["vqa"]["n_scored"] == 0


def test_a_server_slower_than_timeout_is_a_timeout(tmp_path):
    with FakeOpenAI(delay=1.0) as server:
        start = time.monotonic()
        out = run_judge(VQA_ITEMS[:1], config(server.url, tmp_path, timeout=0.2, max_retries=0))
        elapsed = time.monotonic() - start
    assert elapsed < 0.9 and out["failures"] == {"timeout": 1} and out["n_judged"] == 0


def write_inputs(tmp_path, url, **judge_fields):
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps(it) + "\n" for it in VQA_ITEMS))
    fields = {"model": "judge-model", "base_url": url, "cache_dir": str(tmp_path / "cache"), "max_retries": 1,
              "concurrency": 1, "timeout": 5, **judge_fields}
    cfg = tmp_path / "judge.yaml"
    cfg.write_text("".join(f"{k}: {v}\n" for k, v in fields.items()))
    return preds, cfg


PERSISTENT = {
    # mode: (server reply every time, failures by reason, HTTP requests the server sees)
    "rate_limited": ((429, "rate limit reached", FAST_RETRY), {"rate_limited": 3}, 6),
    "server_error": ((502, "bad gateway", FAST_RETRY), {"server_error": 3}, 6),
    # A refused key stops the judge at once: the two other items are never sent.
    "authentication": ((401, "Incorrect API key provided: {auth}"), {"authentication": 1, "not_sent": 2}, 1),
    "connection_error": (None, {"connection_error": 3}, 0),
}


@pytest.mark.parametrize("mode", sorted(PERSISTENT))
def test_persistent_failures_keep_the_lexical_metrics(tmp_path, cli, mode, caplog):
    reply, failures, n_requests = PERSISTENT[mode]
    caplog.set_level(logging.DEBUG)
    with FakeOpenAI(default=reply) as server:
        url = server.url if reply is not None else closed_port_url()
        preds, cfg = write_inputs(tmp_path, url)
        code, out, err = cli("score", "--predictions", preds, "--out", tmp_path / "out", "--judge",
                             "--judge-config", cfg, "--no-meteor")
    assert code == 0 and len(server.requests) == n_requests
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    lexical = score_predictions(VQA_ITEMS, with_meteor=False)
    for key in ("pefomed_exact_match", "llava_med", "med_idefics"):
        assert metrics[key] == json.loads(json.dumps(lexical[key]).replace("NaN", "null")), key
    judge = metrics["judge"]
    assert (judge["n_items"], judge["n_judged"], judge["n_failed"]) == (3, 0, 3)
    assert judge["failures"] == failures and judge["vqa"]["failures"] == failures
    assert judge["vqa"]["accuracy"] is None  # nothing scored: null, not 0
    if mode == "authentication":
        assert "authentication: HTTP 401" in judge["stopped"] and "OPENAI_API_KEY" in judge["stopped"]
        assert "<redacted>" in judge["stopped"]  # the server quoted the key; it is blanked out
    else:
        assert judge["stopped"] is None
    report = (tmp_path / "out" / "report.md").read_text()
    assert "0 of 3 items judged; 3 failed" in report and "| PeFoMed exact match" in report
    assert err.startswith("judge: 0 of 3 items judged (") and "error:" not in err
    rows = [json.loads(line) for line in (tmp_path / "out" / "scored_items.jsonl").read_text().splitlines()]
    assert [r["scores"]["judge"]["status"] for r in rows] == ["failed"] * 3
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in err + out + caplog.text


def test_consecutive_failures_stop_the_judge(tmp_path):
    items = [{**VQA_ITEMS[0], "prediction": f"answer {i}"} for i in range(5)]
    with FakeOpenAI(default=(503, "overloaded", FAST_RETRY)) as server:
        out = run_judge(items, config(server.url, tmp_path, max_retries=0, stop_after_failures=2))
    assert len(server.requests) == 2
    assert out["failures"] == {"server_error": 2, "not_sent": 3}
    assert out["stopped"].startswith("2 items failed in a row, the last with server_error")


def test_a_success_resets_the_failure_count(tmp_path):
    script = [(503, "x"), (200, "Correctness: 1"), (503, "x"), (200, "Correctness: 0")]
    with FakeOpenAI(script) as server:
        out = run_judge([{**VQA_ITEMS[0], "prediction": str(i)} for i in range(4)],
                        config(server.url, tmp_path, max_retries=0, stop_after_failures=2))
    assert len(server.requests) == 4 and out["stopped"] is None
    assert [v["status"] for v in out["verdicts"]] == ["failed", "ok", "failed", "ok"]


MALFORMED = {
    "html_page": ("raw", 200, "text/html", b"<html><body><h1>502 Bad Gateway</h1></body></html>"),
    "not_json": ("raw", 200, "application/json", b'{"choices": [{"message": '),
    "no_choices": ("raw", 200, "application/json", json.dumps({"id": "x", "choices": []}).encode()),
    "not_an_object": ("raw", 200, "application/json", b"[1, 2]"),
    "no_message_text": ("raw", 200, "application/json",
                        json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": None}}]})
                        .encode()),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_responses_are_unparseable_not_a_crash(tmp_path, kind):
    with FakeOpenAI(default=MALFORMED[kind]) as server:
        out = run_judge(VQA_ITEMS[:2], config(server.url, tmp_path))
    assert len(server.requests) == 4  # each item asked twice, then given up
    assert [v["status"] for v in out["verdicts"]] == ["unparseable", "unparseable"]
    assert out["vqa"]["unparseable_reasons"] == {f"malformed_response:{kind}": 2}
    assert out["n_unparseable"] == 2 and out["n_judged"] == 0 and out["n_failed"] == 0
    assert not list((tmp_path / "cache").glob("*.json"))  # nothing cached: asked again next run


def test_a_response_without_usage_still_gives_its_verdict(tmp_path):
    body = completion("Correctness: 1", usage=False)
    with FakeOpenAI(default=("raw", 200, "application/json", body)) as server:
        out = run_judge(VQA_ITEMS[:1], config(server.url, tmp_path))
    assert len(server.requests) == 1 and out["verdicts"][0] == {"score": 1, "status": "ok", "reply": "Correctness: 1"}
    assert out["tokens"]["responses_without_usage"] == 1 and out["tokens"]["prompt_tokens"] == 0


def test_unparseable_reply_is_retried_once_then_counted(tmp_path):
    script = [(200, "I think it is fine"), (200, "Correctness: 1"),        # item 1: second try parses
              (200, "maybe"), (200, "Correctness: 2")]                      # item 2: both unparseable
    with FakeOpenAI(script) as server:
        out = run_judge(VQA_ITEMS[:2], config(server.url, tmp_path))
        assert len(server.requests) == 4
        assert out["verdicts"][0] == {"score": 1, "status": "ok", "reply": "Correctness: 1"}
        assert out["verdicts"][1] == {"score": None, "status": "unparseable", "reason": "no_score_in_reply",
                                      "reply": "Correctness: 2"}
        assert out["vqa"]["n_unparseable"] == 1 and out["vqa"]["n_scored"] == 1 and out["vqa"]["accuracy"] == 1.0
        run_judge(VQA_ITEMS[:2], config(server.url, tmp_path))
        assert len(server.requests) == 5  # the unparseable item is not cached: asked again


def test_concurrent_requests(tmp_path):
    # The gate holds the first two requests until both are in flight: a client sending one request at
    # a time would wait 5 s there.
    items = [{**VQA_ITEMS[0], "prediction": f"answer {i}"} for i in range(8)]
    with FakeOpenAI(gate=2) as server:
        start = time.monotonic()
        out = run_judge(items, config(server.url, tmp_path, concurrency=4, max_retries=0))
    assert time.monotonic() - start < 4
    assert server.max_in_flight >= 2 and len(server.requests) == 8
    assert out["vqa"]["n_scored"] == 8


def test_identical_items_at_high_concurrency_share_one_cache_entry(tmp_path):
    # 64 copies of one item, 16 threads: the first 16 requests are held until all are in flight, so
    # 16 threads write the same cache entry at the same moment.
    items = [dict(VQA_ITEMS[1]) for _ in range(64)]
    with FakeOpenAI(gate=16) as server:
        out = run_judge(items, config(server.url, tmp_path, concurrency=16, max_retries=0))
        assert server.max_in_flight == 16
        assert out["n_judged"] == 64 and out["n_failed"] == 0 and out["n_unparseable"] == 0
        files = sorted(p.name for p in (tmp_path / "cache").iterdir())
        assert len(files) == 1 and files[0].endswith(".json")  # no temporary file left behind
        assert json.loads((tmp_path / "cache" / files[0]).read_text()) == {"score": 1, "reply": "Correctness: 1"}
        sent = len(server.requests)
        again = run_judge(items, config(server.url, tmp_path, concurrency=16, max_retries=0))
        assert len(server.requests) == sent and again["vqa"]["n_cached"] == 64


def test_report_rubric_and_wasm(tmp_path):
    reports = [{"answer": "no acute disease", "prediction": p, "task": "report"} for p in ("a", "b", "c", "d")]
    script = [(200, "Score: 4"), (200, "Score: 3"), (200, "Score: 0"), (200, "Score: 3")]
    with FakeOpenAI(script) as server:
        out = run_judge(reports, config(server.url, tmp_path))
    rep = out["report"]
    assert rep["histogram"] == {"0": 1, "1": 0, "2": 0, "3": 2, "4": 1}
    assert rep["mean_score"] == pytest.approx(2.5)
    assert rep["wasm"] == pytest.approx((0.75 * 2 + 1.0) / 4)
    assert server.requests[0]["body"]["messages"][0]["content"] == REPORT_PROMPT.format(
        question="", answer="no acute disease", prediction="a")
    weighted = summarize_report(out["verdicts"], (0, 0, 0, 1, 1))
    assert weighted["wasm"] == pytest.approx(3 / 4)


@pytest.mark.parametrize("kind, text, expected", [
    ("vqa", "Correctness: 1", 1), ("vqa", "Correctness: 0\n", 0), ("vqa", "1", 1), ("vqa", " 0.", 0),
    ("vqa", "Correctness: 2", None), ("vqa", "Correctness: yes", None), ("vqa", "", None), ("vqa", None, None),
    ("report", "Score: 3", 3), ("report", "Score: 4/4", 4), ("report", "Score: 3.5", None),
    ("report", "Score: 5", None), ("report", "the report is good", None),
])
def test_parse_reply(kind, text, expected):
    assert parse_reply(kind, text) == expected


def test_the_key_never_reaches_logs_outputs_or_cache(tmp_path, cli, caplog):
    caplog.set_level(logging.DEBUG)
    with FakeOpenAI([(429, "busy", FAST_RETRY)]) as server:
        preds, cfg = write_inputs(tmp_path, server.url)
        code, out, err = cli("score", "--predictions", preds, "--out", tmp_path / "out", "--judge",
                             "--judge-config", cfg, "--no-meteor")
    assert code == 0 and [r["retry_count"] for r in server.requests] == ["0", "1", "0", "0"]
    assert "chat/completions" in caplog.text  # the client's own debug log was captured
    assert "Retrying request" in caplog.text  # and its retry message
    assert SECRET not in caplog.text + out + err
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["judge"]["vqa"]["n_scored"] == 3 and metrics["judge"]["tokens"]["retries"] == 1


def test_a_missing_key_fails_before_any_work(tmp_path, cli, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    preds, cfg = write_inputs(tmp_path, "null")  # no base_url: the OpenAI API, which needs a key
    code, out, err = cli("score", "--predictions", preds, "--out", tmp_path / "out", "--judge",
                         "--judge-config", cfg)
    assert code == 2 and err.splitlines() == [err.strip()] and err.startswith("error: the judge needs an API key")
    assert "export OPENAI_API_KEY" in err and not (tmp_path / "out").exists()


def test_config_file_errors(tmp_path, monkeypatch):
    bad = tmp_path / "judge.yaml"
    bad.write_text("api_key: sk-123\n")
    with pytest.raises(JudgeError, match="do not put the API key in the config"):
        load_judge_config(bad)
    bad.write_text("modle: gpt-4\n")
    with pytest.raises(JudgeError, match="unknown judge config field 'modle'"):
        load_judge_config(bad)
    bad.write_text("backoff_base: 1.0\n")  # retries are the client's now: the old field is refused, named
    with pytest.raises(JudgeError, match="unknown judge config field 'backoff_base'"):
        load_judge_config(bad)
    bad.write_text("wasm_weights: [0, 1]\n")
    with pytest.raises(JudgeError, match="5 weights"):
        load_judge_config(bad)
    bad.write_text("timeout: 0\n")
    with pytest.raises(JudgeError, match="timeout must be > 0"):
        load_judge_config(bad)
    bad.write_text("model: [unclosed\n")
    with pytest.raises(JudgeError, match="not valid YAML"):
        load_judge_config(bad)
    with pytest.raises(JudgeError, match="judge config not found"):
        load_judge_config(tmp_path / "nowhere.yaml")
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(JudgeError, match="export OPENAI_API_KEY"):
        Judge(JudgeConfig(cache_dir=str(tmp_path / "c")))
    monkeypatch.setenv("MY_JUDGE_KEY", SECRET)
    assert load_judge_config(None).api_key_env == "OPENAI_API_KEY"
    Judge(JudgeConfig(api_key_env="MY_JUDGE_KEY", cache_dir=str(tmp_path / "c"))).close()


# ---------------------------------------------------------------- credentialed data (MIMIC-CXR)

MIMIC_IMAGE = "/data/mimic-cxr-jpg/files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg"
MIXED_ITEMS = [
    {"task": "report", "answer": "No acute process.", "prediction": "No acute process.", "restricted": True,
     "question": None},
    {"task": "report", "answer": "Small left effusion.", "prediction": "Left effusion.", "image": MIMIC_IMAGE},
    {"question": "is there a mass?", "answer": "yes", "prediction": "yes", "answer_type": "CLOSED", "modality": "CT"},
    {"question": "which organ?", "answer": "liver", "prediction": "spleen", "answer_type": "OPEN", "modality": "MR"},
]
PUBLIC_IP = "93.184.216.34"
STATEMENT = "Azure OpenAI deployment covered by our PhysioNet-approved agreement; no prompts are retained."


def http_library():
    """The HTTP library the openai client is built on (httpx, or its httpx2 fork in newer releases)."""
    import importlib

    import openai

    return importlib.import_module(openai.DefaultHttpxClient.__mro__[1].__module__.split(".")[0])


class RecordingTransport:
    """A transport for the openai client that answers chat completions itself and records every request body."""

    def __init__(self, content="Correctness: 1"):
        self.bodies, self.content = [], content
        self.http = http_library()
        self.transport = self.http.MockTransport(self.handle)

    def handle(self, request):
        body = json.loads(request.read())
        self.bodies.append(body)
        content = "Score: 3" if "medical report" in body["messages"][0]["content"] else self.content
        return self.http.Response(200, content=completion(content, body["model"]),
                                  headers={"content-type": "application/json"})


def resolve_as(monkeypatch, table):
    """DNS answers from `table` (host -> addresses, or an exception), and a record of every socket connect."""
    attempts = []

    def getaddrinfo(host, port, *args, **kwargs):
        answer = table[host]
        if isinstance(answer, Exception):
            raise answer
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in answer]

    def connect(sock, address):
        attempts.append(address)
        raise ConnectionRefusedError(f"test: no connection to {address} allowed")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect)
    return attempts


def sent_texts(transport):
    return [body["messages"][0]["content"] for body in transport.bodies]


def test_restricted_items_are_judged_by_a_loopback_server(tmp_path):
    script = [(200, "Correctness: 1"), (200, "Correctness: 0"), (200, "Score: 3"), (200, "Score: 2")]
    with FakeOpenAI(script) as server:
        out = run_judge(MIXED_ITEMS, config(server.url, tmp_path))
    assert len(server.requests) == 4 and out["n_withheld"] == 0
    assert out["restricted"] == {"n_restricted": 2, "endpoint": server.url, "local": True,
                                 "why": "its host 127.0.0.1 resolves to 127.0.0.1 (local)"}


def test_restricted_items_never_reach_a_non_local_endpoint(tmp_path, monkeypatch, caplog):
    attempts = resolve_as(monkeypatch, {"judge.example.org": [PUBLIC_IP]})
    caplog.set_level(logging.WARNING)
    restricted_only = MIXED_ITEMS[:2]
    out = run_judge(restricted_only, config("https://judge.example.org/v1", tmp_path))
    assert attempts == []  # no connection was even attempted
    assert out["tokens"]["requests"] == 0 and out["n_withheld"] == 2 and out["n_judged"] == 0
    assert [v["status"] for v in out["verdicts"]] == ["withheld", "withheld"]
    assert out["restricted"]["why"] == f"its host judge.example.org resolves to {PUBLIC_IP}, which is not a loopback or " \
                                       "private address"
    assert "http://127.0.0.1:8000/v1" in out["restricted"]["fix"] and "restricted_data_ok" in out["restricted"]["fix"]
    assert "2 of 2 items are restricted" in caplog.text and "data use agreement forbids third-party APIs" in caplog.text


def test_everything_else_is_judged_and_only_it_is_sent(tmp_path, monkeypatch):
    attempts = resolve_as(monkeypatch, {"judge.example.org": [PUBLIC_IP]})
    transport = RecordingTransport()
    judge = Judge(config("https://judge.example.org/v1", tmp_path), transport=transport.transport)
    try:
        out = run_judge(MIXED_ITEMS, judge, exact=[True, False, True, False])
    finally:
        judge.close()
    sent = sent_texts(transport)
    assert len(sent) == 2 and attempts == []
    assert sent == [VQA_PROMPT.format(**MIXED_ITEMS[2]), VQA_PROMPT.format(**MIXED_ITEMS[3])]
    assert not any(it["answer"] in text for it in MIXED_ITEMS[:2] for text in sent)
    assert [v["status"] for v in out["verdicts"]] == ["withheld", "withheld", "ok", "ok"]
    assert out["n_judged"] == 2 and out["n_withheld"] == 2 and "report" not in out
    assert out["vqa"]["by_modality"] == {"CT": {"n": 1, "accuracy": 1.0}, "MR": {"n": 1, "accuracy": 1.0}}


@pytest.mark.parametrize("table, local", [
    ({"judge.example.org": socket.gaierror(-2, "Name or service not known")}, False),  # DNS failure: not local
    ({"judge.example.org": ["10.0.0.5"]}, True),
    ({"judge.example.org": ["192.168.1.20", "fd00::7"]}, True),
    ({"judge.example.org": ["10.0.0.5", PUBLIC_IP]}, False),  # one public address is enough to refuse
])
def test_what_counts_as_local(tmp_path, monkeypatch, table, local):
    resolve_as(monkeypatch, table)
    transport = RecordingTransport()
    judge = Judge(config("http://judge.example.org:8000/v1", tmp_path), transport=transport.transport)
    try:
        out = run_judge(MIXED_ITEMS[:1], judge)
    finally:
        judge.close()
    assert out["restricted"]["local"] is local and out["n_withheld"] == (0 if local else 1)
    assert len(transport.bodies) == (1 if local else 0)


def test_no_base_url_is_the_openai_api_and_is_refused_for_restricted_items(tmp_path, monkeypatch):
    attempts = resolve_as(monkeypatch, {})  # nothing may even be looked up
    out = run_judge(MIXED_ITEMS[:1], config(None, tmp_path))
    assert out["n_withheld"] == 1 and attempts == [] and "api.openai.com" in out["restricted"]["why"]


def test_an_explicit_statement_lets_restricted_items_go_and_is_logged(tmp_path, monkeypatch, caplog):
    resolve_as(monkeypatch, {"judge.example.org": [PUBLIC_IP]})
    caplog.set_level(logging.WARNING)
    transport = RecordingTransport()
    judge = Judge(config("https://judge.example.org/v1", tmp_path, restricted_data_ok=STATEMENT),
                  transport=transport.transport)
    try:
        out = run_judge(MIXED_ITEMS, judge)
    finally:
        judge.close()
    assert len(transport.bodies) == 4 and out["n_withheld"] == 0 and out["report"]["n_scored"] == 2
    assert out["restricted"]["restricted_data_ok"] == STATEMENT
    assert "sending 2 restricted (credentialed) items to https://judge.example.org/v1" in caplog.text
    assert STATEMENT in caplog.text
    bad = tmp_path / "judge.yaml"
    for value in ("true", "'ok'"):
        bad.write_text(f"restricted_data_ok: {value}\n")
        with pytest.raises(JudgeError, match="restricted_data_ok=.* must be a written statement"):
            load_judge_config(bad)


def test_score_withholds_mimic_items_from_a_remote_judge(tmp_path, cli, monkeypatch):
    attempts = resolve_as(monkeypatch, {"judge.example.org": [PUBLIC_IP]})
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps(it) + "\n" for it in MIXED_ITEMS[:2]))
    cfg = tmp_path / "judge.yaml"
    cfg.write_text(f"base_url: https://judge.example.org/v1\ncache_dir: {tmp_path / 'cache'}\n")
    code, out, err = cli("score", "--predictions", preds, "--out", tmp_path / "out", "--judge", "--judge-config", cfg,
                         "--no-meteor", "--report-tokenizer", "python")
    assert code == 0 and attempts == []
    judge = json.loads((tmp_path / "out" / "metrics.json").read_text())["judge"]
    assert judge["n_withheld"] == 2 and judge["restricted"]["local"] is False
    assert "2 restricted items withheld from a non-local endpoint" in err and "vllm serve" in err
    assert "report_metrics" in json.loads((tmp_path / "out" / "metrics.json").read_text())  # the rest is scored
    report = (tmp_path / "out" / "report.md").read_text()
    assert "2 restricted items (credentialed data) were withheld from this non-local endpoint" in report
