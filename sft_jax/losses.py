"""Masked next-token cross-entropy: "The loss" of docs/design.md.

The loss of a step is Σ loss_mask·nll / Σ loss_mask over the *global* batch, so functions
here return the two sums and let the caller divide once, after summing over micro-batches,
devices and hosts. Never a mean of means.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec


def masked_cross_entropy(
    logits: jax.Array, targets: jax.Array, loss_mask: jax.Array, label_smoothing: float = 0.0
) -> tuple[jax.Array, jax.Array]:
    """logits [batch, seq, vocab], targets [batch, seq] int, loss_mask [batch, seq] →
    (Σ mask·nll, Σ mask), both float32 scalars. `label_smoothing` ε > 0: the nll against
    (1 − ε)·onehot + ε/vocab, as torch's CrossEntropyLoss(label_smoothing=ε)."""
    nll = _nll(logits.astype(jnp.float32), targets, label_smoothing)
    mask = loss_mask.astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask)


def chunked_cross_entropy(
    hidden: jax.Array,
    head: jax.Array,
    targets: jax.Array,
    loss_mask: jax.Array,
    chunk: int = 128,
    layout: PartitionSpec | None = None,
    softcap: float = 0.0,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """The loss of `masked_cross_entropy(hidden @ head.T, …, label_smoothing)` without its
    logits.

    hidden [batch, seq, d_model] (the final norm's output), head [vocab, d_model] (the tied
    embedding or the transposed lm_head kernel), targets and loss_mask [batch, seq] →
    (Σ mask·nll, Σ mask). The sequence goes in chunks of `chunk` positions: at most
    [batch, chunk, vocab] float32 logits exist at a time, never [batch, seq, vocab] (412 MB
    for GPT-2 at 4 × 512, three times over in autodiff). Under differentiation, each chunk's
    gradients are formed right after its loss (d logits = softmax − onehot, masked), so the
    backward pass needs no recomputation: the same three matmuls as unfused autodiff.

    `layout`, a PartitionSpec of [batch, seq] over the mesh in force (`jax.set_mesh`), splits
    the work across devices: the rows arrive split over the axes of `layout[0]` and each
    device of the axes of `layout[1]` (over which the rows are the same) takes its own part
    of their positions. Each device runs the chunk loop on its positions with the whole head
    (gathered once, before the loop); the head's gradient and the sums are added across
    devices once, after it. Left to XLA's partitioner, the loop instead all-reduced a
    [vocab, d_model] gradient in every chunk (and, with the vocabulary split over `tensor`,
    logits-sized partial sums).

    `softcap` > 0 caps the logits as Gemma 2 does (transformers' final_logit_softcapping):
    softcap·tanh(logits / softcap), in float32, before the log-softmax; the gradient goes
    back through the cap (d logits = d capped · (1 − tanh²)). 0 leaves them as they are.

    `label_smoothing` ε > 0 takes the nll against (1 − ε)·onehot + ε/vocab, torch's
    CrossEntropyLoss(label_smoothing=ε) (of the capped logits): (1 − ε)·nll + ε·(log Z −
    mean logit), and d logits = softmax − (1 − ε)·onehot − ε/vocab."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"train.label_smoothing={label_smoothing}: use a value in [0, 1)")
    mask = loss_mask.astype(jnp.float32)
    return _chunked_ce(
        hidden, head, targets, mask, chunk, layout, float(softcap), float(label_smoothing)
    )


def _chunks(x: jax.Array, chunk: int) -> jax.Array:
    """[batch, seq, …] → [seq / chunk, batch, chunk, …], the sequence padded to whole chunks
    (padding carries mask 0: it adds nothing to either sum)."""
    b, t = x.shape[:2]
    x = jnp.pad(x, ((0, 0), (0, -t % chunk)) + ((0, 0),) * (x.ndim - 2))
    return jnp.swapaxes(x.reshape(b, -1, chunk, *x.shape[2:]), 0, 1)


def _chunk_logits(h: jax.Array, head: jax.Array) -> jax.Array:
    # [batch, chunk, d] · [vocab, d] → [batch, chunk, vocab], accumulated in float32.
    return jax.lax.dot_general(
        h, head, (((2,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )


def _soft_capped(logits: jax.Array, softcap: float) -> tuple[jax.Array, jax.Array | None]:
    """(softcap·tanh(logits / softcap), the tanh) of float32 logits; (logits, None) when
    softcap is 0. The tanh is kept for the gradient: d capped / d logits = 1 − tanh²."""
    if not softcap:
        return logits, None
    squashed = jnp.tanh(logits / softcap)
    return softcap * squashed, squashed


def _nll(logits: jax.Array, targets: jax.Array, smoothing: float = 0.0, log_z=None) -> jax.Array:
    """−log p(target) of float32 logits, against the smoothed target when `smoothing` > 0:
    (1 − ε)·(log Z − logit[target]) + ε·(log Z − mean logit)."""
    if log_z is None:
        log_z = jax.nn.logsumexp(logits, axis=-1)
    nll = log_z - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    if not smoothing:
        return nll
    return (1.0 - smoothing) * nll + smoothing * (log_z - jnp.mean(logits, axis=-1))


def _loss_sum(hidden, head, targets, mask, chunk, softcap, smoothing):
    """{"total": Σ mask·nll} of these (one device's) positions, chunk by chunk."""

    def body(total, xs):
        h, t, m = xs
        logits, _ = _soft_capped(_chunk_logits(h, head), softcap)
        return total + jnp.sum(_nll(logits, t, smoothing) * m), None

    xs = tuple(_chunks(x, chunk) for x in (hidden, targets, mask))
    return {"total": jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)[0]}


def _loss_sum_and_grads(hidden, head, targets, mask, chunk, softcap, smoothing):
    """{"total": Σ mask·nll, "d_hidden", "d_head": its gradients} of these (one device's)
    positions, chunk by chunk; the head's gradient adds up in float32 across the chunks."""
    vocab = head.shape[0]

    def body(carry, xs):
        total, d_head = carry
        h, t, m = xs
        logits, squashed = _soft_capped(_chunk_logits(h, head), softcap)  # [batch, chunk, vocab]
        # One exp pass serves the loss and its gradient: softmax = exp / Σ exp.
        top = jnp.max(logits, axis=-1, keepdims=True)
        exp = jnp.exp(logits - top)
        total_exp = jnp.sum(exp, axis=-1, keepdims=True)
        log_z = (top + jnp.log(total_exp))[..., 0]
        nll = _nll(logits, t, smoothing, log_z)
        # The (smoothed) target distribution: (1 − ε)·onehot + ε/vocab.
        target = jax.nn.one_hot(t, vocab, dtype=exp.dtype) * (1.0 - smoothing) + smoothing / vocab
        d_logits = exp * (m[..., None] / total_exp) - target * m[..., None]
        if squashed is not None:  # back through the cap to the raw logits
            d_logits = d_logits * (1.0 - squashed * squashed)
        d_logits = d_logits.astype(h.dtype)
        d_h = jnp.einsum("bcv,vd->bcd", d_logits, head, preferred_element_type=jnp.float32)
        d_head = d_head + jnp.einsum("bcv,bcd->vd", d_logits, h, preferred_element_type=jnp.float32)
        return (total + jnp.sum(nll * m), d_head), d_h

    xs = tuple(_chunks(x, chunk) for x in (hidden, targets, mask))
    init = (jnp.zeros((), jnp.float32), jnp.zeros(head.shape, jnp.float32))
    (total, d_head), d_hidden = jax.lax.scan(body, init, xs)
    b, t, d = hidden.shape
    d_hidden = jnp.swapaxes(d_hidden, 0, 1).reshape(b, -1, d)[:, :t]
    return {"total": total, "d_hidden": d_hidden, "d_head": d_head}


def _sums(
    hidden, head, targets, mask, chunk, layout, softcap, smoothing, grads
) -> dict[str, jax.Array]:
    """{"total": Σ mask·nll, "count": Σ mask} and, with `grads`, "d_hidden" and "d_head"
    (the gradients of the total), computed per `layout`."""
    head = head.astype(hidden.dtype)  # gathered (below) in the compute dtype, once
    mesh = jax.sharding.get_abstract_mesh()
    if layout is None or mesh.empty or mesh.size == 1:
        return _device_sums(
            hidden, head, targets, mask, chunk, softcap, smoothing, grads, (), (), ()
        )
    row_axes, seq_axes = (_names(part) for part in layout)
    # The head's gradient leaves summed and split over d_model across the row axes (a
    # reduce-scatter): no device holds a second whole float32 [vocab, d_model] copy.
    scatter = row_axes if grads and head.shape[1] % _size(row_axes) == 0 else ()
    local = functools.partial(
        _device_sums,
        chunk=chunk,
        softcap=softcap,
        smoothing=smoothing,
        grads=grads,
        row_axes=row_axes,
        seq_axes=seq_axes,
        scatter_axes=scatter,
    )
    # The arrays go in and out as the model lays them out (rows split, the same on every
    # device of the sequence axes): a sequence-split spec here would propagate into the
    # model's own layout. Each device takes its part of the positions inside.
    rows = PartitionSpec(row_axes or None)
    out_specs = {"total": PartitionSpec(), "count": PartitionSpec()}
    if grads:
        out_specs.update(d_hidden=rows, d_head=PartitionSpec(None, scatter or None))
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(rows, PartitionSpec(), rows, rows),
        out_specs=out_specs,
        check_vma=False,
    )(hidden, head, targets, mask)


