"""The SLURM launch, under a real SLURM (tests/slurm_cluster.py: munged, slurmctld and slurmd
on loopback), with no launch flags:

- `srun -N1 -n2 python -m sft_jax.main …` on 2 × 2 faked CPU devices: both tasks join one
  run (JAX's SLURM detection) and the losses equal one process on 4 devices;
- `sbatch launch/slurm.sbatch` (the script the README gives, unchanged but for the node
  shape and `--gpus-per-node=0`), `scontrol requeue`d while training: the SIGTERM makes the
  run save the step it is on and exit; SLURM starts the job again, which resumes from that
  checkpoint and ends with the parameters of the uninterrupted `srun` run, bit for bit.
"""

import json
import os
import re
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from sft_jax import runs
from tests import required, slurm_cluster
from tests.processes import ROOT, cpu_env

pytestmark = [
    pytest.mark.slow,
    # One worker for both tests; the fixtures are session-scoped because pytest tears a
    # module's fixtures down whenever the worker runs another module's test in between.
    pytest.mark.xdist_group("slurm"),
    required.skip_unless_ci(slurm_cluster.available()),
]

# Enough steps that a SIGTERM after the first one (JAX's stop takes about a second) always
# lands well before the end, even on a fast machine.
STEPS = 20
ARGS = [
    "--config",
    "configs/tiny.py",
    f"--config.train.steps={STEPS}",
    "--config.train.log_every=1",
    "--config.train.eval_every=0",
    "--config.checkpoint.save_every=0",  # the last step and a preemption's only
    "--config.data.train=synthetic:mix:400",
    "--config.data.validation=",
    "--config.optim.warmup_steps=1",
    "--config.train.progress_bar=False",
    "--config.train.peak_flops=1e12",  # not measured: MFU is not what these tests check
]


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    with slurm_cluster.slurm_cluster(str(tmp_path_factory.mktemp("slurm"))) as env:
        yield env


@pytest.fixture(scope="session")
def xla_cache(tmp_path_factory):
    """One compilation cache for the module's runs: the later ones load the executables."""
    return str(tmp_path_factory.mktemp("xla_cache"))


def _task_env(cluster: dict, devices: int) -> dict:
    """What each SLURM task inherits: the cluster's settings, faked CPU devices, and this
    interpreter first on PATH (the script runs `python`)."""
    env = {**cluster, **{k: v for k, v in cpu_env(devices).items() if "SLURM" not in k}}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def _records(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _losses(workdir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(workdir) if "loss" in r}


def _final_params(workdir) -> list[np.ndarray]:
    run = runs.load_run(str(workdir))
    assert run.step == STEPS
    return jax.tree.leaves(jax.device_get(run.params))


@pytest.fixture(scope="session")
def one_process_run(tmp_path_factory, xla_cache):
    workdir = tmp_path_factory.mktemp("one_process")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "sft_jax.main",
            f"--workdir={workdir}",
            *ARGS,
            f"--config.train.compilation_cache_dir={xla_cache}",
        ],
        cwd=ROOT,
        env=cpu_env(devices=4),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir


@pytest.fixture(scope="session")
def srun_run(tmp_path_factory, cluster, xla_cache):
    """`srun -N1 -n2` of the real main, no launch flags: (workdir, the tasks' stderr)."""
    workdir = tmp_path_factory.mktemp("srun")
    out = subprocess.run(
        [
            "srun",
            "-N1",
            "-n2",
            "--kill-on-bad-exit=1",
            "python",
            "-m",
            "sft_jax.main",
            f"--workdir={workdir}",
            *ARGS,
            f"--config.train.compilation_cache_dir={xla_cache}",
        ],
        cwd=ROOT,
        env=_task_env(cluster, devices=2),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[:3000] + "\n[…]\n" + out.stderr[-3000:]
    return workdir, out.stderr


def test_srun_tasks_join_one_run_without_flags(srun_run, one_process_run):
    workdir, stderr = srun_run
    for i in range(2):
        assert f"process {i} of 2, 2 local devices, 4 in all (distributed JAX via SLURM)" in stderr
    got, ref = _losses(workdir), _losses(one_process_run)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == pytest.approx(ref, rel=1e-6)


def _wait(predicate, what: str, timeout: float = 600, poll: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_requeued_sbatch_job_resumes_to_the_uninterrupted_bits(
    tmp_path, cluster, srun_run, xla_cache
):
    workdir, log = tmp_path / "run", tmp_path / "job.log"
    env = _task_env(cluster, devices=2)
    submitted = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--nodes=1",
            "--ntasks-per-node=2",
            "--gpus-per-node=0",
            f"--output={log}",
            "launch/slurm.sbatch",
            "configs/tiny.py",
            str(workdir),
            *ARGS[2:],
            f"--config.train.compilation_cache_dir={xla_cache}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    job = submitted.stdout.strip().split(";")[0]
    metrics = workdir / "metrics.jsonl"

    def training_steps():
        return metrics.exists() and any("loss" in r for r in _records(workdir))

    def state():
        return slurm_cluster.job_state(cluster, job)

    try:
        _wait(training_steps, "the first training step")
        interrupted_at = max(r["step"] for r in _records(workdir))
        subprocess.run(["scontrol", "requeue", job], env=cluster, check=True)
        # A requeued job waits two minutes before it may start again; not here.
        _wait(lambda: state() == "PENDING", "the job to be requeued", timeout=300)
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=cluster)
        _wait(lambda: state() in ("COMPLETED", "FAILED", "CANCELLED"), "the job", poll=0.5)
    finally:
        subprocess.run(["scancel", job], env=cluster)
    text = log.read_text()
    assert state() == "COMPLETED", text[-3000:]
    assert "attempt 1," in text and "attempt 2," in text
    # The first attempt saved the step the SIGTERM found it on, before the end…
    stopped = set(re.findall(r"stopped at step (\d+) of", text))
    assert len(stopped) == 1, text[-3000:]  # both processes: the same step
    saved = int(stopped.pop())
    assert interrupted_at <= saved < STEPS
    # …and the second resumed from it, to the same bits as the run never interrupted.
    assert set(re.findall(r"resumed from \S+ at step (\d+)", text)) == {str(saved)}
    for a, b in zip(_final_params(workdir), _final_params(srun_run[0]), strict=True):
        np.testing.assert_array_equal(a, b)
