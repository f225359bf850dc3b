"""Every host makes the same decision, with 2 real processes × 2 faked CPU devices on
loopback (JAX's CPU collectives over gloo), launched once for two checks:

- `SavePolicy.decide` on the seconds path: each process has its own clock, skewed (process
  1's runs at a tenth of process 0's speed, from another origin), and both save at the
  same steps, the ones process 0's clock says, broadcast every `agree_every` steps.
- `Checkpointer.restore_latest_good` when the newest checkpoint is damaged where only
  process 1 reads (its own shards' files truncated): process 0 alone could restore it, yet
  both processes restore the previous step, and the same values.

The checkpoints are in a bucket of the GCS emulator (tests/storage_emulator.py), so both
processes write their shards to one place and read each other's back.
"""

import json
import os
import sys

import pytest

from tests.processes import ROOT, cpu_env, run_processes
from tests.storage_emulator import gcs_bucket, gcs_emulator  # noqa: F401 (pytest fixtures)

pytestmark = pytest.mark.slow

SAVE_EVERY_SECONDS = 5.0
STEPS = 40


def _save_steps(process_id: int) -> dict:
    from sft_jax import preemption

    # Process 0: one second per step. Process 1: a tenth of that, from another origin; on
    # its own it would save only at step 50.
    now = {"t": 0.0}
    speed, origin = (1.0, 0.0) if process_id == 0 else (0.1, 1e6)
    policy = preemption.SavePolicy(
        every_steps=0,
        every_seconds=SAVE_EVERY_SECONDS,
        last_step=STEPS + 100,
        stop=preemption.StopSignal(),
        clock=lambda: origin + speed * now["t"],
    )
    saves = []
    for step in range(1, STEPS + 1):
        now["t"] = float(step)
        save, stop = policy.decide(step)
        assert not stop
        if save:
            saves.append(step)
            policy.saved()
    return {"saves": saves}


def _restore_with_damage_on_one_host(process_id: int, workdir: str) -> dict:
    import jax
    import numpy as np
    from etils import epath
    from jax.experimental import multihost_utils

    from sft_jax import checkpoint

    mesh = jax.make_mesh((4,), ("fsdp",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))

    def values(step):  # the same on every process; random, so chunks go to data files
        return np.random.default_rng(step).standard_normal((8, 1024)).astype(np.float32)

    def state(step):
        return {"w": jax.make_array_from_callback((8, 1024), sharding, values(step).__getitem__)}

    ckpt = checkpoint.Checkpointer(workdir, keep=3, async_save=False, writer=True)
    for step in (2, 4):
        ckpt.save(step, state(step), {"step": step}, force=True)
    ckpt.wait()
    multihost_utils.sync_global_devices("saved")
    if process_id == 1:  # truncate the data files of the shards process 1 wrote (and reads)
        for f in epath.Path(ckpt.directory, "4", "state", "ocdbt.process_1", "d").iterdir():
            f.write_bytes(f.read_bytes()[:3])
    multihost_utils.sync_global_devices("damaged")
    abstract = {"w": jax.ShapeDtypeStruct((8, 1024), np.float32, sharding=sharding)}
    local = ckpt._try(4, "cannot be restored", ckpt._read, 4, "state", abstract)
    restored, meta, step = ckpt.restore_latest_good(abstract)
    exact = all(
        np.array_equal(np.asarray(shard.data), values(step)[shard.index])
        for shard in restored["w"].addressable_shards
    )
    ckpt.close()
    return {
        "own_read_of_4": local is not None,
        "step": step,
        "meta": meta,
        "restored_exactly": exact,
    }


def worker(process_id: int, port: int, workdir: str, out: str) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    result = {**_save_steps(process_id), **_restore_with_damage_on_one_host(process_id, workdir)}
    with open(out, "w") as f:
        json.dump(result, f)


def test_hosts_agree_on_when_to_save_and_which_checkpoint_to_restore(tmp_path, gcs_bucket):  # noqa: F811
    outs = [tmp_path / f"process{i}.json" for i in range(2)]
    errs = run_processes(
        lambda i, port: [
            sys.executable,
            "-m",
            "tests.test_preemption_multiprocess",
            str(i),
            str(port),
            f"{gcs_bucket}/run",
            str(outs[i]),
        ],
        env=cpu_env(devices=2),
        timeout=300,
    )
    first, second = (json.loads(out.read_text()) for out in outs)

    # Process 0's clock decides (every 10 steps, when 5 of its seconds have passed).
    assert first["saves"] == second["saves"] == [10, 20, 30, 40]

    # Process 0 could read step 4 by itself; process 1 could not: both restore step 2.
    assert first["own_read_of_4"] and not second["own_read_of_4"]
    assert first["step"] == second["step"] == 2
    assert first["meta"] == second["meta"] == {"step": 2}
    assert first["restored_exactly"] and second["restored_exactly"]
    assert "cannot be read on processes [1]" in errs[0]
    assert not os.path.exists(os.path.join(ROOT, "gs:"))  # all of it went to the bucket


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
