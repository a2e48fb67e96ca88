"""Chat templates and stop tokens, one home for every consumer: `slmkit chat`, the server, SFT
and DPO, `eval generate`, GGUF export and the Ollama Modelfile.

    from slmkit.chat import ChatFormat
    fmt = ChatFormat.for_model("runs/sft/final", tokenizer)      # the template the model was tuned with
    ids = fmt.prompt_ids([{"role": "user", "content": "hi"}])   # message text never becomes special tokens
    fmt.stop_tokens                                              # what ends the assistant's reply
"""

from slmkit.chat.format import (
    TEMPLATE_CHOICES,
    ChatFormat,
    Encoded,
    Example,
    StopTokens,
    encode_pieces,
    split_answer,
    stop_token_ids,
    to_messages,
)
from slmkit.chat.render import Piece, render_chat_template, render_pieces
from slmkit.chat.templates import ALPACA_HEADER, BUILTINS, CHATML_TOKENS, IM_END, IM_START

__all__ = [
    "ALPACA_HEADER", "BUILTINS", "CHATML_TOKENS", "IM_END", "IM_START", "TEMPLATE_CHOICES", "ChatFormat", "Encoded",
    "Example", "Piece", "StopTokens", "encode_pieces", "render_chat_template", "render_pieces", "split_answer", "stop_token_ids",
    "to_messages",
]
