"""sft_jax/model/moe.py against plain numpy: the two grouped matmuls (values and gradients,
rows past the groups), the dispatch with and without a capacity factor (each expert keeps
its earliest slots), and padding that reaches no expert."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft_jax.model import PRESETS
from sft_jax.model.moe import grouped_matmul, mix, route

CFG = dataclasses.replace(
    PRESETS["tiny-moe"], d_model=16, d_expert=12, n_experts=5, experts_per_token=2
)


def _numpy_grouped(lhs, rhs, sizes):
    out = np.zeros((lhs.shape[0], rhs.shape[-1]), np.float64)
    start = 0
    for g, n in enumerate(sizes):
        out[start : start + n] = lhs[start : start + n] @ rhs[g]
        start += n
    return out


@pytest.mark.parametrize("impl", ["blocked", "ragged"])
@pytest.mark.parametrize("sizes", [[10, 0, 25, 7], [0, 0, 0, 40], [3, 1, 1, 2]])
def test_grouped_matmul_equals_a_loop_over_groups(impl, sizes):
    rng = np.random.default_rng(0)
    lhs, rhs = rng.normal(size=(50, 16)), rng.normal(size=(4, 16, 8))
    got = grouped_matmul(jnp.asarray(lhs, jnp.float32), jnp.asarray(rhs, jnp.float32),
                         jnp.asarray(sizes), impl)  # fmt: skip
    np.testing.assert_allclose(got, _numpy_grouped(lhs, rhs, sizes), atol=1e-4)
    assert not np.asarray(got)[sum(sizes) :].any()  # rows past the groups: zeros

    def loss(impl, x, w):
        return jnp.sum(jnp.sin(grouped_matmul(x, w, jnp.asarray(sizes), impl)))

    x, w = jnp.asarray(lhs, jnp.float32), jnp.asarray(rhs, jnp.float32)
    got_grads = jax.grad(loss, (1, 2))(impl, x, w)
    want_grads = jax.grad(lambda x, w: jnp.sum(jnp.sin(_loop(x, w, sizes))), (0, 1))(x, w)
    for g, want in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, want, atol=1e-4)


def _loop(x, w, sizes):
    """The grouped matmul as JAX ops per group (the reference's gradients)."""
    parts, start = [], 0
    for g, n in enumerate(sizes):
        parts.append(x[start : start + n] @ w[g])
        start += n
    parts.append(jnp.zeros((x.shape[0] - start, w.shape[-1]), x.dtype))
    return jnp.concatenate(parts)


def _weights(seed=0):
    rng = np.random.default_rng(seed)
    e, d, f = CFG.n_experts, CFG.d_model, CFG.d_expert
    shapes = {"gate_proj": (e, d, f), "up_proj": (e, d, f), "down_proj": (e, f, d)}
    return {k: jnp.asarray(0.3 * rng.normal(size=s), jnp.float32) for k, s in shapes.items()}


def _reference_mix(tokens, experts, weights, real, w, capacity=None):
    """Each token's slots in token order; an expert past `capacity` slots takes no more."""
    out = np.zeros_like(tokens)
    taken = np.zeros(CFG.n_experts, int)
    silu = lambda z: z / (1 + np.exp(-z))
    for t in range(tokens.shape[0]):
        if not real[t]:
            continue
        for slot in range(experts.shape[1]):
            e = experts[t, slot]
            if capacity is not None and taken[e] >= capacity:
                continue
            taken[e] += 1
            x = tokens[t]
            h = silu(x @ w["gate_proj"][e]) * (x @ w["up_proj"][e])
            out[t] += weights[t, slot] * (h @ w["down_proj"][e])
    return out


@pytest.mark.parametrize("capacity_factor", [0.0, 0.5, 1.0])
def test_dispatch_equals_a_loop_over_tokens(capacity_factor):
    rng = np.random.default_rng(1)
    n = 24
    tokens = rng.normal(size=(n, CFG.d_model)).astype(np.float32)
    logits = rng.normal(size=(n, CFG.n_experts)).astype(np.float32)
    logits[:, 0] += 2.0  # expert 0 is popular: a capacity factor < 1 drops some of its slots
    real = np.arange(n) < 20  # the last four are padding
    cfg = dataclasses.replace(CFG, moe_capacity_factor=capacity_factor)
    weights, experts, _ = route(cfg, jnp.asarray(logits))
    weights, experts = np.asarray(weights), np.asarray(experts)
    w = _weights()
    got = mix(cfg, jnp.asarray(tokens), jnp.asarray(experts), jnp.asarray(weights),
              jnp.asarray(real), w)  # fmt: skip
    # Capacity counts every slot of the layer call, padding's included (static shapes).
    capacity = None
    if capacity_factor:
        capacity = int(np.ceil(capacity_factor * n * cfg.experts_per_token / cfg.n_experts))
    want = _reference_mix(tokens, experts, weights, real, {k: np.asarray(v) for k, v in w.items()},
                          capacity)  # fmt: skip
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert not np.asarray(got)[~real].any()  # padding reaches no expert
    if capacity_factor == 0.5:  # the cap bit: something was dropped
        assert np.abs(want - _reference_mix(tokens, experts, weights, real,
                      {k: np.asarray(v) for k, v in w.items()})).max() > 1e-3  # fmt: skip


def test_routers_pick_as_their_families_do():
    logits = jnp.asarray([[1.0, 3.0, 2.0, -1.0]])
    softmax_first = dataclasses.replace(CFG, n_experts=4, router_norm_topk=False)
    w, e, p = route(softmax_first, logits)
    probs = np.exp([1.0, 3.0, 2.0, -1.0]) / np.exp([1.0, 3.0, 2.0, -1.0]).sum()
    np.testing.assert_allclose(w[0], probs[[1, 2]], rtol=1e-6)
    assert e.tolist() == [[1, 2]]
    w, _, _ = route(dataclasses.replace(softmax_first, router_norm_topk=True), logits)
    np.testing.assert_allclose(w[0], probs[[1, 2]] / probs[[1, 2]].sum(), rtol=1e-6)
    w, _, _ = route(dataclasses.replace(softmax_first, router="topk_softmax"), logits)
    np.testing.assert_allclose(w[0], np.exp([3.0, 2.0]) / np.exp([3.0, 2.0]).sum(), rtol=1e-6)
