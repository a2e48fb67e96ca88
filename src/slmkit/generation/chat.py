"""Multi-turn chat: a prompt format, a history that fits the context window, and a REPL.

A tokenizer with its own chat template (an imported instruct model's, from tokenizer_config.json)
renders the prompt; otherwise, with `<|im_start|>`/`<|im_end|>` among the tokenizer's special
tokens, the prompt is ChatML; otherwise it is plain "User: ...\\nAssistant: ..." text, which a model
pretrained on dialogue transcripts can follow. When the history outgrows the context, the oldest
exchanges are dropped.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TextIO

from slmkit.errors import InputError
from slmkit.generation.api import stop_token_ids, stream_ids
from slmkit.generation.sampling import SamplingParams
from slmkit.model.transformer import Transformer
from slmkit.tokenizer import Tokenizer

IM_START, IM_END = "<|im_start|>", "<|im_end|>"


class ChatFormat:
    """How a turn becomes token ids, and what ends the assistant's reply."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        specials = tokenizer.special_tokens
        self.chatml = IM_START in specials and IM_END in specials
        self.stop = [] if self.chatml or tokenizer.chat_template else ["\nUser:"]
        self.stop_tokens = stop_token_ids(tokenizer, None) + ([specials[IM_END]] if self.chatml else [])

    def render(self, history: list[tuple[str, str]]) -> list[int]:
        """The whole conversation as prompt ids, ending where the assistant's reply begins."""
        if self.tokenizer.chat_template:
            messages = [{"role": role, "content": content} for role, content in history]
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return [token for role, content in history for token in self.turn(role, content)] + self.reply_prefix()

    def turn(self, role: str, content: str) -> list[int]:
        encode = self.tokenizer.encode_ordinary  # what the user types is never a special token
        if self.chatml:
            specials = self.tokenizer.special_tokens
            return [specials[IM_START], *encode(f"{role}\n{content}"), specials[IM_END], *encode("\n")]
        return encode(f"{role.capitalize()}: {content}\n")

    def reply_prefix(self) -> list[int]:
        if self.chatml:
            return [self.tokenizer.special_tokens[IM_START], *self.tokenizer.encode_ordinary("assistant\n")]
        return self.tokenizer.encode_ordinary("Assistant:")


class ChatSession:
    """The conversation so far; `send` streams the assistant's reply and records both turns.

    A reply may use at most half the context (`reply_tokens`), so that the history always keeps
    room for it; the oldest user/assistant exchanges are dropped to make that room.
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_new_tokens: int = 256,
                 params: SamplingParams | None = None, seed: int | None = None) -> None:
        self.model, self.format = model, ChatFormat(tokenizer)
        self.tokenizer = tokenizer
        self.reply_tokens = max(1, min(max_new_tokens, model.cfg.context_length // 2))
        self.params = params or SamplingParams()
        self.seed = seed
        self.history: list[tuple[str, str]] = []  # (role, content)

    def reset(self) -> None:
        self.history = []

    def prompt_ids(self) -> list[int]:
        """The history as a prompt, after dropping the oldest exchanges that do not fit. A new message
        that cannot fit even alone is taken back out of the history."""
        budget = self.model.cfg.context_length - self.reply_tokens
        alone = len(self.format.render(self.history[-1:]))
        if alone > budget:
            self.history.pop()
            raise InputError(f"the message is {alone} tokens as a prompt; at most {budget} fit in the context with room for a reply")
        while len(ids := self.format.render(self.history)) > budget:
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
