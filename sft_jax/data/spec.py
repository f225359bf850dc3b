"""The data part of a config as plain values, their checks, and why a row is not trained on.

config.py builds a `DataSpec` from `c.data` (configs/default.py documents every key);
`Fields` and `FormatTemplate` are the parsed values of `data.fields` and
`data.template_format`. Every check raises ValueError naming the config key.

The drop reasons are one vocabulary for errors, skip counts and reports. A *bad row*
(malformed, missing or mistyped field, …) stops the run with a message naming the file,
line and field, unless `data.on_bad_row=skip`, which counts it under its reason. *Length*
drops (the prompt alone over `data.max_seq_len`, …) are always counted, never errors: they
depend on the config, not on the data being wrong.
"""

from __future__ import annotations

import dataclasses
import string

# The values each choice key accepts.
FORMATS = ("auto", "alpaca", "prompt_completion", "messages", "sharegpt")
TRAIN_ON = ("response", "all")
ASSISTANT_TURNS = ("all", "last")
SPLIT_TURNS = ("auto", "always", "never")
TOO_LONG = ("truncate", "drop", "error")
LONG_PROMPT = ("drop", "truncate_left")
ON_BAD_ROW = ("error", "skip")
ROLES = ("system", "user", "assistant", "tool")
# Our field names; data.fields maps any of them to the user's.
FIELD_NAMES = (
    "instruction",
    "input",
    "output",
    "system",
    "prompt",
    "completion",
    "messages",
    "role",
    "content",
    "conversations",
    "from",
    "value",
    "tools",
    "tool_calls",
    "reasoning_content",
    "history",
)


@dataclasses.dataclass(frozen=True)
class Fields:
    """`data.fields` parsed: our field name -> the data's, and extra role names."""

    names: tuple[tuple[str, str], ...] = ()
    roles: tuple[tuple[str, str], ...] = ()  # (their role name, ours)

    @classmethod
    def parse(cls, text: str) -> Fields:
        names, roles = {}, {}
        for item in filter(None, (s.strip() for s in text.split(","))):
            ours, eq, theirs = (s.strip() for s in item.partition("="))
            if not eq or not ours or not theirs:
                raise ValueError(
                    f"data.fields={text!r}: {item!r} is not <our name>=<your name>, e.g. "
                    "data.fields=instruction=question,output=answer"
                )
            if ours.startswith("role."):
                if ours[5:] not in ROLES:
                    raise ValueError(
                        f"data.fields={text!r}: {ours!r} is not one of role.system, "
                        "role.user, role.assistant, role.tool"
                    )
                for alias in theirs.split("|"):
                    roles[alias] = ours[5:]
            elif ours in FIELD_NAMES:
                names[ours] = theirs
            else:
                raise ValueError(
                    f"data.fields={text!r}: unknown field {ours!r}; valid: "
                    f"{', '.join(FIELD_NAMES)}, role.<system|user|assistant|tool>"
                )
        return cls(tuple(sorted(names.items())), tuple(sorted(roles.items())))

    def col(self, ours: str) -> str:
        return dict(self.names).get(ours, ours)


@dataclasses.dataclass(frozen=True)
class FormatTemplate:
    """A prompt format as format strings (the built-in templates are in templates.py). Turns
    are concatenated; `separator` goes after an assistant turn that another turn follows.
    Trailing whitespace after the last trained span is dropped (it would be a token that
    trains nothing)."""

    system: str = "{content}\n\n"
    user: str = "{content}\n\n"
    user_with_input: str = ""  # For a user turn with an Alpaca input; "" = content + input.
    assistant: str = "{content}{eos}"  # Exactly one {content}; from there to the end trains.
    separator: str = ""
    default_system: str = ""  # Used when the conversation has no system message.
    default_system_with_input: str = ""  # …and its first user turn has an Alpaca input.

    def check(self, key: str = "data.template_format") -> None:
        """Raises ValueError naming the config key if a format string is unusable."""
        allowed = {"content", "input", "eos", "bos"}
        for name in (
            "system",
            "user",
            "user_with_input",
            "assistant",
            "separator",
            "default_system",
            "default_system_with_input",
        ):
            text = getattr(self, name)
            try:
                used = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
            except ValueError as e:
                raise ValueError(
                    f"{key}.{name}={text!r}: {e} (literal braces: {{{{ }}}})"
                ) from None
            bad = set(used) - allowed
            if bad:
                raise ValueError(
                    f"{key}.{name}={text!r}: unknown field(s) {sorted(bad)}; use {{content}}, "
                    "{input}, {eos}, {bos} (literal braces as {{ }})"
                )
            if name == "assistant" and used.count("content") != 1:
                raise ValueError(f"{key}.assistant={text!r} must contain {{content}} exactly once")


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """The data part of a config (see configs/default.py for every field)."""

    train: str  # A source string: path, glob, folder, hf:..., synthetic:...
    validation: str = ""  # A source, a fraction such as "0.05" held out from train, "" or "0".
    format: str = "auto"  # alpaca | prompt_completion | messages | sharegpt | auto
    fields: str = ""  # Field renames: "instruction=question,output=answer,role.assistant=bot".
    template: str = (
        "alpaca"  # alpaca | human_assistant | chatml | raw | tokenizer | format | x.jinja
    )
    template_format: FormatTemplate = FormatTemplate()  # template=format
    train_on: str = "response"  # Or "all".
    assistant_turns: str = "all"  # Or "last": only the last assistant turn carries loss.
    # One example per assistant turn: "auto" (where the chat template rewrites earlier turns),
    # "always", or "never" (such a conversation is then a template_error).
    split_turns: str = "auto"
    # Train the <think> blocks of assistant turns (reasoning_content, or written in content).
    train_reasoning: bool = True
    # Tools for rows without a `tools` field: a JSON list of function definitions, or a
    # .json file holding one ("" = none).
    tools: str = ""
    max_seq_len: int = 512
    too_long: str = "truncate"  # Responses over max_seq_len: truncate | drop | error.
    long_prompt: str = "drop"  # A prompt that fills max_seq_len alone: drop | truncate_left.
    packing: bool = True
    max_segments: int = 64  # Examples per packed row at most; 0 = no cap.
    pad_multiple: int = 64  # packing=False: batch widths rounded up to a multiple of this.
    on_bad_row: str = "error"  # Or "skip": count and report bad rows by reason.
    max_drop_fraction: float = 0.1  # Error if a split drops more of its rows than this.
    streaming: bool = False  # Stream hub data sets instead of reading their Arrow copy.
    cache: bool = True  # Keep tokenized, packed data on disk, keyed by everything it depends on.
    cache_dir: str = ""  # "" = $SFT_JAX_CACHE/data or ~/.cache/sft_jax/data.
    num_workers: int = -1  # Tokenizing processes; -1 = one per core for large data, 0 = none.
    # Training sources with weights and options of their own (data.train must then be ""):
    # each a source string ("a.jsonl:0.7") or a dict {source, weight, name, format, fields}.
    mixture: tuple = ()
    # Examples per epoch of a mixture, resampled to the weights; 0 = all the sources hold.
    mixture_examples: int = 0
    seed: int = 0


