"""Instruction data: sources -> conversations -> template text and spans -> token ids and
loss masks -> packed rows -> step-indexed batches.

Modules, in data-flow order:
- spec: the data config (`DataSpec`, `Fields`, `FormatTemplate`), its checks, and the
  reasons a row is dropped;
- sources: raw rows from files, the hub, saved data sets, or synthetic (generated tasks);
- formats: a raw row -> a conversation (`Message`s);
- templates: a conversation -> text + the character spans that carry loss;
- examples: a row -> token ids and trainable flags (or a drop reason), the length
  policy, and the prompt generation gives for a row;
- packing: `Examples` (ids + offsets, the one container of tokenized data) and
  `PackedRows` (rows of them);
- build: the whole build (`build_splits`, worker processes), cached by cache;
- mixture: a weighted mixture's examples, resampled once to the weights;
- held_out: the raw held-out rows and their prompts, for generations and reports;
- hosts: the build shared by several processes (each tokenizes its share of the rows);
- pipeline: packed rows -> step-indexed batches;
- tokenizer: loading tokenizers (GPT-2 offline); view: what is trained, for people.
The batch and the loss are specified in docs/design.md ("The batch", "The loss").
"""

from sft_jax.data.build import DataSplits, build_splits
from sft_jax.data.examples import bos_to_prepend, make_encoder, prompt_ids
from sft_jax.data.held_out import first_source_spec, held_out_rows, prompts_and_references
from sft_jax.data.hosts import Processes, jax_processes
from sft_jax.data.pipeline import batch_at, eval_batches, num_batches_per_epoch
from sft_jax.data.spec import DataSpec, FormatTemplate
from sft_jax.data.templates import resolve_template, template_id
from sft_jax.data.tokenizer import load_tokenizer, save_tokenizer

__all__ = [
    "DataSpec",
    "DataSplits",
    "FormatTemplate",
    "Processes",
    "batch_at",
    "bos_to_prepend",
    "build_splits",
    "eval_batches",
    "first_source_spec",
    "held_out_rows",
    "jax_processes",
    "load_tokenizer",
    "make_encoder",
    "num_batches_per_epoch",
    "prompt_ids",
    "prompts_and_references",
    "resolve_template",
    "save_tokenizer",
    "template_id",
]
