"""Row shapes -> one conversation type: a list of `Message(role, content)`.

Formats (config key `data.format`):

    alpaca             instruction, input (optional), output, system (optional)
    prompt_completion  prompt, completion: strings, or lists of messages (TRL's conversational form)
    messages           messages: [{role: system|user|assistant, content}, ...], multi-turn
    sharegpt           conversations: [{from: system|human|gpt, value}, ...], multi-turn
    auto               decided from the first row's fields

`data.fields` (parsed into `spec.Fields`) renames fields for data sets that name them
differently, and adds role names: "instruction=question,output=answer" or
"messages=dialog,role.assistant=bot".
Every check raises `RowError` naming the field as the user's data names it.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping

from sft_jax.data.spec import Fields, RowError

NO_RENAMES = Fields()  # data.fields=""
_DEFAULT_ROLES = {
    "messages": {"system": "system", "user": "user", "assistant": "assistant"},
    "sharegpt": {"system": "system", "human": "user", "gpt": "assistant"},
}


@dataclasses.dataclass(frozen=True)
class Message:
    role: str  # system | user | assistant
    content: str
    input: str = ""  # Alpaca's optional input, kept apart for the alpaca template.
    field: str = ""  # Where `content` came from in the row, for error messages.

    def text(self) -> str:
        """The content with an Alpaca input appended, for templates without an input slot."""
        return f"{self.content}\n\n{self.input}" if self.input else self.content


def detect(row: Mapping, fields: Fields) -> str:
    """The format of a row, from which fields it has."""
    for fmt, needed in (
        ("messages", ("messages",)),
        ("sharegpt", ("conversations",)),
        ("alpaca", ("instruction", "output")),
        ("prompt_completion", ("prompt", "completion")),
    ):
        if all(fields.col(f) in row for f in needed):
            return fmt
    raise ValueError(
        f"data.format=auto: cannot tell the format from the fields {sorted(row)}. Expected "
        "messages, conversations, instruction+output or prompt+completion; set data.format "
        "and map differently named fields with data.fields=<ours>=<yours>"
    )


def _missing(row: Mapping, col: str, ours: str, where: str = "") -> RowError:
    close = difflib.get_close_matches(col, [str(k) for k in row], n=1, cutoff=0.6)
    if close:
        extra = f" (the row has {close[0]!r}; if that is it, set data.fields={ours}={close[0]})"
    else:
        extra = f" (the row has {sorted(map(str, row))})"
    return RowError("missing_field", "is missing" + extra, where + col)


def _string(row: Mapping, ours: str, fields: Fields, required=True, allow_empty=False) -> str:
    col = fields.col(ours)
    value = row.get(col)
    if value is None:
        if required:
            raise _missing(row, col, ours)
        return ""
    if not isinstance(value, str):
        raise RowError(
            "not_a_string", f"must be a string, got {type(value).__name__} {value!r:.40}", col
        )
    if not allow_empty and not value.strip():
        raise RowError("empty_field", "is empty", col)
    return value


def _conversation(items, col: str, fmt: str, fields: Fields) -> list[Message]:
    """A list of role/content objects -> messages; `fmt` picks the key and role names. A
    system message may only come first; an empty one is dropped."""
    role_key, content_key = (
        (fields.col("role"), fields.col("content"))
        if fmt == "messages"
        else (fields.col("from"), fields.col("value"))
    )
    roles = {**_DEFAULT_ROLES[fmt], **dict(fields.roles)}
    if not isinstance(items, list):
        raise RowError(
            "bad_messages", f"must be a list of messages, got {type(items).__name__}", col
        )
    if not items:
        raise RowError("bad_messages", "is an empty list", col)
    out = []
    for i, item in enumerate(items):
        where = f"{col}[{i}]"
        m = _message(item, where, "role" if fmt == "messages" else "from", role_key,
                     content_key, roles)  # fmt: skip
        if m.role == "system":
            if i:
                raise RowError(
                    "bad_messages", f"is a system message at position {i}; only the first "
                    "message may be one", where,
                )  # fmt: skip
            if not m.content.strip():
                continue
        elif not m.content.strip():
            raise RowError("empty_field", "is empty", m.field)
        out.append(m)
    return out


def _message(
    m, where: str, role_name: str, role_key: str, content_key: str, roles: dict[str, str]
) -> Message:
    """One role/content object (`where` in the row) -> a Message with our role name."""
    if not isinstance(m, Mapping):
        raise RowError("bad_messages", f"must be an object, got {type(m).__name__}", where)
    role = m.get(role_key)
    if role is None:
        raise _missing(m, role_key, role_name, f"{where}.")
    if not isinstance(role, str) or role not in roles:
        raise RowError(
            "unknown_role", f"is {role!r}; known: {', '.join(sorted(roles))}",
            f"{where}.{role_key}",
        )  # fmt: skip
    content = m.get(content_key)
    field = f"{where}.{content_key}"
    if content is None:
        raise RowError("missing_field", "is missing", field)
    if not isinstance(content, str):
        raise RowError(
            "not_a_string",
            f"must be a string, got {type(content).__name__} {content!r:.40}",
            field,
        )
    return Message(roles[role], content, field=field)


def _needs_assistant(messages: list[Message], col: str) -> list[Message]:
    if not any(m.role == "assistant" for m in messages):
        raise RowError("no_assistant_turn", "has no assistant turn", col)
    return messages


def _alpaca(row: Mapping, fields: Fields) -> list[Message]:
    instruction = _string(row, "instruction", fields)
    inp = _string(row, "input", fields, required=False, allow_empty=True)
    output = _string(row, "output", fields)
    system = _string(row, "system", fields, required=False, allow_empty=True)
    msgs = [Message("system", system, field=fields.col("system"))] if system.strip() else []
    return msgs + [
        Message("user", instruction, input=inp.strip() and inp, field=fields.col("instruction")),
        Message("assistant", output, field=fields.col("output")),
    ]


def _prompt_completion(row: Mapping, fields: Fields) -> list[Message]:
    p_col, c_col = fields.col("prompt"), fields.col("completion")
    if isinstance(row.get(p_col), list) or isinstance(row.get(c_col), list):
        prompt = _conversation(row.get(p_col), p_col, "messages", fields)
        completion = _conversation(row.get(c_col), c_col, "messages", fields)
        if any(m.role != "assistant" for m in completion):
            raise RowError("bad_messages", "may hold assistant messages only", c_col)
        return prompt + completion
    return [
        Message("user", _string(row, "prompt", fields), field=p_col),
        Message("assistant", _string(row, "completion", fields), field=c_col),
    ]


def to_messages(row, fmt: str, fields: Fields = NO_RENAMES) -> list[Message]:
    """One raw row (a dict) of format `fmt` -> its conversation; raises RowError."""
    if not isinstance(row, Mapping):
        raise RowError("not_an_object", f"is a {type(row).__name__}, not an object with fields")
    if fmt == "alpaca":
        return _alpaca(row, fields)
    if fmt == "prompt_completion":
        return _prompt_completion(row, fields)
    key = fields.col("messages" if fmt == "messages" else "conversations")
    if key not in row or row[key] is None:
        raise _missing(row, key, "messages" if fmt == "messages" else "conversations")
    return _needs_assistant(_conversation(row[key], key, fmt, fields), key)
