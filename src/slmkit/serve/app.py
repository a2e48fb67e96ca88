"""The OpenAI-compatible HTTP server (FastAPI) over the engine.

The engine steps on its own thread (`EngineLoop`); each HTTP request submits to it and awaits its
outputs on an asyncio queue. Errors are OpenAI's JSON shape: {"error": {"message", "type",
"param", "code"}} with the matching status.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import logging
import secrets
import struct
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from slmkit.chat import ChatFormat
from slmkit.errors import InputError, MissingExtraError, TokenizerError
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
    from starlette.exceptions import HTTPException
except ImportError:
    raise MissingExtraError("fastapi", "serve") from None

from slmkit.serve.protocol import (APIError, ChatBody, ChatMessage, CompletionBody, DetokenizeBody, EmbeddingBody,
                                   SamplingFields, TokenizeBody, TokenizeChat, TokenizeText, error_body,
                                   validation_error)

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


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e), status_code=e.status, headers=e.headers)


GENERATION_FAILED = APIError(500, "generation failed on the server (its log has the cause); other requests are unaffected",
                             "server_error", "generation_failed")


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
    """ASGI middleware: the API (/v1/..., /tokenize, /detokenize) and its documentation need the
    key; /health and /metrics do not. (A plain ASGI class: Starlette's @app.middleware wrapper
    would hide client disconnects from the handlers.)"""

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
_FIELDS = set(CompletionBody.model_fields) | set(ChatBody.model_fields)


def _param_of(message: str) -> str | None:
    """The request field an engine error names first ("min_tokens must be ..."), as OpenAI's `param`."""
    word = message.split(" ", 1)[0]
    return word if word in _FIELDS else None


@dataclass
class Piece:
    """What one engine output adds to its choice."""

    text: str
    tokens: list[int]  # the tokens its logprobs are of
    logprobs: list
    finish_reason: str | None
    first: bool = False  # the choice's first piece


