"""sft_jax/activations.py: values and gradients against jax.nn's autodiff and torch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft_jax import activations


def _x(seed, shape=(3, 257), dtype=jnp.float32):
    # Wide enough to reach both tails of the tanh and the sigmoid.
    return jnp.asarray(np.random.default_rng(seed).normal(scale=4.0, size=shape), dtype)


def test_gelu_tanh_equals_autodiff_of_jax_nn_gelu():
    x, w = _x(0), _x(1)
    ours = jax.value_and_grad(lambda x: jnp.sum(activations.gelu_tanh(x) * w))(x)
    want = jax.value_and_grad(lambda x: jnp.sum(jax.nn.gelu(x, approximate=True) * w))(x)
    np.testing.assert_allclose(ours[1], want[1], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(
        activations.gelu_tanh(x), jax.nn.gelu(x, approximate=True), atol=1e-5, rtol=1e-6
    )


def test_swiglu_equals_autodiff_of_silu_times_up():
    gate, up, w = _x(2), _x(3), _x(4)
    f = lambda g, u: jnp.sum(activations.swiglu(g, u) * w)
    ref = lambda g, u: jnp.sum(jax.nn.silu(g) * u * w)
    np.testing.assert_allclose(activations.swiglu(gate, up), jax.nn.silu(gate) * up, rtol=1e-6)
    for a, b in zip(jax.grad(f, (0, 1))(gate, up), jax.grad(ref, (0, 1))(gate, up), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_equal_torch_gelu_tanh_and_silu():
    torch = pytest.importorskip("torch")
    x, up, w = _x(5), _x(6), _x(7)
    tx, tu = (torch.tensor(np.asarray(a), requires_grad=True) for a in (x, up))
    tw = torch.tensor(np.asarray(w))
    (torch.nn.functional.gelu(tx, approximate="tanh") * tw).sum().backward()
    np.testing.assert_allclose(
        jax.grad(lambda x: jnp.sum(activations.gelu_tanh(x) * w))(x), tx.grad, atol=5e-5, rtol=1e-5
    )  # float32 rounding of tanh's tails: torch's formula differs there by ~1e-5
    tx.grad = None
    (torch.nn.functional.silu(tx) * tu * tw).sum().backward()
    g_gate, g_up = jax.grad(lambda g, u: jnp.sum(activations.swiglu(g, u) * w), (0, 1))(x, up)
    np.testing.assert_allclose(g_gate, tx.grad, atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(g_up, tu.grad, atol=1e-5, rtol=1e-5)


def test_bfloat16_in_bfloat16_out():
    x = _x(8, dtype=jnp.bfloat16)
    for f in (activations.gelu_tanh, lambda x: activations.swiglu(x, x)):
        y, g = jax.value_and_grad(lambda x, f=f: jnp.sum(f(x).astype(jnp.float32)))(x)
        assert g.dtype == jnp.bfloat16 and np.isfinite(np.asarray(g, np.float32)).all()


def test_backward_pass_keeps_fewer_mlp_activations(monkeypatch, grad_scratch_bytes):
    # A scanned 4-layer model: the compiled gradient needs less scratch memory than with
    # autodiff of jax.nn's activations.
    x = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 256)), jnp.int32)
    temp_bytes = lambda preset: grad_scratch_bytes(preset, x, vocab_size=97, n_layers=4, d_ff=1024)
    ours = {p: temp_bytes(p) for p in ("tiny", "tiny-llama")}
    monkeypatch.setattr(activations, "gelu_tanh", lambda x: jax.nn.gelu(x, approximate=True))
    monkeypatch.setattr(activations, "swiglu", lambda g, u: jax.nn.silu(g) * u)
    for preset, mine in ours.items():
        assert mine < 0.9 * temp_bytes(preset), preset
