"""The judge through the real openai client against a real HTTP server on loopback."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("openai")

from evaluate.judge import Judge, JudgeConfig, summarize  # noqa: E402

SECRET = "sk-test-never-log-this"


class FakeOpenAI:
    """Replies from a script: each entry is (status, content) or (status, content, headers)."""

    def __init__(self, script):
        self.script, self.requests, self.lock = list(script), [], threading.Lock()
        handler = self._handler()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests.append({"body": body, "auth": self.headers.get("Authorization")})
                    entry = fake.script.pop(0) if fake.script else (200, "1")
                status, content, headers = (entry + ({},))[:3]
                if status == 200:
                    payload = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                               "choices": [{"index": 0, "finish_reason": "stop",
                                            "message": {"role": "assistant", "content": content}}],
                               "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11}}
                else:
                    payload = {"error": {"message": content, "type": "server_error"}}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        return Handler

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"


def judge(server, tmp_path, **kw):
    cfg = JudgeConfig(model="judge-model", base_url=server.url, backoff_base=0.01, backoff_max=0.05,
                      cache_dir=str(tmp_path / "cache"), timeout=10, **kw)
    return Judge(cfg)


ITEM = {"question": "is there an effusion?", "answer": "yes", "prediction": "there is a small effusion"}


def test_correct_replies_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with FakeOpenAI([(200, "1"), (200, "0")]) as server:
        j = judge(server, tmp_path, concurrency=2)
        items = [ITEM, {**ITEM, "prediction": "no"}]
        results = j.judge_all("vqa", items)
        assert sorted(r["score"] for r in results) == [0, 1]
        assert server.requests[0]["auth"] == f"Bearer {SECRET}"
        again = judge(server, tmp_path).judge_all("vqa", items)
        assert [r["score"] for r in again] == [r["score"] for r in results] and all(r["cached"] for r in again)
        assert len(server.requests) == 2  # the rerun paid nothing
    assert j.prompt_tokens == 20 and j.completion_tokens == 2
    summary = summarize("vqa", items, results, exact=[False, False])
    assert summary["agreement_with_exact_match"]["judge1_em0"] == 1
    for path in (tmp_path / "cache").iterdir():
        assert SECRET not in path.read_text()


def test_429_and_500_are_retried(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with FakeOpenAI([(429, "slow down", {"Retry-After": "0"}), (500, "boom"), (200, "1")]) as server:
        assert judge(server, tmp_path).judge_one("vqa", ITEM)["score"] == 1
        assert len(server.requests) == 3


def test_malformed_reply_retried_once_then_counted(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with FakeOpenAI([(200, "I think so"), (200, "probably yes")]) as server:
        result = judge(server, tmp_path).judge_one("vqa", ITEM)
        assert result["score"] is None and result["error"] == "unparseable"
        assert len(server.requests) == 2
    assert summarize("vqa", [ITEM], [result])["n_unparseable"] == 1
    with FakeOpenAI([(200, "oops"), (200, "1")]) as server:
        assert judge(server, tmp_path).judge_one("vqa", {**ITEM, "question": "other"})["score"] == 1


def test_report_rubric_and_wasm(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    reports = [{"answer": f"ref {i}", "prediction": f"gen {i}"} for i in range(3)]
    with FakeOpenAI([(200, "4"), (200, "2"), (200, "3")]) as server:
        results = judge(server, tmp_path, concurrency=1).judge_all("report", reports)
    summary = summarize("report", reports, results)
    assert summary["mean_score"] == pytest.approx(3.0) and summary["wasm"] == pytest.approx(0.75)


def test_missing_key_is_clear(monkeypatch, tmp_path):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        Judge(JudgeConfig(cache_dir=str(tmp_path)))


def test_score_cli_with_judge(tmp_path, monkeypatch):
    from evaluate.score import main

    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    preds = tmp_path / "preds.jsonl"
    preds.write_text(json.dumps({**ITEM, "answer_type": "OPEN"}) + "\n")
    with FakeOpenAI([(200, "1")]) as server:
        cfg = tmp_path / "judge.yaml"
        cfg.write_text(f"model: m\nbase_url: {server.url}\ncache_dir: {tmp_path / 'c'}\n")
        metrics = main(["--predictions", str(preds), "--out", str(tmp_path / "out"), "--judge", "--judge-config", str(cfg)])
    assert metrics["judge"]["vqa"]["judge_accuracy"] == 1.0
    assert metrics["judge"]["vqa"]["agreement_with_exact_match"]["judge1_em0"] == 1
    assert metrics["judge"]["tokens"]["prompt"] == 10
    assert SECRET not in (tmp_path / "out" / "metrics.json").read_text()
    report = (tmp_path / "out" / "report.md").read_text()
    assert "GPT judge" in report and SECRET not in report
