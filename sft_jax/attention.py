"""Causal grouped-query attention in plain XLA ops: the training path on every backend
without an accelerator kernel (`model.attention="xla"`, and "auto" on CPU), prompt prefill
and decoding; and `attention_mask`, the [queries, keys] mask of the batch contract.

Three things keep it fast and small on a CPU:

- Query blocks: when queries and keys are the same positions, the queries go in blocks
  and each block scores only the keys up to its own end (the causal mask hides the rest).
  That skips about half of the scores and softmax, and keeps each block's [block, keys]
  scores small enough for the caches. With a sliding window each block also starts at
  the first key its first query sees, so a window's cost grows with seq · window (at
  2048 tokens a 256-key window compiles to 33% of the causal FLOPs, forward and
  backward); against a KV cache the keys are cut to the window's slots
  (`_window_of_cache`), so a decode step costs the window, not the cache.
- A hand-written backward pass (`attend`, flash-attention style): the forward keeps,
  besides q, k, v and the output, only each query's softmax maximum and 1 / Σ exp — not
  the [seq, keys] probabilities, which autodiff would store for every layer. The backward
  pass recomputes the probabilities from q and k, and its softmax term is a sum over
  head_dim (Σ dO·O) instead of over keys.
- Layouts that need no copy of anything [queries, keys]-sized: heads go first
  ([batch, kv_heads, group, seq, head_dim], one copy of q, k, v each), so every score
  matmul is a plain batched matmul; the backward pass computes its scores transposed,
  [keys, queries], which is the layout the matmuls for dK and dV take as it is (the
  [queries, keys] layout would be copied to its transpose for each of them, twice per
  block); dQ comes out as [head_dim, queries] from kᵀ, a [keys, head_dim]-sized copy.
  dK and dV add up per block in place.

Gemma 2's soft cap (scaled scores s → cap·tanh(s / cap), before masking) is applied in the
forward pass and recomputed in the backward one, whose score gradient takes its
derivative 1 − tanh².
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array

# Query block of the causal attention, and at most this many blocks (longer sequences get
# longer blocks, so the unrolled loop and the compile time stay bounded).
BLOCK = 128
MAX_BLOCKS = 16
_MIN = jnp.finfo(jnp.float32).min


def attention_mask(
    segment_ids: Array,
    key_segment_ids: Array | None = None,
    query_offset: Array | int = 0,
    window: int = 0,
) -> Array:
    """[batch, 1, queries, keys] bool: causal, same segment, never padding (segment 0), and
    with `window` > 0 only the last `window` keys (key slot j is seen from query slot i if
    i - j < window, transformers' sliding window).

    Training: queries and keys are the same row. Decoding with a KV cache: the keys are the
    cache's slots (`key_segment_ids` [batch, slots]) and query i sits at slot
    `query_offset + i`. (The XLA path below never builds it whole: cuDNN takes it.)"""
    if key_segment_ids is None:
        key_segment_ids = segment_ids
    q_slots = _query_slots(segment_ids, query_offset)
    return _visible(segment_ids, key_segment_ids, q_slots, window=window)[:, None]


def _query_slots(segment_ids: Array, query_offset: Array | int) -> Array:
    return query_offset + jnp.arange(segment_ids.shape[-1], dtype=jnp.int32)


def _visible(
    q_seg: Array,
    k_seg: Array,
    q_slots: Array,
    keys_first: bool = False,
    key_start: int = 0,
    window: int = 0,
) -> Array:
    """Which keys each query sees: [batch, queries, keys] bool, or [batch, keys, queries]
    with `keys_first`. q_seg [batch, queries], k_seg [batch, keys] (the keys from slot
    `key_start` on), q_slots [queries]: the key slot of each query (a key is visible up to
    and including it, and with `window` > 0 from `q_slot - window + 1` on)."""
    k_slots = key_start + jnp.arange(k_seg.shape[-1])
    distance = q_slots[None, :] - k_slots[:, None]  # [keys, queries]
    seen = distance >= 0
    if window:
        seen &= distance < window
    if keys_first:
        same = k_seg[:, :, None] == q_seg[:, None, :]
        return seen[None] & same & (q_seg != 0)[:, None, :]
    same = q_seg[:, :, None] == k_seg[:, None, :]
    return seen.T[None] & same & (q_seg != 0)[:, :, None]


def dot_product_attention(
    q: Array,
    k: Array,
    v: Array,
    segment_ids: Array,
    key_segment_ids: Array | None = None,
    query_offset: Array | int = 0,
    *,
    scale: float | None = None,
    window: int = 0,
    softcap: float = 0.0,
    sinks: Array | None = None,
) -> Array:
    """Grouped-query attention with softmax in float32, masked as `attention_mask` says, one
    query block's mask at a time: never a whole [batch, queries, keys] mask (64 MiB per
    8192-token row, and a transposed copy of it in the backward pass).

    q: [batch, seq, heads, head_dim]; k, v: [batch, keys, kv_heads, head_dim];
    segment_ids: [batch, seq] int; key_segment_ids [batch, keys] (default: segment_ids),
    query_offset and window (static) as in `attention_mask`. scale multiplies q·k (default
    1/sqrt(head_dim)); softcap (static, 0 = off) maps the scaled scores s to
    softcap·tanh(s / softcap) before masking (Gemma 2). sinks [heads] (gpt-oss): a logit
    per head in every query's softmax, its probability dropped. Returns [batch, seq, heads,
    head_dim]."""
    b, t, h, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    if key_segment_ids is None:
        key_segment_ids = segment_ids
    q_slots = _query_slots(segment_ids, query_offset)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q = (q * scale).astype(q.dtype)  # scaled here: [t, d] not [t, keys]
    q = q.reshape(b, t, kv, h // kv, d).transpose(0, 2, 3, 1, 4)  # [b, kv, group, t, d]
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, kv, keys, d]
    # Causal query blocks need queries and keys at the same positions; otherwise (prefill
    # against a cache) one block sees every key.
    block = max(BLOCK, -(-t // MAX_BLOCKS)) if t == s else t
    if window and t != s and t + window - 1 < s:  # a few queries against a long cache
        k, v, key_segment_ids, q_slots = _window_of_cache(k, v, key_segment_ids, q_slots, window)
    mask = Masking(block, int(window), float(softcap))
    if sinks is not None:
        sinks = sinks.astype(jnp.float32).reshape(kv, h // kv)
    out = attend(q, k, v, segment_ids, key_segment_ids, q_slots, sinks, mask)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def _window_of_cache(k: Array, v: Array, k_seg: Array, q_slots: Array, window: int):
    """The cache slots a window lets consecutive queries see (decoding: one query): the
    `queries + window - 1` slots up to the last query's, k and v [batch, kv_heads, slots,
    head_dim] and k_seg [batch, slots] cut to them, and the query slots counted from the
    cut's start. A decode step then costs `window` keys, not the whole cache."""
    size = q_slots.shape[0] + window - 1
    start = jnp.clip(q_slots[0] - window + 1, 0, k.shape[2] - size)
    k, v = (jax.lax.dynamic_slice_in_dim(x, start, size, axis=2) for x in (k, v))
    k_seg = jax.lax.dynamic_slice_in_dim(k_seg, start, size, axis=1)
    return k, v, k_seg, q_slots - start


