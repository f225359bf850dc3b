"""Train/eval steps: accumulation is the global token-weighted loss, bad steps are refused."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sft_jax import losses, steps
from sft_jax.model import GPT, GPTConfig
from sft_jax.optim import OptimConfig, make_optimizer

VOCAB = 256


def make_batch(rows=8, seq=16, seed=0, loss_fraction=None):
    """Random packed rows: two segments per row, a tail of padding, masks of uneven density."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((rows, seq), np.int32)
    pos = np.zeros((rows, seq), np.int32)
    for r in range(rows):
        a = rng.integers(3, seq - 4)
        b = rng.integers(1, seq - a)
        seg[r, :a], seg[r, a : a + b] = 1, 2
        pos[r, :a], pos[r, a : a + b] = np.arange(a), np.arange(b)
    frac = loss_fraction if loss_fraction is not None else rng.random((rows, 1))
    mask = ((rng.random((rows, seq)) < frac) & (seg > 0)).astype(np.float32)
    return {
        "tokens": rng.integers(0, VOCAB, (rows, seq)).astype(np.int32),
        "targets": rng.integers(0, VOCAB, (rows, seq)).astype(np.int32),
        "loss_mask": mask,
        "segment_ids": seg,
        "positions": pos,
    }


def setup(preset="tiny"):
    model = GPT(GPTConfig.preset(preset, vocab_size=VOCAB))
    tx, schedule = make_optimizer(OptimConfig(learning_rate=1e-2, decay="constant"), 10)
    state = nn.meta.unbox(steps.init_state(jax.random.key(0), model, tx))
    return model, tx, schedule, state


def test_accumulation_equals_one_big_batch():
    model, _, schedule, state = setup()
    # Plain SGD with lr 1: the parameter change is exactly the gradient, so comparing params
    # compares gradients (Adam's first step, ≈ lr·sign(g), would amplify float noise).
    tx = optax.sgd(1.0)
    state = state.replace(opt_state=tx.init(state.params))
    batch = make_batch(rows=8)
    # Rows carry very different loss-token counts, so a mean of micro-batch means would differ.
    counts = batch["loss_mask"].sum(axis=1)
    assert counts.max() > 3 * max(counts.min(), 1)
    run = lambda k: jax.jit(
        functools.partial(steps.train_step, model=model, tx=tx, schedule=schedule, micro_steps=k)
    )(state, batch)
    s1, m1 = run(1)
    s4, m4 = run(4)
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-5)
    assert float(m1["loss_tokens"]) == float(m4["loss_tokens"]) == batch["loss_mask"].sum()
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), s1.params, s4.params
    )
    # And the loss really is Σ mask·nll / Σ mask over the whole batch.
    loss_sum, count = steps.loss_sums(state.params, batch, model)
    np.testing.assert_allclose(m1["loss"], loss_sum / count, rtol=1e-6)
    # The mean of per-micro-batch means is a different number here: the contract matters.
    micro = steps._split_micro(jax.tree.map(jnp.asarray, batch), 4)
    means = [
        np.divide(
            *map(
                float,
                steps.loss_sums(state.params, jax.tree.map(lambda x, i=i: x[i], micro), model),
            )
        )
        for i in range(4)
    ]
    assert abs(np.mean(means) - float(m1["loss"])) > 1e-3


def test_metrics_count_tokens_and_step():
    model, tx, schedule, state = setup("tiny-llama")
    batch = make_batch(rows=4, seed=3)
    new, metrics = jax.jit(
        functools.partial(steps.train_step, model=model, tx=tx, schedule=schedule)
    )(state, batch)
    assert int(new.step) == 1
    assert float(metrics["tokens"]) == (batch["segment_ids"] > 0).sum()
    assert bool(metrics["finite"])
    np.testing.assert_allclose(metrics["learning_rate"], 1e-2)


