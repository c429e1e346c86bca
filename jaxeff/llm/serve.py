"""``jaxeff serve``: a local model as an OpenAI-compatible HTTP endpoint on localhost.

Routes (JSON in, JSON out; errors are ``{"error": {"message": ..., "type": ...}}``):

  - ``GET  /v1/models``: ``{"object": "list", "data": [{"id": NAME, "object": "model"}]}``.
  - ``POST /v1/chat/completions``: the OpenAI request fields ``messages``, ``max_tokens``
    (default 256), ``temperature`` (default 0: greedy), ``n`` and ``seed``; the reply has
    ``choices[i].message.content``, ``finish_reason`` and ``usage``. ``stream`` is refused.
  - ``POST /v1/score`` (a jaxeff extension): ``{"messages", "options"}`` ->
    ``{"logprobs": [log p(option | messages), ...]}`` (see `LocalBackend.score_options`).

A bad body is a 400 naming the field; an unknown route a 404. Requests are served one at a time
(a lock around the model: one compiled generator, no concurrent device work) on the standard
library's ``ThreadingHTTPServer``, which is meant for a local, trusted client.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from jaxeff.llm.backends import LocalBackend, check_messages

MAX_BODY = 8 * 1024 * 1024


class _BadRequest(ValueError):
    pass


def _field(body: dict, name: str, kind, default, check=None):
    value = body.get(name, default)
    if value is None:
        value = default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) or (check and not check(value)):
        raise _BadRequest(f"field {name!r} is invalid: {value!r:.60}")
    return value


def chat_completion(backend: LocalBackend, body: dict) -> dict:
    """The OpenAI chat-completion reply to a request ``body`` (raises `_BadRequest`)."""
    if body.get("stream"):
        raise _BadRequest("field 'stream' is not supported (use stream: false)")
    if "messages" not in body:
        raise _BadRequest("field 'messages' is required")
    try:
        conv = check_messages([body["messages"]])[0]
    except ValueError as err:
        raise _BadRequest(f"field 'messages' is invalid: {err}") from None
    max_tokens = _field(body, "max_tokens", int, 256, lambda v: v >= 1)
    temperature = _field(body, "temperature", float, 0.0, lambda v: v >= 0)
    n = _field(body, "n", int, 1, lambda v: 1 <= v <= 16)
    seed = _field(body, "seed", int, 0)
    try:
        result = backend.chat(
            [conv], max_tokens=max_tokens, temperature=temperature, n=n, seed=seed
        )[0]
    except ValueError as err:  # e.g. longer than the model's context
        raise _BadRequest(str(err)) from None
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": backend.name,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish_reason,
            }
            for i, c in enumerate(result.choices)
        ],
        "usage": {
            "prompt_tokens": result.usage.prompt_tokens,
            "completion_tokens": result.usage.completion_tokens,
            "total_tokens": result.usage.prompt_tokens + result.usage.completion_tokens,
        },
    }


def score(backend: LocalBackend, body: dict) -> dict:
    if "messages" not in body or "options" not in body:
        raise _BadRequest("fields 'messages' and 'options' are required")
    try:
        conv = check_messages([body["messages"]])[0]
        before = backend.stats.prompt_tokens
        logprobs = backend.score_options(conv, body["options"])
    except ValueError as err:
        raise _BadRequest(str(err)) from None
    return {"logprobs": logprobs, "prompt_tokens": backend.stats.prompt_tokens - before}


def make_server(backend: LocalBackend, host: str = "127.0.0.1", port: int = 8000):
    """A `ThreadingHTTPServer` serving ``backend`` (port 0: any free port; read it from
    ``server.server_address``). Call ``serve_forever()`` (in a thread if needed) and
    ``shutdown()``."""
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # noqa: A002  (quiet: no line per request)
            pass

        def _send(self, code: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (its timeout); nothing to tell it

        def _error(self, code: int, message: str, kind: str = "invalid_request_error"):
            self._send(code, {"error": {"message": message, "type": kind}})

        def do_GET(self):  # noqa: N802
            if self.path.rstrip("/") == "/v1/models":
                self._send(
                    200,
                    {"object": "list", "data": [{"id": backend.name, "object": "model"}]},
                )
            else:
                self._error(404, f"no route GET {self.path}; try /v1/models", "not_found")

        def do_POST(self):  # noqa: N802
            route = self.path.rstrip("/")
            handlers = {"/v1/chat/completions": chat_completion, "/v1/score": score}
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                self._error(413, f"body of {length} bytes exceeds {MAX_BODY}")
                return
            raw = self.rfile.read(length)
            if route not in handlers:
                self._error(404, f"no route POST {self.path}; try /v1/chat/completions")
                return
            try:
                body = json.loads(raw)
            except ValueError as err:
                self._error(400, f"request body is not valid JSON: {err}")
                return
            if not isinstance(body, dict):
                self._error(400, "request body must be a JSON object")
                return
            try:
                with lock:
                    reply = handlers[route](backend, body)
            except _BadRequest as err:
                self._error(400, str(err))
                return
            except Exception as err:  # noqa: BLE001  (the server keeps serving)
                self._error(500, f"{type(err).__name__}: {err}", "server_error")
                return
            self._send(200, reply)

    return ThreadingHTTPServer((host, port), Handler)


def serve(model: str | None = None, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Loads the model (default SmolLM2-135M-Instruct) and serves it until interrupted."""
    import sys

    backend = LocalBackend(path=model)
    try:
        server = make_server(backend, host, port)
    except OSError as err:
        raise ValueError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    h, p = server.server_address[:2]
    sys.stderr.write(f"jaxeff serve: http://{h}:{p}/v1 (model {backend.name}); Ctrl-C stops\n")
    try:
        server.serve_forever()
    finally:
        server.server_close()
