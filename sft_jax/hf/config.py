"""config.json ⇄ `GPTConfig`, both ways, for every family: what each family's config
means in our fields, and what transformers needs back; a field we cannot honour is refused
naming it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from sft_jax.model.config import GPTConfig


def config_from_hf(hf: dict, source: str = "config.json") -> GPTConfig:
    """A GPTConfig from a Hugging Face config dict; unsupported options fail by name."""
    model_type = hf.get("model_type")

    def unsupported(what: str) -> ValueError:
        return ValueError(f"{source}: {what} is not supported (model_type={model_type!r})")

    if model_type == "gpt2":
        return _gpt2_config(hf, unsupported)
    if model_type in ("llama", "qwen2", "qwen3", "mistral"):
        return _llama_config(hf, unsupported)
    if model_type in ("qwen3_moe", "mixtral"):
        return _moe_config(hf, unsupported)
    if model_type == "gpt_oss":
        return _gpt_oss_config(hf, unsupported)
    if model_type == "gemma3":  # the multimodal checkpoint: its language model only
        hf = {"tie_word_embeddings": hf.get("tie_word_embeddings", True)} | (
            hf.get("text_config") or {}
        )
        hf["model_type"] = "gemma3_text"
    if model_type in ("gemma2", "gemma3", "gemma3_text"):
        return _gemma_config(hf, unsupported)
    raise ValueError(
        f"{source}: model_type={model_type!r} is not supported; sft_jax imports gpt2, llama "
        "(Llama 2/3, SmolLM2, TinyLlama), qwen2, qwen3, qwen3_moe, mistral, mixtral, gpt_oss, "
        "gemma2, gemma3_text and the text part of gemma3"
    )


def _gpt2_config(hf: dict, unsupported: Callable[[str], ValueError]) -> GPTConfig:
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise unsupported(f"activation_function={act!r}")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(flag):
            raise unsupported(f"{flag}=True")
    d = hf["n_embd"]
    return GPTConfig(
        family="gpt2",
        vocab_size=hf["vocab_size"],
        max_seq_len=hf.get("n_positions", 1024),
        d_model=d,
        n_layers=hf["n_layer"],
        n_heads=hf["n_head"],
        n_kv_heads=hf["n_head"],
        d_ff=hf.get("n_inner") or 4 * d,
        positions="learned",
        norm="layernorm",
        mlp="gelu",
        bias=True,
        tie_embeddings=True,
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
    )


def _llama_config(hf: dict, unsupported: Callable[[str], ValueError]) -> GPTConfig:
    """Llama, Qwen2 (Llama with q/k/v biases), Qwen3 (with q/k norms) and Mistral (with a
    sliding window on every layer, or none)."""
    model_type = hf["model_type"]
    if hf.get("hidden_act", "silu") != "silu":
        raise unsupported(f"hidden_act={hf['hidden_act']!r}")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise unsupported("attention_bias/mlp_bias=True")
    if hf.get("use_sliding_window"):
        raise unsupported("use_sliding_window=True")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    return GPTConfig(
        family=model_type,
        head_dim=_head_dim(hf),
        qk_norm=model_type == "qwen3",
        sliding_window=(hf.get("sliding_window") or 0) if model_type == "mistral" else 0,
        vocab_size=hf["vocab_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        d_ff=hf["intermediate_size"],
        positions="rope",
        norm="rmsnorm",
        mlp="swiglu",
        bias=False,
        qkv_bias=model_type == "qwen2",
        tie_embeddings=bool(hf.get("tie_word_embeddings", model_type == "qwen2")),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        rope_llama3_scaling=_rope_scaling(rope, unsupported),
    )


def _moe_config(hf: dict, unsupported: Callable[[str], ValueError]) -> GPTConfig:
    """Qwen3-MoE (Qwen3's attention, experts in every layer) and Mixtral (Mistral's)."""
    model_type = hf["model_type"]
    dense = _llama_config(
        hf | {"model_type": "qwen3" if model_type == "qwen3_moe" else "mistral"}, unsupported
    )
    if model_type == "qwen3_moe":
        if hf.get("decoder_sparse_step", 1) != 1 or hf.get("mlp_only_layers"):
            raise unsupported(
                f"decoder_sparse_step={hf.get('decoder_sparse_step')}, mlp_only_layers="
                f"{hf.get('mlp_only_layers')} (sft_jax puts experts in every layer)"
            )
        experts = hf.get("num_experts") or hf.get("num_local_experts") or 128
        d_expert, norm_topk = hf.get("moe_intermediate_size", 768), hf.get("norm_topk_prob", False)
        sliding_window = 0
    else:
        if hf.get("router_jitter_noise"):
            raise unsupported(f"router_jitter_noise={hf['router_jitter_noise']}")
        experts, d_expert, norm_topk = hf.get("num_local_experts", 8), hf["intermediate_size"], True
        sliding_window = hf.get("sliding_window") or 0
    return dataclasses.replace(
        dense,
        family=model_type,
        sliding_window=sliding_window,
        n_experts=experts,
        experts_per_token=hf.get("num_experts_per_tok", 8 if model_type == "qwen3_moe" else 2),
        d_expert=d_expert,
        router_norm_topk=bool(norm_topk),
        router_aux_loss_coef=float(
            hf.get("router_aux_loss_coef", 0.001 if model_type == "qwen3_moe" else 0.02)
        ),
    )


def _gpt_oss_config(hf: dict, unsupported: Callable[[str], ValueError]) -> GPTConfig:
    """gpt-oss: q/k/v/o biases, attention sinks, sliding and full layers alternating, YaRN,
    experts fused and clamped with biases. Published checkpoints store the experts in
    MXFP4, which the import dequantizes (`hf.experts`)."""
    quant = (hf.get("quantization_config") or {}).get("quant_method")
    if quant not in (None, "mxfp4"):
        raise unsupported(f"quantization_config.quant_method={quant!r}")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 150000.0)))
    n = hf["num_hidden_layers"]
    window = hf.get("sliding_window") or 0
    pattern = {"sliding_window_pattern": 2} if not hf.get("layer_types") else {}
    return GPTConfig(
        family="gpt_oss",
        vocab_size=hf["vocab_size"],
        max_seq_len=hf.get("max_position_embeddings", 131072),
        d_model=hf["hidden_size"],
        n_layers=n,
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf["num_key_value_heads"],
        d_ff=hf["intermediate_size"],
        head_dim=_head_dim(hf | {"head_dim": hf.get("head_dim", 64)}),
        positions="rope",
        norm="rmsnorm",
        mlp="swiglu",
        bias=False,
        qkv_bias=bool(hf.get("attention_bias", True)),
        attn_out_bias=bool(hf.get("attention_bias", True)),
        attention_sinks=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        norm_eps=hf.get("rms_norm_eps", 1e-5),
        rope_theta=theta,
        rope_yarn=_yarn(rope, unsupported),
        sliding_window=window,
        global_every=_global_every(hf | pattern, unsupported) if window else 0,
        n_experts=hf.get("num_local_experts") or hf.get("num_experts") or 128,
        experts_per_token=hf.get("num_experts_per_tok", 4),
        d_expert=hf["intermediate_size"],
        router="topk_softmax",
        router_bias=True,
        expert_mlp="gpt_oss",
        swiglu_limit=float(hf.get("swiglu_limit", 7.0)),
        router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
    )


def _yarn(rope: dict, unsupported: Callable[[str], ValueError]) -> tuple:
    """GPTConfig.rope_yarn from HF's rope parameters: () for plain RoPE."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return ()
    if rope_type != "yarn":
        raise unsupported(f"rope type {rope_type!r}")
    if rope.get("mscale") or rope.get("mscale_all_dim"):
        raise unsupported("yarn's mscale / mscale_all_dim")
    return (
        float(rope["factor"]),
        float(rope.get("beta_fast") or 32.0),
        float(rope.get("beta_slow") or 1.0),
        int(rope["original_max_position_embeddings"]),
        bool(rope.get("truncate", True)),
        float(rope.get("attention_factor") or 0.0),
    )