class Masking(NamedTuple):
    """The static part of `attend`: query block length, sliding window (0 = none) and
    score soft cap (0 = off)."""

    block: int
    window: int = 0
    softcap: float = 0.0

    def blocks(self, t: int, s: int) -> list[tuple[int, int, int, int]]:
        """(first query, end query, first key, end key) per query block of `t` queries
        against `s` keys: when the block is shorter than the sequence, keys up to the
        block's end (causal) and from `window - 1` before its first query on (so a window
        saves the scores it hides); one block sees all keys otherwise."""
        if self.block >= t:
            return [(0, t, 0, s)]
        return [
            (
                i,
                min(i + self.block, t),
                max(0, i - self.window + 1) if self.window else 0,
                min(i + self.block, t),
            )
            for i in range(0, t, self.block)
        ]

    def cap(self, scores: Array) -> tuple[Array, Array | float]:
        """The soft-capped scores and d(capped)/d(scores)."""
        if not self.softcap:
            return scores, 1.0
        tanh = jnp.tanh(scores / self.softcap)
        return self.softcap * tanh, 1.0 - tanh * tanh


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def attend(q: Array, k: Array, v: Array, q_seg, k_seg, q_slots, sinks, mask: Masking) -> Array:
    """softmax(cap(q·kᵀ), masked)·v per query block. q: [batch, kv_heads, group, seq,
    head_dim] (already scaled); k, v: [batch, kv_heads, keys, head_dim]; q_seg [batch,
    seq], k_seg [batch, keys], q_slots [seq] and `mask.window` say what each query sees
    (`_visible`); sinks: None, or [kv_heads, group] float32 logits each softmax includes
    and drops (their exp joins the denominator only). Returns q's shape and dtype."""
    return _attend_fwd(q, k, v, q_seg, k_seg, q_slots, sinks, mask)[0]


