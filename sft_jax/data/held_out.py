"""The held-out rows people read: the raw validation rows a run answers before and after
training (the separate source, or the very rows data.validation's fraction took), and their
prompts rendered exactly as training rendered them, with the reference answers."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from sft_jax.data import formats, sources
from sft_jax.data.build import held_out_mask
from sft_jax.data.examples import prompt_ids
from sft_jax.data.spec import Fields, validation_fraction


def prompts_and_references(
    rows: Sequence[dict], spec, tokenizer
) -> list[tuple[list[int], str, str]]:
    """(prompt ids, the user's request, reference answer) per row. The ids are rendered with
    the run's format and template: exactly the tokens training put before each response
    (`data.prompt_ids`)."""
    fields = Fields.parse(spec.fields)
    out = []
    for row in rows:
        fmt = formats.detect(row, fields) if spec.format == "auto" else spec.format
        messages = formats.to_messages(row, fmt, fields)
        request = next((m.text() for m in reversed(messages[:-1]) if m.role == "user"), "")
        out.append((prompt_ids(row, spec, tokenizer), request, messages[-1].content))
    return out


def first_source_spec(spec):
    """`spec` reading only the first source of a mixture (data.train or data.mixture, and
    data.validation), with that source's format and fields: where generation prompts come
    from. A spec of one source comes back as it is."""
    first = sources.mixture(spec)[0]
    validation = spec.validation
    if validation and validation_fraction(validation) is None:
        validation = sources.parse_mixture(validation, "data.validation")[0].text
    return dataclasses.replace(
        spec,
        train=first.text,
        mixture=(),
        validation=validation,
        format=first.format or spec.format,
        fields=spec.fields if first.fields is None else first.fields,
    )


def held_out_rows(spec, limit: int) -> list[dict]:
    """Up to `limit` raw rows of the validation split: the separate source, or the same rows
    the held-out fraction of data.train took (the split is a pure function of the seed)."""
    if not spec.validation or limit <= 0:
        return []
    fraction = validation_fraction(spec.validation)
    if fraction is None:
        rows = sources.Source(spec.validation, "data.validation").rows()
        return [r for r, _ in zip(_good(rows), range(limit), strict=False)]
    if not fraction:
        return []
    rows = list(sources.Source(spec.train, "data.train").rows())
    held_out = held_out_mask(len(rows), fraction, spec.seed)
    return [r for r, h in zip(rows, held_out, strict=True) if h and isinstance(r, dict)][:limit]


def _good(rows):
    return (r for r in rows if isinstance(r, dict))