def _head_dim(hf: dict) -> int:
    """GPTConfig.head_dim: 0 where it is d_model / n_heads (configs stay comparable with
    the presets)."""
    head_dim = hf.get("head_dim") or 0
    return 0 if head_dim == hf["hidden_size"] // hf["num_attention_heads"] else head_dim


# transformers' defaults for what a Gemma config.json may leave out (the published Gemma 3
# configs give only the values that differ from these in their text_config).
_GEMMA_DEFAULTS = {
    "gemma2": dict(
        vocab_size=256000,
        hidden_size=2304,
        intermediate_size=9216,
        num_hidden_layers=26,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        max_position_embeddings=8192,
        rms_norm_eps=1e-6,
        query_pre_attn_scalar=256,
        sliding_window=4096,
        sliding_window_pattern=2,
        final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    ),
    "gemma3_text": dict(
        vocab_size=262208,
        hidden_size=2304,
        intermediate_size=9216,
        num_hidden_layers=26,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        max_position_embeddings=131072,
        rms_norm_eps=1e-6,
        query_pre_attn_scalar=256,
        sliding_window=4096,
        sliding_window_pattern=6,
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
        rope_theta=1_000_000.0,
        rope_local_base_freq=10000.0,
        tie_word_embeddings=True,
    ),
}


