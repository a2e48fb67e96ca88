"""Grounded answers: retrieve, number the sources in the prompt, generate, map citations back.

The model is asked to cite sources as [n]. Each citation names its chunk (document, source file,
line of the record, character span of the document's text) and quotes the sentence of the chunk
that shares the most words with the answer sentence that cites it; `quote_start`/`quote_end`
locate that sentence in the document. An answer that cites nothing (small models often do not)
gets attributed citations instead: per answer sentence, the source sharing the most words with
it, marked `attributed`.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from slmkit.errors import InputError
from slmkit.rag.chunking import sentence_spans
from slmkit.rag.index import Index
from slmkit.rag.retrieve import Hit, Retriever
from slmkit.rag.store import Filters

SYSTEM = ("Answer the question using only the numbered sources. After each claim, cite the source it comes from by "
          "its number in square brackets, like [1]. If the sources do not answer the question, say that you do not know.")
_CITE = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")
_WORD = re.compile(r"\w{3,}")
Messages = list[dict[str, str]]


class Generator(Protocol):
    context: int | None  # tokens of prompt + answer, when known

    def prompt_tokens(self, messages: Messages) -> int | None: ...

    def complete(self, messages: Messages, max_tokens: int, temperature: float = 0.0, seed: int | None = None) -> str: ...


@dataclass
class Citation:
    n: int
    chunk_id: int
    doc_id: str
    source: str
    line: int | None
    start: int
    end: int
    heading: str
    quote: str
    quote_start: int
    quote_end: int
    attributed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Answer:
    question: str
    text: str
    sources: list[Hit]
    citations: list[Citation] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"question": self.question, "answer": self.text, "citations": [c.to_dict() for c in self.citations],
                "sources": [{"n": n, **h.to_dict()} for n, h in enumerate(self.sources, 1)]}

    def render(self) -> str:
        """The answer, then one line per citation: [n] doc_id (heading) source:line chars a-b "quote"."""
        lines = [self.text.strip(), ""]
        for c in self.citations:
            where = f"{c.source}:{c.line}" if c.line else c.source
            heading = f" ({c.heading})" if c.heading else ""
            mark = " (attributed)" if c.attributed else ""
            lines.append(f"[{c.n}] {c.doc_id}{heading} {where} chars {c.start}-{c.end}{mark}: \"{_clip(c.quote)}\"")
        return "\n".join(lines).rstrip()


def _clip(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------- prompting
def build_messages(question: str, hits: list[Hit], history: Messages | None = None) -> Messages:
    """System instructions (with any system messages of `history` after them), the earlier turns,
    then the numbered sources and the question."""
    history = list(history or [])
    system = "\n\n".join([SYSTEM, *(m["content"] for m in history if m["role"] == "system")])
    blocks = []
    for n, hit in enumerate(hits, 1):
        label = hit.chunk.doc_id + (f" - {hit.chunk.heading}" if hit.chunk.heading else "")
        blocks.append(f"[{n}] {label}\n{hit.chunk.text}")
    sources = "\n\n".join(blocks) if blocks else "(no sources found)"
    return [{"role": "system", "content": system}, *(m for m in history if m["role"] != "system"),
            {"role": "user", "content": f"Sources:\n\n{sources}\n\nQuestion: {question.strip()}"}]


def fit_sources(generator: Generator, question: str, hits: list[Hit], max_tokens: int,
                history: Messages | None = None) -> tuple[Messages, list[Hit]]:
    """The prompt with as many of the best sources as fit the generator's context with room for
    `max_tokens` of answer; a question too long even without sources is an InputError."""
    if generator.context is None:
        return build_messages(question, hits, history), hits
    budget = generator.context - max_tokens
    bare = generator.prompt_tokens(build_messages(question, [], history))
    if bare is not None and bare > budget:
        raise InputError(f"the question is {bare} tokens as a prompt; at most {budget} fit in the model's context of "
                         f"{generator.context} with room for a {max_tokens}-token answer")
    kept = list(hits)
    while kept:
        messages = build_messages(question, kept, history)
        if (generator.prompt_tokens(messages) or 0) <= budget:
            return messages, kept
        kept.pop()
    return build_messages(question, [], history), []


def answer(index: Index, question: str, generator: Generator, *, retriever: Retriever | None = None, k: int = 5,
           filters: Filters | None = None, max_tokens: int = 256, temperature: float = 0.0, seed: int | None = None,
           history: Messages | None = None) -> Answer:
    """Retrieve the `k` best chunks for `question`, answer from them, and cite them."""
    hits = (retriever or Retriever()).search(index, question, k, filters)
    return respond(question, hits, generator, max_tokens=max_tokens, temperature=temperature, seed=seed, history=history)


def respond(question: str, hits: list[Hit], generator: Generator, *, max_tokens: int = 256, temperature: float = 0.0,
            seed: int | None = None, history: Messages | None = None) -> Answer:
    """Answer `question` from retrieved `hits` (as many as fit the context) and cite them."""
    messages, hits = fit_sources(generator, question, hits, max_tokens, history)
    text = generator.complete(messages, max_tokens, temperature, seed)
    return Answer(question, text, hits, cite(text, hits))


# ---------------------------------------------------------------------------- citations
def _words(text: str) -> set[str]:
    return {w.lower() for w in _WORD.findall(text)}


def cite(text: str, hits: list[Hit]) -> list[Citation]:
    """The citations of an answer: its [n] markers, or attributed ones when it has none."""
    cited: dict[int, set[str]] = {}
    sentences = sentence_spans(text)
    for m in _CITE.finditer(text):
        i = next((i for i, (a, b) in enumerate(sentences) if a <= m.start() < b), 0)
        words = _words(_CITE.sub("", text[slice(*sentences[i])])) if sentences else set()
        if not words and i > 0:  # "... Paris. [1]": the marker closes the previous sentence
            words = _words(_CITE.sub("", text[slice(*sentences[i - 1])]))
        for n in (int(x) for x in m.group(1).split(",")):
            if 1 <= n <= len(hits):
                cited.setdefault(n, set()).update(words)
    attributed = not cited
    if attributed:
        for a, b in sentence_spans(text):
            words = _words(text[a:b])
            overlaps = [len(words & _words(h.chunk.text)) for h in hits]
            if overlaps and max(overlaps) > 0:
                cited.setdefault(overlaps.index(max(overlaps)) + 1, set()).update(words)
    out = []
    for n in sorted(cited):
        chunk = hits[n - 1].chunk
        spans = sentence_spans(chunk.text) or [(0, len(chunk.text))]
        scores = [len(cited[n] & _words(chunk.text[a:b])) for a, b in spans]
        a, b = spans[scores.index(max(scores))]
        out.append(Citation(n, chunk.id, chunk.doc_id, chunk.source, chunk.line, chunk.start, chunk.end, chunk.heading,
                            chunk.text[a:b], chunk.start + a, chunk.start + b, attributed))
    return out


# ---------------------------------------------------------------------------- generators
class LocalGenerator:
    """A slmkit model directory, prompted through its chat format (plain text without one)."""

    def __init__(self, model_dir: str | os.PathLike, device: str = "cpu", dtype: str | None = None) -> None:
        from slmkit.chat import ChatFormat
        from slmkit.model.io import load

        self.model, self.tokenizer = load(model_dir, device, dtype)
        self.format = ChatFormat.for_model(model_dir, self.tokenizer) or ChatFormat.builtin("plain", self.tokenizer)
        self.context = self.model.cfg.context_length

    def prompt_tokens(self, messages: Messages) -> int:
        return len(self.format.prompt_ids(messages))

    def complete(self, messages: Messages, max_tokens: int, temperature: float = 0.0, seed: int | None = None) -> str:
        from slmkit.generation.api import stream_ids
        from slmkit.generation.sampling import SamplingParams

        ids = self.format.prompt_ids(messages)
        max_tokens = min(max_tokens, self.context - len(ids))
        if max_tokens < 1:
            raise InputError(f"the prompt is {len(ids)} tokens, the model's whole context ({self.context})")
        pieces = stream_ids(self.model, self.tokenizer, ids, max_tokens, SamplingParams(temperature), self.format.stop,
                            self.format.stop_tokens, seed)
        return "".join(pieces).strip()


class OpenAIGenerator:
    """Any OpenAI-compatible chat endpoint (`slmkit serve`, vLLM, llama.cpp, Ollama), through the
    official client. `context` (tokens) enables the prompt budget; counted with `tokenizer`."""

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, context: int | None = None,
                 tokenizer=None) -> None:
        import openai

        from slmkit.rag.embedders import _reason

        self.openai, self.reason = openai, _reason
        self.url = url.rstrip("/") if url.rstrip("/").endswith("/v1") else url.rstrip("/") + "/v1"
        self.client = openai.OpenAI(base_url=self.url, api_key=api_key or os.environ.get("OPENAI_API_KEY") or "none",
                                    max_retries=2)
        self.context = context if tokenizer is not None else None
        self.tokenizer = tokenizer
        if model is None:
            try:
                models = self.client.models.list().data
            except openai.OpenAIError as e:
                raise InputError(f"cannot list the models of {self.url}: {_reason(e)}; pass the model name") from None
            if not models:
                raise InputError(f"{self.url} serves no models")
            model = models[0].id
        self.model = model

    def prompt_tokens(self, messages: Messages) -> int | None:
        if self.tokenizer is None:
            return None
        return sum(len(self.tokenizer.encode_ordinary(m["content"])) + 4 for m in messages)

    def complete(self, messages: Messages, max_tokens: int, temperature: float = 0.0, seed: int | None = None) -> str:
        try:
            reply = self.client.chat.completions.create(model=self.model, messages=messages, max_tokens=max_tokens,
                                                        temperature=temperature, seed=seed)
        except self.openai.OpenAIError as e:
            raise InputError(f"generating with {self.url} (model {self.model}) failed: {self.reason(e)}") from None
        return (reply.choices[0].message.content or "").strip()


def load_generator(spec: str, *, model: str | None = None, api_key: str | None = None, context: int | None = None,
                   tokenizer=None, device: str = "cpu", dtype: str | None = None) -> Generator:
    """A model directory or the URL of an OpenAI-compatible server."""
    if spec.startswith(("http://", "https://")):
        return OpenAIGenerator(spec, model, api_key, context, tokenizer)
    return LocalGenerator(spec, device, dtype)
