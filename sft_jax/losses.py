"""Masked next-token cross-entropy: "The loss" of docs/design.md.

The loss of a step is Σ loss_mask·nll / Σ loss_mask over the *global* batch, so functions
here return the two sums and let the caller divide once, after summing over micro-batches,
devices and hosts. Never a mean of means.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def masked_cross_entropy(
    logits: jax.Array, targets: jax.Array, loss_mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """logits [batch, seq, vocab], targets [batch, seq] int, loss_mask [batch, seq] →
    (Σ mask·nll, Σ mask), both float32 scalars."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [batch, seq]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = log_z - target_logit
    mask = loss_mask.astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask)


def chunked_cross_entropy(
    hidden: jax.Array,
    head: jax.Array,
    targets: jax.Array,
    loss_mask: jax.Array,
    chunk: int = 128,
) -> tuple[jax.Array, jax.Array]:
    """The loss of `masked_cross_entropy(hidden @ head.T, …)` without its logits.

    hidden [batch, seq, d_model] (the final norm's output), head [vocab, d_model] (the tied
    embedding or the transposed lm_head kernel), targets and loss_mask [batch, seq] →
    (Σ mask·nll, Σ mask). The sequence goes in chunks of `chunk` positions: at most
    [batch, chunk, vocab] float32 logits exist at a time, never [batch, seq, vocab] (412 MB
    for GPT-2 at 4 × 512, three times over in autodiff). Under differentiation, each chunk's
    gradients are formed right after its loss (d logits = softmax − onehot, masked), so the
    backward pass needs no recomputation: the same three matmuls as unfused autodiff."""
    seq = hidden.shape[1]
    chunk = min(chunk, seq)
    pad = -seq % chunk
    if pad:  # masked-out positions: they add nothing to either sum
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        loss_mask = jnp.pad(loss_mask, ((0, 0), (0, pad)))
    return _chunked_ce(hidden, head, targets, loss_mask.astype(jnp.float32), chunk)


def _chunks(x: jax.Array, chunk: int) -> jax.Array:
    """[batch, seq, …] → [seq / chunk, batch, chunk, …]: the batch axis (and its sharding)
    stays inside every chunk."""
    b, t = x.shape[:2]
    return jnp.swapaxes(x.reshape(b, t // chunk, chunk, *x.shape[2:]), 0, 1)


def _chunk_logits(h: jax.Array, head: jax.Array) -> jax.Array:
    # [batch, chunk, d] · [vocab, d] → [batch, chunk, vocab], accumulated in float32.
    return jax.lax.dot_general(
        h, head.astype(h.dtype), (((2,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )


def _nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    log_z = jax.nn.logsumexp(logits, axis=-1)
    return log_z - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked_ce(hidden, head, targets, mask, chunk):
    def body(total, xs):
        h, t, m = xs
        nll = _nll(_chunk_logits(h, head), t)
        return total + jnp.sum(nll * m), None

    xs = (_chunks(hidden, chunk), _chunks(targets, chunk), _chunks(mask, chunk))
    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
    return total, jnp.sum(mask)


def _chunked_ce_fwd(hidden, head, targets, mask, chunk):
    vocab = head.shape[0]

    def body(carry, xs):
        total, d_head = carry
        h, t, m = xs
        logits = _chunk_logits(h, head)  # [batch, chunk, vocab]
        # One exp pass serves the loss and its gradient: softmax = exp / Σ exp.
        top = jnp.max(logits, axis=-1, keepdims=True)
        exp = jnp.exp(logits - top)
        total_exp = jnp.sum(exp, axis=-1, keepdims=True)
        log_z = (top + jnp.log(total_exp))[..., 0]
        nll = log_z - jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        onehot = jax.nn.one_hot(t, vocab, dtype=exp.dtype)
        d_logits = exp * (m[..., None] / total_exp) - onehot * m[..., None]
        d_logits = d_logits.astype(h.dtype)
        d_h = jnp.einsum("bcv,vd->bcd", d_logits, head.astype(h.dtype),
                         preferred_element_type=jnp.float32)  # fmt: skip
        d_head = d_head + jnp.einsum("bcv,bcd->vd", d_logits, h,
                                     preferred_element_type=jnp.float32)  # fmt: skip
        return (total + jnp.sum(nll * m), d_head), d_h

    xs = (_chunks(hidden, chunk), _chunks(targets, chunk), _chunks(mask, chunk))
    init = (jnp.zeros((), jnp.float32), jnp.zeros(head.shape, jnp.float32))
    (total, d_head), d_hidden = jax.lax.scan(body, init, xs)
    d_hidden = jnp.swapaxes(d_hidden, 0, 1).reshape(hidden.shape)
    # Zero-size arrays carry the input dtypes: residuals must be arrays.
    like = (jnp.zeros((0,), hidden.dtype), jnp.zeros((0,), head.dtype))
    return (total, jnp.sum(mask)), (d_hidden, d_head, like)


def _chunked_ce_bwd(chunk, res, g):
    d_hidden, d_head, (hidden_like, head_like) = res
    g_total = g[0]  # the count's cotangent does not reach the inputs
    return (
        (d_hidden * g_total).astype(hidden_like.dtype),
        (d_head * g_total).astype(head_like.dtype),
        None,
        None,
    )


_chunked_ce.defvjp(_chunked_ce_fwd, _chunked_ce_bwd)
