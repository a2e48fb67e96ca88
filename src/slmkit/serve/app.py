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
from typing import Annotated, Any, Literal

from slmkit.chat import ChatFormat
from slmkit.errors import InputError, MissingExtraError
from slmkit.generation.api import encode_prompt
from slmkit.generation.sampling import SamplingParams
from slmkit.serve.engine import Engine, Output, Request
from slmkit.serve.prometheus import ServerMetrics
from slmkit.tokenizer import Tokenizer

try:
    from fastapi import FastAPI
    from fastapi import Request as HTTPRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.exceptions import HTTPException
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
        self.heartbeat = time.monotonic()  # when the thread last finished a step or found no work

    def stalled_for(self) -> float:
        """Seconds the engine thread has been stuck (inf once it has died); 0 while it makes progress."""
        if not self.thread.is_alive():
            return float("inf")
        return time.monotonic() - self.heartbeat

    def start(self) -> None:
        self.event_loop = asyncio.get_running_loop()
        self.thread.start()

    def submit(self, request: Request, listener: asyncio.Queue[Output]) -> str:
        request.request_id = f"cmpl-{uuid.uuid4().hex}"
        self.listeners[request.request_id] = listener
        try:
            self.engine.submit(request)
        except BaseException:
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
            self.heartbeat = time.monotonic()
            self.wake.clear()
            if not self.engine.has_work():
                self.wake.wait(0.05)
                continue
            try:
                outputs = self.engine.step()
            except Exception:  # a bug must not leave clients waiting forever: end their requests with an error
                log.exception("engine step failed; ending every request in flight with an error")
                ids = list(self.listeners)
                for request_id in ids:
                    self.engine.abort(request_id)
                outputs = [Output(request_id, 0, [], "", [], "error") for request_id in ids]
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
# Strict: an unknown field is an error (a feature this server lacks is never silently ignored), and
# no coercion (true is not 1, "yes" is not true). Ranges are OpenAI's; they appear in /openapi.json.
def finite(default: Any = None, **bounds: float) -> Any:
    """A float field that refuses NaN and the infinities (Python's JSON parser accepts both)."""
    return Field(default, allow_inf_nan=False, **bounds)


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(Body):
    include_usage: bool = False


