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

And the real `python -m sft_jax.main` as 2 processes, one of them sent SIGTERM mid-run:
JAX's preemption service (the processes' own SIGTERM handling left to it) stops both at the
same step, each saves it, and the same command run again resumes there.
"""

import json
import os
import re
import signal
import sys
import time

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


STOP_STEPS = 100  # far more than run before a stop: a SIGTERM takes ~1 s to reach every host
TRAIN = [
    "--config",
    "configs/tiny.py",
    f"--config.train.steps={STOP_STEPS}",
    "--config.train.log_every=1",  # metrics.jsonl shows the steps as they run
    "--config.checkpoint.save_every=1000",  # only the stop and the last step save
    "--config.data.train=synthetic:mix:400",
    "--config.data.validation=0",
    "--config.train.progress_bar=False",
    "--config.train.peak_flops=1e9",  # not measured (a second of matmuls in each process)
]


def _train(workdir, meanwhile=None) -> list[str]:
    return run_processes(
        lambda i, port: [
            sys.executable,
            "-m",
            "sft_jax.main",
            f"--workdir={workdir}",
            *TRAIN,
            # The second run loads the first's compiled steps instead of compiling again.
            f"--config.train.compilation_cache_dir={workdir}/xla_cache",
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={i}",
        ],
        env=cpu_env(devices=2),
        timeout=300,
        meanwhile=meanwhile,
    )


def _logged_steps(workdir) -> list[int]:
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            return [json.loads(line)["step"] for line in f if line.endswith("\n")]
    except FileNotFoundError:
        return []


def _sigterm_after(workdir, step: int, process: int, signalled: list[int]):
    """While the processes run: once WORKDIR/metrics.jsonl logs a step past `step`, SIGTERM
    `process` (only), noting the last logged step in `signalled`."""

    def meanwhile(procs, stderr_paths):
        deadline = time.monotonic() + 240
        while not (logged := _logged_steps(workdir)) or logged[-1] <= step:
            running = all(p.poll() is None for p in procs)
            assert running and time.monotonic() < deadline, (
                f"no step past {step} logged; process {process}'s stderr:\n"
                + open(stderr_paths[process]).read()[-3000:]
            )
            time.sleep(0.05)
        signalled.append(logged[-1])
        procs[process].send_signal(signal.SIGTERM)

    return meanwhile


def _stopped_at(errs: list[str]) -> int:
    """The step both processes say they stopped at, after saving it."""
    stopped = [re.findall(rf"stopped at step (\d+) of {STOP_STEPS}", err) for err in errs]
    assert stopped[0] == stopped[1] and len(stopped[0]) == 1, stopped
    return int(stopped[0][0])


def test_sigterm_to_one_process_stops_both_at_one_saved_step(tmp_path):
    workdir = tmp_path / "run"
    signalled = []

    # Process 1 gets SIGTERM once step 2 is logged (step 1 compiles); process 0, which
    # writes the metrics, gets nothing.
    step = _stopped_at(_train(workdir, _sigterm_after(workdir, 1, 1, signalled)))
    assert signalled[0] < step < STOP_STEPS
    # Only that step was saved, and committed (Orbax renames a step's folder when done).
    assert os.listdir(workdir / "checkpoints") == [str(step)]
    assert _logged_steps(workdir)[-1] == step

    # The same command again resumes there; SIGTERM to process 0 this time, as soon as it
    # has restored, before its first step: JAX's sync point counts calls from 1, so a
    # notice then must stop the run at its first step or so, not at a global step number
    # (asked with those, a resumed run never stopped).
    errs = _train(workdir, _sigterm_once_resumed(0))
    assert all(re.search(rf"resumed from \S+ at step {step}\n", err) for err in errs)
    again = _stopped_at(errs)
    assert step < again <= step + 3
    assert _logged_steps(workdir) == list(range(1, again + 1))  # each step once
    assert sorted(os.listdir(workdir / "checkpoints"), key=int) == [str(step), str(again)]


def _sigterm_once_resumed(process: int):
    """While the processes run: SIGTERM `process` once its stderr says it resumed."""

    def meanwhile(procs, stderr_paths):
        deadline = time.monotonic() + 240
        while "resumed from" not in open(stderr_paths[process]).read():
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline
            time.sleep(0.05)
        procs[process].send_signal(signal.SIGTERM)

    return meanwhile


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
