"""The chat-backend protocol: scripted replies, SmolLM2 batched generation and option scoring
(checked against an unbatched NumPy log-softmax), and the HTTP client's retries and errors
against a stdlib test server."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from jaxeff.llm.backends import (
    BackendError,
    ChatBackend,
    LocalBackend,
    OpenAIBackend,
    ScriptedBackend,
    check_messages,
)

USER = [{"role": "user", "content": "Name a colour."}]


def test_scripted_backend_replies_counts_and_runs_out():
    b = ScriptedBackend(["a b", "c"])
    assert isinstance(b, ChatBackend)
    out = b.chat([USER, USER])
    assert [r.text for r in out] == ["a b", "c"]
    assert b.stats.calls == 2 and b.stats.completion_tokens == 3
    assert b.log == [USER, USER]
    with pytest.raises(BackendError, match="exhausted"):
        b.chat([USER])
    f = ScriptedBackend(lambda m: m[-1]["content"][::-1], scores=lambda m, o: [len(x) for x in o])
    assert f.chat([USER], n=2)[0].choices[1].text == ".ruoloc a emaN"
    assert f.score_options(USER, ["ab", "c"]) == [2.0, 1.0]
    assert f.stats.calls == 2


@pytest.mark.parametrize(
    "batch, match",
    [
        ("hi", "list of conversations"),
        ([[]], r"messages_batch\[0\] must be a non-empty list"),
        ([[{"role": "bot", "content": "x"}]], r"messages_batch\[0\]\[0\].*system\|user"),
        ([[{"role": "user", "content": 3}]], r"messages_batch\[0\]\[0\]"),
    ],
)
def test_bad_messages_are_named(batch, match):
    with pytest.raises(ValueError, match=match):
        check_messages(batch)


def test_bad_sampling_arguments():
    b = ScriptedBackend(["x"])
    with pytest.raises(ValueError, match="max_tokens must be an int >= 1"):
        b.chat([USER], max_tokens=0)
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        b.chat([USER], n=0)
    with pytest.raises(ValueError, match="options must be a non-empty list"):
        ScriptedBackend(["x"], scores=lambda m, o: []).score_options(USER, "yes")
    with pytest.raises(ValueError, match="model must be a LocalModel"):
        LocalBackend(model="smollm2")


def test_local_backend_chat_usage_and_counts(smollm2_backend):
    # one conversation at a time: batching itself is `Generator`'s (tests/infer); the serve
    # test reuses these compiled shapes
    b = smollm2_backend
    calls = b.stats.calls
    (r,) = b.chat([USER], max_tokens=8)
    assert r.text.strip() and b.stats.calls - calls == 1
    assert r.usage.prompt_tokens == len(b.encode(b.template.format(USER)))
    assert 1 <= r.usage.completion_tokens <= 8
    n_new = len(b.encode(r.text))
    assert r.choices[0].finish_reason == ("length" if n_new >= 8 else "stop")
    assert b.chat([USER], max_tokens=8)[0].text == r.text  # greedy


def test_score_options_is_the_teacher_forced_log_probability(smollm2_backend, smollm2):
    model = smollm2[0]
    b = smollm2_backend
    conv = [{"role": "user", "content": "Is fire hot? Answer yes or no."}]
    options = ["Yes", "No, it is cold", "Banana"]
    got = b.score_options(conv, options)
    prompt = b.encode(b.template.format(conv))
    for opt, score in zip(options, got, strict=True):
        seq = prompt + b.encode(opt)
        logits = np.asarray(model(np.asarray([seq], np.int32))[0])[0].astype(np.float64)
        ref = 0.0
        for t in range(len(prompt), len(seq)):  # one token at a time, no padding, no batch
            row = logits[t - 1]
            ref += row[seq[t]] - (row.max() + np.log(np.exp(row - row.max()).sum()))
        assert score == pytest.approx(ref, abs=2e-3)
    assert got[0] > got[2]  # "Yes" beats "Banana"


class _Script(BaseHTTPRequestHandler):
    """Answers POSTs from a class-level list of (status, body) pairs; records each request."""

    replies: list = []
    seen: list = []

    def log_message(self, *args):
        pass

    def do_POST(self):  # noqa: N802
        self.seen.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        status, body = self.replies.pop(0)
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def script_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Script)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Script.replies, _Script.seen = [], []
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


OK = {
    "choices": [{"message": {"role": "assistant", "content": "red"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 1},
}


def test_http_client_retries_5xx_then_succeeds(script_server):
    _Script.replies = [(503, {"error": {"message": "busy"}}), (500, "oops"), (200, OK)]
    b = OpenAIBackend(script_server, "m", retries=2, backoff=0.01)
    (r,) = b.chat([USER], max_tokens=7)
    assert r.text == "red" and r.usage.prompt_tokens == 5
    assert len(_Script.seen) == 3 and _Script.seen[0]["max_tokens"] == 7
    assert _Script.seen[0]["messages"] == USER
    assert b.stats.calls == 1 and b.stats.completion_tokens == 1


def test_http_client_errors(script_server):
    b = OpenAIBackend(script_server, retries=1, backoff=0.01)
    _Script.replies = [(400, {"error": {"message": "bad max_tokens"}})]
    with pytest.raises(BackendError, match="HTTP 400: bad max_tokens"):
        b.chat([USER])
    assert len(_Script.seen) == 1  # a 4xx is not retried
    _Script.replies = [(200, {"choices": [{"text": "no message"}]})]
    with pytest.raises(BackendError, match="malformed chat completion"):
        b.chat([USER])
    _Script.replies = [(200, "<html>")]
    with pytest.raises(BackendError, match="not JSON"):
        b.chat([USER])
    _Script.replies = [(502, "x"), (502, "x")]
    with pytest.raises(BackendError, match="failed after 2 attempts; last error: HTTP 502"):
        b.chat([USER])
    with pytest.raises(ValueError, match="base_url must start with http"):
        OpenAIBackend("localhost:8000")


def test_http_client_connection_refused():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Script)
    port = server.server_address[1]
    server.server_close()  # nothing listens there now
    b = OpenAIBackend(f"http://127.0.0.1:{port}/v1", retries=1, backoff=0.01)
    with pytest.raises(BackendError, match="failed after 2 attempts; last error: URLError"):
        b.chat([USER])
