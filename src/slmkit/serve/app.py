"""The OpenAI-compatible HTTP server (FastAPI) over the engine.

The engine steps on its own thread (`EngineLoop`); each HTTP request submits to it and awaits its
outputs on an asyncio queue. Errors are OpenAI's JSON shape: {"error": {"message", "type",
"param", "code"}} with the matching status.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import struct
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from contextlib import asynccontextmanager
from typing import Any

from slmkit.errors import InputError, MissingExtraError
from slmkit.generation.api import encode_prompt
from slmkit.generation.sampling import SamplingParams
from slmkit.serve.chat_template import ChatTemplate
from slmkit.serve.engine import Engine, Output, Request
from slmkit.serve.prometheus import ServerMetrics
from slmkit.tokenizer import Tokenizer

try:
    from fastapi import FastAPI
    from fastapi import Request as HTTPRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field
except ImportError:
    raise MissingExtraError("fastapi", "serve") from None

log = logging.getLogger("slmkit.serve")


class EngineLoop:
    """Steps the engine on a background thread while it has work, and hands each step's outputs
    to the queues of their requests on the event loop (one hand-over per step)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.wake = threading.Event()
        self.listeners: dict[str, asyncio.Queue[Output]] = {}
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="slmkit-engine", daemon=True)
        self.event_loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self.event_loop = asyncio.get_running_loop()
        self.thread.start()

    def submit(self, request: Request, listener: asyncio.Queue[Output]) -> str:
        request.request_id = f"cmpl-{uuid.uuid4().hex}"
        self.listeners[request.request_id] = listener
        try:
            self.engine.submit(request)
        except InputError:
            del self.listeners[request.request_id]
            raise
        self.wake.set()
        return request.request_id

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self.wake.set()

    def run(self, fn: Callable[[], Any]) -> Future:
        future = self.engine.run(fn)
        self.wake.set()
        return future

    def _run(self) -> None:
        while not self.stopping:
            self.wake.clear()
            if not self.engine.has_work():
                self.wake.wait(0.05)
                continue
            try:
                outputs = self.engine.step()
            except Exception:  # a bug must not leave clients waiting forever: end their requests
                log.exception("engine step failed; aborting every request")
                for request_id in list(self.listeners):
                    self.engine.abort(request_id)
                continue
            if outputs:
                self.event_loop.call_soon_threadsafe(self._deliver, outputs)

    def _deliver(self, outputs: list[Output]) -> None:
        for out in outputs:
            listener = self.listeners.get(out.request_id)
            if listener is not None:
                listener.put_nowait(out)

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel what is still running, let the engine free it, and end the thread."""
        for request_id in list(self.listeners):
            self.abort(request_id)
        deadline = time.monotonic() + timeout
        while self.engine.has_work() and time.monotonic() < deadline:
            time.sleep(0.01)
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout)


# ---------------------------------------------------------------------------- request bodies
class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    ignore_eos: bool = False


class CompletionBody(SamplingFields):
    prompt: str | list[int]
    logprobs: int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str


class ChatBody(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class EmbeddingBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: str = "float"


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param, self.headers = status, message, kind, code, param, headers


def error_response(e: APIError) -> JSONResponse:
    body = {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}}
    return JSONResponse(body, status_code=e.status, headers=e.headers)


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413 before it is read whole."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = APIError(413, f"the request body is larger than {self.limit} bytes", code="request_too_large")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await error_response(too_large)(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _BodyTooLarge
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await error_response(too_large)(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


# ---------------------------------------------------------------------------- the server
class Server:
    """Turns OpenAI requests into engine requests and engine outputs into OpenAI responses."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, model_name: str, chat_template: ChatTemplate | None,
                 defaults: dict[str, Any], api_key: str | None, max_queue: int) -> None:
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.chat_template, self.defaults, self.api_key = chat_template, defaults, api_key
        self.max_active = engine.max_seqs + max_queue
        self.active = 0
        self.loop = EngineLoop(engine)
        self.metrics = ServerMetrics(engine)
        self.created = int(time.time())

    # -------------------------------------------------------------- checks
    def check_auth(self, request: HTTPRequest) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, key = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(key.encode(), self.api_key.encode()):
            raise APIError(401, "missing or wrong API key; send 'Authorization: Bearer KEY'", "authentication_error",
                           "invalid_api_key")

    def adapter_for(self, model: str) -> str | None:
        if model == self.model_name:
            return None
        lora = self.engine.lora
        if lora is not None and model in lora.names:
            return model
        raise APIError(404, f"the model {model!r} does not exist; GET /v1/models lists the ones served",
                       code="model_not_found", param="model")

    def engine_request(self, body: SamplingFields, prompt: list[int], stop_tokens: list[int] | None,
                       logprobs: int | None, max_tokens: int | None) -> Request:
        d = self.defaults
        pick = lambda value, name, fallback: value if value is not None else d.get(name, fallback)
        room = self.engine.context - len(prompt)
        if max_tokens is None:
            max_tokens = max(1, min(d.get("max_new_tokens", 16), room))
        try:
            params = SamplingParams(
                temperature=pick(body.temperature, "temperature", 1.0), top_k=pick(body.top_k, "top_k", None),
                top_p=pick(body.top_p, "top_p", None), min_p=pick(body.min_p, "min_p", None),
                repetition_penalty=pick(body.repetition_penalty, "repetition_penalty", 1.0),
                frequency_penalty=body.frequency_penalty, presence_penalty=body.presence_penalty)
        except InputError as e:
            raise APIError(400, str(e)) from None
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return Request(prompt, max_tokens, params, stop, [] if body.ignore_eos else stop_tokens, body.n, body.seed,
                       logprobs, self.adapter_for(body.model))

    # -------------------------------------------------------------- generation
    async def outputs(self, http: HTTPRequest, request: Request, watch_disconnect: bool) -> AsyncIterator[Output]:
        """Submit and yield the outputs; a client gone away aborts the request (blocks freed)."""
        if self.active >= self.max_active:
            raise APIError(429, f"the server is busy ({self.active} requests in flight); retry shortly",
                           "rate_limit_error", "queue_full", headers={"Retry-After": "1"})
        queue: asyncio.Queue[Output] = asyncio.Queue()
        try:
            request_id = self.loop.submit(request, queue)
        except InputError as e:
            raise APIError(400, str(e)) from None
        self.active += 1
        self.metrics.prompt_tokens.inc(len(request.prompt) * request.n)
        start = last = time.perf_counter()
        remaining, first, finished = request.n, True, False
        try:
            while remaining:
                try:
                    out = await asyncio.wait_for(queue.get(), timeout=0.5) if watch_disconnect else await queue.get()
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        return
                    continue
                now = time.perf_counter()
                if out.token_ids:
                    self.metrics.tokens(len(out.token_ids))
                    if first:
                        self.metrics.ttft.observe(now - start)
                        first = False
                    else:
                        for _ in out.token_ids:
                            self.metrics.tpot.observe((now - last) / len(out.token_ids))
                    last = now
                if out.finish_reason:
                    remaining -= 1
                    self.metrics.requests.labels(out.finish_reason).inc()
                yield out
            finished = True
        finally:
            self.active -= 1
            self.loop.listeners.pop(request_id, None)
            if not finished:
                self.loop.abort(request_id)

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode_bytes([token]).decode("utf-8", errors="replace")

    def usage(self, prompt_tokens: int, completion_tokens: int, cached: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached}}

    async def respond(self, http: HTTPRequest, body: SamplingFields, request: Request, chat: bool) -> Response:
        """A whole response, or server-sent events ending in `data: [DONE]` when streaming."""
        kind = "chat.completion" if chat else "text_completion"
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
        if body.stream:
            stream = self.outputs(http, request, watch_disconnect=False)
            first = await anext(stream)  # errors (429, 400) surface here, before the 200 is sent
            return StreamingResponse(self.events(stream, first, head, request, chat, body), media_type="text/event-stream")
        choices = [{"tokens": [], "text": "", "logprobs": [], "finish_reason": None} for _ in range(request.n)]
        prompt_tokens = cached = 0
        async for out in self.outputs(http, request, watch_disconnect=True):
            c = choices[out.index]
            c["tokens"] += out.token_ids
            c["text"] += out.text
            c["logprobs"] += out.logprobs
            c["finish_reason"] = out.finish_reason or c["finish_reason"]
            prompt_tokens, cached = out.prompt_tokens, out.cached_tokens
        completion_tokens = sum(len(c["tokens"]) for c in choices)
        return JSONResponse({**head, "object": kind, "usage": self.usage(prompt_tokens, completion_tokens, cached),
                             "choices": [self.choice(i, c, request, chat) for i, c in enumerate(choices)]})

    def choice(self, index: int, c: dict, request: Request, chat: bool) -> dict:
        logprobs = self.logprobs(c["tokens"], c["logprobs"], chat) if request.logprobs is not None else None
        if chat:
            return {"index": index, "message": {"role": "assistant", "content": c["text"]}, "logprobs": logprobs,
                    "finish_reason": c["finish_reason"]}
        return {"index": index, "text": c["text"], "logprobs": logprobs, "finish_reason": c["finish_reason"]}

    def logprobs(self, tokens: list[int], logprobs: list, chat: bool) -> dict:
        if chat:
            def entry(token: int, lp: float) -> dict:
                text = self.token_text(token)
                return {"token": text, "logprob": lp, "bytes": list(text.encode())}
            return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in top.items()]}
                                for t, (lp, top) in zip(tokens, logprobs)]}
        texts = [self.token_text(t) for t in tokens]
        offsets = [sum(len(x) for x in texts[:i]) for i in range(len(texts))]
        return {"tokens": texts, "token_logprobs": [lp for lp, _ in logprobs], "text_offset": offsets,
                "top_logprobs": [{self.token_text(a): alp for a, alp in top.items()} for _, top in logprobs]}

    async def events(self, stream: AsyncIterator[Output], first: Output, head: dict, request: Request, chat: bool,
                     body: SamplingFields) -> AsyncIterator[str]:
        import json

        kind = "chat.completion.chunk" if chat else "text_completion"
        started: set[int] = set()
        counts = [0] * request.n
        prompt_tokens = cached = 0

        async def all_outputs():
            yield first
            async for out in stream:
                yield out

        try:
            async for out in all_outputs():
                prompt_tokens, cached = out.prompt_tokens, out.cached_tokens
                counts[out.index] += len(out.token_ids)
                logprobs = (self.logprobs(out.token_ids, out.logprobs, chat)
                            if request.logprobs is not None and out.token_ids else None)
                if chat:
                    delta = {"content": out.text} if out.text or out.finish_reason is None else {}
                    if out.index not in started:
                        delta = {"role": "assistant", **delta}
                        started.add(out.index)
                    choice = {"index": out.index, "delta": delta, "logprobs": logprobs, "finish_reason": out.finish_reason}
                else:
                    choice = {"index": out.index, "text": out.text, "logprobs": logprobs, "finish_reason": out.finish_reason}
                yield f"data: {json.dumps({**head, 'object': kind, 'choices': [choice]})}\n\n"
            if (body.stream_options or {}).get("include_usage"):
                usage = self.usage(prompt_tokens, sum(counts), cached)
                yield f"data: {json.dumps({**head, 'object': kind, 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            await stream.aclose()  # a client that went away: abort the request now

    # -------------------------------------------------------------- endpoints
    async def completions(self, http: HTTPRequest, body: CompletionBody) -> Response:
        prompt = encode_prompt(self.tokenizer, body.prompt) if isinstance(body.prompt, str) else body.prompt
        request = self.engine_request(body, prompt, None, body.logprobs, body.max_tokens)
        return await self.respond(http, body, request, chat=False)

    async def chat(self, http: HTTPRequest, body: ChatBody) -> Response:
        if self.chat_template is None:
            raise APIError(400, "this model has no chat template (no chat_template in tokenizer_config.json and no "
                                "<|im_start|>/<|im_end|> tokens); use /v1/completions")
        try:
            prompt = self.chat_template.render([m.model_dump() for m in body.messages])
        except InputError as e:
            raise APIError(400, str(e)) from None
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        request = self.engine_request(body, prompt, self.chat_template.stop_tokens, logprobs, max_tokens)
        return await self.respond(http, body, request, chat=True)

    async def embeddings(self, body: EmbeddingBody) -> Response:
        self.adapter_for(body.model)
        items = body.input if isinstance(body.input, list) and body.input and not isinstance(body.input[0], int) else [body.input]
        prompts = [encode_prompt(self.tokenizer, x) if isinstance(x, str) else x for x in items]
        context, vocab = self.engine.context, self.engine.model.cfg.vocab_size
        for p in prompts:
            if not p or len(p) > context:
                raise APIError(400, f"each input must be 1 to {context} tokens, not {len(p)}", param="input")
            if any(not 0 <= t < vocab for t in p):
                raise APIError(400, f"input token ids must be in [0, {vocab})", param="input")
        vectors = await asyncio.wrap_future(self.loop.run(lambda: self.engine.embed(prompts)))
        if body.encoding_format == "base64":
            data = [base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() for v in vectors]
        elif body.encoding_format == "float":
            data = vectors
        else:
            raise APIError(400, f"encoding_format must be 'float' or 'base64', not {body.encoding_format!r}")
        tokens = sum(map(len, prompts))
        return JSONResponse({"object": "list", "model": body.model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                             "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)]})

    def models(self) -> dict:
        names = [self.model_name] + [n for n in (self.engine.lora.names if self.engine.lora else []) if n]
        return {"object": "list", "data": [{"id": n, "object": "model", "created": self.created, "owned_by": "slmkit",
                                            "parent": None if n == self.model_name else self.model_name} for n in names]}


def create_app(
    engine: Engine,
    tokenizer: Tokenizer,
    model_name: str,
    *,
    chat_template: ChatTemplate | None = None,
    defaults: dict[str, Any] | None = None,
    api_key: str | None = None,
    max_queue: int = 256,
    max_body_bytes: int = 1 << 20,
) -> FastAPI:
    """The FastAPI app serving `engine`; the engine thread starts and stops with the app."""
    server = Server(engine, tokenizer, model_name, chat_template, defaults or {}, api_key, max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.loop.start()
        yield
        server.loop.stop()

    app = FastAPI(title="slmkit", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(request: HTTPRequest, e: APIError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: HTTPRequest, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        if first.get("type") == "json_invalid":
            return error_response(APIError(400, "the request body is not valid JSON", code="invalid_json"))
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return error_response(APIError(400, f"{where or 'body'}: {first.get('msg', 'invalid value')}", param=where))

    @app.middleware("http")
    async def auth(request: HTTPRequest, call_next):
        if request.url.path.startswith("/v1/"):
            try:
                server.check_auth(request)
            except APIError as e:
                return error_response(e)
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        content, media_type = server.metrics.render()
        return Response(content, media_type=media_type)

    @app.get("/v1/models")
    async def models() -> dict:
        return server.models()

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest, body: CompletionBody) -> Response:
        return await server.completions(http, body)

    @app.post("/v1/chat/completions")
    async def chat(http: HTTPRequest, body: ChatBody) -> Response:
        return await server.chat(http, body)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingBody) -> Response:
        return await server.embeddings(body)

    app.add_middleware(BodyLimit, limit=max_body_bytes)
    return app
