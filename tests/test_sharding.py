"""Mesh building, rule-based shardings, and the same training on 1 device and on 8."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from sft_jax import sharding, train
from sft_jax.model import GPT, GPTConfig
from sft_jax.optim import OptimConfig, make_optimizer
from tests.test_steps import make_batch

VOCAB = 256


def test_make_mesh_fills_the_free_axis_and_checks_sizes():
    assert len(jax.devices()) == 8
    assert dict(sharding.make_mesh(2, -1, 1).shape) == {
        "data": 2,
        "fsdp": 4,
        "expert": 1,
        "tensor": 1,
    }
    assert dict(sharding.make_mesh(1, 2, 4).shape) == {
        "data": 1,
        "fsdp": 2,
        "expert": 1,
        "tensor": 4,
    }
    with pytest.raises(ValueError, match="mesh.data × mesh.fsdp × mesh.expert × mesh.tensor = 6"):
        sharding.make_mesh(2, 3, 1)
    with pytest.raises(ValueError, match="3 does not divide 8"):
        sharding.make_mesh(3, -1, 1)
    with pytest.raises(ValueError, match="at most one may be -1"):
        sharding.make_mesh(-1, -1, 1)


def test_get_path_walks_nested_dicts():
    tree = {"layers": {"mlp": {"up_proj": {"kernel": 3}}}}
    assert sharding.get_path(tree, ("layers", "mlp", "up_proj", "kernel")) == 3
    assert sharding.get_path(tree, ()) is tree


def test_logical_to_sharding_skips_axes_that_do_not_divide():
    mesh = sharding.make_mesh(1, 2, 4)
    s = sharding.logical_to_sharding(P("vocab", "embed"), (50257, 64), mesh)
    assert s.spec == P(None, "fsdp")  # 50257 is not divisible by tensor=4: replicated
    s = sharding.logical_to_sharding(P("vocab", "embed"), (50304, 64), mesh)
    assert s.spec == P("tensor", "fsdp")
    s = sharding.logical_to_sharding(P("batch", None), (8, 16), mesh)
    assert s.spec == P("fsdp", None)  # tensor is not a batch axis; data has size 1


def _run(mesh, micro_steps=1, n_steps=4, preset="tiny"):
    model = GPT(GPTConfig.preset(preset, vocab_size=VOCAB))
    tx, schedule = make_optimizer(OptimConfig(learning_rate=3e-3, warmup_steps=1), n_steps)
    fns = train.build_steps(model, tx, schedule, mesh, micro_steps)
    losses = []
    with fns.context():
        state = fns.init(jax.random.key(0))
        for i in range(n_steps):
            batch = jax.device_put(make_batch(rows=8, seq=16, seed=i % 2), fns.batch_sharding)
            state, m = fns.train_step(state, batch)
            losses.append(float(m["loss"]))
    return losses, jax.device_get(state.params), state, fns


@pytest.mark.parametrize("shape", [(2, 4, 1), (1, 2, 4), (8, 1, 1), (1, 8, 1), (2, 2, 2)])
def test_mesh_training_matches_one_device(shape):
    one = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    ref_losses, ref_params, _, _ = _run(one)
    losses, params, state, fns = _run(sharding.make_mesh(*shape))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert losses[-2] < losses[0]  # batches alternate: compare steps on the same batch
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), params, ref_params)
    # The layout really follows the rules: an MLP kernel [layers, embed, mlp].
    kernel = state.params["h"]["mlp"]["c_fc"]["kernel"]
    data, fsdp, tensor = shape
    expected = P(None, "fsdp" if fsdp > 1 else None, "tensor" if tensor > 1 else None)
    assert kernel.sharding.spec == expected
    assert len(kernel.addressable_shards[0].data.reshape(-1)) == kernel.size // (fsdp * tensor)
    # Adam's moments are laid out like the parameters they track.
    mu = state.opt_state[1][0].mu["h"]["mlp"]["c_fc"]["kernel"]
    assert mu.sharding.spec == expected


def test_llama_with_accumulation_on_fsdp_tensor_mesh_matches_one_device():
    one = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    ref, _, _, _ = _run(one, micro_steps=2, preset="tiny-llama", n_steps=3)
    got, _, _, _ = _run(sharding.make_mesh(1, 2, 4), micro_steps=2, preset="tiny-llama", n_steps=3)
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_loss_logits_stay_split_under_tensor_parallelism():
    """With tensor=4 no device ever holds [rows, seq, full vocab]: the chunked loss runs per
    device in shard_map, tensor splitting the positions (the head is gathered whole, so
    its gradient is reduced once, after the chunk loop), so XLA's compiled program has
    only [rows/fsdp, seq/tensor, vocab] logits."""
    import re

    model = GPT(GPTConfig.preset("tiny", vocab_size=512))
    tx, schedule = make_optimizer(OptimConfig(), 10)
    fns = train.build_steps(model, tx, schedule, sharding.make_mesh(1, 2, 4))
    with fns.context():
        state = fns.init(jax.random.key(0))
        batch = jax.device_put(make_batch(rows=8, seq=16), fns.batch_sharding)
        hlo = fns.train_step.lower(state, batch).compile().as_text()
    assert re.search(r"f32\[4,4,512\]", hlo)  # the local logits: 8/2 rows, 16/4 positions
    assert not re.search(r"f32\[\d+,16,512\]", hlo)
