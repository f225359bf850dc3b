"""Templates: a conversation becomes text plus the character spans that carry loss.

Masks come from spans the renderer knows, never from token values: GPT-2's pad id equals
its EOS id, and the EOS that ends every response must stay trainable so the model learns
to stop. A span covers an assistant turn's content and the end-of-turn marker after it
(`{eos}` or `<|im_end|>`), not the header before it nor the whitespace after it.

Built-in templates are `FormatTemplate`s: one Python format string per role, with the
fields `{content}`, `{input}` (Alpaca's input, user turns only), `{eos}` and `{bos}` (the
tokenizer's special tokens, as text). A user template is the same thing from the config
(`data.template=format`, `data.template_format.*`). The tokenizer's own chat template and
Jinja files live in chat_templates.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from sft_jax.data.formats import Message
from sft_jax.data.spec import FormatTemplate

# The Stanford Alpaca prompts, byte for byte (github.com/tatsu-lab/stanford_alpaca).
ALPACA_PREAMBLE_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request."
)
ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request."
)


@dataclasses.dataclass(frozen=True)
class Rendered:
    """Text of one example; `spans` are the [start, end) character ranges that carry loss."""

    text: str
    spans: tuple[tuple[int, int], ...]


ALPACA = FormatTemplate(
    system="{content}\n\n",
    user="### Instruction:\n{content}\n\n### Response:\n",
    user_with_input="### Instruction:\n{content}\n\n### Input:\n{input}\n\n### Response:\n",
    assistant="{content}{eos}",
    separator="\n\n",
    default_system=ALPACA_PREAMBLE,
    default_system_with_input=ALPACA_PREAMBLE_INPUT,
)
HUMAN_ASSISTANT = FormatTemplate(
    system="{content}\n\n",
    user="Human: {content}\n\n",
    assistant="Assistant: {content}{eos}",
    separator="\n\n",
)
CHATML = FormatTemplate(
    system="<|im_start|>system\n{content}<|im_end|>\n",
    user="<|im_start|>user\n{content}<|im_end|>\n",
    assistant="<|im_start|>assistant\n{content}<|im_end|>\n",
)
# No markup: prompt then completion then EOS, as TRL trains prompt/completion rows.
RAW = FormatTemplate(system="{content}\n\n", user="{content}", assistant="{content}{eos}")

BUILTIN = {"alpaca": ALPACA, "human_assistant": HUMAN_ASSISTANT, "chatml": CHATML, "raw": RAW}


def render_format(
    t: FormatTemplate,
    messages: Sequence[Message],
    eos: str,
    bos: str = "",
    assistant_turns: str = "all",
) -> Rendered:
    """Renders a conversation with a format template; spans cover trained assistant turns."""
    special = {"eos": eos, "bos": bos}
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0

    def add(text: str) -> None:
        nonlocal pos
        parts.append(text)
        pos += len(text)

    msgs = list(messages)
    if msgs and msgs[0].role != "system" and t.default_system:
        first_user = next((m for m in msgs if m.role == "user"), None)
        with_input = first_user is not None and bool(first_user.input)
        default = (with_input and t.default_system_with_input) or t.default_system
        msgs.insert(0, Message("system", default))
    for i, m in enumerate(msgs):
        if m.role == "system":
            add(t.system.format(content=m.content, input="", **special))
        elif m.role == "user":
            if m.input and t.user_with_input:
                add(t.user_with_input.format(content=m.content, input=m.input, **special))
            else:
                add(t.user.format(content=m.text(), input="", **special))
        else:
            # "\0" never occurs in a format string, so it marks where the content goes.
            before, after = t.assistant.format(content="\0", input="", **special).split("\0")
            add(before)
            start = pos
            add(m.content + after)
            spans.append((start, start + len(m.content) + len(after.rstrip())))
            if i + 1 < len(msgs):
                add(t.separator)
    text = "".join(parts)
    if spans:
        text = text[: max(len(text.rstrip()), spans[-1][1])]
    if assistant_turns == "last":
        spans = spans[-1:]
    return Rendered(text, tuple(spans))
