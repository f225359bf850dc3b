"""Instruction data: sources -> template -> token ids and loss masks -> packed rows -> batches."""

from sft_jax.data.pipeline import (
    DataSpec,
    DataSplits,
    batch_at,
    build_splits,
    eval_batches,
    num_batches_per_epoch,
)
from sft_jax.data.tokenizer import load_tokenizer

__all__ = [
    "DataSpec",
    "DataSplits",
    "batch_at",
    "build_splits",
    "eval_batches",
    "load_tokenizer",
    "num_batches_per_epoch",
]
