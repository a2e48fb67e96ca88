"""What the engine serves: a client's `Request`, each completion's `SequenceState` while it is
generated, and the `Output` each step reports."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from slmkit.generation.sampling import SamplingParams
from slmkit.generation.text import TextStream
from slmkit.tokenizer import Tokenizer


@dataclass
class Request:
    """What a client asks for. `stop_tokens` None means the tokenizer's end-of-text token;
    `logprobs` k returns each chosen token's log-probability and the k most likely ones."""

    prompt: list[int]
    max_tokens: int = 16
    params: SamplingParams = field(default_factory=SamplingParams)
    stop: Sequence[str] = ()
    stop_tokens: Sequence[int] | None = None
    n: int = 1
    seed: int | None = None
    logprobs: int | None = None
    adapter: str | None = None
    request_id: str = ""


Logprob = tuple[float, dict[int, float]]  # a chosen token's logprob, and the top alternatives'


@dataclass
class Output:
    """New tokens of one completion (`index` < n) of a request, produced by one step."""

    request_id: str
    index: int
    token_ids: list[int]
    text: str
    logprobs: list[Logprob]
    finish_reason: str | None = None  # "stop", "length", "abort" or "error" on the last output
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens found in the prefix cache


@dataclass(eq=False)  # compared by identity: the scheduler looks sequences up in its lists
class SequenceState:
    """One completion being generated: its tokens so far and where its keys/values live."""

    id: int
    request: Request
    index: int
    tokens: list[int]
    arrival: float
    generator: torch.Generator | None
    text: TextStream | None
    stop_tokens: frozenset[int]
    num_computed: int = 0  # tokens whose keys/values are in the cache
    blocks: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)  # keys of the leading full blocks
    cached_tokens: int = 0

    @classmethod
    def start(cls, seq_id: int, request: Request, index: int, tokenizer: Tokenizer | None, device: torch.device) -> SequenceState:
        """Completion `index` of `request`: seeded with seed + index, so n draws differ."""
        stops = request.stop_tokens
        if stops is None:
            stops = [tokenizer.eot_id] if tokenizer is not None and tokenizer.eot_token else []
        seed = None if request.seed is None else request.seed + index
        generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
        text = TextStream(tokenizer, request.stop) if tokenizer is not None else None
        return cls(seq_id, request, index, list(request.prompt), time.perf_counter(), generator, text, frozenset(stops))

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt)

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def can_speculate(self) -> bool:
        """Drafts are verified against greedy choices, so only greedy requests without penalties
        or logprobs can take them."""
        params = self.request.params
        return params.greedy and not params.needs_history and not self.request.logprobs

    def output(self, finish_reason: str | None = None) -> Output:
        """An empty output of this completion, to fill with new tokens."""
        return Output(self.request.request_id, self.index, [], "", [], finish_reason, self.prompt_len, self.cached_tokens)

    def append(self, tokens: list[int], logprobs: list[Logprob | None], context: int) -> Output:
        """Add chosen tokens, ending the completion on a stop token (not added), a stop string, its
        `max_tokens` or the model's `context`; returns what is new (finish_reason set at the end)."""
        out = self.output()
        for token, logprob in zip(tokens, logprobs):
            if token in self.stop_tokens:
                out.finish_reason = "stop"
                break
            self.tokens.append(token)
            out.token_ids.append(token)
            if logprob is not None:
                out.logprobs.append(logprob)
            if self.text is not None:
                out.text += self.text.push(token)
                if self.text.stopped:
                    out.finish_reason = "stop"
                    break
            if self.num_output >= self.request.max_tokens or len(self.tokens) >= context:
                out.finish_reason = "length"
                break
        if out.finish_reason is not None and self.text is not None:
            out.text += self.text.finish()
        return out
