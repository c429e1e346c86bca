"""``jaxeff serve``: the OpenAI-compatible endpoint, started for real on a free localhost port,
answers the HTTP client with the local backend's greedy text; bad requests get 400s."""

import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from jaxeff.llm.backends import BackendError, OpenAIBackend, ScriptedBackend
from jaxeff.llm.serve import make_server
from jaxeff.parallel.multiprocess import cpu_child_env

CONV = [{"role": "user", "content": "Name a colour."}]


def _start(backend):
    server = make_server(backend, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"


@pytest.fixture(scope="module")
def served(smollm2_backend):
    server, url = _start(smollm2_backend)
    yield url
    server.shutdown()
    server.server_close()


def test_http_matches_local_greedy(served, smollm2_backend):
    client = OpenAIBackend(served, "smollm2", timeout=300, retries=0)
    (remote,) = client.chat([CONV], max_tokens=8)
    (local,) = smollm2_backend.chat([CONV], max_tokens=8)
    assert remote.text == local.text and remote.text.strip()
    assert remote.usage == local.usage
    assert remote.choices[0].finish_reason == local.choices[0].finish_reason
    assert client.stats.calls == 1
    opts = ["Red", "Banana bread"]
    assert client.score_options(CONV, opts) == pytest.approx(
        smollm2_backend.score_options(CONV, opts), abs=1e-5
    )


def _post(url, data: bytes):
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_models_and_bad_requests():
    server, url = _start(ScriptedBackend(lambda m: "ok"))
    try:
        with urllib.request.urlopen(f"{url}/models", timeout=30) as r:
            assert json.loads(r.read())["data"][0]["id"] == "scripted"
        code, body = _post(f"{url}/chat/completions", b"{not json")
        assert code == 400 and "not valid JSON" in body["error"]["message"]
        code, body = _post(f"{url}/chat/completions", b'{"max_tokens": 3}')
        assert code == 400 and "'messages' is required" in body["error"]["message"]
        bad = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}
        code, body = _post(f"{url}/chat/completions", json.dumps(bad).encode())
        assert code == 400 and "'max_tokens' is invalid" in body["error"]["message"]
        code, body = _post(f"{url}/nowhere", b"{}")
        assert code == 404
        code, body = _post(f"{url}/chat/completions", json.dumps({"messages": CONV}).encode())
        assert code == 200 and body["choices"][0]["message"]["content"] == "ok"
        with pytest.raises(BackendError, match="HTTP 400: field 'n' is invalid"):
            OpenAIBackend(url, retries=0).chat([CONV], n=99)
    finally:
        server.shutdown()
        server.server_close()


def test_client_timeout_is_retried_then_reported():
    slow = ScriptedBackend(lambda m: time.sleep(1.5) or "late")
    server, url = _start(slow)
    try:
        client = OpenAIBackend(url, timeout=0.3, retries=1, backoff=0.01)
        with pytest.raises(BackendError, match="failed after 2 attempts; last error: .*timed out"):
            client.chat([CONV])
    finally:
        server.shutdown()
        server.server_close()


def test_cli_serve_help_and_bad_port():
    out = subprocess.run(
        [sys.executable, "-m", "jaxeff.cli", "serve", "--port", "x"],
        capture_output=True,
        text=True,
        env=cpu_child_env(),
    )
    assert out.returncode == 2 and "must be an integer in 0-65535, got 'x'" in out.stderr
    assert out.stderr.count("\n") == 1
