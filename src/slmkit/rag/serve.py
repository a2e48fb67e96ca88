"""`slmkit rag serve`: grounded answers behind an OpenAI-compatible chat endpoint.

The request's `model` names an index; the last user message is the question (earlier turns go
into the prompt as history). The reply is a normal chat completion whose text cites sources as
[n]; the completion also carries `citations` and `sources` (OpenAI clients expose unknown fields,
e.g. `completion.model_extra["citations"]` in Python). Request validation and error bodies are
those of `slmkit serve`.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
import uuid
from typing import Any

from slmkit.errors import InputError, MissingExtraError
from slmkit.rag.answer import Answer, Generator, answer
from slmkit.rag.index import Index
from slmkit.rag.retrieve import Retriever

try:
    from fastapi import FastAPI
    from fastapi import Request as HTTPRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException

    from slmkit.serve.app import APIError, ChatBody, error_response, http_error, validation_error
except ImportError:
    raise MissingExtraError("fastapi", "serve") from None


def create_app(indexes: dict[str, Index], generator: Generator, *, retriever: Retriever | None = None, k: int = 5,
               max_tokens: int = 256, api_key: str | None = None) -> FastAPI:
    """The app answering from `indexes` ({model name: index}) with `generator`."""
    retriever = retriever or Retriever()
    lock = threading.Lock()  # one generation at a time: a local model is not shared between threads
    created = int(time.time())
    app = FastAPI(title="slmkit rag")

    @app.exception_handler(APIError)
    async def api_error(request: HTTPRequest, e: APIError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: HTTPRequest, e: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(list(e.errors())))

    @app.exception_handler(HTTPException)
    async def http_layer_error(request: HTTPRequest, e: HTTPException) -> JSONResponse:
        return error_response(http_error(e, request))

    def check_auth(request: HTTPRequest) -> None:
        if api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(key.encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key; send 'Authorization: Bearer KEY'", "authentication_error",
                           "invalid_api_key")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(http: HTTPRequest) -> dict:
        check_auth(http)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "slmkit"}
                                           for name in indexes]}

    @app.post("/v1/chat/completions")
    async def chat(http: HTTPRequest, body: ChatBody) -> Response:
        check_auth(http)
        index = indexes.get(body.model)
        if index is None:
            raise APIError(404, f"the model {body.model!r} does not exist; GET /v1/models lists the indexes served",
                           code="model_not_found", param="model")
        if body.n != 1 or body.logprobs:
            raise APIError(400, "grounded answers support n = 1 without logprobs", param="n" if body.n != 1 else "logprobs")
        messages = [m.model_dump() for m in body.messages]
        if messages[-1]["role"] != "user":
            raise APIError(400, "the last message must be the user's question", param="messages")
        limit = body.max_completion_tokens or body.max_tokens or max_tokens

        def run() -> Answer:
            with lock:
                return answer(index, messages[-1]["content"], generator, retriever=retriever, k=k, max_tokens=limit,
                              temperature=body.temperature or 0.0, seed=body.seed, history=messages[:-1])

        try:
            reply = await asyncio.to_thread(run)
        except InputError as e:
            raise APIError(400, str(e), param="messages") from None
        result = reply.to_dict()
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
        extra = {"citations": result["citations"], "sources": result["sources"]}
        if not body.stream:
            return JSONResponse({**head, "object": "chat.completion", "choices": [{
                "index": 0, "message": {"role": "assistant", "content": reply.text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}, **extra})

        def event(delta: dict[str, Any], finish: str | None = None, **more: Any) -> str:
            chunk = {**head, "object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **more}
            return f"data: {json.dumps(chunk)}\n\n"

        def events():
            yield event({"role": "assistant", "content": ""})
            yield event({"content": reply.text})
            yield event({}, "stop", **extra)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def serve(indexes: dict[str, str], generator: Generator, host: str = "127.0.0.1", port: int = 8000, **settings: Any) -> None:
    """Serve until Ctrl-C or SIGTERM."""
    try:
        import uvicorn
    except ImportError:
        raise MissingExtraError("uvicorn", "serve") from None
    from slmkit.serve.http_errors import http_protocol

    opened = {name: Index(path) for name, path in indexes.items()}
    for index in opened.values():  # load the embedders now, not on the first request
        index.embedder
    app = create_app(opened, generator, **settings)
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, http=http_protocol(), log_level="info")).run()
