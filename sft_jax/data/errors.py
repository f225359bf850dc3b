"""Why a row was not trained on: one vocabulary for errors, skip counts and reports.

A *bad row* (malformed, missing or mistyped field, …) stops the run with a message naming
the file, line and field, unless `data.on_bad_row=skip`, which counts it under its reason.
*Length* drops (the prompt alone over `data.max_seq_len`, …) are always counted, never
errors: they depend on the config, not on the data being wrong.
"""

from __future__ import annotations

import dataclasses

# reason -> what to do about it (shown in errors and reports).
BAD_ROW_REASONS = {
    "malformed_json": "fix the JSON on that line",
    "not_utf8": "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)",
    "not_an_object": "each row must be a JSON object with named fields",
    "missing_field": "add the field, or map your column name with data.fields=<ours>=<yours>",
    "not_a_string": "the field must be a string (a list of messages for messages/sharegpt)",
    "empty_field": "give the field some text, or remove the row",
    "bad_messages": "a conversation is a list of {role, content} objects, system first if any",
    "unknown_role": (
        "roles are system/user/assistant (messages) or system/human/gpt (sharegpt); map "
        "others with data.fields=role.assistant=<yours>"
    ),
    "no_assistant_turn": "a conversation needs at least one assistant turn to learn from",
    "special_token_text": (
        "the text holds a special token of the tokenizer, which it would read as a control "
        "token; remove it from the data"
    ),
    "template_error": "the chat template rejected this conversation",
}
LENGTH_REASONS = {
    "prompt_too_long": (
        "the prompt alone fills data.max_seq_len; raise it, or set "
        "data.long_prompt=truncate_left to cut the prompt from the left"
    ),
    "too_long": "over data.max_seq_len with data.too_long=drop",
    "no_loss_tokens": "no token left to train on (e.g. an empty response after truncation)",
}
REASONS = {**BAD_ROW_REASONS, **LENGTH_REASONS}
# Stable small codes for per-row status arrays: 0 = kept.
CODES = {reason: i for i, reason in enumerate(REASONS, start=1)}
NAMES = {i: reason for reason, i in CODES.items()}


class RowError(ValueError):
    """A row that cannot be used; `reason` is a key of BAD_ROW_REASONS, `field` names the
    column (as the user's data names it) when there is one."""

    def __init__(self, reason: str, problem: str, field: str = ""):
        assert reason in BAD_ROW_REASONS, reason
        super().__init__(f"field {field!r} {problem}" if field else problem)
        self.reason = reason
        self.field = field


@dataclasses.dataclass(frozen=True)
class BadRow:
    """Stands in for a row the reader could not parse (bad JSON, bad bytes)."""

    reason: str
    problem: str


def hint(reason: str) -> str:
    return REASONS.get(reason, "")
