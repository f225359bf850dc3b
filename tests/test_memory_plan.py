"""tools/memory_plan.py: per-device parameter and optimizer bytes equal what training holds."""

import jax
import pytest

from configs import tiny
from sft_jax import sharding, train
from sft_jax.model import GPT
from tools import memory_plan


def _shard_bytes(tree):
    return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("mesh", [(1, 8, 1), (1, 2, 4), (2, 2, 2)])
def test_planned_bytes_equal_the_real_shards(mesh):
    c = tiny.get_config()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    p = memory_plan.plan(c, 8)
    assert p["mesh"] == dict(zip(("data", "fsdp", "tensor"), mesh, strict=True))
    fns = train.build_steps(GPT(p["model"]), p["tx"], p["schedule"], sharding.make_mesh(*mesh))
    with fns.context():
        state = fns.init(jax.random.key(0))
    assert p["params"] == _shard_bytes(state.params)
    assert p["optimizer"] == _shard_bytes(state.opt_state)
    assert p["activations"] > 0


def test_a_mesh_that_does_not_cover_the_devices_is_refused():
    c = tiny.get_config()
    c.mesh.data, c.mesh.fsdp = 3, 1
    with pytest.raises(SystemExit, match="does not cover 8 devices"):
        memory_plan.plan(c, 8)
