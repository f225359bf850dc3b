"""Templates: a row becomes text plus the character spans that carry loss, then tokens.

Masks come from spans, never from token values: GPT-2's pad id equals its EOS id, and
the EOS that ends every example must stay trainable so the model learns to stop.

To add a template (human_assistant, chatml, a tokenizer's chat template), write a
renderer `row -> Rendered` and register it in `TEMPLATES`; multi-turn renderers return
one span per assistant turn. A prompt for generation is `render(row | {"output": ""})`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import transformers

# The Stanford Alpaca prompts, byte for byte (github.com/tatsu-lab/stanford_alpaca).
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)

TRAIN_ON = ("response", "all")


@dataclasses.dataclass(frozen=True)
class Rendered:
    """Text of one example; `spans` are the [start, end) character ranges that carry loss."""

    text: str
    spans: list[tuple[int, int]]


def _alpaca(row: dict[str, str]) -> Rendered:
    # str.format does not re-parse substituted values, so braces in user data are safe.
    prompt = (ALPACA_WITH_INPUT if row.get("input") else ALPACA_NO_INPUT).format(**row)
    return Rendered(prompt + row["output"], [(len(prompt), len(prompt) + len(row["output"]))])


TEMPLATES: dict[str, Callable[[dict[str, str]], Rendered]] = {"alpaca": _alpaca}


def render(row: dict[str, str], template: str = "alpaca") -> Rendered:
    """Renders a normalised row with the named template."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown data.template {template!r}; valid: {', '.join(TEMPLATES)}")
    return TEMPLATES[template](row)


def _bos_id(tokenizer: transformers.PreTrainedTokenizerBase) -> int | None:
    """The BOS id if the tokenizer itself would prepend a BOS distinct from EOS, else None."""
    bos = tokenizer.bos_token_id
    if bos is None or bos == tokenizer.eos_token_id:
        return None  # GPT-2: bos == eos, and GPT-2 was trained without a leading BOS.
    # Ask the tokenizer rather than read flags: their names differ between tokenizer classes.
    return bos if tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos] else None


def tokenize_many(
    rendered: Sequence[Rendered],
    tokenizer: transformers.PreTrainedTokenizerBase,
    train_on: str = "response",
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Batched `tokenize_rendered`: one tokenizer call for all texts (the fast path)."""
    if train_on not in TRAIN_ON:
        raise ValueError(f"unknown data.train_on {train_on!r}; valid: {', '.join(TRAIN_ON)}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(
            f"tokenizer {tokenizer.name_or_path!r} (model.tokenizer) has no EOS token; "
            "sft_jax ends every example with one"
        )
    bos = _bos_id(tokenizer)
    head_ids, head_mask = ([bos], [False]) if bos is not None else ([], [])
    # split_special_tokens: a literal "<|endoftext|>" inside user data stays text, and
    # does not become an EOS in the middle of an example.
    enc = tokenizer(
        [r.text for r in rendered],
        add_special_tokens=False,
        return_offsets_mapping=True,
        split_special_tokens=True,
    )
    out = []
    for r, ids, offsets in zip(rendered, enc["input_ids"], enc["offset_mapping"], strict=True):
        off = np.asarray(offsets, np.int64).reshape(-1, 2)
        if train_on == "all":
            mask = np.ones(len(ids), np.bool_)
        else:
            start = off[:, 0]
            # Some tokenizers report zero-width offsets; count such a token at its start.
            end = np.maximum(off[:, 1], start + 1)
            mask = np.zeros(len(ids), np.bool_)
            for s, e in r.spans:
                if e > s:
                    mask |= (start < e) & (end > s)  # Any overlap with the span.
        out.append(
            (
                np.asarray(head_ids + list(ids) + [eos], np.int32),
                np.concatenate([head_mask, mask, [True]]).astype(np.bool_),
            )
        )
    return out


def tokenize_rendered(
    rendered: Rendered,
    tokenizer: transformers.PreTrainedTokenizerBase,
    train_on: str = "response",
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (int32) and trainable flags (bool) of one rendered example.

    The whole text is tokenized once; a token is trainable if its character range overlaps
    a span (`train_on="response"`) or always (`"all"`, except a BOS). An EOS, trainable, is
    appended. A BOS is prepended only where the tokenizer would add one and it is not EOS.
    """
    return tokenize_many([rendered], tokenizer, train_on)[0]