def _attend_fwd(q, k, v, q_seg, k_seg, q_slots, sinks, mask):
    outs, tops, inv_totals = [], [], []
    for qs, qe, ks, ke in mask.blocks(q.shape[3], k.shape[2]):
        scores = jnp.einsum(
            "bkgtd,bksd->bkgts",
            q[:, :, :, qs:qe],
            k[:, :, ks:ke],
            preferred_element_type=jnp.float32,
        )
        scores = mask.cap(scores)[0]
        # Masked entries at float32's minimum (finite, not -inf: a query that sees no key
        # at all, padding, must not give NaN).
        visible = _visible(
            q_seg[:, qs:qe], k_seg[:, ks:ke], q_slots[qs:qe], key_start=ks, window=mask.window
        )
        scores = jnp.where(visible[:, None, None], scores, _MIN)
        top = jnp.max(scores, axis=-1)
        if sinks is not None:
            top = jnp.maximum(top, sinks[None, :, :, None])
        exp = jnp.exp(scores - top[..., None])
        total = jnp.sum(exp, axis=-1)
        if sinks is not None:
            total = total + jnp.exp(sinks[None, :, :, None] - top)
        inv_total = 1.0 / total
        # Normalised after the matmul: [block, head_dim] multiplies, not [block, keys].
        out = jnp.einsum(
            "bkgts,bksd->bkgtd",
            exp.astype(v.dtype),
            v[:, :, ks:ke],
            preferred_element_type=jnp.float32,
        )
        outs.append((out * inv_total[..., None]).astype(q.dtype))
        tops.append(top)
        inv_totals.append(inv_total)
    out = jnp.concatenate(outs, axis=3)
    # The maximum and 1/Σ exp, not log-sum-exp: a padding query's scores are all the
    # float32 minimum, where max + log(Σ) rounds back to the minimum and the recomputed
    # probabilities would be 1 instead of 1/keys.
    top, inv_total = jnp.concatenate(tops, axis=3), jnp.concatenate(inv_totals, axis=3)
    return out, (q, k, v, q_seg, k_seg, q_slots, sinks, out, top, inv_total)


def _attend_bwd(mask, res, d_out):
    q, k, v, q_seg, k_seg, q_slots, sinks, out, top, inv_total = res
    # softmax's backward: p·(dp − Σ_keys p·dp), and Σ_keys p·dp = Σ_head_dim dO·O (a sink
    # carries no value, so this holds with it too).
    row = jnp.einsum("bkgtd,bkgtd->bkgt", d_out.astype(jnp.float32), out.astype(jnp.float32))
    d_sinks = None
    if sinks is not None:  # ∂O/∂sink = −p_sink·O, so d sink = −Σ_queries p_sink·(dO·O)
        p_sink = jnp.exp(sinks[None, :, :, None] - top) * inv_total
        d_sinks = -jnp.sum(p_sink * row, axis=(0, 3))
    # Everything [keys, queries]-shaped below is transposed: [batch, kv_heads, keys, group,
    # block]; the per-query terms broadcast over keys.
    top, inv_total, row = (x[:, :, None] for x in (top, inv_total, row))
    k_t = jnp.swapaxes(k, -1, -2)  # [batch, kv_heads, head_dim, keys]
    d_k = jnp.zeros(k.shape, jnp.float32)
    d_v = jnp.zeros(v.shape, jnp.float32)
    d_q_t = []
    for qs, qe, ks, ke in mask.blocks(q.shape[3], k.shape[2]):
        q_b, d_out_b = q[:, :, :, qs:qe], d_out[:, :, :, qs:qe]
        m = _visible(
            q_seg[:, qs:qe],
            k_seg[:, ks:ke],
            q_slots[qs:qe],
            keys_first=True,
            key_start=ks,
            window=mask.window,
        )
        m = m[:, None, :, None]  # [batch, 1, keys, 1, block]
        scores = jnp.einsum(
            "bksd,bkgtd->bksgt", k[:, :, ks:ke], q_b, preferred_element_type=jnp.float32
        )
        scores, d_cap = mask.cap(scores)
        probs = jnp.exp(jnp.where(m, scores, _MIN) - top[..., qs:qe]) * inv_total[..., qs:qe]
        d_probs = jnp.einsum(
            "bksd,bkgtd->bksgt", v[:, :, ks:ke], d_out_b, preferred_element_type=jnp.float32
        )
        # Masked scores were constants: no gradient flows through them (this matters only
        # for padding queries, whose probabilities are uniform over masked keys).
        d_scores = probs * (d_probs - row[..., qs:qe]) * d_cap
        d_scores = jnp.where(m, d_scores, 0.0).astype(q.dtype)
        d_v = d_v.at[:, :, ks:ke].add(
            jnp.einsum(
                "bksgt,bkgtd->bksd",
                probs.astype(v.dtype),
                d_out_b,
                preferred_element_type=jnp.float32,
            )
        )
        d_k = d_k.at[:, :, ks:ke].add(
            jnp.einsum("bksgt,bkgtd->bksd", d_scores, q_b, preferred_element_type=jnp.float32)
        )
        d_q_t.append(jnp.einsum("bkds,bksgt->bkdgt", k_t[..., ks:ke], d_scores))
    d_q = jnp.concatenate(d_q_t, axis=-1).transpose(0, 1, 3, 4, 2)
    return d_q, d_k.astype(k.dtype), d_v.astype(v.dtype), None, None, None, d_sinks


attend.defvjp(_attend_fwd, _attend_bwd)
