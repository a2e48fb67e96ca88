"""Token ids -> text, incrementally: whole characters only, and stop strings cut out.

A token can end in the middle of a multi-byte UTF-8 character, and a stop string can span
several tokens, so text is released only when it can no longer change: the incremental UTF-8
decoder holds back an unfinished character, and text that might be the start of a stop string
waits until the next tokens decide.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from slmkit.tokenizer import Tokenizer


class TextStream:
    """Feed generated token ids with `push`; each call returns the new, final text (maybe "")."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # everything decoded so far (cut at a stop string once one is found)
        self.emitted = 0  # characters of `text` already returned
        self.stopped = False  # a stop string was found; further tokens are ignored

    def push(self, token_id: int, find_stops: bool = True) -> str:
        """`find_stops` False: stop strings are not looked for in what this token adds (vLLM's min_tokens)."""
        if self.stopped:
            return ""
        return self._add(self.decoder.decode(self.tokenizer.decode_bytes([token_id])), find_stops)

    def finish(self) -> str:
        """The text still held back, once generation has ended."""
        if self.stopped:
            return ""
        delta = self._add(self.decoder.decode(b"", final=True))
        rest = self.text[self.emitted :]
        self.emitted = len(self.text)
        return delta + rest

    def _add(self, new: str, find_stops: bool = True) -> str:
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0) + 1)
        self.text += new
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0] if find_stops else []
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
            safe = len(self.text)
        else:
            safe = len(self.text) - (self._held_back() if find_stops else 0)
        delta = self.text[self.emitted : safe]
        self.emitted = max(self.emitted, safe)
        return delta

    def _held_back(self) -> int:
        """Length of the longest end of `text` that is the beginning of a stop string."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:n]):
                    longest = n
                    break
        return longest
