"""Judge protocol against a local fake endpoint (127.0.0.1, port 0): replies, retries, timeouts, cache."""

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from vidlora.cli import main as vidlora
from vidlora.eval.judge import (
    SYSTEM_PROMPT,
    JudgeConfig,
    JudgeConfigError,
    JudgeParseError,
    build_messages,
    cache_key,
    judge_records,
    parse_judgement,
    summarize_judgements,
)

SLOW_SLEEP_S = 4.0  # far above the 0.5 s client timeout used below

# What the fake judge does, keyed by the predicted answer it is shown.
# A list is a script: one entry per successive request for that prediction (the last one repeats).
SCRIPT = {
    "good-yes": ["{'pred': 'yes', 'score': 4}"],
    "good-no": ['{"pred": "no", "score": 1}'],
    "chatty": ["Sure! {'pred': 'Yes', 'score': 5.0} Hope this helps."],
    "garbage": ["I think the answer is right."],
    "flaky": [500, "{'pred': 'yes', 'score': 3}"],
    "slow": ["sleep"],
    "denied": [401],
}


def main(argv: list[str]) -> int:
    """`vidlora eval ARGV` through the CLI (its error policy included)."""
    return vidlora(["eval", *argv])


class _Server(ThreadingHTTPServer):
    # Do not wait for handlers still sleeping on a request the client abandoned.
    block_on_close = False

    def handle_error(self, request, client_address):
        pass  # the client hanging up on the slow handler is expected


