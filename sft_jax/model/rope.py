"""Rotary position embeddings: inverse frequencies (Llama 3, linear and YaRN scaling, a
local base for local layers) and the rotation itself, HF Llama's convention."""

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
    if cfg.rope_yarn:
        return _yarn_frequencies(cfg, inv_freq)
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


def _yarn_frequencies(cfg: GPTConfig, inv_freq: Array) -> Array:
    """YaRN (Peng et al. 2023, transformers' `_compute_yarn_parameters`): frequencies that
    turn fewer than beta_slow times over the original context are interpolated (÷ factor),
    those that turn more than beta_fast times kept, a linear ramp between."""
    factor, beta_fast, beta_slow, original, truncate, _ = cfg.rope_yarn
    dim, base = cfg.dim_per_head, cfg.rope_theta

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high = high + 0.001 if low == high else high
    ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate
    return inv_freq / factor * (1 - keep) + inv_freq * keep


def rope_scale(cfg: GPTConfig) -> float:
    """The factor on cos and sin: YaRN's attention factor (0.1·ln(factor) + 1 unless the
    config gives it), else 1."""
    if not cfg.rope_yarn:
        return 1.0
    factor, *_, attention_factor = cfg.rope_yarn
    if attention_factor:
        return float(attention_factor)
    return 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0


def rope(x: Array, positions: Array, inv_freq: Array, scale: float = 1.0) -> Array:
    """Rotary embedding, HF Llama convention (rotate the two halves of each head); `scale`
    multiplies cos and sin (YaRN's attention factor).

    x: [batch, seq, heads, head_dim]; positions: [batch, seq]; inv_freq: [head_dim // 2]."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, seq, half]
    sin = jnp.sin(angles)[:, :, None, :] * scale
    cos = jnp.cos(angles)[:, :, None, :] * scale
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def layer_rope_frequencies(cfg: GPTConfig, local: bool | Array) -> Array:
    if not cfg.rope_local_theta:
        return rope_frequencies(cfg)
    if isinstance(local, bool):
        return rope_frequencies(cfg, local)
    return jnp.where(local, rope_frequencies(cfg, True), rope_frequencies(cfg))
