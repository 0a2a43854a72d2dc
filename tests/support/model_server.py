"""A local HTTP server speaking the OpenAI chat-completions and Anthropic Messages APIs: it
replays recorded answers in order and records every request, for the planner's real httpx
client."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson


@dataclass
class Reply:
    """One recorded answer: the assistant's text (wrapped in the API's envelope), or a raw
    status and body; ``delay`` seconds before answering (a slow model)."""

    text: str | None = None
    status: int = 200
    body: bytes | None = None
    delay: float = 0.0


@dataclass
class ModelServer:
    """Replays ``replies`` in order; ``requests`` holds (path, headers, JSON body)."""

    replies: list[Reply]
    requests: list[tuple[str, dict[str, str], Any]] = field(default_factory=list)
    url: str = ""

    def envelope(self, path: str, text: str) -> bytes:
        """The API's reply shape around ``text``, as the real services send it."""
        if path.endswith("/chat/completions"):
            return orjson.dumps({
                "id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-test",
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
        return orjson.dumps({
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-test",
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
            "usage": {"input_tokens": 1, "output_tokens": 1}})


@contextmanager
def model_server(replies: list[Reply]) -> Iterator[ModelServer]:
    """Serve on 127.0.0.1 (a free port) until the block ends."""
    state = ModelServer(list(replies))
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", "0"))
            body = orjson.loads(self.rfile.read(length) or b"null")
            with lock:
                state.requests.append((self.path, dict(self.headers.items()), body))
                reply = state.replies.pop(0) if state.replies else Reply(status=500)
            time.sleep(reply.delay)  # a slow model; the client's timeout decides
            payload = reply.body if reply.body is not None else (
                state.envelope(self.path, reply.text) if reply.text is not None else b"{}")
            try:
                self.send_response(reply.status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeout): nothing to answer

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
