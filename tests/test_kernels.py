"""The accelerator attention paths (sft_jax/kernels.py) against the XLA path, on CPU: the
TPU splash kernel in Pallas interpret mode, jax.nn.dot_product_attention (cuDNN on GPU) in
its XLA form. Packed rows with several examples, padding, and GQA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft_jax import kernels
from sft_jax.model import GPT, GPTConfig, attention_mask, dot_product_attention


def _packed(b=2, t=128, h=4, kv=2, d=32, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, d)), jnp.float32) for n in (h, kv, kv))
    seg = np.zeros((b, t), np.int32)
    seg[0, :50], seg[0, 50:110] = 1, 2  # two examples, then padding
    seg[1, :128] = 1
    return q, k, v, jnp.asarray(seg)


def test_resolve():
    assert kernels.resolve("auto", "tpu") == "splash"
    assert kernels.resolve("auto", "gpu") == "cudnn"
    assert kernels.resolve("auto", "cpu") == "xla"
    assert kernels.resolve("splash", "cpu") == "splash"
    with pytest.raises(ValueError, match="model.attention='flash'"):
        kernels.resolve("flash")
    with pytest.raises(ValueError, match="invalid attention"):
        GPTConfig.preset("tiny", attention="flash")


@pytest.mark.parametrize("kernel", ["splash", "cudnn"])
def test_kernel_equals_xla_path_with_gradients(kernel):
    q, k, v, seg = _packed()
    mask = attention_mask(seg)
    real = (seg != 0)[:, :, None, None]
    w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32) * real

    def run(f):
        return lambda q, k, v: jnp.sum(f(q, k, v) * w)

    ours = lambda q, k, v: dot_product_attention(q, k, v, mask)
    if kernel == "splash":
        theirs = lambda q, k, v: kernels.splash_attention(q, k, v, seg, interpret=True)
    else:
        theirs = lambda q, k, v: kernels.cudnn_attention(q, k, v, mask)
    np.testing.assert_allclose(theirs(q, k, v) * real, ours(q, k, v) * real, atol=2e-5)
    for g, e in zip(
        jax.grad(run(theirs), argnums=(0, 1, 2))(q, k, v),
        jax.grad(run(ours), argnums=(0, 1, 2))(q, k, v),
        strict=True,
    ):
        np.testing.assert_allclose(g, e, atol=2e-4, rtol=2e-4)


def test_splash_needs_whole_blocks():
    q, k, v, seg = _packed(t=192)
    with pytest.raises(ValueError, match="multiple of 128"):
        kernels.splash_attention(q, k, v, seg[:, :192], interpret=True)


def test_model_with_splash_equals_xla():
    cfg = GPTConfig.preset("tiny-llama", vocab_size=97, attention="xla")
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 97, (2, 128)), jnp.int32)
    _, _, _, seg = _packed()
    positions = jnp.asarray(np.concatenate([np.arange(50), np.arange(78)])[None].repeat(2, 0))
    model = GPT(cfg)
    params = model.init(jax.random.key(0), tokens)["params"]
    kw = dict(positions=positions, segment_ids=seg)
    want = model.apply({"params": params}, tokens, **kw)
    splash_model = GPT(GPTConfig.preset("tiny-llama", vocab_size=97, attention="splash"))
    got = splash_model.apply({"params": params}, tokens, **kw)
    real = (seg != 0)[..., None]
    np.testing.assert_allclose(got * real, want * real, atol=1e-4)


def test_splash_after_a_scanned_model_trace():
    # The model's layer scan traces the kernel; a later use under grad must not see state
    # from that trace (a kernel cached across traces leaked its tracers here).
    test_model_with_splash_equals_xla()
    q, k, v, seg = _packed()
    grads = jax.grad(lambda q: jnp.sum(kernels.splash_attention(q, k, v, seg, interpret=True)))(q)
    assert np.isfinite(np.asarray(grads)).all()
