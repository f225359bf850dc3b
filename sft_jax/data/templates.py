"""Templates: a conversation becomes text plus the character spans that carry loss.

Masks come from spans the renderer knows, never from token values: GPT-2's pad id equals
its EOS id, and the EOS that ends every response must stay trainable so the model learns
to stop. A span covers an assistant turn's content and the end-of-turn marker after it
(`{eos}` or `<|im_end|>`), not the header before it nor the whitespace after it.
`resolve_template` picks the template `data.template` names.

Format templates (`spec.FormatTemplate`): one Python format string per role, with the
fields `{content}`, `{input}` (Alpaca's input, user turns only), `{eos}` and `{bos}` (the
tokenizer's special tokens, as text). The built-in templates are these; a user template
is the same thing from the config (`data.template=format`, `data.template_format.*`).

Jinja chat templates (`JinjaTemplate`: the tokenizer's own, or a file). Most stock
templates (Llama 3, Qwen 2.5, SmolLM2's ChatML) have no generation markers, so
`apply_chat_template(..., return_assistant_tokens_mask=True)` gives all-zero masks for
them. We find each assistant turn by rendering the conversation up to the turn with the
generation prompt, and up to and including the turn: the turn is the difference. The
rendered prefixes must be prefixes of the full text (true for every template that
renders history as it is). Templates *with* `{% generation %}` markers use them.
Rendering uses the same sandboxed Jinja environment as `apply_chat_template`, with the
tokenizer's special tokens as variables, and a fixed date for templates that print
today's (so the data stays a pure function of the config).

Templates that rewrite history (Qwen3 renders the last assistant turn with an empty
`<think>\n\n</think>\n\n` block and earlier ones without; reasoning templates drop
earlier turns' thoughts) are not prefix-stable. Such a conversation is split
(`data.split_turns`, default auto): one example per assistant turn, rendered as the model
sees it at inference — the prompt as `add_generation_prompt=True` renders the turns before
it, then that turn as the template renders it last — with only that turn trained.
Whatever the template writes in the turn after the generation prompt trains, Qwen3's
empty think block included: at inference the model writes it itself.

Tools, tool calls and tool results reach a Jinja template as transformers passes them
(`tools=`, OpenAI-shaped `tool_calls` with arguments as objects, `tool` messages); an
assistant turn's trained span covers its content, its tool calls and its end marker, as
the template writes them, never the tool results, the user turns or the tools block. Of the
built-in templates only `chatml` writes tools, in the Hermes style Qwen 2.5 and Qwen3 use:
the tools in the system turn (after its text) under "# Tools" in <tools></tools>, each call
as `<tool_call>\n{"name": …, "arguments": {…}}\n</tool_call>` on its own line after the
content, and consecutive tool results as one user turn of `<tool_response>` blocks. The
others refuse a row with tools (template_error).

Reasoning: an assistant turn's `reasoning_content` reaches a Jinja template as that key
(Qwen3, DeepSeek-R1 and QwQ templates write it as a `<think>` block); format templates write
it before the content as Qwen3 does, `<think>\n…\n</think>\n\n`. The `<think>…</think>`
blocks (and the whitespace after them) inside trained turns are `Rendered.reasoning`;
`data.train_reasoning=False` takes them out of the trained spans (`with_reasoning`).

Templates that refuse a system message (Gemma 2: `raise_exception('System role not
supported')`) get its text folded into the first user turn, "system\n\nuser", exactly as
Gemma 3's template does by itself; the probe that finds them runs once per template.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import re
from collections.abc import Sequence

import jinja2
import transformers
from transformers.utils import chat_template_utils

from sft_jax.data.formats import Message
from sft_jax.data.spec import DataSpec, FormatTemplate, RowError

log = logging.getLogger(__name__)

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
    # [start, end) of the <think> blocks inside assistant turns (trained or not, see
    # with_reasoning); empty until with_reasoning fills it.
    reasoning: tuple[tuple[int, int], ...] = ()


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
    tools: Sequence[dict] = (),
) -> Rendered:
    """Renders a conversation with a format template; spans cover trained assistant turns.
    Raises RowError (template_error) for tools where the template is not chatml."""
    special = {"eos": eos, "bos": bos}
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0

    def add(text: str) -> None:
        nonlocal pos
        parts.append(text)
        pos += len(text)

    msgs = _hermes(messages, tools) if t == CHATML else _no_tools(t, messages, tools)
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
            body = _think(m.reasoning) + m.content
            add(body + after)
            if m.train:
                spans.append((start, start + len(body) + len(after.rstrip())))
            if i + 1 < len(msgs):
                add(t.separator)
    text = "".join(parts)
    if spans:
        text = text[: max(len(text.rstrip()), spans[-1][1])]
    if assistant_turns == "last":
        spans = spans[-1:]
    return Rendered(text, tuple(spans))


def _think(reasoning: str) -> str:
    """A turn's reasoning as Qwen3's template writes it before the answer."""
    return f"<think>\n{reasoning.strip(chr(10))}\n</think>\n\n" if reasoning else ""


# Qwen 2.5's and Qwen3's system text for tools (their templates, verbatim), after the
# system message's own text and a blank line.
_TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou "
    "are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and "
    'arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": '
    '<function-name>, "arguments": <args-json-object>}\n</tool_call>'
)


def dumps(value) -> str:
    """JSON as chat templates' `tojson` writes it (transformers: no ASCII escapes)."""
    return json.dumps(value, ensure_ascii=False)


