"""Prompts for generation that match training token for token.

`prompt_ids(row, spec, tokenizer)` renders a row of the run's format with the run's
template, with a placeholder response, and returns the ids before the first trained
token: exactly what the model saw before each response in training, including where a
template's trailing space went into the response's first token (" Blue" after
"Assistant:"), which rendering the prompt text alone would get wrong.
"""

from __future__ import annotations

import transformers

from sft_jax.data import build, encode, formats, templates
from sft_jax.data.spec import DataSpec

_PLACEHOLDER = "x"  # A letter: no template joins it to what comes before.


def prompt_ids(
    row: dict | str, spec: DataSpec, tokenizer: transformers.PreTrainedTokenizerBase
) -> list[int]:
    """Ids to generate the response to `row`: a row of `spec.format` whose response is
    missing, empty or to be replaced (a final assistant turn), or a plain prompt string."""
    if isinstance(row, str):
        row = {"messages": [{"role": "user", "content": row}]}
    fields = formats.Fields.parse(spec.fields)
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
    enc = build.make_encoder(spec, tokenizer, template, fmt)
    rendered = enc.render(enc.messages(row))
    if not rendered.spans:
        raise ValueError(f"data.template={spec.template!r} marks no response in {row!r}")
    # Only the placeholder's span: earlier assistant turns are history here.
    last = templates.Rendered(rendered.text, rendered.spans[-1:])
    ((ids, trainable),) = encode.encode([last], tokenizer, "response", enc.bos)
    return ids[: int(trainable.argmax())].tolist()