_CHOICES = {
    "format": FORMATS,
    "train_on": TRAIN_ON,
    "assistant_turns": ASSISTANT_TURNS,
    "split_turns": SPLIT_TURNS,
    "too_long": TOO_LONG,
    "long_prompt": LONG_PROMPT,
    "on_bad_row": ON_BAD_ROW,
}


def check(spec: DataSpec) -> None:
    """Raises ValueError naming the config key for any value that cannot work."""
    for key, valid in _CHOICES.items():
        if getattr(spec, key) not in valid:
            raise ValueError(
                f"unknown data.{key} {getattr(spec, key)!r}; valid: {', '.join(valid)}"
            )
    if spec.max_seq_len < 1:
        raise ValueError(f"data.max_seq_len must be positive, got {spec.max_seq_len}")
    if spec.max_segments < 0:
        raise ValueError(f"data.max_segments must be >= 0 (0 = no cap), got {spec.max_segments}")
    if spec.pad_multiple < 1:
        raise ValueError(f"data.pad_multiple must be >= 1, got {spec.pad_multiple}")
    if not 0.0 <= spec.max_drop_fraction <= 1.0:
        raise ValueError(f"data.max_drop_fraction must be in [0, 1], got {spec.max_drop_fraction}")
    if spec.mixture_examples < 0:
        raise ValueError(f"data.mixture_examples must be >= 0, got {spec.mixture_examples}")
    if not spec.train and not spec.mixture:
        raise ValueError("data.train is empty; give a file, glob, folder, hf:<name> or synthetic:…")
    Fields.parse(spec.fields)
    if spec.template == "format":
        spec.template_format.check()
    validation_fraction(spec.validation)


def validation_fraction(validation: str) -> float | None:
    """The held-out fraction if `validation` is a number (0 = none), else None (a source)."""
    try:
        f = float(validation)
    except ValueError:
        return None
    if not 0.0 <= f < 1.0:
        raise ValueError(f"data.validation={validation!r}: a held-out fraction must be in [0, 1)")
    return f


# ---------------------------------------------------------------- why a row is dropped

# reason -> what to do about it (shown in errors and reports).
BAD_ROW_REASONS = {
    "malformed_json": "fix the JSON on that line",
    "not_utf8": "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)",
    "lone_surrogate": (
        "a JSON \\uXXXX escape of half a UTF-16 pair (\\ud800-\\udfff) without its other half; "
        "fix the escape (or the program that cut the text) or remove the row"
    ),
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
    "non_text_content": (
        "a content part is not text (image, audio); sft_jax trains text-only models: remove "
        "such parts, or skip these rows with data.on_bad_row=skip"
    ),
    "bad_tools": (
        "tools are a list of function definitions {name, description, parameters} (or its "
        "JSON string); a tool call is {name, arguments} or OpenAI's {type: function, "
        "function: {name, arguments}}, arguments an object or its JSON string"
    ),
    "special_token_text": (
        "the text holds a special token of the tokenizer, which it would read as a control "
        "token; remove it from the data"
    ),
    "template_error": (
        "the chat template rejected this conversation (or cannot express it: tool calls "
        "need data.template=chatml or a chat template with tools)"
    ),
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