class SamplingFields(Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = finite(ge=0, le=2)
    top_p: float | None = finite(gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    min_p: float | None = finite(ge=0, le=1)
    frequency_penalty: float = finite(0.0, ge=-2, le=2)
    presence_penalty: float = finite(0.0, ge=-2, le=2)
    repetition_penalty: float | None = finite(gt=0)
    seed: int | None = Field(None, ge=0, lt=2**64)
    stop: str | Annotated[list[str], Field(max_length=16)] | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False


class CompletionBody(SamplingFields):
    prompt: str | list[int]
    logprobs: int | None = Field(None, ge=0, le=20)


class ChatMessage(Body):
    role: Literal["system", "user", "assistant"]  # the roles chat templates render; tool messages are not served yet
    content: str


class ChatBody(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class EmbeddingBody(Body):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param, self.headers = status, message, kind, code, param, headers


def error_body(e: APIError) -> dict:
    return {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e), status_code=e.status, headers=e.headers)


GENERATION_FAILED = APIError(500, "generation failed on the server (its log has the cause); other requests are unaffected",
                             "server_error", "generation_failed")


_BOUNDS = {"greater_than_equal": ("ge", ">="), "greater_than": ("gt", ">"), "less_than_equal": ("le", "<="),
           "less_than": ("lt", "<")}


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict"}


def _field_path(loc: tuple) -> str:
    """("body", "messages", 0, "role") -> "messages.0.role"; pydantic's union-member tags are left out."""
    return ".".join(str(p) for p in loc[1:] if isinstance(p, int) or ("[" not in p and p not in _UNION_TAGS))


def validation_error(errors: list[dict]) -> APIError:
    """One OpenAI-shaped 400 for pydantic's errors: every unsupported field named, else the first problem."""
    if any(e.get("type") == "json_invalid" for e in errors):
        return APIError(400, "the request body is not valid JSON", code="invalid_json")
    extra = [_field_path(e["loc"]) for e in errors if e.get("type") == "extra_forbidden"]
    if extra:
        names = ", ".join(repr(x) for x in extra)
        return APIError(400, f"unsupported field{'s' * (len(extra) > 1)} {names}: this server does not implement "
                             f"{'them' if len(extra) > 1 else 'it'}; remove {'them' if len(extra) > 1 else 'it'} from the request",
                        param=extra[0], code="unsupported_field")
    first = max(errors, key=lambda e: len(e.get("loc", ()))) if errors else {}  # in a union: the member that got furthest
    where = _field_path(first.get("loc", ())) or "body"
    kind, ctx = first.get("type", ""), first.get("ctx") or {}
    if kind in _BOUNDS:
        key, op = _BOUNDS[kind]
        bound = ctx.get(key)
        bound = int(bound) if isinstance(bound, float) and bound.is_integer() else bound
        message = f"{where} must be {op} {bound}, not {first.get('input')!r}"
    elif kind == "finite_number":
        message = f"{where} must be a finite number"
    elif kind == "missing":
        message = f"{where} is required"
    else:
        message = f"{where}: {first.get('msg', 'invalid value')}"
    return APIError(400, message, param=None if where == "body" else where)


def http_error(e: HTTPException, request: HTTPRequest) -> APIError:
    """Routing and parsing errors of the HTTP layer, in OpenAI's shape."""
    if e.status_code == 404:
        return APIError(404, f"no route {request.url.path}; the API is under /v1 (see /openapi.json)", code="not_found")
    if e.status_code == 405:
        return APIError(405, f"{request.url.path} does not accept {request.method}", code="method_not_allowed",
                        headers=e.headers)
    if e.status_code == 400:  # the body could not be parsed: not UTF-8, or nested too deep to decode
        return APIError(400, "the request body could not be parsed as JSON (it must be UTF-8 JSON, not nested too deep)",
                        code="invalid_json")
    return APIError(e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500 else "server_error",
                    headers=e.headers)


class KeyCheck:
    """ASGI middleware: the API (/v1/...) and its documentation need the key; /health and /metrics
    do not. (A plain ASGI class: Starlette's @app.middleware wrapper would hide client
    disconnects from the handlers.)"""

    def __init__(self, app, server: "Server", protected: set[str | None]) -> None:
        self.app, self.server, self.protected = app, server, protected

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and (scope["path"].startswith("/v1/") or scope["path"] in self.protected):
            try:
                self.server.check_auth(HTTPRequest(scope))
            except APIError as e:
                return await error_response(e)(scope, receive, send)
        await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413, whether it announces its length
    or arrives chunked; the app sees the body only once it is known to fit."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = error_response(APIError(413, f"the request body is larger than {self.limit} bytes",
                                            code="request_too_large"))
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await too_large(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away while sending
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await too_large(scope, receive, send)
            if not message.get("more_body", False):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay():
            nonlocal body
            if body is None:
                return await receive()
            message, body = body, None
            return message

        await self.app(scope, replay, send)


async def _put_none_on_disconnect(http: HTTPRequest, queue: asyncio.Queue) -> None:
    """Wait for the client to go away (the ASGI `http.disconnect` message), then wake the request's
    output loop with None. The body has been read by then, so nothing else arrives before it."""
    while (await http.receive())["type"] != "http.disconnect":
        pass
    queue.put_nowait(None)


# ---------------------------------------------------------------------------- the server
class Server:
    """Turns OpenAI requests into engine requests and engine outputs into OpenAI responses."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, model_name: str, chat_format: ChatFormat | None,
                 defaults: dict[str, Any], api_key: str | None, max_queue: int) -> None:
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.chat_format, self.defaults, self.api_key = chat_format, defaults, api_key
        self.max_active = engine.max_seqs + max_queue
        self.active = 0
        self.loop = EngineLoop(engine)
        self.metrics = ServerMetrics(engine, in_flight=lambda: self.active)
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
    async def outputs(self, http: HTTPRequest, request: Request) -> AsyncIterator[Output]:
        """Submit and yield the outputs. Whatever ends the request (its last output, an error, the
        client going away, a cancellation) frees its slot; if it ends early the engine aborts it."""
        if self.active >= self.max_active:
            raise APIError(429, f"the server is busy ({self.active} requests in flight); retry shortly",
                           "rate_limit_error", "queue_full", headers={"Retry-After": "1"})
        queue: asyncio.Queue[Output | None] = asyncio.Queue()
        try:
            request_id = self.loop.submit(request, queue)
        except InputError as e:
            raise APIError(400, str(e)) from None
        self.active += 1
        finished = False
        watcher = asyncio.create_task(_put_none_on_disconnect(http, queue))  # one waiter per request, none per token
        try:
            self.metrics.prompt_tokens.inc(len(request.prompt) * request.n)
            start = last = time.perf_counter()
            remaining, first = request.n, True
            while remaining:
                out = await queue.get()
                if out is None:  # the client went away, perhaps before the first token
                    return
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
                if out.finish_reason == "error":
                    return  # the rest of the request is aborted below
            finished = True
        finally:
            watcher.cancel()
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
            stream = self.outputs(http, request)
            try:
                first = await anext(stream)  # errors (429, 400) surface here, before the 200 is sent
            except StopAsyncIteration:  # the client went away before the first token
                return Response(status_code=499)
            except BaseException:
                await stream.aclose()
                raise
            if first.finish_reason == "error":
                await stream.aclose()
                raise GENERATION_FAILED
            return StreamingResponse(self.events(stream, first, head, request, chat, body), media_type="text/event-stream")
        choices: dict[int, dict] = {}  # filled as outputs come: `n` is validated only when the engine takes the request
        prompt_tokens = cached = 0
        async for out in self.outputs(http, request):
            if out.finish_reason == "error":
                raise GENERATION_FAILED
            c = choices.setdefault(out.index, {"tokens": [], "text": "", "logprobs": [], "finish_reason": None})
            c["tokens"] += out.token_ids
            c["text"] += out.text
            c["logprobs"] += out.logprobs
            c["finish_reason"] = out.finish_reason or c["finish_reason"]
            prompt_tokens, cached = out.prompt_tokens, out.cached_tokens
        completion_tokens = sum(len(c["tokens"]) for c in choices.values())
        return JSONResponse({**head, "object": kind, "usage": self.usage(prompt_tokens, completion_tokens, cached),
                             "choices": [self.choice(i, choices[i], request, chat) for i in sorted(choices)]})

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
                if out.finish_reason == "error":
                    yield f"data: {json.dumps(error_body(GENERATION_FAILED))}\n\n"
                    return
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
            if body.stream_options is not None and body.stream_options.include_usage:
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
        if self.chat_format is None:
            raise APIError(400, "this model has no chat template (no chat_template in tokenizer_config.json and no "
                                "ChatML tokens); use /v1/completions")
        try:
            prompt = self.chat_format.prompt_ids([m.model_dump() for m in body.messages])
        except InputError as e:
            raise APIError(400, str(e)) from None
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        request = self.engine_request(body, prompt, self.chat_format.stop_tokens, logprobs, max_tokens)
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
        else:
            data = vectors
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
    chat_format: ChatFormat | None = None,
    defaults: dict[str, Any] | None = None,
    api_key: str | None = None,
    max_queue: int = 256,
    max_body_bytes: int = 1 << 20,
    stall_timeout: float = 60.0,
) -> FastAPI:
    """The FastAPI app serving `engine`; the engine thread starts and stops with the app. /health
    answers 503 once the engine thread has been stuck in one step for `stall_timeout` seconds."""
    server = Server(engine, tokenizer, model_name, chat_format, defaults or {}, api_key, max_queue)

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
        return error_response(validation_error(list(e.errors())))

    @app.exception_handler(HTTPException)
    async def http_layer_error(request: HTTPRequest, e: HTTPException) -> JSONResponse:
        return error_response(http_error(e, request))

    @app.exception_handler(Exception)
    async def internal_error(request: HTTPRequest, e: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=e)
        return error_response(APIError(500, "internal server error (its log has the cause)", "server_error", "internal_error"))

    @app.get("/health")
    async def health() -> dict:
        stalled = server.loop.stalled_for()
        if stalled > stall_timeout:
            why = "has stopped" if stalled == float("inf") else f"has been stuck for {stalled:.0f} s"
            raise APIError(503, f"the engine thread {why}; restart the server", "server_error", "engine_stalled")
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
    app.add_middleware(KeyCheck, server=server,
                       protected={app.openapi_url, app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url})
    return app
