"""A raw row -> a training example (token ids and trainable flags) or the reason it is
dropped; and the prompt that generation gives the model for a row.

Tokenizing (`encode`): each text is tokenized whole, once, with the tokenizer reading
special tokens the way it does at inference (so `<|im_end|>` written by a template is one
token): the tokens at a turn boundary are those the model will see, never pieces glued
together. A token is trainable if its character range overlaps a span. Data whose text
holds a special token's text is refused first (`Encoder.check_special`), so every special
token here was written by the template.

`encode_chunk` is the unit of work of the build: a pure function of (rows, Encoder), run
in this process or in worker processes. It never raises for bad data; every row gets a
status (kept, or a reason from spec.py) so the caller can apply `data.on_bad_row` with
the row's file and line in hand.

Length policy, per example of n + 1 ids (n positions) against limit = max_seq_len + 1:
- fits: kept.
- `too_long=drop` (or `error`): dropped as `too_long` (the caller raises for `error`).
- `too_long=truncate` (default), some trained target within the limit: the response is
  cut on the right; flagged `RESPONSE_CUT` (it lost its EOS).
- the prompt alone fills the limit: dropped as `prompt_too_long`, or with
  `long_prompt=truncate_left` the prompt is cut from the left (a leading BOS, prepended or
  written by a chat template, stays) to leave room for up to half the row of response.
- no trainable target left: dropped as `no_loss_tokens`. Never a silently empty mask.

A conversation split per assistant turn (`data.split_turns`, templates.py) gives several
examples from one row; each is fitted alone. The row is kept if any of them is (flagged
`TURNS_DROPPED` if not all), else dropped with the first one's reason.

`prompt_ids(row, spec, tokenizer)` renders a row with a placeholder response and returns
the ids before the first trained token: exactly what the model saw before each response
in training, including where a template's trailing space went into the response's first
token (" Blue" after "Assistant:"), which rendering the prompt text alone would get wrong.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from collections.abc import Sequence

import numpy as np
import transformers

from sft_jax.data import formats, templates
from sft_jax.data.packing import Examples, offsets
from sft_jax.data.spec import CODES, BadRow, DataSpec, Fields, FormatTemplate, RowError
from sft_jax.data.spec import hint as spec_hint
from sft_jax.data.templates import Rendered

# Bits of a row's flags. SPLIT_TURNS: its conversation became one example per assistant
# turn; TURNS_DROPPED: some (not all) of those were dropped for length. TOOLS_UNRENDERED,
# REASONING_UNRENDERED: the row has tools (a tool definition, call or result) or reasoning
# of a trained turn that the chat template did not write (it cannot express them).
RESPONSE_CUT, PROMPT_CUT, NO_END_TOKEN, SPLIT_TURNS, TURNS_DROPPED = 1, 2, 4, 8, 16
TOOLS_UNRENDERED, REASONING_UNRENDERED = 32, 64
_KEEP_PROBLEMS = 3  # Messages kept per reason per chunk (the first one is what errors show).
_PLACEHOLDER = "x"  # A letter: no template joins it to what comes before.


# ---------------------------------------------------------------- text -> ids and flags


def special_token_pattern(tokenizer: transformers.PreTrainedTokenizerBase) -> re.Pattern | None:
    """A regex matching the text of any special token the tokenizer would read as one."""
    texts = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    texts |= {t for t in tokenizer.all_special_tokens if t}
    if not texts:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True)))


def bos_to_prepend(tokenizer: transformers.PreTrainedTokenizerBase) -> int | None:
    """The BOS id if the tokenizer itself would prepend a BOS distinct from EOS, else None."""
    bos = tokenizer.bos_token_id
    if bos is None or bos == tokenizer.eos_token_id:
        return None  # GPT-2: bos == eos, and GPT-2 was trained without a leading BOS.
    # Ask the tokenizer rather than read flags: their names differ between tokenizer classes.
    return bos if tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos] else None


@contextlib.contextmanager
def _special_tokens_recognised(backend):
    # The transformers wrapper sets this flag per call (split_special_tokens); make sure it
    # is off, and leave it as we found it.
    saved = backend.encode_special_tokens
    backend.encode_special_tokens = False
    try:
        yield
    finally:
        backend.encode_special_tokens = saved


def encode(
    rendered: Sequence[Rendered],
    tokenizer: transformers.PreTrainedTokenizerBase,
    train_on: str = "response",
    bos: int | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids int32, trainable bool) per text, in one batched call of the fast tokenizer.

    `train_on="all"` trains every token but a prepended `bos`."""
    return [
        (ids, trainable) for ids, trainable, _ in encode_marked(rendered, tokenizer, train_on, bos)
    ]


