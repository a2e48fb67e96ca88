"""The built-in chat templates, as Jinja source in the Hugging Face convention.

- `alpaca`: the Stanford Alpaca prompt; an assistant turn ends with the end-of-text token.
- `chatml`: `<|im_start|>role\\n...<|im_end|>` turns; needs those two special tokens.
- `plain`: "User: ...\\nAssistant: ..." text, which a model pretrained on dialogue transcripts can
  follow; its turns end in text ("\\nUser:"), so `slmkit chat` stops on that string.

Assistant turns sit in `{% generation %}` blocks: they are what SFT trains on. The source is what
a tuned model directory carries in tokenizer_config.json, so transformers, llama.cpp and slmkit
render it alike.
"""

from __future__ import annotations

from dataclasses import dataclass

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHATML_TOKENS = (IM_START, IM_END)
ALPACA_HEADER = "Below is an instruction that describes a task. Write a response that appropriately completes the request."

ALPACA = (
    "{{ '" + ALPACA_HEADER + "\\n\\n' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\\n\\n' }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% else %}"
    "{{ '### Instruction:\\n' + (message['instruction'] if message['instruction'] is defined else message['content']) + '\\n\\n' }}"
    "{% if message['input'] %}{{ '### Input:\\n' + message['input'] + '\\n\\n' }}{% endif %}"
    "{{ '### Response:\\n' }}"
    "{% endif %}"
    "{% endfor %}"
)

CHATML = (
    "{% for message in messages %}"
    "{{ '" + IM_START + "' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '" + IM_END + "' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '" + IM_END + "' }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + IM_START + "assistant\\n' }}{% endif %}"
)

PLAIN = (
    "{% for message in messages %}{{ (message['role'] | capitalize) + ': ' + message['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


@dataclass(frozen=True)
class Builtin:
    source: str
    needs_tokens: tuple[str, ...] = ()  # special tokens the tokenizer must have
    needs_eos: bool = False  # the template writes eos_token
    stop: tuple[str, ...] = ()  # strings that end a reply, for templates whose turns end in text


BUILTINS = {
    "alpaca": Builtin(ALPACA, needs_eos=True),
    "chatml": Builtin(CHATML, needs_tokens=CHATML_TOKENS),
    "plain": Builtin(PLAIN, stop=("\nUser:",)),
}
