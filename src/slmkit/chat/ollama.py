"""A chat format as an Ollama Modelfile TEMPLATE (Go text/template), derived from its Jinja source.

Ollama does not run Jinja. Most chat templates, and all the built-in ones, write a fixed text
before and after each message according to its role, a fixed head once, and a fixed generation
prompt at the end; those texts are read off the Jinja template by rendering one message of each
role, and the Go template is checked against the Jinja one on sample conversations. A template
that is not of that shape (a default system prompt, content-dependent logic) is refused rather
than approximated.
"""

from __future__ import annotations

from slmkit.chat.format import ChatFormat
from slmkit.errors import ExportError, InputError

ROLES = ("system", "user", "assistant")
_PROBES = (
    ["user"],
    ["system", "user"],
    ["user", "assistant", "user"],
    ["system", "user", "assistant", "user", "assistant"],
)


def _go_text(text: str) -> str:
    """Literal text in a Go template: only "{{" needs escaping."""
    return text.replace("{{", '{{ "{{" }}')


def ollama_template(chat_format: ChatFormat) -> str:
    """The Go template that renders what `chat_format.render(messages)` renders."""
    def render(roles: list[str], generation_prompt: bool) -> str:
        return chat_format.render([{"role": r, "content": f"{r} text {i}"} for i, r in enumerate(roles)], generation_prompt)

    refused = ExportError(f"an Ollama TEMPLATE cannot express the {chat_format.name} chat template (it does not write "
                          "one fixed block per message); export without --modelfile and write its TEMPLATE by hand")
    try:
        head, with_prompt = render([], False), render([], True)
        blocks = {}
        for role in ROLES:
            pieces = chat_format.pieces([{"role": role, "content": "x"}], False)
            texts = [i for i, p in enumerate(pieces) if not p.template]
            before = "".join(p.text for p in pieces[: texts[0]]) if len(texts) == 1 else ""
            if len(texts) != 1 or not before.startswith(head):
                raise refused
            blocks[role] = (before[len(head):], "".join(p.text for p in pieces[texts[0] + 1 :]))
        if not with_prompt.startswith(head):
            raise refused
        generation_prompt = with_prompt[len(head):]
        for roles in _PROBES:
            expected = head + "".join(blocks[r][0] + f"{r} text {i}" + blocks[r][1] for i, r in enumerate(roles))
            if render(roles, True) != expected + generation_prompt:
                raise refused
    except InputError:  # the template refuses a probe conversation
        raise refused from None
    actions = "".join(("{{ if " if i == 0 else "{{ else if ") + 'eq .Role "' + role + '" }}'
                      + _go_text(pre) + "{{ .Content }}" + _go_text(post) for i, (role, (pre, post)) in enumerate(blocks.items()))
    return _go_text(head) + "{{ range .Messages }}" + actions + "{{ end }}{{ end }}" + _go_text(generation_prompt)
