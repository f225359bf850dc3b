"""A transformer block: attention (grouped-query, sliding windows, q/k norms, KV cache)
and the MLP (or the mixture of experts, `moe`), each a `Sublayer` whose dense layers may
carry LoRA adapters."""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from sft_jax import kernels
from sft_jax.model.config import GPTConfig
from sft_jax.model.layers import (
    LoraLayers,
    Sublayer,
    geglu,
    gelu,
    logical_param,
    norm_layer,
    select_local,
    swiglu,
    with_recomputed_activation,
)
from sft_jax.model.moe import MoE
from sft_jax.model.rope import layer_rope_frequencies, rope, rope_scale

Array = jax.Array


def init_cache(cfg: GPTConfig, batch: int, slots: int) -> dict[str, Array]:
    """An empty KV cache for decoding: keys/values per layer and the segment id of each
    slot (0 = empty, never attended to)."""
    shape = (cfg.n_layers, batch, slots, cfg.n_kv_heads, cfg.dim_per_head)
    return {
        "k": jnp.zeros(shape, jnp.dtype(cfg.dtype)),
        "v": jnp.zeros(shape, jnp.dtype(cfg.dtype)),
        "segment_ids": jnp.zeros((batch, slots), jnp.int32),
    }


def _attend(cfg: GPTConfig, local: bool | Array, q, k, v, **kwargs) -> Array:
    """`kernels.attention` with the model's score scale and soft cap, through the sliding
    window on local layers."""
    scale = cfg.query_pre_attn_scalar**-0.5 if cfg.query_pre_attn_scalar else None

    def call(window: int) -> Callable:
        return lambda q, k, v: kernels.attention(
            q, k, v, scale=scale, window=window, softcap=cfg.attn_softcap, **kwargs
        )

    return select_local(local, call(cfg.sliding_window), call(0), q, k, v)


class Attention(Sublayer):
    @nn.compact
    def __call__(self, x: Array, positions: Array, segment_ids: Array, cache=None, local=False):
        """cache: None (training) or (k, v, key_segment_ids, slot) of this layer; then
        returns (out, (k, v)) with this call's keys and values written at `slot`.
        local: whether this layer is local (`select_local`: a bool or a traced flag)."""
        cfg, names = self.cfg, self.cfg.names
        hd = cfg.dim_per_head
        if len(names.qkv) == 1:
            # Fused q|k|v as in GPT-2's c_attn, kept as [d_model, 3, heads, head_dim].
            axes = ("embed", "qkv", "heads", "head_dim")
            qkv = self.dense((3, cfg.n_heads, hd), axes, cfg.bias, names.qkv[0])(x)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        else:
            qkv_bias = cfg.bias or cfg.qkv_bias
            q_name, k_name, v_name = names.qkv
            q_axes, kv_axes = ("embed", "heads", "head_dim"), ("embed", "kv_heads", "head_dim")
            q = self.dense((cfg.n_heads, hd), q_axes, qkv_bias, q_name)(x)
            k = self.dense((cfg.n_kv_heads, hd), kv_axes, qkv_bias, k_name)(x)
            v = self.dense((cfg.n_kv_heads, hd), kv_axes, qkv_bias, v_name)(x)
        if cfg.qk_norm:  # over head_dim, per head, before RoPE
            q, k = norm_layer(cfg, names.q_norm)(q), norm_layer(cfg, names.k_norm)(k)
        if cfg.positions == "rope":
            inv_freq, scale = layer_rope_frequencies(cfg, local), rope_scale(cfg)
            q, k = rope(q, positions, inv_freq, scale), rope(k, positions, inv_freq, scale)
        q = nn.with_logical_constraint(q, ("batch", "length", "act_heads", None))
        sinks = None
        if cfg.attention_sinks:  # one logit per head, float32 as transformers keeps it
            init = logical_param(nn.initializers.zeros, "heads")
            sinks = self.param("sinks", init, (cfg.n_heads,), jnp.float32)
        if cache is None:
            out = _attend(
                cfg,
                local,
                q,
                k,
                v,
                segment_ids=segment_ids,
                implementation=cfg.attention,
                sinks=sinks,
            )
            new_cache = None
        else:
            cache_k, cache_v, key_segment_ids, slot = cache  # [batch, slots, kv_heads, hd]
            k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, slot, 0, 0))
            v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, slot, 0, 0))
            new_cache = (k, v)
            out = _attend(
                cfg,
                local,
                q,
                k,
                v,
                segment_ids=segment_ids,
                key_segment_ids=key_segment_ids,
                query_offset=slot,
                sinks=sinks,
            )
        # [batch, seq, heads, head_dim] → [batch, seq, d_model]
        axes = ("heads", "head_dim", "embed")
        out_bias = cfg.bias or cfg.attn_out_bias
        out = self.dense((cfg.d_model,), axes, out_bias, names.attn_out, in_dims=2)(out)
        return out if cache is None else (out, new_cache)


