"""Requests too malformed to reach the app (a bad Content-Length, a broken request line) answered
in OpenAI's error shape too. uvicorn rejects them in its HTTP protocol, before any ASGI code runs,
with a plain-text 400; these protocol classes send the same status with a JSON body instead."""

from __future__ import annotations

import json
from typing import Any

from slmkit.serve.protocol import APIError, error_body


def malformed_request_body(msg: str) -> bytes:
    return json.dumps(error_body(APIError(400, f"malformed HTTP request: {msg}", code="malformed_request"))).encode()


def http_protocol() -> type:
    """The HTTP protocol class uvicorn would pick (httptools when installed, else h11), answering
    malformed requests with an OpenAI-shaped JSON 400."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return _h11_protocol()

    class OpenAIErrorHttpTools(HttpToolsProtocol):
        def send_400_response(self, msg: str) -> None:
            body = malformed_request_body(msg)
            head = [b"HTTP/1.1 400 Bad Request\r\n", b"content-type: application/json\r\n",
                    b"content-length: " + str(len(body)).encode() + b"\r\n", b"connection: close\r\n", b"\r\n"]
            self.transport.write(b"".join(head) + body)
            self.transport.close()

    return OpenAIErrorHttpTools


def _h11_protocol() -> type:
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class OpenAIErrorH11(H11Protocol):
        def send_400_response(self, msg: str) -> None:
            body = malformed_request_body(msg)
            headers: list[tuple[bytes, Any]] = [(b"content-type", b"application/json"),
                                                (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
            self.transport.write(self.conn.send(h11.Response(status_code=400, headers=headers, reason=b"Bad Request")))
            self.transport.write(self.conn.send(h11.Data(data=body)))
            self.transport.write(self.conn.send(h11.EndOfMessage()))
            self.transport.close()

    return OpenAIErrorH11
