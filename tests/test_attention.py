"""sft_jax/attention.py: the blocked causal attention and its hand-written backward pass,
against autodiff of plain softmax attention and against torch's
scaled_dot_product_attention; and the memory it does not keep."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft_jax import attention
from sft_jax.attention import attention_mask


def _inputs(b=2, t=300, h=4, kv=2, d=16, seed=0, dtype=jnp.float32):
    """Packed rows: row 0 holds an example across the first block boundary, a second one,
    then padding (queries that see no key); row 1 one example."""
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, d)), dtype) for n in (h, kv, kv))
    seg = np.zeros((b, t), np.int32)
    seg[0, :120], seg[0, 120 : t - 10] = 1, 2
    seg[1, :] = 1
    seg = jnp.asarray(seg)
    cotangent = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)
    return q, k, v, seg, cotangent


def plain_attention(q, k, v, mask):
    """Softmax attention as one would first write it, differentiated by autodiff."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    k, v = (jnp.repeat(x, h // kv, axis=2) for x in (k, v))
    scores = jnp.einsum("bthd,bshd->bhts", q / np.sqrt(d), k)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), v)


def _value_and_grads(f, q, k, v, w):
    out = f(q, k, v)
    grads = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * w), (0, 1, 2))
    return out, grads(q, k, v)


def test_equals_autodiff_of_plain_attention_with_padding_and_gqa():
    # Every query, padding included (its cotangent is not zero here): the custom backward
    # pass is the same function's gradient everywhere, not only where a loss would look.
    q, k, v, seg, w = _inputs()
    mask = attention_mask(seg)
    ours = _value_and_grads(lambda *x: attention.dot_product_attention(*x, seg), q, k, v, w)
    want = _value_and_grads(lambda *x: plain_attention(*x, mask), q, k, v, w)
    for got, exp in zip(jax.tree.leaves(ours), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(got, exp, atol=2e-5, rtol=2e-5)


def test_equals_torch_scaled_dot_product_attention():
    torch = pytest.importorskip("torch")
    q, k, v, seg, w = _inputs(seed=1)
    mask = attention_mask(seg)
    real = np.asarray(seg != 0)[:, :, None, None]
    w = w * real  # torch gives NaN for queries that see no key: keep them out of the loss
    got, got_grads = _value_and_grads(
        lambda *x: attention.dot_product_attention(*x, seg), q, k, v, w
    )
    tq, tk, tv = (torch.tensor(np.asarray(x)).transpose(1, 2).requires_grad_() for x in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(
        tq, tk, tv, attn_mask=torch.tensor(np.asarray(mask)), enable_gqa=True
    ).transpose(1, 2)
    (out * torch.tensor(np.asarray(w))).nan_to_num().sum().backward()
    np.testing.assert_allclose(np.asarray(got) * real, out.detach().numpy() * real, atol=2e-5)
    for g, t in zip(got_grads, (tq, tk, tv), strict=True):
        np.testing.assert_allclose(g, t.grad.transpose(1, 2).numpy(), atol=5e-5, rtol=5e-5)


def test_bfloat16_inputs_follow_the_float32_function():
    q, k, v, seg, w = _inputs(seed=2, dtype=jnp.bfloat16)
    mask = attention_mask(seg)
    out, grads = _value_and_grads(lambda *x: attention.dot_product_attention(*x, seg), q, k, v, w)
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want, want_grads = _value_and_grads(lambda *x: plain_attention(*x, mask), *f32, w)
    for got, exp in zip((out, *grads), (want, *want_grads), strict=True):
        got = np.asarray(got, np.float32)
        assert np.linalg.norm(got - exp) / np.linalg.norm(exp) < 2e-2


def test_backward_pass_keeps_no_probabilities(monkeypatch, grad_scratch_bytes):
    # The compiled gradient of a 4-layer model at 2 × 512 needs much less scratch memory
    # than with autodiff's attention backward, which keeps every layer's probabilities.
    x = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 512)), jnp.int32)
    temp_bytes = lambda: grad_scratch_bytes("tiny", x, vocab_size=97, n_layers=4)
    ours = temp_bytes()
    monkeypatch.setattr(attention, "attend", lambda *a: attention._attend_fwd(*a)[0])
    autodiff = temp_bytes()
    assert ours < 0.7 * autodiff


def test_queries_against_more_keys_as_in_prefill_with_a_cache():
    # Prefill writes a prompt into a KV cache and attends over all of its slots: queries
    # and keys are not the same positions (and more queries than one block), so one block
    # sees every key.
    q, k, v, _, w = _inputs(b=2, t=150, h=4, kv=2, d=16, seed=3)
    keys = jnp.concatenate([k, k[:, :50]], axis=1)  # 200 slots, the prompt at slots 20…169
    values = jnp.concatenate([v, v[:, :50]], axis=1)
    key_seg = jnp.zeros((2, 200), jnp.int32).at[:, 20:170].set(1)
    query_seg = jnp.ones((2, 150), jnp.int32)
    mask = attention_mask(query_seg, key_seg, query_offset=20)
    ours = _value_and_grads(
        lambda *x: attention.dot_product_attention(*x, query_seg, key_seg, 20), q, keys, values, w
    )
    want = _value_and_grads(lambda *x: plain_attention(*x, mask), q, keys, values, w)
    for got, exp in zip(jax.tree.leaves(ours), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(got, exp, atol=2e-5, rtol=2e-5)
