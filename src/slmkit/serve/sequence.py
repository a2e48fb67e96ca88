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
    `stop_token_ids` end the completion too, whatever `stop_tokens` is (vLLM's `ignore_eos` empties
    only the latter). `logprobs` k returns each chosen token's log-probability and the k most likely
    ones; `prompt_logprobs` k the same for every prompt token after the first (from the prefill
    pass). `logit_bias` {token: bias} is added to the logits before sampling; `min_tokens` holds
    back the stop tokens and stop strings until that many tokens are out."""

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
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_tokens: int = 0
    stop_token_ids: Sequence[int] = ()


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
    prompt_logprobs: list[Logprob | None] | None = None  # on the first output, when asked: None for the first token


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
    prompt_logprobs: list[Logprob | None] = field(default_factory=lambda: [None])  # of prompt tokens 0, 1, ...

    @classmethod
    def start(cls, seq_id: int, request: Request, index: int, tokenizer: Tokenizer | None, device: torch.device) -> SequenceState:
        """Completion `index` of `request`: seeded with seed + index, so n draws differ."""
        stops = request.stop_tokens
        if stops is None:
            stops = [tokenizer.eot_id] if tokenizer is not None and tokenizer.eot_token else []
        seed = None if request.seed is None else request.seed + index
        generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
        text = TextStream(tokenizer, request.stop) if tokenizer is not None else None
        return cls(seq_id, request, index, list(request.prompt), time.perf_counter(), generator, text,
                   frozenset(stops) | frozenset(request.stop_token_ids))

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt)

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Prompt logprobs were asked and some prompt tokens have none yet (so they must be computed, not cached)."""
        return self.request.prompt_logprobs is not None and len(self.prompt_logprobs) < self.prompt_len

    @property
    def holds_stops(self) -> bool:
        """`min_tokens` not reached yet: stop tokens are masked and stop strings not looked for."""
        return self.num_output < self.request.min_tokens

    @property
    def can_speculate(self) -> bool:
        """Drafts are verified against greedy choices of the raw logits, so only greedy requests
        without penalties, logit bias, held-back stops or logprobs can take them."""
        params, request = self.request.params, self.request
        return (params.greedy and not params.needs_history and request.logprobs is None and not request.logit_bias
                and not self.holds_stops)

    def output(self, finish_reason: str | None = None) -> Output:
        """An empty output of this completion, to fill with new tokens."""
        return Output(self.request.request_id, self.index, [], "", [], finish_reason, self.prompt_len, self.cached_tokens)

    def append(self, tokens: list[int], logprobs: list[Logprob | None], context: int) -> Output:
        """Add chosen tokens, ending the completion on a stop token (not added), a stop string, its
        `max_tokens` or the model's `context`; returns what is new (finish_reason set at the end)."""
        out = self.output()
        if self.num_output == 0 and self.request.prompt_logprobs is not None:
            out.prompt_logprobs = list(self.prompt_logprobs)
        for token, logprob in zip(tokens, logprobs):
            if token in self.stop_tokens:
                out.finish_reason = "stop"
                break
            find_stops = not self.holds_stops  # before this token: vLLM looks for stop strings past min_tokens
            self.tokens.append(token)
            out.token_ids.append(token)
            if logprob is not None:
                out.logprobs.append(logprob)
            if self.text is not None:
                out.text += self.text.push(token, find_stops)
                if self.text.stopped:
                    out.finish_reason = "stop"
                    break
            if self.num_output >= self.request.max_tokens or len(self.tokens) >= context:
                out.finish_reason = "length"
                break
        if out.finish_reason is not None and self.text is not None:
            out.text += self.text.finish()
        return out
