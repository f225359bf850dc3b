"""A GPT in Flax linen: GPT-2, Llama, Qwen2/3, Mistral and Gemma 2/3 behind one code path.

A config names its `family`, which decides the parameter names (`FAMILIES`: one row per
family, read here and by `sft_jax.hf`); the architecture is config fields, not subclasses:

| field            | GPT-2                   | Llama, Qwen2/3, Mistral    | Gemma 2 / 3            |
|------------------|-------------------------|----------------------------|------------------------|
| `positions`      | "learned" (wpe table)   | "rope"                     | "rope"                 |
| `norm`           | "layernorm" (with bias) | "rmsnorm"                  | "rmsnorm", × (1 + w)   |
| `mlp`            | "gelu" (tanh approx.)   | "swiglu"                   | "geglu"                |
| `n_kv_heads`     | = n_heads               | ≤ n_heads (grouped-query)  | ≤ n_heads              |
| `bias`           | True everywhere         | False (`qkv_bias`: Qwen2)  | False                  |
| `qk_norm`        | False                   | True for Qwen3             | True for Gemma 3       |
| `sliding_window` | 0                       | every layer (Mistral v0.1) | local layers; every    |
|                  |                         |                            | `global_every`-th not  |

Gemma also norms the attention and MLP outputs (`sandwich_norms`), scales the embeddings
by sqrt(d_model), scores by `query_pre_attn_scalar`^-1/2, and soft-caps the attention
scores (Gemma 2) and the logits (`final_softcap`; the loss caps its chunks the same way).
Local and global layers differ only in their window and RoPE base: with `scan_layers` a
scanned per-layer flag picks them (one compiled block, the params one stack).

Parameter names mirror the Hugging Face checkpoints of each family (`wte`, `h`, `attn/c_attn`
… for GPT-2; `embed_tokens`, `layers`, `self_attn/q_proj` … for Llama), so weight conversion
is a table of names and reshapes. Every parameter carries logical axis names; the mapping of
those names onto a device mesh lives in `sharding.py` only.

Attention follows the batch contract (docs/design.md, "The batch"): position i attends to
j only if j <= i and both carry the same non-zero segment id, so several examples packed in
one row give the same logits as each example alone. `kernels.attention` turns the segment
ids into whatever mask its implementation takes.

The package, in dependency order: `families` (parameter names per family), `config`
(`GPTConfig`, `PRESETS`: the description of a model, no network), `layers` (dense layers,
norms, activations), `rope`, `blocks` (attention, MLP, the block), `gpt` (the network).
"""

from sft_jax.model.blocks import MLP, Attention, Block, init_cache
from sft_jax.model.config import LAYERS_AXIS, LORA_RANK_AXIS, PRESETS, GPTConfig
from sft_jax.model.families import FAMILIES, Family
from sft_jax.model.gpt import (
    GPT,
    head_weight,
    neftune_noise,
    neftune_scale,
    segment_lengths,
    unstack_layers,
)
from sft_jax.model.layers import (
    Dense,
    LoraLayers,
    Norm,
    recompute_input,
    with_recomputed_activation,
)
from sft_jax.model.rope import rope, rope_frequencies

__all__ = [
    "FAMILIES",
    "GPT",
    "LAYERS_AXIS",
    "LORA_RANK_AXIS",
    "MLP",
    "PRESETS",
    "Attention",
    "Block",
    "Dense",
    "Family",
    "GPTConfig",
    "LoraLayers",
    "Norm",
    "head_weight",
    "init_cache",
    "neftune_noise",
    "neftune_scale",
    "recompute_input",
    "rope",
    "rope_frequencies",
    "segment_lengths",
    "unstack_layers",
    "with_recomputed_activation",
]
