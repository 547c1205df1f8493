"""A tiny local stand-in LLM server for tests: Anthropic /v1/messages and OpenAI /v1/chat/completions.

It answers every request with ``reply(prompt_text)`` and records the JSON bodies it received.
``fail_status`` makes it answer every request with that HTTP status instead.
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Callable
from typing import Any


def default_reply(prompt: str) -> str:
    clusters = [line.split(":")[0].strip("- ").strip() for line in prompt.splitlines() if line.startswith("- C")]
    lines = ["## Summary", "STUB-ANALYSIS: the circuit routes the prompt tokens to the prediction.", "", "## Clusters"]
    lines += [f"- {c}: stub role" for c in clusters] or ["- none"]
    return "\n".join(lines)


class StubLLM:
    def __init__(self, reply: Callable[[str], str] = default_reply, fail_status: int = 0) -> None:
        self.reply = reply
        self.fail_status = fail_status
        self.requests: list[dict[str, Any]] = []
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
                stub.requests.append({"path": self.path, "body": body, "headers": dict(self.headers)})
                if stub.fail_status:
                    return self._json(stub.fail_status, {"error": {"type": "api_error", "message": "stub failure"}})
                text_in = "\n".join(_texts(body.get("messages", [])))
                text = stub.reply(text_in)
                if self.path.rstrip("/").endswith("/v1/messages"):
                    return self._json(200, {
                        "id": "msg_stub", "type": "message", "role": "assistant", "model": body.get("model", "stub"),
                        "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
                        "usage": {"input_tokens": len(text_in) // 4, "output_tokens": len(text) // 4},
                    })
                if self.path.rstrip("/").endswith("/chat/completions"):
                    return self._json(200, {
                        "id": "chatcmpl-stub", "object": "chat.completion", "created": 0, "model": body.get("model", "stub"),
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": text}}],
                        "usage": {"prompt_tokens": len(text_in) // 4, "completion_tokens": len(text) // 4,
                                  "total_tokens": (len(text_in) + len(text)) // 4},
                    })
                return self._json(404, {"error": {"message": f"no route {self.path}"}})

            def _json(self, code: int, obj: Any) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                return

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def anthropic_base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def openai_base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> StubLLM:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _texts(messages: list[dict[str, Any]]) -> list[str]:
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, list):
            out += [c.get("text", "") for c in content if isinstance(c, dict)]
    return out
