"""What the family parity tests share (tests/test_families.py, test_moe_families.py,
test_gpt_oss.py, test_moe_run.py): the tiny shapes, a padded batch, logits from
transformers and from sft_jax (jitted once per config), and a few train steps."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

from sft_jax import steps
from sft_jax.model import GPT

VOCAB = 160
SEQ = 12  # longer than every sliding window of the parity tests' models
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=48,
    intermediate_size=80,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
)


def batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCAB, (2, SEQ))
    mask = np.ones((2, SEQ), np.int64)
    mask[1, 9:] = 0  # right padding in the second row
    return tokens, mask


def train_batch(tokens, mask) -> dict:
    """Padded rows [rows, seq] (mask 1 on real tokens) as a training batch: next-token
    targets, loss on every real position but the last, one segment per row."""
    seq = tokens.shape[1]
    return {
        "tokens": jnp.asarray(tokens, jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(seq), tokens.shape),
        "segment_ids": jnp.asarray(mask, jnp.int32),
        "targets": jnp.asarray(np.roll(tokens, -1, axis=1), jnp.int32),
        "loss_mask": jnp.asarray(mask, jnp.float32).at[:, -1].set(0),
    }


def torch_logits(model, tokens, mask):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask))
    return out.logits.float().numpy()


@functools.partial(jax.jit, static_argnums=0)
def forward(cfg, params, tokens, segment_ids, positions):
    # Jitted once per config and shape: the tests of a family share one compile.
    return GPT(cfg).apply({"params": params}, tokens, positions=positions, segment_ids=segment_ids)


def our_logits(cfg, params, tokens, segment_ids, positions=None):
    if positions is None:
        positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
    args = (tokens, segment_ids, positions)
    return np.asarray(forward(cfg, params, *(jnp.asarray(a, jnp.int32) for a in args)))


def fine_tune(cfg, params, n_steps=3):
    """A few optimizer steps of `steps.train_step` on the padded batch."""
    model = GPT(cfg)
    tx = optax.adam(1e-2)
    state = steps.state_from_params(jax.tree.map(jnp.asarray, params), jax.random.key(0), tx)
    rows = train_batch(*batch())
    step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, schedule=lambda s: 0.0))
    losses = []
    for _ in range(n_steps):
        state, metrics = step(state, rows)
        losses.append(float(metrics["loss"]))
    return state.params, losses


def packed_rows_error(cfg, params, ref) -> float:
    """Rows of two examples each (positions restart, segment ids differ), both longer than
    the window: the largest difference between our logits of each packed example and
    `ref`, transformers' logits of `batch()`'s rows alone (a causal model's logits of a
    prefix are the prefix's). Same shape as `batch()`: the same compiled forward."""
    tokens, _ = batch()
    n0, n1 = 7, 9  # the first example's length in each row; the second fills the row
    rows = np.stack(
        [np.r_[tokens[0, :n0], tokens[1, : SEQ - n0]], np.r_[tokens[1, :n1], tokens[0, : SEQ - n1]]]
    )
    segments = np.stack([np.r_[[1] * n0, [2] * (SEQ - n0)], np.r_[[1] * n1, [2] * (SEQ - n1)]])
    positions = np.stack(
        [np.r_[np.arange(n0), np.arange(SEQ - n0)], np.r_[np.arange(n1), np.arange(SEQ - n1)]]
    )
    out = our_logits(cfg, params, rows, segments, positions)
    pairs = [
        (out[0, :n0], ref[0, :n0]),
        (out[0, n0:], ref[1, : SEQ - n0]),
        (out[1, :n1], ref[1, :n1]),
        (out[1, n1:], ref[0, : SEQ - n1]),
    ]
    return max(float(np.abs(got - want).max()) for got, want in pairs)


def shifted_batch(tokens, mask) -> dict:
    """`train_batch` with transformers' label shift: position t predicts token t + 1 and
    counts where both are real (labels -100 on padding)."""
    rows = train_batch(tokens, mask)
    rows["loss_mask"] = jnp.asarray(mask * np.roll(mask, -1, axis=1), jnp.float32).at[:, -1].set(0)
    return rows


def sgd_step(cfg, params, rows) -> tuple[dict, dict]:
    """(the gradient, as the change one SGD step of learning rate 1 makes to every
    parameter, and the step's metrics) of `steps.train_step` on `rows`."""
    tx = optax.sgd(1.0)
    state = steps.state_from_params(jax.tree.map(jnp.asarray, params), jax.random.key(0), tx)
    step = functools.partial(steps.train_step, model=GPT(cfg), tx=tx, schedule=lambda s: 0.0)
    new, metrics = jax.jit(step)(state, rows)
    grads = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), state.params, new.params)
    return grads, metrics
