"""A Gemma-shaped model trains the same on 1 device and on a mesh of 8 (faked CPU devices).

A tiny Gemma 2: local layers with a sliding window shorter than the rows and global ones
between them (so the scanned layers differ by position), attention and final-logit soft
caps (the final one in the chunked loss, split over the mesh), (1 + w) and sandwich norms,
GeGLU, the scaled embedding, GQA and head_dim ≠ d_model / n_heads. The mesh splits rows
over data and fsdp and heads (and the loss's positions) over tensor.
"""

import jax
import numpy as np

from sft_jax import sharding, train
from sft_jax.model import GPT, GPTConfig
from sft_jax.optim import OptimConfig, make_optimizer
from tests.test_steps import VOCAB, make_batch

GEMMA = GPTConfig.preset(
    "gemma2-2b",
    vocab_size=VOCAB,
    max_seq_len=64,
    d_model=64,
    n_layers=4,
    n_heads=4,
    n_kv_heads=2,
    d_ff=96,
    head_dim=24,
    query_pre_attn_scalar=24,
    sliding_window=6,
    global_every=2,
    attn_softcap=5.0,
    final_softcap=0.5,
)
STEPS = 3


def _losses(mesh) -> tuple[list[float], dict]:
    model = GPT(GEMMA)
    tx, schedule = make_optimizer(OptimConfig(learning_rate=1e-2, warmup_steps=1), STEPS)
    fns = train.build_steps(model, tx, schedule, mesh)
    losses = []
    with fns.context():
        state = fns.init(jax.random.key(0))
        for i in range(STEPS):
            batch = jax.device_put(make_batch(rows=8, seq=32, seed=i), fns.batch_sharding)
            state, metrics = fns.train_step(state, batch)
            losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params)


def test_gemma_shaped_training_on_a_mesh_matches_one_device():
    assert GEMMA.local_layers == (True, False, True, False)
    ref_losses, ref_params = _losses(sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    losses, params = _losses(sharding.make_mesh(2, 2, 2))
    print(f"losses: 1 device {ref_losses}, mesh (2, 2, 2) {losses}")
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), params, ref_params)
