"""Instruction data: sources -> conversations -> template text and spans -> token ids and
loss masks -> packed rows -> step-indexed batches.

Modules, in data-flow order: sources (raw rows), formats (rows -> messages), templates and
chat_templates (messages -> text + trained spans), encode (text -> ids + masks), examples
(one row end to end, length policy), packing (rows of examples), build (the whole build,
cached by cache), pipeline (batches), view (what is trained, for people). spec holds
`DataSpec`; errors the drop reasons.
"""

from sft_jax.data.build import DataSplits, build_splits
from sft_jax.data.examples import prompt_ids
from sft_jax.data.pipeline import batch_at, eval_batches, num_batches_per_epoch
from sft_jax.data.spec import DataSpec, FormatTemplate
from sft_jax.data.tokenizer import load_tokenizer

__all__ = [
    "DataSpec",
    "DataSplits",
    "FormatTemplate",
    "batch_at",
    "build_splits",
    "eval_batches",
    "load_tokenizer",
    "num_batches_per_epoch",
    "prompt_ids",
]
