"""Text generation: logits processors, the KV-cached decoding loops, streaming, chat.

The public entry point is `slmkit.generate(...)`, re-exported from here.
"""

from slmkit.generation.api import generate, generate_ids, stream
from slmkit.generation.chat import ChatSession
from slmkit.generation.sampling import SamplingParams

__all__ = ["ChatSession", "SamplingParams", "generate", "generate_ids", "stream"]
