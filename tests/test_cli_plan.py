"""sft_jax/cli/plan.py (sft-jax-plan): per-device parameter and optimizer bytes equal what
training holds."""

import os
import subprocess

import jax
import pytest

from configs import tiny
from sft_jax import sharding, train
from sft_jax.cli import plan
from sft_jax.model import GPT


def _shard_bytes(tree):
    return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("mesh", [(1, 8, 1), (1, 2, 4), (2, 2, 2)])
def test_planned_bytes_equal_the_real_shards(mesh):
    c = tiny.get_config()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    p = plan.plan(c, 8)
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
        plan.plan(c, 8)


def test_the_command_line_prints_the_plan(console_script):
    tiny_py = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py")
    done = subprocess.run(
        [console_script("sft-jax-plan"), "--config", tiny_py, "--devices", "8",
         "--config.mesh.fsdp=2", "--config.mesh.tensor=4"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "mesh {'data': 1, 'fsdp': 2, 'tensor': 4}; per device:" in done.stdout
    for line in ("params", "optimizer state", "gradients", "activations", "total"):
        assert f"  {line} " in done.stdout


def test_a_missing_config_is_a_flags_error(capsys):
    with pytest.raises(SystemExit) as e:
        plan.main(["--devices", "8"])
    assert e.value.code == 1 and "--config" in capsys.readouterr().err
