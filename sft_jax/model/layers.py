"""The network's building pieces: dense layers (LoRA adapters and quantized bases
included), norms, activations, and the helpers blocks use to build them."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sft_jax import quant
from sft_jax.matmul import dense_matmul, lora_output
from sft_jax.model.config import LORA_RANK_AXIS, GPTConfig

Array = jax.Array


def logical_param(init, *axes: str | None):
    return nn.with_logical_partitioning(init, axes)


def dense_init():
    return nn.initializers.normal(stddev=0.02)


def gelu(x: Array) -> Array:
    """GPT-2's GELU, the tanh approximation."""
    return jax.nn.gelu(x, approximate=True)


def swiglu(gate: Array, up: Array) -> Array:
    """Llama's gated MLP activation."""
    return jax.nn.silu(gate) * up


def geglu(gate: Array, up: Array) -> Array:
    """Gemma's gated MLP activation: the tanh GELU of the gate times up."""
    return gelu(gate) * up


def softcap(x: Array, cap: float) -> Array:
    """cap · tanh(x / cap) (Gemma's soft cap), x itself for cap = 0."""
    return cap * jnp.tanh(x / cap) if cap else x


def recompute_input(apply: Callable) -> Callable:
    """`apply(module, *inputs)` whose backward pass keeps only the inputs and recomputes the
    rest (the matmul is not repeated: remat drops what the backward pass does not use)."""
    return nn.checkpoint(apply, prevent_cse=False)


def with_recomputed_activation(dense: nn.Module, activation: Callable) -> Callable:
    """`*h ↦ dense(activation(*h))`, an MLP's activation and down projection, with the
    activation recomputed in the backward pass from its inputs rather than kept: the
    kernel's gradient needs activation(h) and the activation's gradient needs h, so without
    this both are kept for every layer (a scan stacks them, [layers, tokens, d_ff] each,
    with their zero fill and copies every step), and autodiff's own intermediates (the
    tanh, the sigmoid) too. The recompute is one elementwise loop."""
    return lambda *h: recompute_input(lambda dense, *h: dense(activation(*h)))(dense, *h)


@dataclasses.dataclass(frozen=True)
class LoraLayers:
    """Which dense layers of a block carry LoRA adapters, and their rank and scale: what
    the model needs of a `lora.LoraSpec` (`LoraSpec.layers(cfg)` builds it). Frozen: the
    model is a static jit argument."""

    rank: int
    scale: float  # alpha / rank (alpha / √rank with rsLoRA)
    dropout: float  # on the adapter's input, in training
    gaussian: bool  # A drawn N(0, 1/rank²) (PEFT's "gaussian"), else Kaiming-uniform
    paths: frozenset[tuple[str, ...]]  # within a block: ("self_attn", "q_proj"), ("mlp", "c_fc")
    # How the frozen base is stored (`lora.prepare_base`); the layers read whatever is there.
    quantize: str = ""  # the blocks' kernels: "nf4", "int8" or "" (floats)
    double_quant: bool = True
    base_dtype: str = ""  # "" = param_dtype

    def on(self, *path: str) -> LoraLayers | None:
        """Itself if the layer at `path` (within a block) is adapted, else None."""
        return self if path in self.paths else None