def _device_sums(
    hidden,
    head,
    targets,
    mask,
    chunk,
    softcap,
    smoothing,
    grads,
    row_axes,
    seq_axes,
    scatter_axes,
):
    """`_sums` on one device's rows: its own part of their positions (split over
    `seq_axes`), then the sums and the head's gradient added over all the axes, once (the
    gradient scattered over `scatter_axes` along d_model)."""
    if seq_axes:
        part = hidden.shape[1] // _size(seq_axes)
        start = jax.lax.axis_index(seq_axes) * part
        hidden, targets, mask = (
            jax.lax.dynamic_slice_in_dim(x, start, part, axis=1) for x in (hidden, targets, mask)
        )
    local_sums = _loss_sum_and_grads if grads else _loss_sum
    chunk = min(chunk, hidden.shape[1])
    sums = local_sums(hidden, head, targets, mask, chunk, softcap, smoothing)
    sums["count"] = jnp.sum(mask)
    axes = row_axes + seq_axes
    if not axes:
        return sums
    # After the chunk loop: once per call, not once per chunk.
    sums["total"], sums["count"] = jax.lax.psum((sums["total"], sums["count"]), axes)
    if grads:
        d_head = sums["d_head"]
        if scatter_axes:
            d_head = jax.lax.psum_scatter(d_head, scatter_axes, scatter_dimension=1, tiled=True)
        rest = tuple(a for a in axes if a not in scatter_axes)
        sums["d_head"] = jax.lax.psum(d_head, rest) if rest else d_head
    if grads and seq_axes:  # [rows, seq, d_model] again, the same on every device
        sums["d_hidden"] = jax.lax.all_gather(sums["d_hidden"], seq_axes, axis=1, tiled=True)
    return sums


