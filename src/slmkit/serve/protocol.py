"""The API's request bodies, as strict pydantic models, and the OpenAI-shaped errors they raise.

Strict: an unknown field is an error (a feature this server lacks is never silently ignored), and
no coercion (true is not 1, "yes" is not true). Ranges are OpenAI's (vLLM's for its own fields);
they appear in /openapi.json. Field names and shapes follow OpenAI, and vLLM where it extends
OpenAI (`ignore_eos`, `min_tokens`, `stop_token_ids`, `/tokenize`, `/detokenize`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from slmkit.errors import MissingExtraError

try:
    from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator
    from pydantic_core import PydanticCustomError
except ImportError:
    raise MissingExtraError("pydantic", "serve") from None


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param, self.headers = status, message, kind, code, param, headers


def error_body(e: APIError) -> dict:
    return {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}}


# ---------------------------------------------------------------------------- request bodies
def finite(default: Any = None, **bounds: float) -> Any:
    """A float field that refuses NaN and the infinities (Python's JSON parser accepts both)."""
    return Field(default, allow_inf_nan=False, **bounds)


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(Body):
    include_usage: bool = False


TokenId = Annotated[str, Field(pattern=r"^[0-9]+$")]  # JSON object keys are strings: logit_bias {"42": -100}


class SamplingFields(Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = finite(ge=0, le=2)
    top_p: float | None = finite(gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    min_p: float | None = finite(ge=0, le=1)
    frequency_penalty: float = finite(0.0, ge=-2, le=2)
    presence_penalty: float = finite(0.0, ge=-2, le=2)
    repetition_penalty: float | None = finite(gt=0)
    seed: int | None = Field(None, ge=0, lt=2**64)
    stop: str | Annotated[list[str], Field(max_length=16)] | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[TokenId, Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[int] | None = None


class CompletionBody(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]  # one prompt, or a batch: choices prompt-major, n each
    max_tokens: int | None = Field(None, ge=0)  # 0 only with echo: the prompt and its logprobs alone
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class TextPart(Body):
    """A content part of a chat message; only text parts are served."""

    type: Literal["text"]
    text: str

    @model_validator(mode="before")
    @classmethod
    def only_text(cls, data: Any) -> Any:
        if isinstance(data, dict) and "type" in data and data["type"] != "text":
            raise PydanticCustomError("content_part_type", "content parts of type '{kind}' are not served; only 'text' parts are",
                                      {"kind": data["type"]})
        return data


class ChatMessage(Body):
    role: Literal["system", "user", "assistant"]  # the roles chat templates render; tool messages are not served yet
    content: str | list[TextPart]

    def for_template(self) -> dict[str, str]:
        """The message as chat templates take it: text parts joined by newlines, as vLLM joins them."""
        content = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)
        return {"role": self.role, "content": content}


class ChatBody(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class EmbeddingBody(Body):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"


class TokenizeText(Body):
    """vLLM's TokenizeCompletionRequest."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True  # the tokenizer's own additions (an imported Llama 3's BOS)
    return_token_strs: bool = False


class TokenizeChat(Body):
    """vLLM's TokenizeChatRequest: the ids a chat completion's prompt would have."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    add_special_tokens: Literal[False] = False  # the chat template writes its own special tokens
    return_token_strs: bool = False


def _tokenize_form(body: Any) -> str:
    return "tokenize-chat" if isinstance(body, dict) and "messages" in body else "tokenize-text"


TokenizeBody = Annotated[Annotated[TokenizeText, Tag("tokenize-text")] | Annotated[TokenizeChat, Tag("tokenize-chat")],
                         Discriminator(_tokenize_form)]


class DetokenizeBody(Body):
    model: str | None = None
    tokens: list[int]


# ---------------------------------------------------------------------------- validation errors
_BOUNDS = {"greater_than_equal": ("ge", ">="), "greater_than": ("gt", ">"), "less_than_equal": ("le", "<="),
           "less_than": ("lt", "<")}


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "tokenize-text", "tokenize-chat"}


def _field_path(loc: tuple) -> str:
    """("body", "messages", 0, "role") -> "messages.0.role"; pydantic's union-member tags are left out."""
    return ".".join(str(p) for p in loc[1:] if isinstance(p, int) or ("[" not in p and p not in _UNION_TAGS))


def validation_error(errors: list[dict]) -> APIError:
    """One OpenAI-shaped 400 for pydantic's errors: every unsupported field named, else the first problem."""
    if any(e.get("type") == "json_invalid" for e in errors):
        return APIError(400, "the request body is not valid JSON", code="invalid_json")
    extra = [_field_path(e["loc"]) for e in errors if e.get("type") == "extra_forbidden"]
    if extra:
        names = ", ".join(repr(x) for x in extra)
        return APIError(400, f"unsupported field{'s' * (len(extra) > 1)} {names}: this server does not implement "
                             f"{'them' if len(extra) > 1 else 'it'}; remove {'them' if len(extra) > 1 else 'it'} from the request",
                        param=extra[0], code="unsupported_field")
    first = max(errors, key=lambda e: len(e.get("loc", ()))) if errors else {}  # in a union: the member that got furthest
    where = _field_path(first.get("loc", ())) or "body"
    kind, ctx = first.get("type", ""), first.get("ctx") or {}
    if kind in _BOUNDS:
        key, op = _BOUNDS[kind]
        bound = ctx.get(key)
        bound = int(bound) if isinstance(bound, float) and bound.is_integer() else bound
        message = f"{where} must be {op} {bound}, not {first.get('input')!r}"
    elif kind == "finite_number":
        message = f"{where} must be a finite number"
    elif kind == "missing":
        message = f"{where} is required"
    elif kind == "content_part_type":
        where += ".type"
        message = f"{where}: {first.get('msg')}"
    else:
        message = f"{where}: {first.get('msg', 'invalid value')}"
    return APIError(400, message, param=None if where == "body" else where)