def test_non_finite_loss_leaves_state_unchanged():
    model, tx, schedule, state = setup()
    bad = jax.tree.map(lambda x: x, state.params)
    bad["wte"]["embedding"] = bad["wte"]["embedding"].at[0, 0].set(jnp.nan)
    state = state.replace(params=bad)
    batch = make_batch(rows=2)
    batch["tokens"][:] = 0  # every row reads the NaN embedding
    new, metrics = jax.jit(
        functools.partial(steps.train_step, model=model, tx=tx, schedule=schedule)
    )(state, batch)
    assert not bool(metrics["finite"])
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), new.params, state.params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), new.opt_state, state.opt_state)


def test_eval_step_sums():
    model, _, _, state = setup()
    batch = make_batch(rows=4, seed=5)
    out = steps.eval_step(state.params, batch, model=model)
    loss_sum, count = steps.loss_sums(state.params, batch, model)
    assert float(out["loss_tokens"]) == float(count)
    np.testing.assert_allclose(out["loss_sum"], loss_sum)


def test_unrolled_init_is_the_scanned_init_split_per_layer():
    # Unrolled models are initialised as scanned ones and split (one layer's initialisers
    # to compile, not n_layers): the same tree, shapes and logical axis names as the
    # unrolled model's own init (shardings derive from them), values layer by layer.
    key, tokens = jax.random.key(3), jnp.zeros((1, 8), jnp.int32)
    unrolled = GPT(GPTConfig.preset("tiny-llama", vocab_size=97, scan_layers=False))
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
    describe = lambda t: jax.tree.map(
        lambda b: (b.value.shape, b.value.dtype, b.names), t, is_leaf=is_box
    )
    got = jax.eval_shape(lambda r: steps.init_params(r, unrolled), key)
    want = jax.eval_shape(lambda r: unrolled.init(r, tokens)["params"], key)
    assert describe(got) == describe(want)

    params = nn.meta.unbox(steps.init_params(key, unrolled))
    scanned = GPT(GPTConfig.preset("tiny-llama", vocab_size=97))
    stacked = nn.meta.unbox(scanned.init(key, tokens)["params"])
    for i in range(unrolled.cfg.n_layers):
        jax.tree.map(
            lambda a, b, i=i: np.testing.assert_array_equal(a, b[i]),
            params[f"layers_{i}"],
            stacked["layers"],
        )
    np.testing.assert_array_equal(
        params["embed_tokens"]["embedding"], stacked["embed_tokens"]["embedding"]
    )


def test_loss_caps_logits_as_the_config_says():
    # Gemma 2's final_softcap reaches the chunked loss: the train loss is the cross-entropy
    # of cap·tanh(logits / cap), not of the raw logits. The head is scaled up so that the
    # logits (~0.1 at init) reach the cap and are bent by it.
    cap = 2.0
    model = GPT(GPTConfig.preset("tiny-llama", vocab_size=VOCAB, n_layers=1, final_softcap=cap))
    params = nn.meta.unbox(steps.init_params(jax.random.key(0), model))
    params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 50
    batch = make_batch(rows=2, seed=7)

    @jax.jit
    def train_and_reference_losses(params, batch):
        hidden = model.apply(
            {"params": params},
            batch["tokens"],
            positions=batch["positions"],
            segment_ids=batch["segment_ids"],
            method="hidden_states",
        )
        raw = jnp.einsum("btd,vd->btv", hidden, steps.head_weight(model.cfg, params))
        targets, mask = batch["targets"], batch["loss_mask"]
        capped = losses.masked_cross_entropy(cap * jnp.tanh(raw / cap), targets, mask)[0]
        uncapped = losses.masked_cross_entropy(raw, targets, mask)[0]
        return steps.loss_sums(params, batch, model)[0], capped, uncapped

    got, capped, uncapped = map(float, train_and_reference_losses(params, batch))
    np.testing.assert_allclose(got, capped, rtol=1e-5)
    assert abs(got - uncapped) > 0.05 * uncapped, (got, uncapped)
