"""NEFTune (train.neftune_alpha): noise on the token embeddings scaled by each packed
example's own length, in training only."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from transformers.integrations.neftune import neftune_post_forward_hook

from configs import default
from sft_jax import sharding, steps, train
from sft_jax.model import GPT, GPTConfig, neftune_noise, neftune_scale, segment_lengths
from sft_jax.optim import OptimConfig, make_optimizer
from tests.run_config import model_config
from tests.test_steps import make_batch

ALPHA, D = 5.0, 64
# One packed row: examples of 8 and 40 tokens, then 16 of padding.
PACKED = np.array([[1] * 8 + [2] * 40 + [0] * 16], np.int32)


def test_each_token_counts_its_own_examples_length():
    np.testing.assert_array_equal(segment_lengths(PACKED)[0], [8] * 8 + [40] * 40 + [16] * 16)


def test_the_noise_of_each_packed_example_has_its_own_scale_and_padding_none():
    rows = np.repeat(PACKED, 16, axis=0)  # 16 draws of the row: 8·16·64 values per example
    noise = np.asarray(neftune_noise(jax.random.key(0), rows, D, ALPHA))
    assert noise.dtype == np.float32 and noise.shape == (*rows.shape, D)
    assert not noise[:, 48:].any()  # padding
    for span, length in ((slice(0, 8), 8), (slice(8, 48), 40)):
        bound = ALPHA / np.sqrt(length * D)
        part = noise[:, span]
        assert np.abs(part).max() <= bound and np.abs(part).max() > 0.99 * bound
        # U(-b, b): mean 0, variance b²/3 (≥ 8192 draws: within 5 %).
        assert abs(part.mean()) < 0.02 * bound
        np.testing.assert_allclose(part.var(), bound**2 / 3, rtol=0.05)
    # Not the packed row's length (48 tokens), which would shrink the first example's noise.
    assert np.abs(noise[:, :8]).max() > 2 * ALPHA / np.sqrt(48 * D)


def test_a_packed_example_gets_the_scale_it_gets_alone():
    packed = np.asarray(neftune_scale(PACKED, D, ALPHA))[0]
    first_alone = np.array([[1] * 8 + [0] * 56], np.int32)
    second_alone = np.array([[1] * 40 + [0] * 24], np.int32)
    np.testing.assert_array_equal(
        packed[:8], np.asarray(neftune_scale(first_alone, D, ALPHA))[0, :8]
    )
    np.testing.assert_array_equal(
        packed[8:48], np.asarray(neftune_scale(second_alone, D, ALPHA))[0, :40]
    )


def test_an_unpacked_example_gets_transformers_noise():
    # transformers' hook scales by the row's length: right for one unpadded example per row.
    embed = torch.nn.Embedding(10, D)
    embed.neftune_noise_alpha = ALPHA
    torch.manual_seed(0)
    theirs = neftune_post_forward_hook(embed, None, torch.zeros(64, 40, D)).numpy()
    ours = np.asarray(neftune_noise(jax.random.key(0), np.ones((64, 40), np.int32), D, ALPHA))
    assert abs(np.abs(ours).max() - np.abs(theirs).max()) < 1e-3 * np.abs(theirs).max()
    np.testing.assert_allclose(ours.var(), theirs.var(), rtol=0.02)


@pytest.fixture(scope="module")
def models():
    cfg = GPTConfig(
        vocab_size=256, max_seq_len=32, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=64
    )
    plain, noisy = GPT(cfg), GPT(dataclasses.replace(cfg, neftune_alpha=ALPHA))
    params = jax.jit(lambda rng: nn.meta.unbox(steps.init_params(rng, plain)))(jax.random.key(0))
    return plain, noisy, params


def test_training_sees_the_noise_evaluation_and_generation_do_not(models):
    plain, noisy, params = models
    batch = {k: jnp.asarray(v) for k, v in make_batch(rows=4, seq=16).items()}
    loss = jax.jit(
        lambda model, rng: steps.loss_sums(params, batch, model, rng)[0], static_argnums=0
    )
    clean, rng = loss(plain, None), jax.random.key(3)
    # Evaluation (no rng): no noise. Training (an rng): the noise changes the loss.
    assert loss(noisy, None) == clean
    assert abs(loss(noisy, rng) - clean) > 1e-6
    # Generation decodes deterministically: the same logits with and without NEFTune.
    logits = jax.jit(lambda m: m.apply({"params": params}, batch["tokens"]), static_argnums=0)
    np.testing.assert_array_equal(logits(noisy), logits(plain))


def test_the_train_step_gives_the_model_an_rng_for_the_noise(models):
    _, noisy, _ = models
    tx, schedule = make_optimizer(OptimConfig(learning_rate=1e-2), 10)
    fns = train.build_steps(noisy, tx, schedule, sharding.make_mesh(1, 1, 1, jax.devices()[:1]))
    assert fns.train_step.__wrapped__.keywords["dropout"]  # the flag that passes the rng


def test_the_config_key_reaches_the_model_and_bad_values_are_refused():
    config = ml_collections.ConfigDict(default.get_config())
    config.model.preset = "tiny"
    config.train.neftune_alpha = 5.0
    assert model_config(config).neftune_alpha == 5.0
    config.train.neftune_alpha = -1.0
    with pytest.raises(ValueError, match="neftune_alpha=-1.0"):
        model_config(config)
