"""Masked cross-entropy against a hand computation and torch's ignore_index=-100 loss; the
chunked loss against the whole-logits loss, on one device and split over a mesh, with and
without Gemma 2's final logit soft-cap and label smoothing (torch's label_smoothing)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import AxisType, PartitionSpec

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


def capped_torch_logits(hidden, head, softcap):
    """Gemma 2's final logits in torch (transformers' Gemma2ForCausalLM.forward): logits /
    cap, tanh, × cap; softcap 0 = plain logits."""
    logits = hidden @ head.T
    return softcap * torch.tanh(logits / softcap) if softcap else logits


def test_chunked_soft_capped_equals_reference_loss_and_gradients():
    # Logits of std ~2 against a cap of 1.5: most of them are bent by the cap, so a loss that
    # skipped the cap (or its 1 − tanh² in the gradient) would be far off. 37 positions in
    # chunks of 8: the padded last chunk must add nothing through the cap either.
    rng = np.random.default_rng(4)
    hidden = rng.normal(size=(3, 37, 16)).astype(np.float32)
    head = (rng.normal(size=(101, 16)) * 0.5).astype(np.float32)
    targets = rng.integers(0, 101, size=(3, 37))
    mask = (rng.random((3, 37)) < 0.6).astype(np.float32)
    cap = 1.5

    def naive(h, w):  # the cap written out on the whole logits, differentiated by JAX
        logits = cap * jnp.tanh(jnp.einsum("btd,vd->btv", h, w) / cap)
        return masked_cross_entropy(logits, targets, mask)[0]

    def chunked(h, w):
        return chunked_cross_entropy(h, w, targets, mask, chunk=8, softcap=cap)[0]

    h, w = jnp.asarray(hidden), jnp.asarray(head)
    total, grads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(h, w)
    expected = jax.grad(naive, argnums=(0, 1))(h, w)
    for g, e in zip(grads, expected, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), atol=1e-5, rtol=1e-5)
    logits = capped_torch_logits(torch.tensor(hidden), torch.tensor(head), cap)
    labels = torch.tensor(np.where(mask > 0, targets, -100))
    ref = torch.nn.functional.cross_entropy(
        logits.reshape(-1, 101), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    np.testing.assert_allclose(float(total), ref.item(), rtol=1e-5)
    uncapped = chunked_cross_entropy(h, w, jnp.asarray(targets), jnp.asarray(mask), 8)[0]
    assert abs(float(uncapped) - ref.item()) > 0.05 * ref.item(), "the cap made no difference"


@pytest.mark.parametrize(
    "mesh_shape, softcap, smoothing",
    [((1, 8, 1), 0.0, 0.0), ((2, 2, 2), 0.0, 0.0), ((2, 2, 2), 1.5, 0.1)],
)
def test_chunked_split_over_a_mesh_equals_torch(mesh_shape, softcap, smoothing):
    # The loss and its gradients with the rows split over (data, fsdp) and, on (2, 2, 2), the
    # 44 positions over tensor: 22 per device in chunks of 8, so each device pads its last
    # chunk. Reference: torch's summed cross-entropy and autograd on the whole logits (soft-
    # capped as Gemma 2 caps them where `softcap` is set, label-smoothed by `smoothing`).
    rng = np.random.default_rng(3)
    hidden = rng.normal(size=(8, 44, 16)).astype(np.float32)
    head = (rng.normal(size=(101, 16)) * 0.3).astype(np.float32)
    targets = rng.integers(0, 101, size=(8, 44))
    mask = (rng.random((8, 44)) < 0.6).astype(np.float32)
    mesh = jax.make_mesh(mesh_shape, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    layout = PartitionSpec(("data", "fsdp"), "tensor")

    def loss(h, w):
        return chunked_cross_entropy(
            h, w, jnp.asarray(targets), jnp.asarray(mask), 8, layout, softcap, smoothing
        )

    def loss_and_grads(h, w):
        return loss(h, w), jax.grad(lambda h, w: loss(h, w)[0], argnums=(0, 1))(h, w)

    with jax.set_mesh(mesh):
        (total, count), grads = jax.jit(loss_and_grads)(jnp.asarray(hidden), jnp.asarray(head))
    h_t, w_t = (torch.tensor(x, requires_grad=True) for x in (hidden, head))
    labels = torch.tensor(np.where(mask > 0, targets, -100))
    logits = capped_torch_logits(h_t, w_t, softcap)
    ref = torch.nn.functional.cross_entropy(
        logits.reshape(-1, 101),
        labels.reshape(-1),
        ignore_index=-100,
        reduction="sum",
        label_smoothing=smoothing,
    )
    ref.backward()
    assert float(count) == mask.sum()
    np.testing.assert_allclose(float(total), ref.item(), rtol=1e-5)
    for g, e in zip(grads, (h_t.grad, w_t.grad), strict=True):
        np.testing.assert_allclose(np.asarray(g), e.numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("softcap", [0.0, 1.5])
def test_label_smoothing_equals_torch(softcap):
    """Both losses with label_smoothing=0.2 against torch's CrossEntropyLoss(label_smoothing=
    0.2, ignore_index=-100) on the same (soft-capped) logits; the chunked one's gradients
    against torch's autograd too. Logits of std ~2 (capped at 1.5 where set) and 37 positions
    in chunks of 8: the padded last chunk must add nothing to the smoothing term either."""
    rng = np.random.default_rng(5)
    hidden = rng.normal(size=(3, 37, 16)).astype(np.float32)
    head = (rng.normal(size=(101, 16)) * 0.5).astype(np.float32)
    targets = rng.integers(0, 101, size=(3, 37))
    mask = (rng.random((3, 37)) < 0.6).astype(np.float32)
    h_t, w_t = (torch.tensor(x, requires_grad=True) for x in (hidden, head))
    logits_t = capped_torch_logits(h_t, w_t, softcap)
    ref = torch.nn.CrossEntropyLoss(ignore_index=-100, reduction="sum", label_smoothing=0.2)(
        logits_t.reshape(-1, 101), torch.tensor(np.where(mask > 0, targets, -100)).reshape(-1)
    )
    ref.backward()
    t, m = jnp.asarray(targets), jnp.asarray(mask)
    whole = masked_cross_entropy(jnp.asarray(logits_t.detach().numpy()), t, m, 0.2)[0]
    np.testing.assert_allclose(float(whole), ref.item(), rtol=1e-5)

    def chunked(h, w):
        return chunked_cross_entropy(h, w, t, m, chunk=8, softcap=softcap, label_smoothing=0.2)[0]

    total, grads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(hidden, head)
    np.testing.assert_allclose(float(total), ref.item(), rtol=1e-5)
    for g, e in zip(grads, (h_t.grad, w_t.grad), strict=True):
        np.testing.assert_allclose(np.asarray(g), e.numpy(), atol=1e-5, rtol=1e-5)
    plain = chunked_cross_entropy(jnp.asarray(hidden), jnp.asarray(head), t, m, 8, None, softcap)
    # Random targets: the smoothed loss is ~1% off the plain one, 1000× the tolerance above.
    assert abs(float(plain[0]) - ref.item()) > 1e-3 * ref.item(), "smoothing made no difference"


def test_label_smoothing_out_of_range_names_the_key():
    with pytest.raises(ValueError, match="train.label_smoothing"):
        chunked_cross_entropy(
            jnp.zeros((1, 4, 8)),
            jnp.zeros((16, 8)),
            jnp.zeros((1, 4), jnp.int32),
            jnp.ones((1, 4)),
            label_smoothing=1.0,
        )
