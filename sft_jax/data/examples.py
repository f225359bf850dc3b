"""Raw rows -> training examples: normalise, render, tokenize, fit to max_seq_len.

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
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import transformers

from sft_jax.data import encode, formats, templates
from sft_jax.data.spec import CODES, BadRow, Fields, FormatTemplate, RowError

RESPONSE_CUT, PROMPT_CUT, NO_END_TOKEN = 1, 2, 4  # Bits of a row's flags.
_KEEP_PROBLEMS = 3  # Messages kept per reason per chunk (the first one is what errors show).


@dataclasses.dataclass(frozen=True)
class Encoder:
    """Everything that turns a raw row into an example; pickles to worker processes."""

    format: str  # Resolved: never "auto".
    fields: Fields
    template: FormatTemplate | templates.JinjaTemplate
    tokenizer: transformers.PreTrainedTokenizerBase
    train_on: str = "response"
    assistant_turns: str = "all"
    max_seq_len: int = 512
    too_long: str = "truncate"
    long_prompt: str = "drop"
    special: re.Pattern | None = None
    bos: int | None = None  # Prepended to format-template examples (tokenizer's own habit).

    def render(self, messages: list[formats.Message]) -> templates.Rendered:
        if isinstance(self.template, templates.JinjaTemplate):
            return self.template.render(messages, self.assistant_turns)
        tok = self.tokenizer
        return templates.render_format(
            self.template, messages, tok.eos_token, tok.bos_token or "", self.assistant_turns
        )

    def ends_unmarked(self, r: templates.Rendered) -> bool:
        """Whether a response ends without a special token (EOS, end of turn) of the
        tokenizer: then the model learns to stop only on text, if at all."""
        if self.special is None:
            return True
        end = re.compile(f"(?:{self.special.pattern})\\Z")  # `re` caches the compiled pattern.
        return any(not end.search(r.text[max(s, e - 64) : e]) for s, e in r.spans)

    def check_special(self, messages: list[formats.Message]) -> None:
        if self.special is None:
            return
        for m in messages:
            for text, field in ((m.content, m.field), (m.input, self.fields.col("input"))):
                if match := self.special.search(text):
                    raise RowError(
                        "special_token_text", f"holds the special token text {match[0]!r}", field
                    )

    def messages(self, row) -> list[formats.Message]:
        """Raw row -> checked conversation; raises RowError."""
        messages = formats.to_messages(row, self.format, self.fields)
        self.check_special(messages)
        return messages


@dataclasses.dataclass
class Chunk:
    """The outcome of a chunk of rows, in compact arrays (cheap to send between processes)."""

    status: np.ndarray  # [rows] int8: 0 kept, else CODES[reason]
    flags: np.ndarray  # [rows] uint8: RESPONSE_CUT | PROMPT_CUT
    lengths: np.ndarray  # [kept] int64: ids per kept example
    ids: np.ndarray  # [sum(lengths)] int32
    trainable: np.ndarray  # [sum(lengths)] bool
    problems: dict[int, str]  # row in chunk -> what is wrong (the first few per reason)


def fit(
    ids: np.ndarray, trainable: np.ndarray, enc: Encoder
) -> tuple[np.ndarray, np.ndarray, int] | str:
    """Applies the length policy: (ids, trainable, flags), or the reason for dropping."""
    limit = enc.max_seq_len + 1  # n + 1 ids give n positions.
    if not trainable[1:].any():
        return "no_loss_tokens"
    n = len(ids)
    if n <= limit:
        return ids, trainable, 0
    if enc.too_long != "truncate":
        return "too_long"
    first = 1 + int(np.argmax(trainable[1:]))  # First trained id (a target, so index >= 1).
    if first < limit:
        return ids[:limit], trainable[:limit], RESPONSE_CUT
    if enc.long_prompt == "drop":
        return "prompt_too_long"
    tok = enc.tokenizer
    bos = enc.bos if enc.bos is not None else tok.bos_token_id
    head = int(bos is not None and bos != tok.eos_token_id and ids[0] == bos)  # Kept: a BOS.
    room = limit - head
    keep_resp = max(1, min(n - first, room // 2))
    keep_prompt = room - keep_resp
    cut = np.r_[0:head, first - keep_prompt : first + keep_resp]
    flags = PROMPT_CUT | (RESPONSE_CUT if keep_resp < n - first else 0)
    return ids[cut], trainable[cut], flags


def encode_chunk(rows: list, enc: Encoder) -> Chunk:
    """Normalise, check, render, tokenize (one batched call) and fit a chunk of raw rows."""
    n = len(rows)
    status = np.zeros(n, np.int8)
    flags = np.zeros(n, np.uint8)
    problems: dict[int, str] = {}
    seen: dict[str, int] = {}

    def drop(i: int, reason: str, problem: str) -> None:
        status[i] = CODES[reason]
        if seen.get(reason, 0) < _KEEP_PROBLEMS:
            problems[i] = problem
            seen[reason] = seen.get(reason, 0) + 1

    rendered, where = [], []
    for i, row in enumerate(rows):
        if isinstance(row, BadRow):
            drop(i, row.reason, row.problem)
            continue
        try:
            r = enc.render(enc.messages(row))
            rendered.append(r)
            where.append(i)
            if enc.ends_unmarked(r):
                flags[i] |= NO_END_TOKEN
        except RowError as e:
            drop(i, e.reason, str(e))
    kept_ids, kept_tr, lengths = [], [], []
    if rendered:
        for i, (ids, trainable) in zip(
            where, encode.encode(rendered, enc.tokenizer, enc.train_on, enc.bos), strict=True
        ):
            out = fit(ids, trainable, enc)
            if isinstance(out, str):
                drop(i, out, f"{len(ids)} tokens, data.max_seq_len={enc.max_seq_len}")
                continue
            ids, trainable, fit_flags = out
            flags[i] |= fit_flags
            kept_ids.append(ids)
            kept_tr.append(trainable)
            lengths.append(len(ids))
    return Chunk(
        status=status,
        flags=flags,
        lengths=np.asarray(lengths, np.int64),
        ids=np.concatenate(kept_ids) if kept_ids else np.zeros(0, np.int32),
        trainable=np.concatenate(kept_tr) if kept_tr else np.zeros(0, np.bool_),
        problems=problems,
    )
