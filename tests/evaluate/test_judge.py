"""The judge through the real `openai` client against a real HTTP server on 127.0.0.1.

The server speaks `/v1/chat/completions` in the OpenAI schema (with `usage`) and replies from a
script; it runs in a thread on a free port and is shut down by the fixture. Backoff delays are
recorded through an injected sleep, so nothing here waits on the clock.
"""

import json
import logging
import threading
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

SECRET = "sk-test-0123456789-never-log-this"


class FakeOpenAI:
    """Replies in order from `script`: (status, content[, headers]); then "Correctness: 1"."""

    def __init__(self, script=(), barrier: threading.Barrier | None = None):
        self.script, self.barrier = list(script), barrier
        self.requests, self.lock = [], threading.Lock()
        self.in_flight = self.max_in_flight = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                    entry = fake.script.pop(0) if fake.script else (200, "Correctness: 1")
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    if fake.barrier is not None:
                        fake.barrier.wait()  # passes only when enough requests are in flight together
                    self._reply(body, *entry)
                finally:
                    with fake.lock:
                        fake.in_flight -= 1

            def _reply(self, body, status, content, headers=None):
                if status == 200:
                    payload = {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                               "choices": [{"index": 0, "finish_reason": "stop",
                                            "message": {"role": "assistant", "content": content}}],
                               "usage": {"prompt_tokens": 100, "completion_tokens": 3, "total_tokens": 103}}
                else:
                    payload = {"error": {"message": content, "type": "server_error", "code": None}}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
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


def config(server, tmp_path, **kw):
    defaults = {"model": "judge-model", "base_url": server.url, "backoff_base": 0.01, "backoff_max": 0.05,
                "cache_dir": str(tmp_path / "cache"), "timeout": 10, "max_retries": 3, "concurrency": 1}
    return JudgeConfig(**{**defaults, **kw})


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
        out = run_judge(VQA_ITEMS, config(server, tmp_path), exact=[True, False, False])
    vqa = out["vqa"]
    assert vqa["n_scored"] == 3 and vqa["n_unparseable"] == 0 and vqa["n_failed"] == 0
    assert vqa["accuracy"] == pytest.approx(2 / 3) and vqa["closed"] == 0.5 and vqa["open"] == 1.0
    assert vqa["vs_exact_match"] == {"judge_1_exact_1": 1, "judge_1_exact_0": 1, "judge_0_exact_1": 0,
                                     "judge_0_exact_0": 1, "agreement": pytest.approx(2 / 3)}
    assert out["tokens"] == {"requests": 3, "prompt_tokens": 300, "completion_tokens": 9, "cache_hits": 0,
                             "retries": 0}
    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions" and request["body"]["model"] == "judge-model"
    assert request["body"]["messages"][0]["content"] == VQA_PROMPT.format(**VQA_ITEMS[0])
    assert request["auth"] == f"Bearer {SECRET}"  # the key reaches the server, and nothing else


def test_cache_hits_send_no_second_request(tmp_path):
    with FakeOpenAI() as server:
        first = run_judge(VQA_ITEMS, config(server, tmp_path))
        assert len(server.requests) == 3
        second = run_judge(VQA_ITEMS, config(server, tmp_path))
        assert len(server.requests) == 3  # the server saw nothing new
        third = run_judge(VQA_ITEMS, config(server, tmp_path, model="other-model"))
        assert len(server.requests) == 6  # the model is part of the key
    assert [v["score"] for v in second["verdicts"]] == [v["score"] for v in first["verdicts"]]
    assert second["vqa"]["n_cached"] == 3 and second["tokens"]["cache_hits"] == 3
    assert second["tokens"]["requests"] == 0 and second["tokens"]["prompt_tokens"] == 0
    assert third["vqa"]["n_cached"] == 0


@pytest.mark.parametrize("status", [429, 500, 503])
def test_rate_limit_and_server_errors_are_retried_with_backoff(tmp_path, status):
    delays = []
    script = [(status, "busy"), (status, "busy"), (200, "Correctness: 1")]
    with FakeOpenAI(script) as server:
        out = run_judge(VQA_ITEMS[:1], config(server, tmp_path), sleep=delays.append)
    assert out["verdicts"][0]["score"] == 1 and len(server.requests) == 3
    assert delays == [pytest.approx(0.01), pytest.approx(0.02)]  # backoff_base * 2^attempt
    assert out["tokens"]["retries"] == 2 and out["tokens"]["requests"] == 1


def test_retry_after_is_honoured(tmp_path):
    delays = []
    with FakeOpenAI([(429, "slow down", {"Retry-After": "0.03"}), (200, "Correctness: 0")]) as server:
        out = run_judge(VQA_ITEMS[:1], config(server, tmp_path, backoff_base=0.001), sleep=delays.append)
    assert delays == [pytest.approx(0.03)] and out["verdicts"][0]["score"] == 0