def encode_marked(
    rendered: Sequence[Rendered],
    tokenizer: transformers.PreTrainedTokenizerBase,
    train_on: str = "response",
    bos: int | None = None,
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """`encode`, and per text which tokens are reasoning (overlap `Rendered.reasoning`)."""
    backend = tokenizer.backend_tokenizer
    with _special_tokens_recognised(backend):
        encodings = backend.encode_batch([r.text for r in rendered], add_special_tokens=False)
    head = [bos] if bos is not None else []
    out = []
    for r, enc in zip(rendered, encodings, strict=True):
        ids = np.asarray(head + enc.ids, np.int32)
        trainable = np.zeros(len(ids), np.bool_)
        reasoning = np.zeros(len(ids), np.bool_)
        off = np.asarray(enc.offsets, np.int64).reshape(-1, 2)
        if train_on == "all":
            trainable[len(head) :] = True
        else:
            trainable[len(head) :] = _overlapping(off, r.spans)
        reasoning[len(head) :] = _overlapping(off, r.reasoning)
        out.append((ids, trainable, reasoning))
    return out


def _overlapping(offsets: np.ndarray, spans) -> np.ndarray:
    """[tokens] bool: whether each token's [start, end) character range overlaps a span."""
    start = offsets[:, 0]
    end = np.maximum(offsets[:, 1], start + 1)  # A zero-width token counts at its start.
    hit = np.zeros(len(offsets), np.bool_)
    for s, e in spans:
        hit |= (start < e) & (end > s)  # Any overlap with the span.
    return hit


# ---------------------------------------------------------------- a row -> an example


@dataclasses.dataclass(frozen=True)
class Encoder:
    """Everything that turns a raw row into an example; pickles to worker processes."""

    format: str  # Resolved: never "auto".
    fields: Fields
    template: FormatTemplate | templates.JinjaTemplate
    tokenizer: transformers.PreTrainedTokenizerBase
    train_on: str = "response"
    assistant_turns: str = "all"
    split_turns: str = "auto"
    max_seq_len: int = 512
    too_long: str = "truncate"
    long_prompt: str = "drop"
    special: re.Pattern | None = None
    bos: int | None = None  # Prepended to format-template examples (tokenizer's own habit).
    train_reasoning: bool = True
    tools: tuple[dict, ...] = ()  # data.tools: for rows without a tools field.

    def render(self, messages: list[formats.Message], tools: Sequence[dict] = ()) -> Rendered:
        """The whole conversation as one example (never split)."""
        if isinstance(self.template, templates.JinjaTemplate):
            r = self.template.render(messages, self.assistant_turns, tools)
        else:
            r = self._format(messages, self.assistant_turns, tools)
        return templates.with_reasoning(r, self.train_reasoning)

    def training_examples(
        self, messages: list[formats.Message], tools: Sequence[dict] = ()
    ) -> list[Rendered]:
        """What trains on a conversation: `render_examples`, or with train_on="all" the whole
        text as the template writes it, once (no spans needed, so never split: a split
        would train the earlier turns again in every later example)."""
        if self.train_on == "all" and isinstance(self.template, templates.JinjaTemplate):
            return [self.template.render_text_only(messages, tools)]
        return self.render_examples(messages, tools)

    def render_examples(
        self, messages: list[formats.Message], tools: Sequence[dict] = ()
    ) -> list[Rendered]:
        """The examples of a conversation: one, or one per assistant turn where it is split
        (`split_turns`; format templates are prefix-stable, so only "always" splits them);
        reasoning marked, and untrained under data.train_reasoning=False."""
        if isinstance(self.template, templates.JinjaTemplate):
            out = self.template.render_examples(
                messages, self.assistant_turns, self.split_turns, tools
            )
        elif self.split_turns != "always":
            out = [self._format(messages, self.assistant_turns, tools)]
        else:
            ends = [k + 1 for k, m in enumerate(messages) if m.role == "assistant" and m.train]
            if self.assistant_turns == "last":
                ends = ends[-1:]
            out = [self._format(messages[:end], "last", tools) for end in ends]
        return [templates.with_reasoning(r, self.train_reasoning) for r in out]

    def _format(
        self, messages: list[formats.Message], assistant_turns: str, tools: Sequence[dict] = ()
    ) -> Rendered:
        tok = self.tokenizer
        return templates.render_format(
            self.template, messages, tok.eos_token, tok.bos_token or "", assistant_turns, tools
        )

    def unrendered(
        self, messages: list[formats.Message], tools: Sequence[dict], rendered: list[Rendered]
    ) -> int:
        """Flags (TOOLS_UNRENDERED, REASONING_UNRENDERED) for what the row has that the
        template left out of every example: a tool's or call's name, a tool result, the
        reasoning of a trained turn. Format templates write all of it or refuse the row."""
        if not isinstance(self.template, templates.JinjaTemplate) or self.train_on == "all":
            return 0
        text = "\0".join(r.text for r in rendered)
        trained = [m for m in messages if m.role == "assistant" and m.train]
        if self.assistant_turns == "last":
            trained = trained[-1:]
        tool_texts = [formats.tool_name(t) for t in tools]
        for m in messages:
            tool_texts += [formats.tool_name(c) for c in m.tool_calls]
            tool_texts += [m.content.strip()] if m.role == "tool" and m.content.strip() else []
        flags = TOOLS_UNRENDERED * any(t not in text for t in tool_texts)
        thoughts = [m.reasoning.strip() for m in trained if m.reasoning.strip()]
        return flags | REASONING_UNRENDERED * any(t not in text for t in thoughts)

    def ends_unmarked(self, r: Rendered) -> bool:
        """Whether a response ends without a special token (EOS, end of turn) of the
        tokenizer: then the model learns to stop only on text, if at all."""
        if self.special is None:
            return True
        end = re.compile(f"(?:{self.special.pattern})\\Z")  # `re` caches the compiled pattern.
        return any(not end.search(r.text[max(s, e - 64) : e]) for s, e in r.spans)

    def check_special(self, messages: list[formats.Message], tools: Sequence[dict] = ()) -> None:
        if self.special is None:
            return
        texts = [(templates.dumps(list(tools)), self.fields.col("tools"))] if tools else []
        for m in messages:
            calls = templates.dumps(list(m.tool_calls))
            texts += [
                (m.content, m.field),
                (m.input, self.fields.col("input")),
                (m.reasoning, m.field),
                (calls, m.field),
            ]
        for text, field in texts:
            if match := self.special.search(text):
                raise RowError(
                    "special_token_text", f"holds the special token text {match[0]!r}", field
                )

    def messages(self, row) -> list[formats.Message]:
        """Raw row -> checked conversation; raises RowError."""
        return self.conversation(row)[0]

    def conversation(self, row) -> tuple[list[formats.Message], tuple[dict, ...]]:
        """Raw row -> checked (conversation, tools: the row's, else data.tools); raises
        RowError."""
        messages = formats.to_messages(row, self.format, self.fields)
        tools = formats.tools(row, self.fields) or self.tools
        self.check_special(messages, tools)
        return messages, tools


def make_encoder(spec: DataSpec, tokenizer, template, fmt: str) -> Encoder:
    """The Encoder of a spec's settings for rows of format `fmt` (resolved, not auto)."""
    uses_bos = not isinstance(template, templates.JinjaTemplate) and "{bos}" in repr(template)
    bos = (
        None
        if isinstance(template, templates.JinjaTemplate) or uses_bos
        else bos_to_prepend(tokenizer)
    )
    return Encoder(
        train_reasoning=spec.train_reasoning,
        tools=load_tools(spec.tools),
        format=fmt,
        fields=Fields.parse(spec.fields),
        template=template,
        tokenizer=tokenizer,
        train_on=spec.train_on,
        assistant_turns=spec.assistant_turns,
        split_turns=spec.split_turns,
        max_seq_len=spec.max_seq_len,
        too_long=spec.too_long,
        long_prompt=spec.long_prompt,
        special=special_token_pattern(tokenizer),
        bos=bos,
    )


def load_tools(value: str) -> tuple[dict, ...]:
    """`data.tools`: a JSON list of function definitions, or the path of a .json file."""
    if value.strip().endswith(".json") and not value.lstrip().startswith(("[", "{")):
        try:
            with open(os.path.expanduser(value.strip()), encoding="utf-8-sig") as f:
                value = f.read()
        except OSError as e:
            raise ValueError(f"data.tools={value!r}: cannot read it: {e}") from None
    try:
        return formats.parse_tools(value, "data.tools")
    except RowError as e:
        raise ValueError(f"{e}; {spec_hint('bad_tools')}") from None


@dataclasses.dataclass(frozen=True, eq=False)
class Chunk(Examples):
    """The outcome of some rows (a chunk, or a whole source): the examples of the kept rows,
    back to back, and every row's status. Compact arrays, cheap to send between processes."""

    status: np.ndarray  # [rows] int8: 0 kept, else CODES[reason]
    flags: np.ndarray  # [rows] uint8: RESPONSE_CUT | PROMPT_CUT | … (the bits above)
    problems: dict[int, str]  # row -> what is wrong (the first few per reason and chunk)
    # [rows] int32: examples of each row, in row order (0 if dropped, > 1 if split per turn).
    # None: one per kept row (what a reader that does not store it meant).
    examples_per_row: np.ndarray | None = None
    # [rows] int32: tokens of each row's examples in <think> blocks of assistant turns
    # (trained unless data.train_reasoning=False). None: zeros (an older reader's chunk).
    reasoning_tokens: np.ndarray | None = None

    def __post_init__(self):
        if self.examples_per_row is None:
            object.__setattr__(self, "examples_per_row", (self.status == 0).astype(np.int32))
        if self.reasoning_tokens is None:
            object.__setattr__(self, "reasoning_tokens", np.zeros(len(self.status), np.int32))

    def example_rows(self) -> np.ndarray:
        """[examples] int64: the row of each example."""
        return np.repeat(np.arange(len(self.status)), self.examples_per_row)

    @classmethod
    def concat(cls, parts: Sequence[Chunk]) -> Chunk:
        """The rows of `parts`, one part after another."""
        first_row = offsets([len(c.status) for c in parts])
        return cls(
            ids=np.concatenate([c.ids for c in parts]),
            trainable=np.concatenate([c.trainable for c in parts]),
            starts=offsets(np.concatenate([c.lengths for c in parts])),
            status=np.concatenate([c.status for c in parts]),
            flags=np.concatenate([c.flags for c in parts]),
            problems={
                int(row) + i: p
                for c, row in zip(parts, first_row, strict=False)
                for i, p in c.problems.items()
            },
            examples_per_row=np.concatenate([c.examples_per_row for c in parts]),
            reasoning_tokens=np.concatenate([c.reasoning_tokens for c in parts]),
        )


def fit(
    ids: np.ndarray, trainable: np.ndarray, enc: Encoder
) -> tuple[np.ndarray, np.ndarray, int] | str:
    """Applies the length policy: (ids, trainable, flags), or the reason for dropping."""
    out = fit_index(ids, trainable, enc)
    if isinstance(out, str):
        return out
    keep, flags = out
    return ids[keep], trainable[keep], flags


def fit_index(ids: np.ndarray, trainable: np.ndarray, enc: Encoder) -> tuple | str:
    """The length policy as (the ids kept: a slice or an index array, flags), or the reason
    for dropping."""
    limit = enc.max_seq_len + 1  # n + 1 ids give n positions.
    if not trainable[1:].any():
        return "no_loss_tokens"
    n = len(ids)
    if n <= limit:
        return slice(None), 0
    if enc.too_long != "truncate":
        return "too_long"
    first = 1 + int(np.argmax(trainable[1:]))  # First trained id (a target, so index >= 1).
    if first < limit:  # a response lost its end only if the cut falls inside a trained run
        return slice(0, limit), RESPONSE_CUT if trainable[limit - 1] and trainable[limit] else 0
    if enc.long_prompt == "drop":
        return "prompt_too_long"
    tok = enc.tokenizer
    bos = enc.bos if enc.bos is not None else tok.bos_token_id
    head = int(bos is not None and bos != tok.eos_token_id and ids[0] == bos)  # Kept: a BOS.
    room = limit - head
    keep_resp = max(1, min(n - first, room // 2))
    keep_prompt = room - keep_resp
    cut = np.r_[0:head, first - keep_prompt : first + keep_resp]
    return cut, PROMPT_CUT | (RESPONSE_CUT if keep_resp < n - first else 0)


def encode_chunk(rows: list, enc: Encoder) -> Chunk:
    """Normalise, check, render, tokenize (one batched call) and fit a chunk of raw rows."""
    n = len(rows)
    status = np.zeros(n, np.int8)
    flags = np.zeros(n, np.uint8)
    per_row = np.zeros(n, np.int32)
    reasoning_tokens = np.zeros(n, np.int32)
    problems: dict[int, str] = {}
    seen: dict[str, int] = {}

    def drop(i: int, reason: str, problem: str) -> None:
        status[i] = CODES[reason]
        if seen.get(reason, 0) < _KEEP_PROBLEMS:
            problems[i] = problem
            seen[reason] = seen.get(reason, 0) + 1

    rendered, where = _render_rows(rows, enc, drop, flags)
    kept_ids, kept_tr, lengths = [], [], []
    length_drops: dict[int, tuple[str, str]] = {}  # row -> its first example's drop
    if rendered:
        for i, (ids, trainable, reasoning) in zip(
            where, encode_marked(rendered, enc.tokenizer, enc.train_on, enc.bos), strict=True
        ):
            out = fit_index(ids, trainable, enc)
            if isinstance(out, str):
                problem = f"{len(ids)} tokens, data.max_seq_len={enc.max_seq_len}"
                length_drops.setdefault(i, (out, problem))
                continue
            keep, fit_flags = out
            flags[i] |= fit_flags
            per_row[i] += 1
            reasoning_tokens[i] += int(reasoning[keep].sum())
            kept_ids.append(ids[keep])
            kept_tr.append(trainable[keep])
            lengths.append(len(kept_ids[-1]))
    for i, (reason, problem) in length_drops.items():
        if per_row[i]:  # Some turns of a split conversation stay.
            flags[i] |= TURNS_DROPPED
        else:
            drop(i, reason, problem)
    return Chunk(
        ids=np.concatenate(kept_ids) if kept_ids else np.zeros(0, np.int32),
        trainable=np.concatenate(kept_tr) if kept_tr else np.zeros(0, np.bool_),
        starts=offsets(lengths),
        status=status,
        flags=flags,
        problems=problems,
        examples_per_row=per_row,
        reasoning_tokens=reasoning_tokens,
    )


def _render_rows(rows: list, enc: Encoder, drop, flags: np.ndarray):
    """(the rendered examples of the rows that render, the row of each); `drop(row, reason,
    problem)` for the others, and each row's rendering flags set in `flags`."""
    rendered, where = [], []
    for i, row in enumerate(rows):
        if isinstance(row, BadRow):
            drop(i, row.reason, row.problem)
            continue
        try:
            messages, tools = enc.conversation(row)
            examples = enc.training_examples(messages, tools)
        except RowError as e:
            drop(i, e.reason, str(e))
            continue
        flags[i] |= enc.unrendered(messages, tools, examples)
        rendered += examples
        where += [i] * len(examples)
        if len(examples) > 1:
            flags[i] |= SPLIT_TURNS
        if any(enc.ends_unmarked(r) for r in examples):
            flags[i] |= NO_END_TOKEN
    return rendered, where


# ---------------------------------------------------------------- generation prompts


def prompt_ids(
    row: dict | str, spec: DataSpec, tokenizer: transformers.PreTrainedTokenizerBase
) -> list[int]:
    """Ids to generate the response to `row`: a row of `spec.format` whose response is
    missing, empty or to be replaced (a final assistant turn), or a plain prompt string."""
    if isinstance(row, str):
        row = {"messages": [{"role": "user", "content": row}]}
    fields = Fields.parse(spec.fields)
    fmt = spec.format
    if fmt == "auto":  # The response field may be absent: detect as if it were there.
        blanks = {fields.col("output"): "", fields.col("completion"): ""}
        fmt = formats.detect({**blanks, **row}, fields)
    if fmt == "alpaca":
        row = {**row, fields.col("output"): _PLACEHOLDER}
    elif fmt == "prompt_completion":
        row = {**row, fields.col("completion"): _PLACEHOLDER}
    else:
        key, role, content, assistant = (
            ("messages", "role", "content", "assistant")
            if fmt == "messages"
            else ("conversations", "from", "value", "gpt")
        )
        turns = list(row[fields.col(key)])
        if turns and turns[-1].get(fields.col(role)) in (assistant, "assistant"):
            turns = turns[:-1]
        turns.append({fields.col(role): assistant, fields.col(content): _PLACEHOLDER})
        row = {**row, fields.col(key): turns}
    template = templates.resolve_template(spec, tokenizer)
    # Reasoning trained: the prompt ends where the response (its <think> block first) begins.
    enc = dataclasses.replace(make_encoder(spec, tokenizer, template, fmt), train_reasoning=True)
    # The last example: the whole conversation, or (split per turn) the placeholder's turn.
    rendered = enc.render_examples(*enc.conversation(row))[-1]
    if not rendered.spans:
        raise ValueError(f"data.template={spec.template!r} marks no response in {row!r}")
    # Only the placeholder's span: earlier assistant turns are history here.
    last = Rendered(rendered.text, rendered.spans[-1:])
    ((ids, trainable),) = encode([last], tokenizer, "response", enc.bos)
    return ids[: int(trainable.argmax())].tolist()
