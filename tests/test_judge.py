"""The LLM-as-judge client (sft_jax/judge.py) against a local OpenAI-compatible chat server
(a real HTTP server on loopback, standing in for Ollama), and in a tiny training run."""

import http.server
import json
import threading

import pytest

from configs import tiny
from sft_jax import evaluate, judge, train


class _ChatServer(http.server.BaseHTTPRequestHandler):
    """POST /v1/chat/completions: 'Score: 90' when the graded response contains the
    reference answer, else 'Score: 5'; records every request body."""

    requests: list[dict] = []
    reply_override: str | None = None

    def do_POST(self):  # noqa: N802 (the http.server API)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(
            {"path": self.path, "body": body, "auth": self.headers.get("Authorization")}
        )
        if self.path != "/v1/chat/completions":
            self.send_error(404, "no such model route")
            return
        user = body["messages"][1]["content"]
        reference = user.split("Reference answer:\n")[1].split("\n\nResponse to grade:")[0]
        response = user.split("Response to grade:\n")[1]
        text = self.reply_override or (
            "Matches the reference.\nScore: 90" if reference in response else "Wrong.\nScore: 5"
        )
        out = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(out.encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    _ChatServer.requests, _ChatServer.reply_override = [], None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ChatServer)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


def test_parse_score():
    assert judge.parse_score("Good.\nScore: 85") == 85
    assert judge.parse_score("score=7") == 7
    assert judge.parse_score("**Score:** 100") == 100  # markdown bold, as judges often write
    assert judge.parse_score("Score: **100**") == 100
    assert judge.parse_score("Score: 3 ... on reflection Score: 40") == 40
    assert judge.parse_score("Score: 250") is None
    assert judge.parse_score("I would give it 80") is None


def test_scores_records_and_reports(server):
    j = judge.Judge(server, "judge-model", api_key="k123")
    records = evaluate.generation_records(
        ["What is 2+3?", "Capital of France?"], ["5", "Paris"], ["It is 5.", "Lyon"]
    )
    j.score_records(records)
    assert [r["judge"] for r in records] == [90, 5]
    sent = _ChatServer.requests[0]
    assert sent["path"] == "/v1/chat/completions" and sent["auth"] == "Bearer k123"
    assert sent["body"]["model"] == "judge-model" and sent["body"]["temperature"] == 0
    assert "What is 2+3?" in sent["body"]["messages"][1]["content"]
    assert evaluate.summarize(records)["judge_score"] == 47.5
    report = evaluate.report_markdown(records, records, None, None)
    assert "| LLM judge score (0–100) | 47.5 | 47.5 |" in report


def test_unusable_replies_are_counted_not_guessed(server):
    _ChatServer.reply_override = "Fine answer, I like it."
    records = evaluate.generation_records(["q"], ["a"], ["a"])
    judge.Judge(server, "m").score_records(records)
    assert records[0]["judge"] is None
    assert evaluate.summarize(records) == {"exact_match": 1.0, "contains": 1.0, "judge_unscored": 1}


def test_errors_name_the_config_key(server):
    with pytest.raises(judge.JudgeError, match="eval.judge_url=.*could not reach the judge"):
        judge.Judge("http://127.0.0.1:9/v1", "m", timeout_s=5).ask("q", "a", "r")
    with pytest.raises(judge.JudgeError, match="HTTP 404.*eval.judge_model='m'"):
        judge.Judge(server.replace("/v1", "/v2"), "m").ask("q", "a", "r")


def test_judge_in_a_training_run(server, tmp_path):
    c = tiny.get_config()
    c.train.progress_bar = False
    c.train.steps, c.checkpoint.save_every = 2, 0
    c.optim.warmup_steps = 0
    c.eval.generations, c.eval.max_new_tokens = 2, 4
    c.eval.judge_url, c.eval.judge_model = server, "judge-model"
    train.train_and_evaluate(c, str(tmp_path))
    for name in ("before", "after"):
        with open(tmp_path / f"generations_{name}.jsonl") as f:
            records = [json.loads(line) for line in f]
        assert len(records) == 2 and all(r["judge"] in (5, 90) for r in records)
    assert "LLM judge score" in (tmp_path / "report.md").read_text()
    assert len(_ChatServer.requests) == 4  # two prompts, before and after
