"""sft_jax/matmul.py: the dense matmul's hand-written gradients equal autodiff's, for
kernels taller than wide and wider than tall, with one or two contracted dimensions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft_jax.matmul import dense_matmul

CASES = [
    pytest.param((2, 5, 12), (12, 4), 1, id="taller-than-wide"),
    pytest.param((2, 5, 4), (4, 12), 1, id="wider-than-tall"),
    pytest.param((2, 5, 3, 4), (3, 4, 6), 2, id="two-contracted-dims"),
    pytest.param((2, 5, 6), (6, 3, 4), 1, id="head-shaped-output"),
]


def _plain(x, kernel, in_dims):
    contract = (tuple(range(x.ndim - in_dims, x.ndim)), tuple(range(in_dims)))
    return jax.lax.dot_general(x, kernel, (contract, ((), ())))


@pytest.mark.parametrize("x_shape, k_shape, in_dims", CASES)
def test_values_and_gradients_equal_autodiff(x_shape, k_shape, in_dims):
    rng = np.random.default_rng(0)
    x, kernel = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in (x_shape, k_shape))
    w = jnp.asarray(rng.normal(size=(*x_shape[: len(x_shape) - in_dims], *k_shape[in_dims:])))

    def loss(f):
        return jax.value_and_grad(lambda x, k: jnp.sum(f(x, k, in_dims) * w), (0, 1))

    (got, got_grads), (want, want_grads) = loss(dense_matmul)(x, kernel), loss(_plain)(x, kernel)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, want_grads, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_bfloat16_gradients_stay_bfloat16():
    x = jnp.ones((3, 8), jnp.bfloat16)
    kernel = jnp.ones((8, 2), jnp.bfloat16)
    grads = jax.grad(lambda x, k: jnp.sum(dense_matmul(x, k).astype(jnp.float32)), (0, 1))(
        x, kernel
    )
    assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.bfloat16]
    np.testing.assert_array_equal(np.asarray(grads[1], np.float32), np.full((8, 2), 3.0))


@pytest.mark.parametrize("k_shape, barrier", [((12, 4), True), ((4, 12), False)])
def test_cpu_forms_a_tall_kernels_gradient_transposed(k_shape, barrier):
    # The orientation is the point of the module: a taller-than-wide kernel's gradient is
    # formed as gᵀ·x behind an optimization barrier on CPU; a wide one's as xᵀ·g.
    x = jnp.ones((2, 5, k_shape[0]), jnp.float32)
    grad = jax.jit(jax.grad(lambda k: jnp.sum(dense_matmul(x, k)))).lower(jnp.ones(k_shape))
    assert ("optimization_barrier" in grad.as_text()) == barrier
