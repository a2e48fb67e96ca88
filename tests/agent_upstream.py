"""A scripted OpenAI-compatible server on loopback: each chat request gets the next scripted reply, so
agent tests are deterministic and see exactly what the agent sent."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def call(name: str, arguments: Any, call_id: str | None = None) -> dict:
    """A native tool call, as a scripted reply's element."""
    return {"name": name, "arguments": arguments, "id": call_id}


class ScriptedUpstream:
    """`replies`: each a string (assistant content), {"tool_calls": [call(...), ...]} (native calls),
    {"status": N, "message": "..."} (an error response), or a callable(request body) -> one of those.
    With `native=False` the server refuses `tools` the way `slmkit serve` does (400, param "tools")."""

    def __init__(self, replies: list[Any], native: bool = True, model: str = "scripted") -> None:
        self.replies, self.native, self.model = list(replies), native, model
        self.requests: list[dict] = []
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path.rstrip("/") == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": upstream.model, "object": "model", "created": 0,
                                                                  "owned_by": "test"}]})
                else:
                    self._send(404, {"error": {"message": "not found", "type": "not_found", "param": None, "code": None}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if self.path.rstrip("/") != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": "not found", "type": "not_found", "param": None, "code": None}})
                upstream.requests.append(body)
                if not upstream.native and "tools" in body:
                    return self._send(400, {"error": {"message": "unsupported field 'tools': this server does not "
                                                                 "implement it; remove it from the request",
                                                      "type": "invalid_request_error", "param": "tools",
                                                      "code": "unsupported_field"}})
                if not upstream.replies:
                    return self._send(500, {"error": {"message": "script exhausted", "type": "server_error",
                                                      "param": None, "code": None}})
                reply = upstream.replies.pop(0)
                if callable(reply):
                    reply = reply(body)
                if isinstance(reply, dict) and "status" in reply:
                    return self._send(reply["status"], {"error": {"message": reply["message"], "type": "error",
                                                                  "param": None, "code": None}})
                self._send(200, upstream.completion(reply))

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def completion(self, reply: Any) -> dict:
        message: dict = {"role": "assistant", "content": None}
        finish = "stop"
        if isinstance(reply, str):
            message["content"] = reply
        else:
            message["content"] = reply.get("content")
            message["tool_calls"] = [
                {"id": c["id"] or f"call_{i}", "type": "function",
                 "function": {"name": c["name"], "arguments": c["arguments"] if isinstance(c["arguments"], str)
                              else json.dumps(c["arguments"])}}
                for i, c in enumerate(reply["tool_calls"])]
            finish = "tool_calls"
        return {"id": "chatcmpl-scripted", "object": "chat.completion", "created": 0, "model": self.model,
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    def __enter__(self) -> "ScriptedUpstream":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

