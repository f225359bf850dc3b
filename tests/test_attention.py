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


def plain_attention(q, k, v, mask, scale=None, softcap=0.0):
    """Softmax attention as one would first write it (Gemma 2's soft cap as transformers
    writes it), differentiated by autodiff."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    k, v = (jnp.repeat(x, h // kv, axis=2) for x in (k, v))
    scores = jnp.einsum("bthd,bshd->bhts", q, k) * (scale or 1 / np.sqrt(d))
    if softcap:
        scores = softcap * jnp.tanh(scores / softcap)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), v)


def _value_and_grads(f, q, k, v, w):
    """f(q, k, v) and the gradient of Σ f·w, compiled as one function (op by op, the
    blocked attention takes ~5 times longer on a CPU)."""

    @jax.jit
    def run(q, k, v):
        grads = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * w), (0, 1, 2))
        return f(q, k, v), grads(q, k, v)

    return run(q, k, v)


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


def window_mask(seg, window, key_seg=None, query_offset=0):
    """The reference mask written out in numpy: causal, same non-zero segment, and key
    slot j seen from query slot i only if i - j < window (transformers'
    `kv_idx > q_idx - sliding_window`)."""
    seg = np.asarray(seg)
    key_seg = seg if key_seg is None else np.asarray(key_seg)
    i = query_offset + np.arange(seg.shape[1])[:, None]
    j = np.arange(key_seg.shape[1])[None, :]
    near = (j <= i) & (i - j < window if window else True)
    same = (seg[:, :, None] == key_seg[:, None, :]) & (seg != 0)[:, :, None]
    return jnp.asarray(near[None] & same)[:, None]


@pytest.mark.parametrize(
    "window, softcap, scale",
    [(100, 0.0, None), (0, 2.0, 0.3), (37, 1.5, 0.2)],
)
def test_window_softcap_and_scale_equal_autodiff_of_plain_attention(window, softcap, scale):
    # 300 queries in blocks of 128: windows shorter than a block and reaching into the
    # block before, soft caps small enough that tanh bends the scores (whose spread is ~4
    # here). Padding queries see no key and average whatever keys their block scores, which a window
    # narrows: their outputs are unused and left out (no cotangent either).
    q, k, v, seg, w = _inputs(h=2, kv=1, d=8, seed=4)
    real = (seg != 0)[:, :, None, None]
    w = w * real
    mask = window_mask(seg, window)
    kw = dict(scale=scale, window=window, softcap=softcap)
    out, grads = _value_and_grads(
        lambda *x: attention.dot_product_attention(*x, seg, **kw), q, k, v, w
    )
    want, want_grads = _value_and_grads(
        lambda *x: plain_attention(*x, mask, scale=scale, softcap=softcap), q, k, v, w
    )
    np.testing.assert_allclose(out * real, want * real, atol=3e-5, rtol=3e-5)
    for got, exp in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(got, exp, atol=3e-5, rtol=3e-5)


def test_attention_mask_with_a_window_is_transformers_sliding_window():
    # Left padding as the generator writes prompts; padding queries see nothing here and
    # are left out (transformers lets them see the real keys).
    torch = pytest.importorskip("torch")
    masking_utils = pytest.importorskip("transformers.masking_utils")
    seg = jnp.ones((2, 12), jnp.int32).at[0, :3].set(0)
    want = masking_utils.sdpa_mask(
        batch_size=2,
        q_length=12,
        kv_length=12,
        attention_mask=torch.tensor(np.asarray(seg)),
        mask_function=masking_utils.sliding_window_causal_mask_function(5),
        allow_is_causal_skip=False,
    )
    real = np.asarray(seg != 0)[:, None, :, None]
    got = attention_mask(seg, window=5)
    np.testing.assert_array_equal(got & real, want.numpy() & real)
    np.testing.assert_array_equal(got, window_mask(seg, 5))


def test_a_window_skips_the_key_blocks_outside_it():
    # Query blocks of 128 over 2048 positions: with a 256-key window each block scores at
    # most 128 + 255 keys, against all keys up to its end without one.
    full = attention.Masking(128).blocks(2048, 2048)
    local = attention.Masking(128, window=256).blocks(2048, 2048)
    keys = lambda blocks: sum((qe - qs) * (ke - ks) for qs, qe, ks, ke in blocks)
    assert max(ke - ks for _, _, ks, ke in local) == 128 + 255
    assert keys(local) / keys(full) < 0.35
    # The compiled forward and backward passes at 1024 tokens, window 128: 43% of the
    # FLOPs (the key blocks give 1913 / 4608 = 42%; the rest is per-query work).
    x = jax.ShapeDtypeStruct((1, 1024, 1, 16), jnp.float32)
    seg = jax.ShapeDtypeStruct((1, 1024), jnp.int32)

    def flops(window):
        loss = lambda q, k, v, s: jnp.sum(
            attention.dot_product_attention(q, k, v, s, window=window)
        )
        compiled = jax.jit(jax.value_and_grad(loss, (0, 1, 2))).lower(x, x, x, seg).compile()
        return compiled.cost_analysis()["flops"]

    assert flops(128) / flops(0) < 0.45


def test_decoding_past_the_window_equals_attention_without_a_cache():
    # A left-padded row decoded one query at a time against a 48-slot cache, window 8, the
    # slot traced as in the generator's step: every step's output equals the uncached
    # forward pass at that position, before and far past the window, and a step scores
    # only the window's slots.
    q, k, v, _, _ = _inputs(b=2, t=48, h=4, kv=2, d=16, seed=5)
    seg = jnp.zeros((2, 48), jnp.int32).at[0, 6:].set(1).at[1, :].set(1)  # row 0: 6 pads
    kw = dict(softcap=3.0)
    want = attention.dot_product_attention(q, k, v, seg, window=8, **kw)

    def step(slot, window=8):
        q_slot = jax.lax.dynamic_slice_in_dim(q, slot, 1, axis=1)
        decoding = jnp.ones((2, 1), jnp.int32)  # the segment id the generator gives a step
        out = attention.dot_product_attention(
            q_slot, k, v, decoding, seg, slot, window=window, **kw
        )
        return out[:, 0]

    for slot in (7, 20, 47):  # slot 7: the cut starts at the cache's first slot
        np.testing.assert_allclose(jax.jit(step)(slot), want[:, slot], atol=1e-5, rtol=1e-5)
    flops = lambda window: jax.jit(step, static_argnums=1).lower(0, window).cost_analysis()["flops"]
    assert flops(8) < 0.3 * flops(0)