def _size(axes: tuple[str, ...]) -> int:
    return math.prod(jax.sharding.get_abstract_mesh().shape[a] for a in axes)


def _names(part) -> tuple[str, ...]:
    """The mesh axis names in one entry of a PartitionSpec (None, a name, or a tuple)."""
    return () if part is None else (part,) if isinstance(part, str) else tuple(part)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _chunked_ce(hidden, head, targets, mask, chunk, layout, softcap, smoothing):
    sums = _sums(hidden, head, targets, mask, chunk, layout, softcap, smoothing, grads=False)
    return sums["total"], sums["count"]


def _chunked_ce_fwd(hidden, head, targets, mask, chunk, layout, softcap, smoothing):
    sums = _sums(hidden, head, targets, mask, chunk, layout, softcap, smoothing, grads=True)
    # Zero-size arrays carry the input dtypes: residuals must be arrays.
    like = (jnp.zeros((0,), hidden.dtype), jnp.zeros((0,), head.dtype))
    return (sums["total"], sums["count"]), (sums["d_hidden"], sums["d_head"], like)


def _chunked_ce_bwd(chunk, layout, softcap, smoothing, res, g):
    d_hidden, d_head, (hidden_like, head_like) = res
    g_total = g[0]  # the count's cotangent does not reach the inputs
    return (
        (d_hidden * g_total).astype(hidden_like.dtype),
        (d_head * g_total).astype(head_like.dtype),
        None,
        None,
    )


_chunked_ce.defvjp(_chunked_ce_fwd, _chunked_ce_bwd)
