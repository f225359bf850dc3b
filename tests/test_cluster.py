"""Which launcher started a process, and which GPUs a SLURM task trains on
(`sft_jax.cluster`). The real launches are in tests/test_slurm.py (a real SLURM on
loopback) and tests/test_multiprocess.py (an explicit coordinator)."""

import subprocess
import sys

import pytest

from sft_jax import cluster
from tests.processes import ROOT, cpu_env

# What `srun` sets for task `local_id` of `tasks` on one node (values as SLURM writes them).
SLURM_TASK = {
    "SLURM_JOB_ID": "41",
    "SLURM_STEP_NODELIST": "gpu-node-01",
    "SLURM_NTASKS": "16",
    "SLURM_PROCID": "9",
    "SLURM_NODEID": "1",
}


def _task(tasks_per_node: str, local_id: int, **extra) -> dict:
    return {
        **SLURM_TASK,
        "SLURM_STEP_TASKS_PER_NODE": tasks_per_node,
        "SLURM_LOCALID": str(local_id),
        **extra,
    }


@pytest.mark.parametrize(
    ("environ", "gpus"),
    [
        # srun --ntasks-per-node=1 on 8-GPU nodes: the task owns the node (JAX alone: GPU 0).
        (_task("1(x2)", 0, CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7"), "all"),
        (_task("1(x2)", 0), "all"),
        # One task per GPU, each seeing all 8: its own, by local id (JAX's choice).
        (_task("8(x2)", 5, CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7"), "5"),
        (_task("8(x2)", 5), "5"),
        # Two tasks per node of 8 GPUs: four each.
        (_task("2(x2)", 1, CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7"), "4,5,6,7"),
        # SLURM bound each task to its GPU (--gpus-per-task=1 / --gpu-bind): all it sees.
        (_task("8(x2)", 5, CUDA_VISIBLE_DEVICES="5"), "all"),
        (_task("8(x2)", 5, CUDA_VISIBLE_DEVICES="0", SLURM_GPUS_PER_TASK="1"), "all"),
        # Uneven nodes: "3,1" — node 1 runs one task.
        (_task("3,1", 0, CUDA_VISIBLE_DEVICES="0,1,2,3"), "all"),
    ],
    ids=[
        "one-task-per-node",
        "one-task-per-node-no-gres",
        "task-per-gpu",
        "task-per-gpu-no-gres",
        "two-tasks-four-gpus-each",
        "bound-by-gpu-bind",
        "bound-by-gpus-per-task",
        "uneven-nodes",
    ],
)
def test_slurm_task_trains_on_its_share_of_the_node(environ, gpus):
    assert cluster.slurm_visible_gpus(environ) == gpus


def test_slurm_tasks_that_cannot_share_the_gpus_evenly_are_refused():
    environ = _task("3(x2)", 0, CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7")
    with pytest.raises(ValueError, match=r"--ntasks-per-node=1\) or one per GPU"):
        cluster.slurm_visible_gpus(environ)


def _start_in_subprocess(env: dict, require_cluster: bool = False):
    code = (
        "from sft_jax import cluster; print(cluster.detected_launcher()); "
        f"print(cluster.start(require_cluster={require_cluster}))"
    )
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_a_plain_machine_runs_one_process_and_says_so():
    env = {k: v for k, v in cpu_env(devices=2).items() if not k.startswith(("SLURM_", "OMPI_"))}
    out = _start_in_subprocess(env)
    assert out.returncode == 0, out.stderr[-2000:]
    launcher, line = out.stdout.splitlines()
    assert launcher == "None"
    assert line == "process 0 of 1, 2 local devices, 2 in all (single process)"
    refused = _start_in_subprocess(env, require_cluster=True)
    assert refused.returncode == 1 and "--multihost, but no cluster was found" in refused.stderr


def test_a_one_task_slurm_job_is_detected_and_started_without_flags():
    """`srun -n1` (or `sbatch` with one task): JAX's own SLURM detection, a one-process
    distributed run; the coordinator port comes from the job id, so pick an unused one."""
    from tests.processes import free_port

    env = {
        **cpu_env(devices=2),
        **_task("1", 0, SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="1", SLURM_PROCID="0"),
        "SLURM_NODEID": "0",
        "JAX_COORDINATOR_PORT": str(free_port()),
    }
    out = _start_in_subprocess(env)
    assert out.returncode == 0, out.stderr[-2000:]
    launcher, line = out.stdout.splitlines()
    assert launcher == "SlurmCluster"
    assert line == "process 0 of 1, 2 local devices, 2 in all (distributed JAX via SLURM)"