class MLP(Sublayer):
    """c_proj(gelu(c_fc(x))) (GPT-2), or down_proj(swiglu(gate_proj(x), up_proj(x))) (Llama;
    geglu for Gemma), with the activation recomputed in the backward pass
    (`with_recomputed_activation`)."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg, names = self.cfg, self.cfg.names

        def into(name: str) -> Array:  # [batch, seq, d_model] → [batch, seq, d_ff]
            h = self.dense((cfg.d_ff,), ("embed", "mlp"), cfg.bias, name)(x)
            return nn.with_logical_constraint(h, ("batch", "length", "act_mlp"))

        down = self.dense((cfg.d_model,), ("mlp", "embed"), cfg.bias, names.mlp_out)
        if cfg.mlp == "gelu":
            (fc,) = names.mlp_in
            return with_recomputed_activation(down, gelu)(into(fc))
        gate, up = names.mlp_in
        activation = swiglu if cfg.mlp == "swiglu" else geglu
        return with_recomputed_activation(down, activation)(into(gate), into(up))


class Block(nn.Module):
    """Pre-norm transformer block (with sandwich norms: the attention and MLP outputs
    normed too, Gemma). Signature fits `nn.scan`: (carry, broadcast…, scanned…) → (carry,
    scanned out): the layer's KV cache goes in and out as a scanned part, and so does the
    flag `local_flag` when layers differ (Gemma's local and global layers: the params stay
    one stack and one block is compiled). `decode`: None (training) or (key_segment_ids,
    slot) of the cache. `local`: this layer's kind when known while tracing (unrolled
    layers, or all alike), None to read `local_flag`."""

    cfg: GPTConfig
    deterministic: bool = True
    local: bool | None = False
    lora: LoraLayers | None = None

    @nn.compact
    def __call__(self, x, positions, segment_ids, decode=None, layer_cache=None, local_flag=None):
        cfg, names = self.cfg, self.cfg.names
        local = self.local if self.local is not None else local_flag
        drop = nn.Dropout(cfg.dropout, deterministic=self.deterministic)
        h = norm_layer(cfg, names.norm_1)(x)
        attention = Attention(cfg, self.lora, self.deterministic, name=names.attn)
        new_cache = None
        if layer_cache is None:
            h = attention(h, positions, segment_ids, local=local)
        else:
            h, new_cache = attention(h, positions, segment_ids, (*layer_cache, *decode), local)
        if cfg.sandwich_norms:
            h = norm_layer(cfg, names.attn_out_norm)(h)
        x = x + drop(h)
        h = norm_layer(cfg, names.norm_2)(x)
        if cfg.n_experts:
            h = MoE(cfg, self.lora, self.deterministic, name=names.moe)(h, segment_ids)
        else:
            h = MLP(cfg, self.lora, self.deterministic, name="mlp")(h)
        if cfg.sandwich_norms:
            h = norm_layer(cfg, names.mlp_out_norm)(h)
        x = x + drop(h)
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        return x, new_cache


def block_class(cfg: GPTConfig):
    if cfg.remat == "none":
        return Block
    policy = None if cfg.remat == "full" else jax.checkpoint_policies.checkpoint_dots
    # Arguments 1.. (positions, segment ids, cache) and `deterministic` are not differentiated.
    return nn.remat(Block, policy=policy, prevent_cse=not cfg.scan_layers)