@dataclass
class Pieces:
    """Engine outputs -> pieces of choices: choice `i * n + j` is completion j of requests[i]. With
    `echo` (each prompt's text) a choice starts with its prompt, and its prompt tokens' logprobs when
    asked; `echo_only` (max_tokens 0) drops the one token generated. Adds up the usage."""

    requests: list[Request]
    echo: list[str] | None = None
    echo_only: bool = False
    started: set[int] = field(default_factory=set)
    prompt_tokens: dict[int, int] = field(default_factory=dict)
    cached_tokens: dict[int, int] = field(default_factory=dict)
    completion_tokens: int = 0

    def next(self, i: int, out: Output) -> tuple[int, Piece]:
        index = i * self.requests[i].n + out.index
        piece = Piece("", [], [], out.finish_reason, first=index not in self.started)
        if piece.first:
            self.started.add(index)
            if self.echo is not None:
                piece.text = self.echo[i]
                if out.prompt_logprobs is not None:
                    piece.tokens, piece.logprobs = list(self.requests[i].prompt), list(out.prompt_logprobs)
        if self.echo_only:
            piece.finish_reason = out.finish_reason and "length"
        else:
            piece.text += out.text
            piece.tokens += out.token_ids
            piece.logprobs += out.logprobs
            self.completion_tokens += len(out.token_ids)
        self.prompt_tokens[i], self.cached_tokens[i] = out.prompt_tokens, out.cached_tokens
        return index, piece

    def usage(self) -> tuple[int, int, int]:
        """prompt tokens (each prompt once), completion tokens, prompt tokens found in the prefix cache."""
        return sum(self.prompt_tokens.values()), self.completion_tokens, sum(self.cached_tokens.values())


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
                       logprobs: int | None, max_tokens: int | None, prompt_logprobs: int | None = None) -> Request:
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
        bias = {int(token): value for token, value in (body.logit_bias or {}).items()}
        return Request(prompt, max_tokens, params, stop, [] if body.ignore_eos else stop_tokens, body.n, body.seed,
                       logprobs, self.adapter_for(body.model), prompt_logprobs=prompt_logprobs, logit_bias=bias,
                       min_tokens=body.min_tokens, stop_token_ids=list(body.stop_token_ids or []))

    # -------------------------------------------------------------- generation
    async def outputs(self, http: HTTPRequest, requests: list[Request]) -> AsyncIterator[tuple[int, Output]]:
        """Submit and yield (index of the request, output). Whatever ends them (their last outputs,
        an error, the client going away, a cancellation) frees their slots; if they end early the
        engine aborts them."""
        if len(requests) > self.max_active:
            raise APIError(400, f"{len(requests)} prompts in one request; this server takes at most {self.max_active}",
                           param="prompt")
        if self.active + len(requests) > self.max_active:
            raise APIError(429, f"the server is busy ({self.active} requests in flight); retry shortly",
                           "rate_limit_error", "queue_full", headers={"Retry-After": "1"})
        queue: asyncio.Queue[Output | None] = asyncio.Queue()
        ids: list[str] = []
        try:
            for request in requests:
                ids.append(self.loop.submit(request, queue))
        except BaseException as e:
            self._drop(ids)
            if isinstance(e, InputError):
                where = f"prompt {len(ids)}: " if len(requests) > 1 else ""
                raise APIError(400, where + str(e), param=_param_of(str(e))) from None
            raise
        order = {request_id: i for i, request_id in enumerate(ids)}
        self.active += len(requests)
        finished = False
        watcher = asyncio.create_task(_put_none_on_disconnect(http, queue))  # one waiter per request, none per token
        try:
            self.metrics.prompt_tokens.inc(sum(len(r.prompt) * r.n for r in requests))
            start = last = time.perf_counter()
            remaining, first = sum(r.n for r in requests), True
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
                yield order[out.request_id], out
                if out.finish_reason == "error":
                    return  # the rest of the request is aborted below
            finished = True
        finally:
            watcher.cancel()
            self.active -= len(requests)
            self._drop(ids, abort=not finished)

    def _drop(self, request_ids: list[str], abort: bool = True) -> None:
        for request_id in request_ids:
            self.loop.listeners.pop(request_id, None)
            if abort:
                self.loop.abort(request_id)

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode_bytes([token]).decode("utf-8", errors="replace")

    def usage(self, prompt_tokens: int, completion_tokens: int, cached: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached}}

    async def respond(self, http: HTTPRequest, body: SamplingFields, requests: list[Request], chat: bool,
                      echo: list[str] | None = None, echo_only: bool = False) -> Response:
        """A whole response, or server-sent events ending in `data: [DONE]` when streaming. Choice
        `i * n + j` is completion j of requests[i]; `echo` the prompt texts each choice starts with
        (`echo_only`: and nothing else)."""
        kind = "chat.completion" if chat else "text_completion"
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
        pieces = Pieces(requests, echo, echo_only)
        if body.stream:
            stream = self.outputs(http, requests)
            try:
                first = await anext(stream)  # errors (429, 400) surface here, before the 200 is sent
            except StopAsyncIteration:  # the client went away before the first token
                return Response(status_code=499)
            except BaseException:
                await stream.aclose()
                raise
            if first[1].finish_reason == "error":
                await stream.aclose()
                raise GENERATION_FAILED
            return StreamingResponse(self.events(stream, first, head, pieces, chat, body), media_type="text/event-stream")
        choices: dict[int, dict] = {}  # filled as outputs come: `n` is validated only when the engine takes the request
        async for i, out in self.outputs(http, requests):
            if out.finish_reason == "error":
                raise GENERATION_FAILED
            index, piece = pieces.next(i, out)
            c = choices.setdefault(index, {"tokens": [], "text": "", "logprobs": [], "finish_reason": None})
            c["tokens"] += piece.tokens
            c["text"] += piece.text
            c["logprobs"] += piece.logprobs
            c["finish_reason"] = piece.finish_reason or c["finish_reason"]
        return JSONResponse({**head, "object": kind, "usage": self.usage(*pieces.usage()),
                             "choices": [self.choice(i, choices[i], requests[0], chat) for i in sorted(choices)]})

    def choice(self, index: int, c: dict, request: Request, chat: bool) -> dict:
        logprobs = self.logprobs(c["tokens"], c["logprobs"], chat) if request.logprobs is not None else None
        if chat:
            return {"index": index, "message": {"role": "assistant", "content": c["text"]}, "logprobs": logprobs,
                    "finish_reason": c["finish_reason"]}
        return {"index": index, "text": c["text"], "logprobs": logprobs, "finish_reason": c["finish_reason"]}

    def logprobs(self, tokens: list[int], logprobs: list, chat: bool, offset: int = 0) -> dict:
        """Chat's `content` list, or the completions shape; an echoed prompt's first token has no logprob (null)."""
        if chat:
            def entry(token: int, lp: float) -> dict:
                text = self.token_text(token)
                return {"token": text, "logprob": lp, "bytes": list(text.encode())}
            return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in top.items()]}
                                for t, (lp, top) in zip(tokens, logprobs)]}
        texts = [self.token_text(t) for t in tokens]
        offsets = list(itertools.accumulate((len(x) for x in texts[:-1]), initial=offset)) if texts else []
        tops = [self.top_by_text(text, e) if e else None for text, e in zip(texts, logprobs)]
        return {"tokens": texts, "token_logprobs": [e[0] if e else None for e in logprobs], "text_offset": offsets,
                "top_logprobs": tops}

    def top_by_text(self, text: str, logprob: tuple[float, dict[int, float]]) -> dict[str, float]:
        """The chosen token first, as OpenAI's top_logprobs hold it too (k + 1 entries at most), then the
        top k; keys are token texts, so of tokens with the same text the first listed keeps the key."""
        top = {text: logprob[0]}
        for token, value in logprob[1].items():
            top.setdefault(self.token_text(token), value)
        return top

    async def events(self, stream: AsyncIterator[tuple[int, Output]], first: tuple[int, Output], head: dict,
                     pieces: Pieces, chat: bool, body: SamplingFields) -> AsyncIterator[str]:
        import json

        kind = "chat.completion.chunk" if chat else "text_completion"
        text_lengths: dict[int, int] = {}  # each choice's text so far: where its next tokens' text_offset starts
        logprobs_asked = pieces.requests[0].logprobs is not None

        async def all_outputs():
            yield first
            async for item in stream:
                yield item

        try:
            async for i, out in all_outputs():
                if out.finish_reason == "error":
                    yield f"data: {json.dumps(error_body(GENERATION_FAILED))}\n\n"
                    return
                index, piece = pieces.next(i, out)
                offset = text_lengths.get(index, 0)
                text_lengths[index] = offset + len(piece.text)
                logprobs = (self.logprobs(piece.tokens, piece.logprobs, chat, offset)
                            if logprobs_asked and piece.tokens else None)
                if chat:
                    delta = {"content": piece.text} if piece.text or piece.finish_reason is None else {}
                    if piece.first:
                        delta = {"role": "assistant", **delta}
                    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": piece.finish_reason}
                else:
                    choice = {"index": index, "text": piece.text, "logprobs": logprobs, "finish_reason": piece.finish_reason}
                yield f"data: {json.dumps({**head, 'object': kind, 'choices': [choice]})}\n\n"
            if body.stream_options is not None and body.stream_options.include_usage:
                usage = self.usage(*pieces.usage())
                yield f"data: {json.dumps({**head, 'object': kind, 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            await stream.aclose()  # a client that went away: abort the request now

    # -------------------------------------------------------------- endpoints
    def echo_texts(self, batch: list[str] | list[list[int]]) -> list[str]:
        """The text each choice of a prompt starts with under `echo`: the prompt as sent, token ids decoded."""
        try:
            return [p if isinstance(p, str) else self.tokenizer.decode(p) for p in batch]
        except TokenizerError as e:  # token ids outside the vocabulary
            raise APIError(400, f"prompt: {e}", param="prompt") from None

    async def completions(self, http: HTTPRequest, body: CompletionBody) -> Response:
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens must be >= 1, not 0 (0 is for echo: the prompt and its logprobs alone)",
                           param="max_tokens")
        batch = body.prompt if body.prompt and isinstance(body.prompt, list) and not isinstance(body.prompt[0], int) else [body.prompt]
        echo = self.echo_texts(batch) if body.echo else None
        echo_only = body.max_tokens == 0  # one token is generated and dropped, as vLLM does
        prompt_logprobs = body.logprobs if body.echo else None
        requests = [self.engine_request(body, encode_prompt(self.tokenizer, p) if isinstance(p, str) else p, None,
                                        body.logprobs, 1 if echo_only else body.max_tokens, prompt_logprobs)
                    for p in batch]
        return await self.respond(http, body, requests, chat=False, echo=echo, echo_only=echo_only)

    def chat_prompt(self, messages: list[ChatMessage], add_generation_prompt: bool = True) -> list[int]:
        if self.chat_format is None:
            raise APIError(400, "this model has no chat template (no chat_template in tokenizer_config.json and no "
                                "ChatML tokens); use /v1/completions")
        try:
            return self.chat_format.encode([m.for_template() for m in messages], add_generation_prompt).ids
        except InputError as e:
            raise APIError(400, str(e)) from None

    async def chat(self, http: HTTPRequest, body: ChatBody) -> Response:
        prompt = self.chat_prompt(body.messages)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        request = self.engine_request(body, prompt, self.chat_format.stop_tokens, logprobs, max_tokens)
        return await self.respond(http, body, [request], chat=True)

    def tokenize(self, body: TokenizeText | TokenizeChat) -> dict:
        """vLLM's /tokenize: the ids of a prompt (as /v1/completions encodes text, plus the tokenizer's
        own additions with add_special_tokens) or of a chat's prompt (as /v1/chat/completions builds it)."""
        if body.model is not None:
            self.adapter_for(body.model)
        if isinstance(body, TokenizeChat):
            ids = self.chat_prompt(body.messages, body.add_generation_prompt)
        elif body.add_special_tokens:
            ids = self.tokenizer.encode_with_template(body.prompt)
        else:
            ids = self.tokenizer.encode(body.prompt, allowed_special="all")
        strs = [self.tokenizer.vocab_piece(t) for t in ids] if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": self.engine.context, "tokens": ids, "token_strs": strs}

    def detokenize(self, body: DetokenizeBody) -> dict:
        if body.model is not None:
            self.adapter_for(body.model)
        try:
            return {"prompt": self.tokenizer.decode(body.tokens)}
        except TokenizerError as e:
            raise APIError(400, f"tokens: {e}", param="tokens") from None

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

    @app.post("/tokenize")
    async def tokenize(body: TokenizeBody) -> dict:
        return server.tokenize(body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeBody) -> dict:
        return server.detokenize(body)

    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.add_middleware(KeyCheck, server=server,
                       protected={app.openapi_url, app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url,
                                  "/tokenize", "/detokenize"})
    return app