def test_retries_spent_counts_the_item_as_failed(tmp_path):
    delays = []
    with FakeOpenAI([(500, "down")] * 3) as server:
        out = run_judge(VQA_ITEMS[:1], config(server, tmp_path, max_retries=2), sleep=delays.append)
    assert len(server.requests) == 3 and len(delays) == 2
    assert out["verdicts"][0]["status"] == "failed" and out["vqa"]["n_failed"] == 1 and out["vqa"]["n_scored"] == 0


def test_a_refused_request_stops_the_run(tmp_path):
    with FakeOpenAI([(401, "invalid api key")]) as server, pytest.raises(JudgeError, match="401") as err:
        run_judge(VQA_ITEMS[:1], config(server, tmp_path))
    assert len(server.requests) == 1 and SECRET not in str(err.value)


def test_unparseable_reply_is_retried_once_then_counted(tmp_path):
    script = [(200, "I think it is fine"), (200, "Correctness: 1"),        # item 1: second try parses
              (200, "maybe"), (200, "Correctness: 2")]                      # item 2: both unparseable
    with FakeOpenAI(script) as server:
        out = run_judge(VQA_ITEMS[:2], config(server, tmp_path))
        assert len(server.requests) == 4
        assert out["verdicts"][0] == {"score": 1, "status": "ok", "reply": "Correctness: 1"}
        assert out["verdicts"][1]["status"] == "unparseable" and out["verdicts"][1]["score"] is None
        assert out["vqa"]["n_unparseable"] == 1 and out["vqa"]["n_scored"] == 1 and out["vqa"]["accuracy"] == 1.0
        run_judge(VQA_ITEMS[:2], config(server, tmp_path))
        assert len(server.requests) == 5  # the unparseable item is not cached: asked again


def test_concurrent_requests(tmp_path):
    # The barrier lets the first two requests through only together: a client sending one request
    # at a time would leave the first waiting until the barrier breaks (5 s) and get a 500.
    barrier = threading.Barrier(2, timeout=5)
    items = [{**VQA_ITEMS[0], "prediction": f"answer {i}"} for i in range(8)]
    with FakeOpenAI(barrier=barrier) as server:
        out = run_judge(items, config(server, tmp_path, concurrency=4, max_retries=0))
    assert not barrier.broken
    assert server.max_in_flight >= 2 and len(server.requests) == 8
    assert out["vqa"]["n_scored"] == 8


def test_report_rubric_and_wasm(tmp_path):
    reports = [{"answer": "no acute disease", "prediction": p, "task": "report"} for p in ("a", "b", "c", "d")]
    script = [(200, "Score: 4"), (200, "Score: 3"), (200, "Score: 0"), (200, "Score: 3")]
    with FakeOpenAI(script) as server:
        out = run_judge(reports, config(server, tmp_path))
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


def test_the_key_never_reaches_logs_outputs_or_cache(tmp_path, caplog):
    from pefomed.evaluate.score import main

    for name in (None, "openai", "httpx", "httpcore", "evaluate"):
        caplog.set_level(logging.DEBUG, logger=name)
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps(it) + "\n" for it in VQA_ITEMS))
    with FakeOpenAI([(429, "busy", {"Retry-After": "0"})]) as server:
        cfg = tmp_path / "judge.yaml"
        cfg.write_text(f"model: judge-model\nbase_url: {server.url}\ncache_dir: {tmp_path / 'cache'}\n"
                       "backoff_base: 0.01\nbackoff_max: 0.02\n")
        main(["--predictions", str(preds), "--out", str(tmp_path / "out"), "--judge", "--judge-config", str(cfg),
              "--no-meteor"])
    assert "chat/completions" in caplog.text  # the client's own debug log was captured
    assert SECRET not in caplog.text
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["judge"]["vqa"]["n_scored"] == 3


def test_config_file_errors(tmp_path, monkeypatch):
    bad = tmp_path / "judge.yaml"
    bad.write_text("api_key: sk-123\n")
    with pytest.raises(JudgeError, match="do not put the API key in the config"):
        load_judge_config(bad)
    bad.write_text("modle: gpt-4\n")
    with pytest.raises(JudgeError, match="unknown judge config field 'modle'"):
        load_judge_config(bad)
    bad.write_text("wasm_weights: [0, 1]\n")
    with pytest.raises(JudgeError, match="5 weights"):
        load_judge_config(bad)
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(JudgeError, match="export OPENAI_API_KEY"):
        Judge(JudgeConfig(cache_dir=str(tmp_path / "c")))
    monkeypatch.setenv("MY_JUDGE_KEY", SECRET)
    assert load_judge_config(None).api_key_env == "OPENAI_API_KEY"
    Judge(JudgeConfig(api_key_env="MY_JUDGE_KEY", cache_dir=str(tmp_path / "c")))
