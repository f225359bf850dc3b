"""Jinja chat templates (the tokenizer's own, or a file) -> text and assistant spans.

Most stock templates (Llama 3, Qwen 2.5, SmolLM2's ChatML) have no generation markers, so
`apply_chat_template(..., return_assistant_tokens_mask=True)` gives all-zero masks for
them. We find each assistant turn by rendering the conversation up to the turn with the
generation prompt, and up to and including the turn: the turn is the difference. The
rendered prefixes must be prefixes of the full text (true for every template that
renders history as it is); a template that rewrites earlier turns (e.g. drops their
reasoning) fails with a message. Templates *with* `{% generation %}` markers use them.

Rendering uses the same sandboxed Jinja environment as `apply_chat_template`, with the
tokenizer's special tokens as variables, and a fixed date for templates that print
today's (so the data stays a pure function of the config).
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Sequence

import jinja2
from transformers.utils import chat_template_utils

from sft_jax.data.formats import Message
from sft_jax.data.spec import RowError
from sft_jax.data.templates import Rendered

FIXED_DATE = datetime.datetime(2024, 7, 26)
_MARKERS = re.compile(r"\{%-?\s*generation\s*-?%\}")


def _fixed_strftime(fmt: str) -> str:
    return FIXED_DATE.strftime(fmt)


class JinjaTemplate:
    """A chat template; `name` says where it came from, for messages."""

    def __init__(self, source: str, name: str, special_tokens: dict[str, str]):
        self.source, self.name = source, name
        self.markers = bool(_MARKERS.search(source))
        self.kwargs = {**special_tokens, "strftime_now": _fixed_strftime}
        if not self.markers and "add_generation_prompt" not in source:
            raise ValueError(
                f"{name} has no add_generation_prompt branch, so the assistant header cannot "
                "be told apart from the response. Use a template that has one, mark the "
                "responses with {% generation %} … {% endgeneration %}, or pick a built-in "
                "data.template (alpaca, human_assistant, chatml, raw)"
            )
        try:
            self._compiled = chat_template_utils._compile_jinja_template(source)
        except jinja2.TemplateError as e:
            raise ValueError(f"{name} is not a valid Jinja template: {e}") from None

    def __getstate__(self):  # Compiled templates do not pickle; worker processes recompile.
        return {k: v for k, v in self.__dict__.items() if k != "_compiled"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._compiled = chat_template_utils._compile_jinja_template(self.source)

    def render_text(self, msgs: list[dict], add_generation_prompt: bool) -> str:
        return self._compiled.render(
            messages=msgs,
            add_generation_prompt=add_generation_prompt,
            tools=None,
            documents=None,
            **self.kwargs,
        )

    def _with_markers(self, msgs: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        blocks: list[str] = []
        spans: list[tuple[int, int]] = []
        # The AssistantTracker extension of transformers' environment records the spans.
        with self._compiled.environment.activate_tracker(blocks, spans):
            for block in self._compiled.generate(
                messages=msgs, add_generation_prompt=False, tools=None, documents=None,
                **self.kwargs,
            ):  # fmt: skip
                blocks.append(block)
        text = "".join(blocks)
        return text, [(s, s + len(text[s:e].rstrip())) for s, e in spans]

    def _by_diff(self, msgs: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        full = self.render_text(msgs, False)
        spans = []
        for k, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            prompt = self.render_text(msgs[:k], True)
            upto = full if k == len(msgs) - 1 else self.render_text(msgs[: k + 1], False)
            for shorter, longer, what in (
                (prompt, upto, f"the first {k} messages with the generation prompt"),
                (upto, full, f"the first {k + 1} messages"),
            ):
                if not longer.startswith(shorter):
                    at = next(
                        (
                            i
                            for i, (a, b) in enumerate(zip(shorter, longer, strict=False))
                            if a != b
                        ),
                        min(len(shorter), len(longer)),
                    )
                    raise RowError(
                        "template_error",
                        f"{self.name} is not prefix-stable: rendering {what} gives "
                        f"{shorter[at : at + 30]!r} at character {at} where the longer "
                        f"conversation has {longer[at : at + 30]!r}. Add {{% generation %}} "
                        "markers to a copy of the template (data.template=path/to/file.jinja) "
                        "or use a built-in data.template",
                    )
            turn = upto[len(prompt) :]
            spans.append((len(prompt), len(prompt) + len(turn.rstrip())))
        return full, spans

    def render(self, messages: Sequence[Message], assistant_turns: str = "all") -> Rendered:
        msgs = [{"role": m.role, "content": m.text()} for m in messages]
        try:
            text, spans = (self._with_markers if self.markers else self._by_diff)(msgs)
        except jinja2.TemplateError as e:  # raise_exception(...) in the template, etc.
            raise RowError("template_error", f"{self.name}: {e}") from None
        spans = [s for s in spans if s[1] > s[0]]
        if assistant_turns == "last":
            spans = spans[-1:]
        return Rendered(text, tuple(spans))