def _hermes(messages: Sequence[Message], tools: Sequence[dict]) -> list[Message]:
    """The conversation with tools written into plain turns, Hermes/Qwen style: the tools
    block in the system turn, tool calls after the assistant's content, consecutive tool
    results as one user turn."""
    msgs = list(messages)
    out: list[Message] = []
    if tools:
        system = msgs.pop(0).content + "\n\n" if msgs and msgs[0].role == "system" else ""
        block = "".join("\n" + dumps(tool) for tool in tools)
        out.append(Message("system", system + _TOOLS_HEADER + block + _TOOLS_FOOTER))
    after_tool = False
    for m in msgs:
        if m.role == "tool":
            result = f"<tool_response>\n{m.content}\n</tool_response>"
            if after_tool:
                out[-1] = dataclasses.replace(out[-1], content=out[-1].content + "\n" + result)
            else:
                out.append(Message("user", result, field=m.field))
        elif m.tool_calls:
            calls = [
                "<tool_call>\n"
                + dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]})
                + "\n</tool_call>"
                for c in m.tool_calls
            ]
            content = "\n".join(filter(None, [m.content, *calls]))
            out.append(dataclasses.replace(m, content=content, tool_calls=()))
        else:
            out.append(m)
        after_tool = m.role == "tool"
    return out


def _no_tools(t: FormatTemplate, messages: Sequence[Message], tools: Sequence[dict]):
    """The messages, or RowError if the row has tools, which only chatml can write."""
    used = next((m for m in messages if m.role == "tool" or m.tool_calls), None)
    if tools or used:
        name = next((k for k, v in BUILTIN.items() if v == t), "format")
        what = f"a tool call or result ({used.field})" if used else "tools"
        raise RowError(
            "template_error",
            f"data.template={name} cannot express {what}: use data.template=chatml (Hermes/"
            "Qwen style <tool_call> JSON), or a chat template with tools (data.template="
            "tokenizer or a .jinja file)",
        )
    return list(messages)


_THINK_BLOCK = re.compile(r"<think>.*?</think>\s*", re.DOTALL)


def with_reasoning(r: Rendered, train_reasoning: bool = True) -> Rendered:
    """`r` with its reasoning: the <think> blocks (and the whitespace after them) inside its
    spans; without `train_reasoning`, the spans with those blocks taken out."""
    blocks = tuple(m.span() for s, e in r.spans for m in _THINK_BLOCK.finditer(r.text, s, e))
    if train_reasoning or not blocks:
        return Rendered(r.text, r.spans, blocks)
    spans = []
    for s, e in r.spans:
        pos = s
        for start, end in (b for b in blocks if s <= b[0] < e):
            spans.append((pos, start))
            pos = end
        spans.append((pos, e))
    return Rendered(r.text, tuple((s, e) for s, e in spans if e > s), blocks)


# ---------------------------------------------------------------- Jinja chat templates

FIXED_DATE = datetime.datetime(2024, 7, 26)
_MARKERS = re.compile(r"\{%-?\s*generation\s*-?%\}")


def _fixed_strftime(fmt: str) -> str:
    return FIXED_DATE.strftime(fmt)


