"""The parameter names of each model family, as its Hugging Face checkpoints spell them:
one `Family` row per family, read by the network and by `sft_jax.hf`."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Family:
    """The parameter names of one model family. They mirror the family's Hugging Face
    checkpoints: `sft_jax.hf` names each tensor `hf_prefix` + its parameter path joined by dots,
    the leaf (`kernel`, `scale`, `embedding`) called `weight` (`lm_head` has no prefix)."""

    embed: str  # the token embedding table
    layers: str  # the scanned stack of blocks; `{layers}_{i}` per layer when unrolled
    norm_1: str  # a block's norm before attention
    attn: str
    qkv: tuple[str, ...]  # one fused [d_model, 3, heads, head_dim] projection, or q, k, v
    attn_out: str
    norm_2: str  # a block's norm before the MLP
    mlp_in: tuple[str, ...]  # the projection into the MLP, or (gate, up) of a gated MLP
    mlp_out: str
    final_norm: str
    hf_prefix: str  # of every HF tensor name but lm_head's
    hf_kernels: str  # "conv1d" (GPT-2's Conv1D: [in, out], as ours) | "linear" ([out, in])
    hf_architecture: str  # config.json's "architectures"
    # Optional parts ("" = the family has none): per-head norms on q and k (under `attn`),
    # and the sandwich norms on the attention output and on the MLP output.
    q_norm: str = ""
    k_norm: str = ""
    attn_out_norm: str = ""
    mlp_out_norm: str = ""
    # Mixture of experts ("" = dense MLPs): the block's MoE module (where `mlp` is), its
    # router, and the experts' module with each expert's (gate, up) and down projections
    # as the published checkpoints name them (`{moe}.{experts}.{e}.{name}.weight`).
    moe: str = ""
    router: str = ""
    experts: str = ""
    expert_in: tuple[str, ...] = ()
    expert_out: str = ""


_LLAMA_NAMES = Family(
    embed="embed_tokens",
    layers="layers",
    norm_1="input_layernorm",
    attn="self_attn",
    qkv=("q_proj", "k_proj", "v_proj"),
    attn_out="o_proj",
    norm_2="post_attention_layernorm",
    mlp_in=("gate_proj", "up_proj"),
    mlp_out="down_proj",
    final_norm="norm",
    hf_prefix="model.",
    hf_kernels="linear",
    hf_architecture="LlamaForCausalLM",
)

# Gemma's four norms per block: input_layernorm before attention, post_attention_layernorm
# ON the attention output (not before the MLP, as Llama's of the same name), then
# pre_feedforward_layernorm and post_feedforward_layernorm around the MLP.
_GEMMA_NAMES = dataclasses.replace(
    _LLAMA_NAMES,
    norm_2="pre_feedforward_layernorm",
    attn_out_norm="post_attention_layernorm",
    mlp_out_norm="post_feedforward_layernorm",
    hf_architecture="Gemma2ForCausalLM",
)
_QK_NORMS = dict(q_norm="q_norm", k_norm="k_norm")

FAMILIES: dict[str, Family] = {
    "gpt2": Family(
        embed="wte",
        layers="h",
        norm_1="ln_1",
        attn="attn",
        qkv=("c_attn",),
        attn_out="c_proj",
        norm_2="ln_2",
        mlp_in=("c_fc",),
        mlp_out="c_proj",
        final_norm="ln_f",
        hf_prefix="transformer.",
        hf_kernels="conv1d",
        hf_architecture="GPT2LMHeadModel",
    ),
    "llama": _LLAMA_NAMES,
    "qwen2": dataclasses.replace(_LLAMA_NAMES, hf_architecture="Qwen2ForCausalLM"),
    "qwen3": dataclasses.replace(_LLAMA_NAMES, hf_architecture="Qwen3ForCausalLM", **_QK_NORMS),
    "mistral": dataclasses.replace(_LLAMA_NAMES, hf_architecture="MistralForCausalLM"),
    "qwen3_moe": dataclasses.replace(
        _LLAMA_NAMES,
        hf_architecture="Qwen3MoeForCausalLM",
        moe="mlp",
        router="gate",
        experts="experts",
        expert_in=("gate_proj", "up_proj"),
        expert_out="down_proj",
        **_QK_NORMS,
    ),
    # transformers 5 calls Mixtral's MoE module `mlp` in memory; its checkpoints (and
    # save_pretrained) keep `block_sparse_moe` and w1 (gate), w3 (up), w2 (down).
    "mixtral": dataclasses.replace(
        _LLAMA_NAMES,
        hf_architecture="MixtralForCausalLM",
        moe="block_sparse_moe",
        router="gate",
        experts="experts",
        expert_in=("w1", "w3"),
        expert_out="w2",
    ),
    # gpt-oss: experts fused as transformers holds (and saves) them, gate and up
    # interleaved in one [experts, d_model, 2·d_expert] projection.
    "gpt_oss": dataclasses.replace(
        _LLAMA_NAMES,
        hf_architecture="GptOssForCausalLM",
        moe="mlp",
        router="router",
        experts="experts",
        expert_in=("gate_up_proj",),
        expert_out="down_proj",
    ),
    "gemma2": _GEMMA_NAMES,
    "gemma3": dataclasses.replace(_GEMMA_NAMES, hf_architecture="Gemma3ForCausalLM", **_QK_NORMS),
}
