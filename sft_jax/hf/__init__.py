"""Hugging Face ⇄ sft_jax: config.json and safetensors in, and back out.

Parameter names already mirror the HF checkpoints, so conversion is a list of entries per
config, built from its family's row of `model.FAMILIES`: (our path, HF name, how the tensor
is laid out, the kernel's input dims). Layouts:

- `table`:  embedding tables, same shape both sides;
- `vector`: norms and biases; ours may keep head structure ([3, heads, head_dim]), HF is 1-D;
- `linear`: torch `nn.Linear` weight [out, in]; ours is [in…, out…] (transpose, reshape);
- `conv1d`: GPT-2's `Conv1D` weight, already [in, out]; ours reshapes only.

Layers are stacked along a leading axis when `scan_layers` is on (`h`, `layers`), else
named `h_0`, `layers_0`, …. No torch here: safetensors are read and written with numpy,
a block or a tensor at a time (`files`), and each process reads or gathers only what
its devices hold (`sharded`): no process holds more than its shards plus one tensor.

The package: `config` (config.json both ways), `tensors` (the entries and reshapes),
`hub` (where a source's files are), `folders` (`load_hf`, `save_hf`), `files` (weight
files read by block, written by shard), `sharded` (per-process import and export),
`gguf_file` (llama.cpp's GGUF as HF tensors).
"""

from sft_jax.hf.config import config_from_hf, config_to_hf
from sft_jax.hf.folders import LanguageModelReader, export_dtype, hf_leaves, load_hf, save_hf
from sft_jax.hf.hub import load_config, resolve_folder
from sft_jax.hf.tensors import Entry, Tensor, params_from_hf, params_to_hf, tensors

__all__ = [
    "Entry",
    "LanguageModelReader",
    "Tensor",
    "config_from_hf",
    "config_to_hf",
    "export_dtype",
    "hf_leaves",
    "load_config",
    "load_hf",
    "params_from_hf",
    "params_to_hf",
    "resolve_folder",
    "save_hf",
    "tensors",
]
