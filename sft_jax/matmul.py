"""The dense layers' matmul, x · kernel: a plain `jax.lax.dot_general`, differentiated by
autodiff, on every backend but CPU.

On CPU (`cpu_kernel_gradient`, the one place that decides) the same forward gets a
hand-written backward pass that forms the kernel's gradient in the orientation XLA:CPU runs
fastest. The gradient of a kernel [K, N] is xᵀ·g, a contraction over every token. Left to
itself, XLA:CPU runs that dot slowly for a kernel with more rows than columns (GPT-2's MLP
c_proj [3072, 768], Llama's down_proj, k/v projections). Forming gᵀ·x [N, K] instead and
transposing the (kernel-sized) result afterwards, with an optimization barrier so XLA
cannot fold the transpose back into the dot, runs at the matmul's usual rate (the README's
benchmark section has the figures). The values are autodiff's either way.
"""

from __future__ import annotations

import math

import jax

Array = jax.Array


def dense_matmul(x: Array, kernel: Array, in_dims: int = 1) -> Array:
    """x [..., *in] · kernel [*in, *out] → [..., *out], contracting x's last `in_dims`
    dimensions with the kernel's first `in_dims`."""
    if cpu_kernel_gradient():
        return _cpu_dense_matmul(x, kernel, in_dims)
    return _matmul(x, kernel, in_dims)


def cpu_kernel_gradient() -> bool:
    """Whether dense layers take the CPU backward pass (`_bwd`): only on the CPU backend,
    decided when the model is traced. Accelerators run a plain dot_general and autodiff."""
    return jax.default_backend() == "cpu"


def _matmul(x, kernel, in_dims):
    contract = (tuple(range(x.ndim - in_dims, x.ndim)), tuple(range(in_dims)))
    return jax.lax.dot_general(x, kernel, (contract, ((), ())))


_cpu_dense_matmul = jax.custom_vjp(_matmul, nondiff_argnums=(2,))


def _fwd(x, kernel, in_dims):
    return _matmul(x, kernel, in_dims), (x, kernel)


def _bwd(in_dims, res, g):
    x, kernel = res
    out_dims = kernel.ndim - in_dims
    # d x = g · kernelᵀ, contracting the output dimensions.
    g_out, k_out = tuple(range(g.ndim - out_dims, g.ndim)), tuple(range(in_dims, kernel.ndim))
    d_x = jax.lax.dot_general(g, kernel, ((g_out, k_out), ((), ())))
    tokens = tuple(range(x.ndim - in_dims))  # d kernel contracts every token dimension
    rows, cols = math.prod(kernel.shape[:in_dims]), math.prod(kernel.shape[in_dims:])
    if rows > cols:
        # gᵀ·x [*out, *in], materialised as it is, then transposed to [*in, *out].
        d_k_t = jax.lax.dot_general(g, x, ((tokens, tokens), ((), ())))
        d_k_t = jax.lax.optimization_barrier(d_k_t)
        d_k = d_k_t.transpose(*range(out_dims, kernel.ndim), *range(out_dims))
    else:
        d_k = jax.lax.dot_general(x, g, ((tokens, tokens), ((), ())))
    return d_x, d_k


_cpu_dense_matmul.defvjp(_fwd, _bwd)


def lora_output(x: Array, lora_a: Array, lora_b: Array, scale: float, in_dims: int = 1) -> Array:
    """scale·(x·A)·B, a LoRA adapter's part of a dense layer's output (`sft_jax.lora`):
    x [..., *in], A [*in, r], B [r, *out] → [..., *out], in x's dtype. Two thin matmuls
    through the rank, never the [*in, *out] product A·B."""
    h = dense_matmul(x, lora_a.astype(x.dtype), in_dims)  # [..., r]
    return scale * dense_matmul(h, lora_b.astype(x.dtype), 1)
