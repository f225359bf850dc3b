"""Rendered text -> token ids and trainable flags, from character spans.

Each text is tokenized whole, once, with the tokenizer reading special tokens the way it
does at inference (so `<|im_end|>` written by a template is one token): the tokens at a
turn boundary are those the model will see, never pieces glued together. A token is
trainable if its character range overlaps a span. Data whose text holds a special
token's text is refused earlier (examples.py), so every special token here was written
by the template.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence

import numpy as np
import transformers

from sft_jax.data.templates import Rendered


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
    backend = tokenizer.backend_tokenizer
    with _special_tokens_recognised(backend):
        encodings = backend.encode_batch([r.text for r in rendered], add_special_tokens=False)
    head = [bos] if bos is not None else []
    out = []
    for r, enc in zip(rendered, encodings, strict=True):
        ids = np.asarray(head + enc.ids, np.int32)
        trainable = np.zeros(len(ids), np.bool_)
        body = trainable[len(head) :]  # A view: writes land in `trainable`.
        if train_on == "all":
            body[:] = True
        elif r.spans and len(body):
            off = np.asarray(enc.offsets, np.int64).reshape(-1, 2)
            start = off[:, 0]
            end = np.maximum(off[:, 1], start + 1)  # A zero-width token counts at its start.
            for s, e in r.spans:
                body |= (start < e) & (end > s)  # Any overlap with the span.
        out.append((ids, trainable))
    return out
