"""Multi-turn chat: a history that fits the context window, and a REPL.

The prompt format is the model's `ChatFormat` (`slmkit.chat`): the chat template it was tuned
with, else ChatML when the tokenizer has the ChatML tokens, else plain
"User: ...\\nAssistant: ..." text, which a model pretrained on dialogue transcripts can follow.
When the history outgrows the context, the oldest exchanges are dropped.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TextIO

from slmkit.chat import ChatFormat
from slmkit.errors import InputError
from slmkit.generation.api import stream_ids
from slmkit.generation.sampling import SamplingParams
from slmkit.model.transformer import Transformer
from slmkit.tokenizer import Tokenizer


class ChatSession:
    """The conversation so far; `send` streams the assistant's reply and records both turns.

    A reply may use at most half the context (`reply_tokens`), so that the history always keeps
    room for it; the oldest user/assistant exchanges are dropped to make that room.
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_new_tokens: int = 256,
                 params: SamplingParams | None = None, seed: int | None = None,
                 chat_format: ChatFormat | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.format = chat_format or ChatFormat.for_tokenizer(tokenizer) or ChatFormat.builtin("plain", tokenizer)
        self.reply_tokens = max(1, min(max_new_tokens, model.cfg.context_length // 2))
        self.params = params or SamplingParams()
        self.seed = seed
        self.history: list[tuple[str, str]] = []  # (role, content)

    def reset(self) -> None:
        self.history = []

    def render(self, history: list[tuple[str, str]]) -> list[int]:
        return self.format.prompt_ids([{"role": role, "content": content} for role, content in history])

    def prompt_ids(self) -> list[int]:
        """The history as a prompt, after dropping the oldest exchanges that do not fit. A new message
        that cannot fit even alone is taken back out of the history."""
        budget = self.model.cfg.context_length - self.reply_tokens
        alone = len(self.render(self.history[-1:]))
        if alone > budget:
            self.history.pop()
            raise InputError(f"the message is {alone} tokens as a prompt; at most {budget} fit in the context with room for a reply")
        while len(ids := self.render(self.history)) > budget:
            self.history.pop(0)
            if self.history[0][0] == "assistant":  # drop the whole exchange
                self.history.pop(0)
        return ids

    def send(self, message: str) -> Iterator[str]:
        self.history.append(("user", message))
        prompt = self.prompt_ids()
        reply = ""
        for delta in stream_ids(self.model, self.tokenizer, prompt, self.reply_tokens, self.params,
                                self.format.stop, self.format.stop_tokens, self.seed):
            reply += delta
            yield delta
        self.history.append(("assistant", reply.strip()))


def repl(session: ChatSession, stdin: TextIO, stdout: TextIO) -> None:
    """Read messages line by line until /exit or end of input; /reset forgets the history."""
    interactive = stdin.isatty()
    if interactive:
        stdout.write("Type a message; /reset clears the history, /exit (or Ctrl-D) quits.\n")
    while True:
        if interactive:
            stdout.write("> ")
            stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            return
        message = line.strip()
        if message == "/reset":
            session.reset()
            stdout.write("(history cleared)\n")
        elif message:
            try:
                for delta in session.send(message):
                    stdout.write(delta)
                    stdout.flush()
                stdout.write("\n")
            except InputError as e:
                stdout.write(f"error: {e}\n")
