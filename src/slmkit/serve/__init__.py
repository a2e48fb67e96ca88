"""Serving: a continuous-batching engine over a paged KV cache, and an OpenAI-compatible server.

    from slmkit.serve import Engine, Request
    engine = Engine(model, tokenizer)
    [[ids]] = engine.generate([Request(prompt_ids, max_tokens=32)])
"""

from slmkit.serve.engine import Engine, Output, Request
from slmkit.serve.server import build_app, serve

__all__ = ["Engine", "Output", "Request", "build_app", "serve"]
