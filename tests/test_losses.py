"""Masked cross-entropy against a hand computation and torch's ignore_index=-100 loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sft_jax.losses import chunked_cross_entropy, masked_cross_entropy


def test_hand_computed_masked_mean():
    # Two positions, vocab 3. Only the second carries loss.
    logits = jnp.asarray([[[1.0, 2.0, 3.0], [0.0, 0.0, np.log(2.0)]]])
    targets = jnp.asarray([[0, 2]])
    mask = jnp.asarray([[0.0, 1.0]])
    loss_sum, count = masked_cross_entropy(logits, targets, mask)
    # p(target=2) = 2 / (1 + 1 + 2) = 0.5
    assert float(count) == 1.0
    np.testing.assert_allclose(float(loss_sum), np.log(2.0), rtol=1e-6)
    assert loss_sum.dtype == jnp.float32


def test_equals_torch_cross_entropy_with_ignore_index():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 7, 11)).astype(np.float32) * 3
    targets = rng.integers(0, 11, size=(3, 7))
    mask = (rng.random((3, 7)) < 0.6).astype(np.float32)
    loss_sum, count = masked_cross_entropy(
        jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask)
    )
    labels = torch.tensor(np.where(mask > 0, targets, -100))
    ref = torch.nn.functional.cross_entropy(
        torch.tensor(logits).reshape(-1, 11), labels.reshape(-1), ignore_index=-100
    )
    np.testing.assert_allclose(float(loss_sum / count), ref.item(), rtol=1e-5)
    assert float(count) == mask.sum()


def test_bfloat16_logits_are_upcast():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, 300)), jnp.bfloat16)
    targets = jnp.zeros((2, 5), jnp.int32)
    mask = jnp.ones((2, 5))
    s16, _ = masked_cross_entropy(logits, targets, mask)
    s32, _ = masked_cross_entropy(logits.astype(jnp.float32), targets, mask)
    assert s16.dtype == jnp.float32
    np.testing.assert_allclose(float(s16), float(s32), rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_chunked_equals_full_logits_loss_and_gradients(dtype):
    # 37 positions in chunks of 8: the last chunk is padded (and masked out).
    rng = np.random.default_rng(2)
    hidden = jnp.asarray(rng.normal(size=(3, 37, 16)), dtype)
    head = jnp.asarray(rng.normal(size=(101, 16)) * 0.3, jnp.float32)
    targets = jnp.asarray(rng.integers(0, 101, size=(3, 37)), jnp.int32)
    mask = jnp.asarray(rng.random((3, 37)) < 0.6, jnp.float32)

    def full(hidden, head):
        logits = jnp.einsum("btd,vd->btv", hidden, head.astype(dtype))
        return masked_cross_entropy(logits, targets, mask)

    def chunked(hidden, head):
        return chunked_cross_entropy(hidden, head, targets, mask, chunk=8)

    (s, c), (s_ref, c_ref) = jax.jit(chunked)(hidden, head), full(hidden, head)
    assert s.dtype == jnp.float32 and float(c) == float(c_ref) == float(mask.sum())
    np.testing.assert_allclose(float(s), float(s_ref), rtol=1e-5 if dtype == jnp.float32 else 1e-2)
    # The gradients of the loss sum (scaled, as the train step divides by the count).
    grad = lambda f: jax.grad(lambda h, w: 0.5 * f(h, w)[0], argnums=(0, 1))
    for g, e in zip(jax.jit(grad(chunked))(hidden, head), grad(full)(hidden, head), strict=True):
        assert g.dtype == e.dtype
        tol = 1e-5 if dtype == jnp.float32 else 2e-2
        np.testing.assert_allclose(
            np.asarray(g, np.float32), np.asarray(e, np.float32), atol=tol, rtol=tol
        )