class NotPrefixStable(RowError):
    """The template renders a conversation's earlier turns differently once later ones follow."""

    def __init__(self, problem: str):
        super().__init__("template_error", problem)


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
        self.folds_system = self._refuses_system()
        if self.folds_system:
            log.info(
                "%s refuses a system message: its text goes into the first user turn, "
                "'system\\n\\nuser', as Gemma 3's template does",
                name,
            )

    def __getstate__(self):  # Compiled templates do not pickle; worker processes recompile.
        return {k: v for k, v in self.__dict__.items() if k != "_compiled"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._compiled = chat_template_utils._compile_jinja_template(self.source)

    def _refuses_system(self) -> bool:
        """Whether the template raises on a leading system message but renders the same
        conversation without it (Gemma 2). Probed once, on a three-message conversation."""
        chat = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
        try:
            self.render_text([{"role": "system", "content": "s"}, *chat], False)
            return False
        except Exception:  # noqa: BLE001 - any failure: see if the system message causes it
            pass
        try:
            self.render_text(chat, False)
        except Exception:  # noqa: BLE001 - fails for another reason: rows will say which
            return False
        return True

    def render_text(self, msgs: list[dict], add_generation_prompt: bool, tools=()) -> str:
        return self._compiled.render(
            messages=msgs,
            add_generation_prompt=add_generation_prompt,
            tools=list(tools) or None,
            documents=None,
            **self.kwargs,
        )

    def _with_markers(self, chat: _Chat) -> tuple[str, list[tuple[int, int]]]:
        """The text, and the spans of the trained turns' generation blocks."""
        blocks: list[str] = []
        spans: list[tuple[int, int]] = []
        # The AssistantTracker extension of transformers' environment records the spans.
        with self._compiled.environment.activate_tracker(blocks, spans):
            for block in self._compiled.generate(
                messages=chat.msgs,
                add_generation_prompt=False,
                tools=list(chat.tools) or None,
                documents=None,
                **self.kwargs,
            ):
                blocks.append(block)
        text = "".join(blocks)
        trained = [
            t for m, t in zip(chat.msgs, chat.trained, strict=True) if m["role"] == "assistant"
        ]
        if len(trained) == len(spans):  # One block per assistant turn: keep the trained ones.
            spans = [s for s, t in zip(spans, trained, strict=True) if t]
        elif not all(trained):
            raise RowError(
                "template_error",
                f"{self.name}: its {len(spans)} generation blocks are not "
                f"one per assistant turn ({len(trained)}), so untrained turns cannot be masked",
            )
        return text, [(s, s + len(text[s:e].rstrip())) for s, e in spans]

    def _turn(self, chat: _Chat, k: int, full: str | None = None, fix: str = "") -> tuple:
        """(the text of msgs[: k + 1], the span of assistant turn k in it): the turn is what
        that text adds to the first k messages rendered with the generation prompt."""
        prompt = self.render_text(chat.msgs[:k], True, chat.tools)
        upto = full if full is not None else self.render_text(chat.msgs[: k + 1], False, chat.tools)
        what = f"the first {k} messages with the generation prompt"
        _check_prefix(prompt, upto, self.name, what, fix or _FIX_SPLIT)
        turn = upto[len(prompt) :]
        return upto, (len(prompt), len(prompt) + len(turn.rstrip()))

    def _by_diff(self, chat: _Chat) -> tuple[str, list[tuple[int, int]]]:
        full = self.render_text(chat.msgs, False, chat.tools)
        spans = []
        for k in chat.trained_turns():
            upto, span = self._turn(chat, k, full if k == len(chat.msgs) - 1 else None)
            _check_prefix(upto, full, self.name, f"the first {k + 1} messages", _FIX_SPLIT)
            spans.append(span)
        return full, spans

    def _split(self, chat: _Chat) -> list[Rendered]:
        """One example per trained assistant turn: the conversation up to that turn, rendered
        as the template renders a last turn, with only that turn trained."""
        out = []
        for k in chat.trained_turns():
            if self.markers:
                text, spans = self._with_markers(chat.upto(k + 1))
                out.append(Rendered(text, tuple(spans[-1:])))
            else:
                text, span = self._turn(chat, k, fix=_FIX_UNSPLITTABLE)
                out.append(Rendered(text, (span,)))
        return out

    def _chat(self, messages: Sequence[Message], tools: Sequence[dict]) -> _Chat:
        msgs = [m.as_dict() for m in messages]
        trained = [m.train for m in messages]
        if self.folds_system and _system_folded(msgs) is not msgs:
            msgs, trained = _system_folded(msgs), trained[1:]
        return _Chat(msgs, trained, tuple(tools))

    def render_examples(
        self,
        messages: Sequence[Message],
        assistant_turns: str = "all",
        split_turns: str = "auto",
        tools: Sequence[dict] = (),
    ) -> list[Rendered]:
        """The examples of one conversation: the whole of it, or (`split_turns` "always", or
        "auto" where the template is not prefix-stable for it) one per assistant turn.
        Raises RowError (reason template_error) where the template refuses it."""
        chat = self._chat(messages, tools)
        try:
            if split_turns == "always":
                out = self._split(chat)
            else:
                try:
                    out = [self._whole(chat)]
                except NotPrefixStable:
                    if split_turns == "never":
                        raise
                    out = self._split(chat)
        except jinja2.TemplateError as e:  # raise_exception(...) in the template, etc.
            raise RowError("template_error", f"{self.name}: {e}") from None
        out = [Rendered(r.text, tuple(s for s in r.spans if s[1] > s[0])) for r in out]
        if assistant_turns == "last":
            return [Rendered(r.text, r.spans[-1:]) for r in out[-1:]]
        return out

    def _whole(self, chat: _Chat) -> Rendered:
        text, spans = (self._with_markers if self.markers else self._by_diff)(chat)
        return Rendered(text, tuple(spans))

    def render_text_only(self, messages: Sequence[Message], tools: Sequence[dict] = ()) -> Rendered:
        """The whole conversation's text, without spans (for train_on=all)."""
        chat = self._chat(messages, tools)
        try:
            return Rendered(self.render_text(chat.msgs, False, chat.tools), ())
        except jinja2.TemplateError as e:
            raise RowError("template_error", f"{self.name}: {e}") from None

    def render(
        self, messages: Sequence[Message], assistant_turns: str = "all", tools: Sequence[dict] = ()
    ) -> Rendered:
        """The whole conversation as one example (never split)."""
        (r,) = self.render_examples(messages, assistant_turns, "never", tools)
        return r


@dataclasses.dataclass(frozen=True)
class _Chat:
    """A conversation as a chat template reads it: the message dicts, whether each is
    trained, and the tools."""

    msgs: list[dict]
    trained: list[bool]
    tools: tuple[dict, ...] = ()

    def trained_turns(self) -> list[int]:
        return [k for k, m in enumerate(self.msgs) if m["role"] == "assistant" and self.trained[k]]

    def upto(self, end: int) -> _Chat:
        return _Chat(self.msgs[:end], self.trained[:end], self.tools)


_MARKERS_FIX = (
    "add {% generation %} markers to a copy of the template (data.template=path/to/file.jinja) "
    "or use a built-in data.template"
)
_FIX_SPLIT = "Set data.split_turns=auto (one example per assistant turn), " + _MARKERS_FIX
_FIX_UNSPLITTABLE = (
    "Its generation prompt does not begin its own rendering of the next assistant turn, so "
    "data.split_turns cannot help: " + _MARKERS_FIX
)


def _check_prefix(shorter: str, longer: str, name: str, what: str, fix: str) -> None:
    """Raises NotPrefixStable, saying `fix`, if `shorter` (`what`, rendered) does not begin
    `longer`."""
    if longer.startswith(shorter):
        return
    at = next(
        (i for i, (a, b) in enumerate(zip(shorter, longer, strict=False)) if a != b),
        min(len(shorter), len(longer)),
    )
    raise NotPrefixStable(
        f"{name} is not prefix-stable: rendering {what} gives {shorter[at : at + 30]!r} at "
        f"character {at} where the longer conversation has {longer[at : at + 30]!r}. {fix}"
    )


def _system_folded(msgs: list[dict]) -> list[dict]:
    """A leading system message's text put before the first user turn's, "system\\n\\nuser"
    (as Gemma 3's template does), for templates that refuse a system role. Without a user
    turn to take it, the messages stay as they are (and the template's own error says why)."""
    if not msgs or msgs[0]["role"] != "system":
        return msgs
    rest = list(msgs[1:])
    first_user = next((i for i, m in enumerate(rest) if m["role"] == "user"), None)
    if first_user is None:
        return msgs
    user = rest[first_user]
    rest[first_user] = {**user, "content": f"{msgs[0]['content']}\n\n{user['content']}"}
    return rest


# ---------------------------------------------------------------- data.template


def resolve_template(
    spec: DataSpec, tokenizer: transformers.PreTrainedTokenizerBase
) -> FormatTemplate | JinjaTemplate:
    """The template `data.template` names: built-in, `format`, the tokenizer's, or a file."""
    special = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    if spec.template in BUILTIN:
        return BUILTIN[spec.template]
    if spec.template == "format":
        return spec.template_format
    if spec.template == "tokenizer":
        if not tokenizer.chat_template:
            raise ValueError(
                f"data.template=tokenizer, but the tokenizer {tokenizer.name_or_path!r} "
                "(model.tokenizer) has no chat template; pick a built-in data.template "
                "(alpaca, human_assistant, chatml, raw) or give a Jinja file"
            )
        name = f"the chat template of {tokenizer.name_or_path!r} (data.template=tokenizer)"
        return JinjaTemplate(tokenizer.chat_template, name, special)
    if spec.template.endswith((".jinja", ".j2")) or os.path.isfile(spec.template):
        try:
            with open(os.path.expanduser(spec.template), encoding="utf-8") as f:
                source = f.read()
        except OSError as e:
            raise ValueError(f"data.template={spec.template!r}: cannot read it: {e}") from None
        return JinjaTemplate(source, f"data.template={spec.template!r}", special)
    raise ValueError(
        f"unknown data.template {spec.template!r}; valid: {', '.join(BUILTIN)}, "
        "tokenizer (the tokenizer's chat template), format (data.template_format.*), or the "
        "path of a .jinja file"
    )


def template_id(template) -> str:
    """The template's identity, for the cache key."""
    if isinstance(template, JinjaTemplate):
        return "jinja:" + template.source
    return "format:" + repr(dataclasses.asdict(template))