def _gemma_config(hf: dict, unsupported: Callable[[str], ValueError]) -> GPTConfig:
    """Gemma 2 and Gemma 3 (text): (1 + w) norms, four per block, GeGLU, scaled
    embeddings, soft caps, local (sliding-window) and global layers."""
    model_type = hf["model_type"]
    hf = _GEMMA_DEFAULTS[model_type] | hf  # a null soft cap or window stays null: none
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act != "gelu_pytorch_tanh":
        raise unsupported(f"hidden_activation={act!r}")
    for flag in ("attention_bias", "use_bidirectional_attention"):
        if hf.get(flag):
            raise unsupported(f"{flag}=True")
    window = hf.get("sliding_window") or 0
    local_theta, global_rope = _gemma_rope(hf, unsupported)
    return GPTConfig(
        family="gemma2" if model_type == "gemma2" else "gemma3",
        vocab_size=hf["vocab_size"],
        max_seq_len=hf["max_position_embeddings"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf["num_key_value_heads"],
        d_ff=hf["intermediate_size"],
        head_dim=_head_dim(hf),
        positions="rope",
        norm="rmsnorm",
        mlp="geglu",
        bias=False,
        tie_embeddings=bool(hf["tie_word_embeddings"]),
        norm_eps=hf["rms_norm_eps"],
        qk_norm=model_type != "gemma2",
        norm_plus_one=True,
        sandwich_norms=True,
        embed_scale=True,
        query_pre_attn_scalar=float(hf["query_pre_attn_scalar"]),
        attn_softcap=float(hf.get("attn_logit_softcapping") or 0.0),
        final_softcap=float(hf.get("final_logit_softcapping") or 0.0),
        sliding_window=window,
        global_every=_global_every(hf, unsupported) if window else 0,
        rope_theta=float(global_rope.get("rope_theta", hf["rope_theta"])),
        rope_local_theta=local_theta,
        rope_linear_factor=_rope_linear_factor(global_rope, unsupported),
    )


def _gemma_rope(hf: dict, unsupported: Callable[[str], ValueError]) -> tuple[float, dict]:
    """(local layers' RoPE base, 0 for Gemma 2's one base; the global layers' rope
    parameters). transformers 5 writes `rope_parameters` per layer type for Gemma 3 (and
    one dict for Gemma 2); older configs `rope_theta`, `rope_local_base_freq`, `rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    if "full_attention" in params:
        local = params.get("sliding_attention") or {}
        if local.get("rope_type", "default") != "default":
            raise unsupported(f"local layers' rope type {local['rope_type']!r}")
        theta = local.get("rope_theta", hf.get("rope_local_base_freq", 10000.0))
        return float(theta), dict(params["full_attention"] or {})
    global_rope = params or dict(hf.get("rope_scaling") or {})
    if hf["model_type"] == "gemma2":
        return 0.0, global_rope
    return float(hf["rope_local_base_freq"]), global_rope


def _rope_linear_factor(rope: dict, unsupported: Callable[[str], ValueError]) -> float:
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear"):
        raise unsupported(f"rope type {rope_type!r}")
    return float(rope["factor"]) if rope_type == "linear" else 1.0


def _global_every(hf: dict, unsupported: Callable[[str], ValueError]) -> int:
    """GPTConfig.global_every from `layer_types` (else `sliding_window_pattern`): every
    N-th layer global, the others local; another pattern is refused by name."""
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types")
    if not types:
        every = int(hf["sliding_window_pattern"])
        types = [
            "full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n)
        ]
    if len(types) != n or set(types) - {"full_attention", "sliding_attention"}:
        raise unsupported(f"layer_types={types}")
    local = [t == "sliding_attention" for t in types]
    every = 0 if all(local) else local.index(False) + 1
    expected = [not (every and (i + 1) % every == 0) for i in range(n)]
    if local != expected:
        raise unsupported(
            f"layer_types={types} (sft_jax takes every N-th layer global, the others local)"
        )
    return every


def _rope_scaling(rope: dict, unsupported: Callable[[str], ValueError]) -> tuple:
    """GPTConfig.rope_llama3_scaling from HF's rope parameters: () for plain RoPE."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return ()
    if rope_type != "llama3":
        raise unsupported(f"rope type {rope_type!r}")
    return (
        float(rope["factor"]),
        float(rope["low_freq_factor"]),
        float(rope["high_freq_factor"]),
        int(rope["original_max_position_embeddings"]),
    )


def _shape_keys(cfg: GPTConfig) -> dict:
    """The config.json keys of a rotary model's shapes, the same in every such family."""
    return {
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.dim_per_head,
    }


def config_to_hf(cfg: GPTConfig) -> dict:
    """The config.json of the equivalent transformers model."""
    if cfg.family == "gpt2":
        return {
            "model_type": "gpt2",
            "architectures": [cfg.names.hf_architecture],
            "vocab_size": cfg.vocab_size,
            "n_positions": cfg.max_seq_len,
            "n_ctx": cfg.max_seq_len,
            "n_embd": cfg.d_model,
            "n_layer": cfg.n_layers,
            "n_head": cfg.n_heads,
            "n_inner": cfg.d_ff,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "tie_word_embeddings": True,
            "torch_dtype": cfg.param_dtype,
        }
    if cfg.qkv_bias and cfg.family not in ("qwen2", "gpt_oss"):
        raise ValueError(
            f"model: a {cfg.family} model with q/k/v biases has no Hugging Face equivalent; "
            "set family='qwen2'"
        )
    _check_exportable(cfg)
    if cfg.family == "gpt_oss":
        return _gpt_oss_config_to_hf(cfg)
    if cfg.family in ("gemma2", "gemma3"):
        return _gemma_config_to_hf(cfg)
    rope = _rope_to_hf(cfg)
    extra = {}
    if cfg.family == "mistral":
        extra = {"sliding_window": cfg.sliding_window or None}
    elif cfg.family == "qwen3":
        extra = {"use_sliding_window": False, "sliding_window": None}
    elif cfg.n_experts:
        extra = _moe_config_to_hf(cfg)
    return {
        "model_type": cfg.family,
        "architectures": [cfg.names.hf_architecture],
        **_shape_keys(cfg),
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": rope,
        "rope_scaling": rope if cfg.rope_llama3_scaling else None,
        "attention_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": cfg.param_dtype,
    } | extra


def _gpt_oss_config_to_hf(cfg: GPTConfig) -> dict:
    if not (cfg.qkv_bias and cfg.attn_out_bias and cfg.attention_sinks and cfg.router_bias):
        raise ValueError(
            "model: a gpt_oss model has q/k/v/o biases, attention sinks and a router bias"
        )
    types = ["sliding_attention" if local else "full_attention" for local in cfg.local_layers]
    return {
        "model_type": "gpt_oss",
        "architectures": [cfg.names.hf_architecture],
        **_shape_keys(cfg),
        "intermediate_size": cfg.d_expert,
        "num_local_experts": cfg.n_experts,
        "num_experts_per_tok": cfg.experts_per_token,
        "router_aux_loss_coef": cfg.router_aux_loss_coef,
        "output_router_logits": False,
        "swiglu_limit": cfg.swiglu_limit,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": _rope_to_hf(cfg),
        "sliding_window": cfg.sliding_window or cfg.max_seq_len,
        "layer_types": types,
        "attention_bias": True,
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": cfg.param_dtype,
    }


def _moe_config_to_hf(cfg: GPTConfig) -> dict:
    """The expert keys of a Qwen3-MoE or Mixtral config.json."""
    common = {
        "num_experts_per_tok": cfg.experts_per_token,
        "router_aux_loss_coef": cfg.router_aux_loss_coef,
        "output_router_logits": False,
    }
    if cfg.family == "mixtral":
        if not cfg.router_norm_topk:
            raise ValueError(
                "model: Mixtral always renormalises its top-k weights; set router_norm_topk=True"
            )
        return common | {
            "num_local_experts": cfg.n_experts,
            "intermediate_size": cfg.d_expert,
            "sliding_window": cfg.sliding_window or None,
            "router_jitter_noise": 0.0,
        }
    return common | {
        "num_experts": cfg.n_experts,
        "moe_intermediate_size": cfg.d_expert,
        "norm_topk_prob": cfg.router_norm_topk,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "use_sliding_window": False,
        "sliding_window": None,
    }


def _rope_to_hf(cfg: GPTConfig) -> dict:
    """The global layers' `rope_parameters`."""
    rope: dict = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_llama3_scaling:
        factor, low, high, original = cfg.rope_llama3_scaling
        rope.update(
            rope_type="llama3",
            factor=factor,
            low_freq_factor=low,
            high_freq_factor=high,
            original_max_position_embeddings=original,
        )
    elif cfg.rope_linear_factor != 1.0:
        rope.update(rope_type="linear", factor=cfg.rope_linear_factor)
    elif cfg.rope_yarn:
        factor, beta_fast, beta_slow, original, truncate, attention_factor = cfg.rope_yarn
        rope.update(
            rope_type="yarn",
            factor=factor,
            beta_fast=beta_fast,
            beta_slow=beta_slow,
            original_max_position_embeddings=original,
            truncate=truncate,
        )
        if attention_factor:
            rope["attention_factor"] = attention_factor
    return rope


def _check_exportable(cfg: GPTConfig) -> None:
    """Fields the family's transformers class cannot express fail by name."""
    gemma, oss = cfg.family in ("gemma2", "gemma3"), cfg.family == "gpt_oss"
    windows = gemma or oss or cfg.family in ("mistral", "mixtral")
    fits = {
        "sliding_window": windows or not cfg.sliding_window,
        "router": cfg.router == ("topk_softmax" if oss else "softmax_topk"),
        "global_every": gemma or oss or not cfg.global_every,
        "attn_out_bias": oss or not cfg.attn_out_bias,
        "attention_sinks": oss or not cfg.attention_sinks,
        "router_bias": oss or not cfg.router_bias,
        "rope_yarn": oss or not cfg.rope_yarn,
        "rope_local_theta": cfg.family == "gemma3" or not cfg.rope_local_theta,
        "attn_softcap": gemma or not cfg.attn_softcap,
        "final_softcap": gemma or not cfg.final_softcap,
        "query_pre_attn_scalar": gemma or not cfg.query_pre_attn_scalar,
        "mlp": cfg.mlp == ("geglu" if gemma else "swiglu"),
        "norm_plus_one": cfg.norm_plus_one == gemma,
        "embed_scale": cfg.embed_scale == gemma,
    }
    for field, ok in fits.items():
        if not ok:
            raise ValueError(
                f"model: {field}={getattr(cfg, field)!r} has no Hugging Face equivalent in "
                f"the {cfg.family} family"
            )


def _int_if_whole(x: float) -> int | float:
    """transformers' strict config classes take 256, not 256.0, where they declare an int."""
    return int(x) if float(x).is_integer() else x


def _gemma_config_to_hf(cfg: GPTConfig) -> dict:
    """config.json of Gemma2ForCausalLM, or Gemma3ForCausalLM (model_type gemma3_text)."""
    gemma2 = cfg.family == "gemma2"
    types = ["sliding_attention" if local else "full_attention" for local in cfg.local_layers]
    rope = _rope_to_hf(cfg)
    if not gemma2:
        local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta}
        rope = {"sliding_attention": local, "full_attention": rope}
    return {
        "model_type": "gemma2" if gemma2 else "gemma3_text",
        "architectures": [cfg.names.hf_architecture],
        **_shape_keys(cfg),
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": rope,
        "query_pre_attn_scalar": _int_if_whole(cfg.query_pre_attn_scalar or cfg.dim_per_head),
        "attn_logit_softcapping": cfg.attn_softcap or None,
        "final_logit_softcapping": cfg.final_softcap or None,
        # transformers needs a window even with every layer global: it is then unused.
        "sliding_window": cfg.sliding_window or cfg.max_seq_len,
        "layer_types": types if cfg.sliding_window else ["full_attention"] * cfg.n_layers,
        "attention_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": cfg.param_dtype,
    }
