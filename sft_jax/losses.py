"""Masked next-token cross-entropy, the loss contract of DESIGN.md.

The loss of a step is Σ loss_mask·nll / Σ loss_mask over the *global* batch, so functions
here return the two sums and let the caller divide once, after summing over micro-batches,
devices and hosts. Never a mean of means.
"""

from __future__ import annotations

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
