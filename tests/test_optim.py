"""Schedule shape, clipping and the weight-decay mask."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sft_jax.optim import OptimConfig, make_optimizer, make_schedule, weight_decay_mask


def test_warmup_then_cosine_to_the_end_ratio():
    s = make_schedule(
        OptimConfig(learning_rate=1.0, warmup_steps=10, end_learning_rate_ratio=0.1), 110
    )
    np.testing.assert_allclose([float(s(i)) for i in (0, 5, 10)], [0.0, 0.5, 1.0], atol=1e-6)
    np.testing.assert_allclose(float(s(60)), 0.1 + 0.9 * 0.5, atol=1e-6)  # half-way down
    np.testing.assert_allclose(float(s(110)), 0.1, atol=1e-6)


def test_linear_and_constant_decay():
    lin = make_schedule(
        OptimConfig(learning_rate=2.0, warmup_steps=0, decay="linear", end_learning_rate_ratio=0.0),
        100,
    )
    np.testing.assert_allclose([float(lin(0)), float(lin(50)), float(lin(100))], [2.0, 1.0, 0.0])
    const = make_schedule(OptimConfig(learning_rate=2.0, warmup_steps=4, decay="constant"), 100)
    np.testing.assert_allclose([float(const(2)), float(const(99))], [1.0, 2.0])


def test_bad_schedule_settings_name_the_key():
    with pytest.raises(ValueError, match="optim.decay"):
        make_schedule(OptimConfig(decay="exp"), 10)
    with pytest.raises(ValueError, match="optim.warmup_steps"):
        make_schedule(OptimConfig(warmup_steps=20), 10)


PARAMS = {
    "wte": {"embedding": jnp.ones((4, 2))},
    "wpe": jnp.ones((3, 2)),
    "h": {
        "ln_1": {"scale": jnp.ones(2), "bias": jnp.ones(2)},
        "mlp": {"c_fc": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}},
    },
    "lm_head": {"kernel": jnp.ones((2, 4))},
}


def test_decay_mask_skips_norms_biases_and_embeddings():
    mask = weight_decay_mask(PARAMS)
    assert mask["h"]["mlp"]["c_fc"]["kernel"] and mask["lm_head"]["kernel"]
    assert not any(
        [
            mask["wte"]["embedding"],
            mask["wpe"],
            mask["h"]["ln_1"]["scale"],
            mask["h"]["ln_1"]["bias"],
            mask["h"]["mlp"]["c_fc"]["bias"],
        ]
    )
    assert weight_decay_mask(PARAMS, decay_embeddings=True)["wte"]["embedding"]


def test_weight_decay_applies_only_where_masked():
    tx, _ = make_optimizer(
        OptimConfig(learning_rate=0.1, weight_decay=0.5, decay="constant", grad_clip_norm=0.0), 10
    )
    zero_grads = jax.tree.map(jnp.zeros_like, PARAMS)
    updates, _ = tx.update(zero_grads, tx.init(PARAMS), PARAMS)
    # With zero gradients only decay moves a parameter: -lr * wd * p = -0.05.
    np.testing.assert_allclose(updates["h"]["mlp"]["c_fc"]["kernel"], -0.05, rtol=1e-6)
    np.testing.assert_allclose(updates["h"]["mlp"]["c_fc"]["bias"], 0.0)
    np.testing.assert_allclose(updates["wte"]["embedding"], 0.0)


def test_global_norm_clipping_happens_before_adam():
    tx, _ = make_optimizer(
        OptimConfig(learning_rate=1.0, decay="constant", grad_clip_norm=1.0, b1=0.5), 10
    )
    p = {"w": {"kernel": jnp.zeros(4)}}
    g = {"w": {"kernel": jnp.asarray([3.0, 4.0, 0.0, 0.0])}}  # global norm 5
    _, state = tx.update(g, tx.init(p), p)
    # Adam's first moment after one step is (1 - b1) · the clipped gradient g / 5.
    mu = optax.tree_utils.tree_get(state, "mu")
    np.testing.assert_allclose(mu["w"]["kernel"], [0.3, 0.4, 0.0, 0.0], atol=1e-6)
