"""The MLP activations with hand-written gradients that keep only their inputs.

Autodiff of `jax.nn.gelu(approximate=True)` keeps several [tokens, d_ff] intermediates
per layer for the backward pass (the cube, the tanh, …), and a scan over layers stacks
each of them; likewise silu's sigmoid in SwiGLU. These keep only the inputs and recompute
the cheap elementwise terms in the backward pass, where they fuse into one loop.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_CUBIC = 0.044715


def _gelu_tanh_terms(x: Array) -> tuple[Array, Array]:
    inner = _SQRT_2_OVER_PI * (x + _CUBIC * x * x * x)
    return inner, jnp.tanh(inner)


@jax.custom_vjp
def gelu_tanh(x: Array) -> Array:
    """GPT-2's GELU, the tanh approximation: x/2 · (1 + tanh(√(2/π)(x + 0.044715x³)))."""
    return 0.5 * x * (1.0 + _gelu_tanh_terms(x)[1])


def _gelu_fwd(x):
    return gelu_tanh(x), x


def _gelu_bwd(x, g):
    _, t = _gelu_tanh_terms(x)
    d_inner = _SQRT_2_OVER_PI * (1.0 + 3.0 * _CUBIC * x * x)
    return (g * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * d_inner),)


gelu_tanh.defvjp(_gelu_fwd, _gelu_bwd)


@jax.custom_vjp
def swiglu(gate: Array, up: Array) -> Array:
    """Llama's gated MLP activation: silu(gate) · up."""
    return gate * jax.nn.sigmoid(gate) * up


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(res, g):
    gate, up = res
    sig = jax.nn.sigmoid(gate)
    silu = gate * sig
    return g * up * sig * (1.0 + gate * (1.0 - sig)), g * silu


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)
