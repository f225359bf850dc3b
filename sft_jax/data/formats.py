"""Row shapes -> one conversation type: a list of `Message`s (and the row's tools).

Formats (config key `data.format`):

    alpaca             instruction, input (optional), output, system (optional), history
                       (optional: earlier [instruction, response] pairs, context only)
    prompt_completion  prompt, completion: strings, or lists of messages (TRL's conversational form)
    messages           messages: [{role: system|user|assistant|tool, content}, ...], multi-turn
    sharegpt           conversations: [{from: system|human|gpt|function_call|observation, value}],
                       multi-turn; optional system and tools fields beside it
    auto               decided from the first row's fields

What a message may carry besides role and content (OpenAI's chat shape, which TRL and
transformers' chat templates read):
- `content`: a string, or a list of parts [{type: text, text (or value)}, ...] joined in
  order; a part of another type (image, audio) is a `non_text_content` row error;
- assistant `tool_calls`: [{type: function, function: {name, arguments}}] or [{name,
  arguments}]; `arguments` an object or its JSON string (parsed, so every template gets an
  object); `content` may then be empty or null;
- assistant `reasoning_content`: the turn's thoughts (a `<think>` block inside `content`
  stays in the content, where reasoning templates look for it);
- a `tool` message (sharegpt `observation`): a tool's result, with optional `name` and
  `tool_call_id`; sharegpt `function_call`: an assistant turn whose value is the call(s) as
  JSON ({name, arguments} or a list of them), LLaMA-Factory's shape;
- `train`, `weight` or `loss_weight`: 0/false masks that turn (axolotl, LLaMA-Factory).
A row's `tools` (a list of JSON-schema function definitions, or its JSON string) is read
by `tools`. `data.fields` (parsed into `spec.Fields`) renames fields for data sets that
name them differently, and adds role names: "instruction=question,output=answer" or
"messages=dialog,role.assistant=bot" (`role.user=observation` reads tool results as user
turns). Every check raises `RowError` naming the field as the user's data names it.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Mapping

from sft_jax.data.spec import Fields, RowError

NO_RENAMES = Fields()  # data.fields=""
_DEFAULT_ROLES = {
    "messages": {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool"},
    "sharegpt": {
        "system": "system",
        "human": "user",
        "gpt": "assistant",
        "observation": "tool",
        "tool": "tool",
        "function_call": "function_call",
    },
}
_TRAIN_KEYS = ("train", "weight", "loss_weight")  # Per-message 0/1 flags, any of these names.


@dataclasses.dataclass(frozen=True)
class Message:
    role: str  # system | user | assistant | tool
    content: str
    input: str = ""  # Alpaca's optional input, kept apart for the alpaca template.
    field: str = ""  # Where `content` came from in the row, for error messages.
    # Assistant turns: OpenAI-shaped calls, {type: function, function: {name, arguments: {}}}.
    tool_calls: tuple[dict, ...] = ()
    reasoning: str = ""  # Assistant turns: reasoning_content.
    name: str = ""  # Tool results: the tool's name, if the row gives it.
    tool_call_id: str = ""  # Tool results: the call answered, if the row gives it.
    train: bool = True  # False: the row says not to train this turn (context only).

    def text(self) -> str:
        """The content with an Alpaca input appended, for templates without an input slot."""
        return f"{self.content}\n\n{self.input}" if self.input else self.content

    def as_dict(self) -> dict:
        """The message as chat templates read it: keys beyond role/content only if set."""
        d = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            d["tool_calls"] = [dict(c) for c in self.tool_calls]
        if self.reasoning:
            d["reasoning_content"] = self.reasoning
        if self.name:
            d["name"] = self.name
        if self.tool_call_id:
            d["tool_call_id"] = self.tool_call_id
        return d


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
    if col in row:  # there, but null
        return RowError("missing_field", "is null; give it a value or remove the row", where + col)
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
    keys = (
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
        m = _message(item, where, "role" if fmt == "messages" else "from", keys, roles, fields)
        if m.role == "system":
            if i:
                raise RowError(
                    "bad_messages",
                    f"is a system message at position {i}; only the first message may be one",
                    where,
                )
            if not m.content.strip():
                continue
        elif not (m.content.strip() or m.tool_calls or m.reasoning or m.role == "tool"):
            raise RowError("empty_field", "is empty", m.field)
        out.append(m)
    return out


def _message(
    m, where: str, role_name: str, keys: tuple[str, str], roles: dict[str, str], fields: Fields
) -> Message:
    """One role/content object (`where` in the row) -> a Message with our role name."""
    role_key, content_key = keys
    if not isinstance(m, Mapping):
        raise RowError("bad_messages", f"must be an object, got {type(m).__name__}", where)
    role = m.get(role_key)
    if role is None:
        raise _missing(m, role_key, role_name, f"{where}.")
    if not isinstance(role, str) or role not in roles:
        raise RowError(
            "unknown_role",
            f"is {role!r}; known: {', '.join(sorted(roles))}",
            f"{where}.{role_key}",
        )
    ours, field = roles[role], f"{where}.{content_key}"
    train = _train_flag(m, where)
    if ours == "function_call":  # LLaMA-Factory: the value is the call(s), as JSON.
        calls = tool_calls(_parse_json(m.get(content_key), field), field)
        return Message("assistant", "", field=field, tool_calls=calls, train=train)
    raw = m.get(content_key)
    calls_key = fields.col("tool_calls")
    calls = tool_calls(m.get(calls_key), f"{where}.{calls_key}") if ours == "assistant" else ()
    if raw is None and not calls:
        raise RowError("missing_field", "is missing", field)
    if ours == "tool" and isinstance(raw, Mapping | int | float | bool):
        raw = json.dumps(raw, ensure_ascii=False)  # A result given as a JSON value.
    if ours == "assistant":
        extra = {"reasoning": _optional_string(m, fields.col("reasoning_content"), where)}
    elif ours == "tool":
        extra = {key: _optional_string(m, key, where) for key in ("name", "tool_call_id")}
    else:
        extra = {}
    text = content(raw, field) if raw is not None else ""
    return Message(ours, text, field=field, tool_calls=calls, train=train, **extra)


def content(value, field: str) -> str:
    """A message's content: a string, or text parts [{type: text, text | value}] joined in
    order. Raises RowError (`non_text_content`) for an image, audio or other part."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise RowError(
            "not_a_string",
            f"must be a string or a list of text parts, got {type(value).__name__} {value!r:.40}",
            field,
        )
    texts = []
    for j, part in enumerate(value):
        kind = part.get("type", "text") if isinstance(part, Mapping) else None
        text = part.get("text", part.get("value")) if isinstance(part, Mapping) else None
        if kind != "text":
            raise RowError(
                "non_text_content",
                f"is a {kind!r} part" if kind else f"is not a {{type, text}} part: {part!r:.40}",
                f"{field}[{j}]",
            )
        if not isinstance(text, str):
            raise RowError(
                "not_a_string",
                "is a text part without a string 'text' (or 'value')",
                f"{field}[{j}]",
            )
        texts.append(text)
    return "".join(texts)


