"""Rotary position embeddings: inverse frequencies (Llama 3 and linear scaling, a local
base for local layers) and the rotation itself, HF Llama's convention."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sft_jax.model.config import GPTConfig

Array = jax.Array


def rope_frequencies(cfg: GPTConfig, local: bool = False) -> Array:
    """Inverse frequencies [head_dim // 2] of RoPE, with Llama 3 or linear scaling when
    configured; `local` layers with their own base (`rope_local_theta`) are unscaled."""
    half = cfg.dim_per_head // 2
    if local and cfg.rope_local_theta:
        return 1.0 / (cfg.rope_local_theta ** (jnp.arange(half, dtype=jnp.float32) / half))
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(half, dtype=jnp.float32) / half))
    if not cfg.rope_llama3_scaling:
        return inv_freq / cfg.rope_linear_factor
    factor, low, high, original = cfg.rope_llama3_scaling
    # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return jnp.where(medium, blended, scaled)


def rope(x: Array, positions: Array, inv_freq: Array) -> Array:
    """Rotary embedding, HF Llama convention (rotate the two halves of each head).

    x: [batch, seq, heads, head_dim]; positions: [batch, seq]; inv_freq: [head_dim // 2]."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, seq, half]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def layer_rope_frequencies(cfg: GPTConfig, local: bool | Array) -> Array:
    if not cfg.rope_local_theta:
        return rope_frequencies(cfg)
    if isinstance(local, bool):
        return rope_frequencies(cfg, local)
    return jnp.where(local, rope_frequencies(cfg, True), rope_frequencies(cfg))