@pytest.fixture
def endpoint(monkeypatch):
    """A fake OpenAI-compatible endpoint; yields (base_url, state) where state logs every request."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)  # 127.0.0.1 must never go through a proxy
    state = {"requests": [], "lock": threading.Lock(), "stop": threading.Event()}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            user = body["messages"][1]["content"]
            prediction = re.search(r"Predicted Answer: (.*)\n", user).group(1)
            with state["lock"]:
                state["requests"].append(
                    {"path": self.path, "body": body, "auth": self.headers.get("Authorization")}
                )
                seen = sum(r["body"]["messages"][1]["content"] == user for r in state["requests"])
            steps = SCRIPT[prediction]
            step = steps[min(seen, len(steps)) - 1]
            if step == "sleep":
                state["stop"].wait(SLOW_SLEEP_S)
                return
            if isinstance(step, int):
                self.send_error(step)
                return
            payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": step}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    server = _Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", state
    finally:
        state["stop"].set()
        server.shutdown()
        server.server_close()


def _records(predictions, qtype="motion"):
    return [
        {"id": f"r{i}", "question": f"Where? ({p})", "answer": "left", "prediction": p, "type": qtype}
        for i, p in enumerate(predictions)
    ]


def _config(base_url, tmp_path, **overrides):
    values = dict(
        base_url=base_url,
        model="judge-x",
        api_key="sk-test",
        timeout=0.5,
        max_retries=1,
        backoff=0.01,
        workers=3,
        cache_path=tmp_path / "cache.jsonl",
    )
    values.update(overrides)
    return JudgeConfig(**values)


def test_prompt_is_the_original_wording():
    messages = build_messages("What moves?", "left", "Left.")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"] == SYSTEM_PROMPT
    assert SYSTEM_PROMPT.startswith("You are an intelligent chatbot designed for evaluating the correctness")
    assert "Here's how you can accomplish the task:------##INSTRUCTIONS: - Focus on" in SYSTEM_PROMPT
    user = messages[1]["content"]
    assert user.startswith(
        "Please evaluate the following video-based question-answer pair:\n\n"
        "Question: What moves?\nCorrect Answer: left\nPredicted Answer: Left.\n\n"
    )
    assert "where value of 'pred' is  a string of 'yes' or 'no'" in user
    assert user.endswith("For example, your response should look like this: {'pred': 'yes', 'score': 4.8}.")


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("{'pred': 'yes', 'score': 4}", ("yes", 4)),
        ('{"pred": "no", "score": 0}', ("no", 0)),
        ("Answer: {'pred': ' YES ', 'score': 5.0} done", ("yes", 5)),
        ("{'pred': 'no', 'score': 2}\n{'pred': 'yes', 'score': 5}", ("no", 2)),  # the first dict wins
    ],
)
def test_parse_judgement_valid(reply, expected):
    judgement = parse_judgement(reply)
    assert (judgement.pred, judgement.score) == expected


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        ("yes, 4", "no {...}"),
        ("{'pred': 'yes', 'score': }", "cannot parse"),
        ("{'pred': 'maybe', 'score': 3}", "'pred' must be 'yes' or 'no'"),
        ("{'pred': 'yes', 'score': 4.8}", "'score' must be an integer 0-5, got 4.8"),
        ("{'pred': 'yes', 'score': '4'}", "'score' must be an integer 0-5"),
        ("{'pred': 'yes', 'score': 6}", "'score' must be an integer 0-5, got 6"),
        ("{'pred': 'yes', 'score': True}", "'score' must be an integer 0-5"),
        ("{'pred': 'yes'}", "'score' must be an integer 0-5, got None"),
        ("{__import__('os').getcwd()}", "cannot parse"),  # never evaluated
    ],
)
def test_parse_judgement_invalid(reply, message):
    with pytest.raises(JudgeParseError, match=re.escape(message)):
        parse_judgement(reply)


def test_replies_retries_timeouts_and_counts(endpoint, tmp_path):
    base_url, state = endpoint
    records = _records(["good-yes", "good-no", "chatty", "garbage", "flaky", "slow", "denied", "good-yes"])
    records[-1]["type"] = "color"  # same (question?, answer, prediction) as r0 but another question
    records[-1]["question"] = "Which color?"
    config = _config(base_url, tmp_path)
    start = time.monotonic()
    results = judge_records(records, config, progress=False)
    elapsed = time.monotonic() - start
    # slow: 2 attempts x 0.5 s timeout + 0.01 s backoff; a loop without bound would never return.
    assert elapsed < SLOW_SLEEP_S

    statuses = [r.status for r in results]
    assert statuses == ["ok", "ok", "ok", "parse_failure", "ok", "error", "error", "ok"]
    assert [r.attempts for r in results] == [1, 1, 1, 1, 2, 2, 1, 1]
    assert "gave up after 2 attempt(s)" in results[5].error
    assert "HTTP 401" in results[6].error
    assert results[3].reply == "I think the answer is right."

    # One request per record, plus one retry each for flaky (500) and slow (timeout); 401 is not retried.
    assert len(state["requests"]) == 10
    first = state["requests"][0]
    assert first["path"] == "/v1/chat/completions"
    assert first["auth"] == "Bearer sk-test"
    assert first["body"]["model"] == "judge-x" and first["body"]["temperature"] == 0

    summary = summarize_judgements(records, results, config)
    # verdicts: yes 4, no 1, yes 5, yes 3, yes 4 -> 4 yes / 5, mean score 17 / 5
    assert (summary["yes"], summary["no"], summary["accuracy"]) == (4, 1, 4 / 5)
    assert summary["mean_score"] == 17 / 5
    assert (summary["n"], summary["parse_failures"], summary["errors"], summary["cached"]) == (8, 1, 2, 0)
    assert summary["by_type"]["color"] == {
        "n": 1, "yes": 1, "no": 0, "accuracy": 1.0, "mean_score": 4.0, "parse_failures": 0, "errors": 0,
    }  # fmt: skip
    motion = summary["by_type"]["motion"]
    assert (motion["n"], motion["yes"], motion["no"], motion["mean_score"]) == (7, 3, 1, 13 / 4)

    # Replies (parse failures included) are cached; failed requests are not and are asked again.
    cache_lines = (tmp_path / "cache.jsonl").read_text().splitlines()
    assert len(cache_lines) == 6
    state["requests"].clear()
    again = judge_records(records, config, progress=False)
    assert [r.status for r in again] == statuses
    assert [r.cached for r in again] == [True, True, True, True, True, False, False, True]
    asked = sorted(re.search(r"Predicted Answer: (.*)\n", r["body"]["messages"][1]["content"]).group(1)
                   for r in state["requests"])  # fmt: skip
    assert asked == ["denied", "slow", "slow"]


def test_cache_hit_makes_no_request_and_duplicates_are_asked_once(endpoint, tmp_path):
    base_url, state = endpoint
    records = _records(["good-yes", "good-no", "chatty"])
    records.append(dict(records[0], id="dup"))  # same question/answer/prediction as r0
    config = _config(base_url, tmp_path)
    first = judge_records(records, config, progress=False)
    assert len(state["requests"]) == 3
    assert [(r.judgement.pred, r.judgement.score) for r in first] == [
        ("yes", 4),
        ("no", 1),
        ("yes", 5),
        ("yes", 4),
    ]

    second = judge_records(records, config, progress=False)
    assert len(state["requests"]) == 3  # zero new requests
    assert [r.judgement for r in second] == [r.judgement for r in first]
    assert all(r.cached for r in second)

    # The key covers the model: another judge model is asked afresh.
    judge_records(records, _config(base_url, tmp_path, model="judge-y"), progress=False)
    assert len(state["requests"]) == 6
    assert cache_key("judge-x", "q", "a", "p") != cache_key("judge-y", "q", "a", "p")


def test_eval_command_with_judge(endpoint, tmp_path, monkeypatch, capsys):
    base_url, state = endpoint
    preds = tmp_path / "preds.jsonl"
    rows = _records(["good-yes", "garbage", "flaky"])
    rows[0]["prediction"] = "good-yes"
    preds.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "report.json"
    argv = ["--predictions", str(preds), "--out", str(out), "--judge", "--judge_base_url", base_url,
            "--judge_model", "judge-x", "--judge_api_key_env", "VIDLORA_TEST_JUDGE_KEY",
            "--judge_timeout", "0.5", "--judge_backoff", "0.01", "--judge_workers", "2"]  # fmt: skip

    monkeypatch.delenv("VIDLORA_TEST_JUDGE_KEY", raising=False)
    assert main(argv) == 2
    assert "environment variable VIDLORA_TEST_JUDGE_KEY is not set" in capsys.readouterr().err
    assert not state["requests"]

    monkeypatch.setenv("VIDLORA_TEST_JUDGE_KEY", "sk-local")
    assert main(argv) == 0
    report = json.loads(out.read_text())
    judge = report["judge"]
    assert (judge["yes"], judge["no"], judge["parse_failures"], judge["errors"]) == (2, 0, 1, 0)
    assert (judge["accuracy"], judge["mean_score"]) == (1.0, 7 / 2)
    assert judge["model"] == "judge-x" and "sk-local" not in out.read_text()
    assert [item["judge"]["status"] for item in report["items"]] == ["ok", "parse_failure", "ok"]
    assert report["exact_match"]["accuracy"] == 0.0  # none of the fake predictions says "left"
    assert (tmp_path / "report.judge_cache.jsonl").exists()
    assert state["requests"][0]["auth"] == "Bearer sk-local"

    n = len(state["requests"])
    assert main(argv) == 0
    assert len(state["requests"]) == n  # rerun: everything from the cache
    assert "3 of 3 verdicts from the cache" in capsys.readouterr().out

    (tmp_path / "report.judge_cache.jsonl").write_text("not json\n")
    assert main(argv) == 2
    assert "report.judge_cache.jsonl:1: malformed judge cache line" in capsys.readouterr().err


def test_config_errors():
    with pytest.raises(JudgeConfigError, match="--judge_base_url is required; --judge_model is required"):
        JudgeConfig(base_url="", model="")
    with pytest.raises(JudgeConfigError, match="--judge_workers must be >= 1"):
        JudgeConfig(base_url="http://127.0.0.1:1", model="m", workers=0)
    assert "sk-secret" not in repr(JudgeConfig(base_url="http://x", model="m", api_key="sk-secret"))