def _optional_string(m: Mapping, key: str, where: str) -> str:
    value = m.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowError(
            "not_a_string",
            f"must be a string, got {type(value).__name__} {value!r:.40}",
            f"{where}.{key}",
        )
    return value


def _train_flag(m: Mapping, where: str) -> bool:
    """False if the message says not to train it (train / weight / loss_weight: 0 or false)."""
    for key in _TRAIN_KEYS:
        value = m.get(key)
        if value is None:
            continue
        if value not in (0, 1) or isinstance(value, str):  # True == 1, False == 0
            raise RowError(
                "bad_messages",
                f"is {value!r}; a turn is trained (1, true) or not (0, false)",
                f"{where}.{key}",
            )
        return bool(value)
    return True


def _parse_json(value, field: str):
    """A JSON string's value (other values as they are); RowError (`bad_tools`) if invalid."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except (ValueError, RecursionError) as e:
        raise RowError("bad_tools", f"is not valid JSON ({e}): {value!r:.60}", field) from None


def tool_calls(value, field: str) -> tuple[dict, ...]:
    """Tool calls in OpenAI's shape, arguments parsed: {type: function, function: {name,
    arguments: {...}}} (with the call's id if given). Accepts that shape or {name,
    arguments}, one call or a list; None -> ()."""
    if value is None:
        return ()
    calls = value if isinstance(value, list) else [value]
    out = []
    for j, call in enumerate(calls):
        where = f"{field}[{j}]" if isinstance(value, list) else field
        fn = call.get("function", call) if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise RowError(
                "bad_tools", f"is not a tool call {{name, arguments}}: {call!r:.60}", where
            )
        args = _parse_json(fn.get("arguments", fn.get("parameters", {})), f"{where}.arguments")
        if not isinstance(args, Mapping):
            raise RowError(
                "bad_tools", f"must be an object, got {args!r:.40}", f"{where}.arguments"
            )
        one = {"type": "function", "function": {"name": fn["name"], "arguments": dict(args)}}
        out.append({**({"id": call["id"]} if call.get("id") else {}), **one})
    return tuple(out)


def tools(row, fields: Fields = NO_RENAMES) -> tuple[dict, ...]:
    """The row's `tools` field: JSON-schema function definitions (a list, or its JSON
    string, as LLaMA-Factory writes it), as given; () if the row has none."""
    if not isinstance(row, Mapping):
        return ()
    col = fields.col("tools")
    return parse_tools(row.get(col), col)


def parse_tools(value, where: str) -> tuple[dict, ...]:
    """A tools list (or its JSON string, or one tool) -> tuple of tool dicts; RowError
    (`bad_tools`) naming `where` if it is not one."""
    if value is None or value == "":
        return ()
    value = _parse_json(value, where)
    items = [value] if isinstance(value, Mapping) else value
    if not isinstance(items, list) or not all(
        isinstance(t, Mapping) and isinstance(t.get("function", t).get("name"), str) for t in items
    ):
        raise RowError(
            "bad_tools",
            f"is not a list of function definitions {{name, description, "
            f"parameters}}: {value!r:.60}",
            where,
        )
    return tuple(dict(t) for t in items)


def tool_name(tool: Mapping) -> str:
    """The function name of a tool definition or call, OpenAI-shaped or bare."""
    return tool.get("function", tool)["name"]


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
    return (
        msgs
        + _history(row, fields)
        + [
            Message(
                "user", instruction, input=inp.strip() and inp, field=fields.col("instruction")
            ),
            Message("assistant", output, field=fields.col("output")),
        ]
    )


def _history(row: Mapping, fields: Fields) -> list[Message]:
    """Alpaca's `history` (LLaMA-Factory): earlier [instruction, response] pairs, rendered
    before the instruction as context, never trained."""
    col = fields.col("history")
    pairs = row.get(col)
    if pairs is None:
        return []
    if not isinstance(pairs, list):
        raise RowError("bad_messages", "must be a list of [instruction, response] pairs", col)
    out = []
    for i, pair in enumerate(pairs):
        if not (
            isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)
        ):
            raise RowError(
                "bad_messages",
                f"is not an [instruction, response] pair of strings: {pair!r:.40}",
                f"{col}[{i}]",
            )
        out += [
            Message("user", pair[0], field=f"{col}[{i}][0]", train=False),
            Message("assistant", pair[1], field=f"{col}[{i}][1]", train=False),
        ]
    return out


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
    msgs = _conversation(row[key], key, fmt, fields)
    return _needs_assistant(_with_system_field(row, msgs, fields), key)


def _with_system_field(row: Mapping, msgs: list[Message], fields: Fields) -> list[Message]:
    """The conversation with the row's `system` field (ShareGPT, LLaMA-Factory) first."""
    system = _string(row, "system", fields, required=False, allow_empty=True)
    if not system.strip():
        return msgs
    if msgs and msgs[0].role == "system":
        raise RowError(
            "bad_messages",
            "is set, and the conversation has a system message too; keep one",
            fields.col("system"),
        )
    return [Message("system", system, field=fields.col("system")), *msgs]