class Dense(nn.Module):
    """x @ kernel (+ bias). `kernel_axes` names each kernel dimension; `features` may be a
    tuple so a kernel keeps head structure ([d_model, heads, head_dim]) for tensor parallelism.

    With `lora`, the layer adds a LoRA adapter's scale·(x·A)·B (A `lora_a` [*in, r],
    B `lora_b` [r, *out], float32, beside the kernel), the kernel left as it is, so the
    base can be frozen and even stored quantized (a `quant` tensor where the kernel is,
    dequantized here, inside the matmul that uses it)."""

    features: tuple[int, ...]
    kernel_axes: tuple[str | None, ...]
    use_bias: bool
    in_dims: int = 1  # how many trailing dims of x are contracted
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Any = None
    lora: LoraLayers | None = None
    deterministic: bool = True  # no adapter dropout (evaluation, generation)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self._kernel(x)
        y = dense_matmul(x.astype(self.dtype), kernel.astype(self.dtype), self.in_dims)
        if self.lora is not None:
            y = y + self._adapter(x.astype(self.dtype))
        if self.use_bias:
            bias_axes = self.kernel_axes[self.in_dims :]
            bias = self.param(
                "bias",
                logical_param(nn.initializers.zeros, *bias_axes),
                self.features,
                self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        return y

    def _kernel(self, x: Array) -> Array:
        if self.has_variable("params", "kernel"):
            stored = self.get_variable("params", "kernel")
            if quant.is_quantized(stored):
                return quant.dequantize(stored)  # `param` would check its shape, not the codes'
        return self.param(
            "kernel",
            logical_param(self.kernel_init or dense_init(), *self.kernel_axes),
            (*x.shape[-self.in_dims :], *self.features),
            self.param_dtype,
        )

    def _adapter(self, x: Array) -> Array:
        lora, in_shape = self.lora, x.shape[-self.in_dims :]
        in_axes, out_axes = self.kernel_axes[: self.in_dims], self.kernel_axes[self.in_dims :]
        if lora.gaussian:
            a_init = nn.initializers.normal(stddev=1.0 / lora.rank)
        else:  # torch's kaiming_uniform_(a=√5), PEFT's default: U(±1/√fan_in)
            in_axis = tuple(range(self.in_dims))
            a_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis, -1)
        a = self.param(
            "lora_a",
            logical_param(a_init, *in_axes, LORA_RANK_AXIS),
            (*in_shape, lora.rank),
            jnp.float32,
        )
        b = self.param(
            "lora_b",
            logical_param(nn.initializers.zeros, LORA_RANK_AXIS, *out_axes),
            (lora.rank, *self.features),
            jnp.float32,
        )
        x = nn.Dropout(lora.dropout, deterministic=self.deterministic)(x)
        return lora_output(x, a, b, lora.scale, self.in_dims)


class Norm(nn.Module):
    """LayerNorm (GPT-2) or RMSNorm (Llama) over the last axis, statistics in float32;
    `plus_one` (Gemma) scales by 1 + w with w initialised to 0."""

    kind: str
    eps: float
    use_bias: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    plus_one: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        x32 = x.astype(jnp.float32)
        if self.kind == "layernorm":
            x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        init = nn.initializers.zeros if self.plus_one else nn.initializers.ones
        scale = self.param("scale", logical_param(init, "norm"), (d,), self.param_dtype)
        y = y * (scale.astype(jnp.float32) + (1.0 if self.plus_one else 0.0))
        if self.use_bias:
            bias = self.param(
                "bias", logical_param(nn.initializers.zeros, "norm"), (d,), self.param_dtype
            )
            y = y + bias.astype(jnp.float32)
        return y.astype(self.dtype)


def norm_layer(cfg: GPTConfig, name: str) -> Norm:
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    return Norm(cfg.norm, cfg.norm_eps, cfg.bias, dt, pdt, cfg.norm_plus_one, name=name)


def dense_layer(
    cfg: GPTConfig,
    features,
    kernel_axes,
    use_bias,
    name: str,
    in_dims: int = 1,
    lora: LoraLayers | None = None,
    deterministic: bool = True,
):
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    return Dense(
        features,
        kernel_axes,
        use_bias,
        in_dims,
        dt,
        pdt,
        lora=lora,
        deterministic=deterministic,
        name=name,
    )


class Sublayer(nn.Module):
    """Attention or MLP: a part of a block whose dense layers may carry LoRA adapters."""

    cfg: GPTConfig
    lora: LoraLayers | None = None
    deterministic: bool = True

    def dense(self, features, kernel_axes, use_bias, name: str, in_dims: int = 1) -> Dense:
        """The dense layer `name` of this part, adapted if `lora` names it."""
        lora = self.lora and self.lora.on(self.name, name)
        return dense_layer(
            self.cfg, features, kernel_axes, use_bias, name, in_dims, lora, self.deterministic
        )


def select_local(local: bool | Array, if_local: Callable, if_global: Callable, *args):
    """if_local(*args) or if_global(*args): chosen while tracing for a Python bool (an
    unrolled layer, or every layer alike), else by `lax.cond` on the scanned flag, which
    compiles both once for the whole scan."""
    if isinstance(local, bool):
        return (if_local if local else if_global)(*args)
    return jax.lax.cond(local, if_local, if_global, *args)
