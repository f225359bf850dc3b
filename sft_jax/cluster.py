"""Starting distributed JAX with no launch flags: which launcher started this process
(a TPU VM slice, GKE, SLURM, Open MPI, or an explicit coordinator), and which of the
node's GPUs this process owns.

JAX's own cluster detection (`jax._src.clusters`) reads the launcher's environment; `start()`
asks it *before* starting anything, so a plain `python -m sft_jax.main` on every worker of a
TPU slice, in a GKE JobSet or under `srun` joins one run, and a laptop run stays a single
process. The one thing JAX decides that a cluster user would not want: under SLURM it gives
each process only the GPU numbered by its task's local id, so `srun --ntasks-per-node=1`
on 8-GPU nodes would train on one GPU per node. `slurm_visible_gpus()` chooses instead
from the node's layout: one task per node owns all its GPUs, one task per GPU owns its own.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import jax
from absl import logging

# JAX's names for its launchers (the ClusterEnv subclasses), as a person reads them.
LAUNCHERS = {
    "GceTpuCluster": "TPU VM slice",
    "GkeTpuCluster": "GKE TPU",
    "K8sCluster": "Kubernetes",
    "SlurmCluster": "SLURM",
    "OmpiCluster": "Open MPI",
}


# Started only with --multihost: any pod has KUBERNETES_SERVICE_HOST, and JAX's Kubernetes
# start needs the pod's controller and the API's permissions, which a one-pod job (a
# notebook, a one-GPU pod) lacks. GKE's TPU pods are GkeTpuCluster, detected without it.
NEEDS_MULTIHOST_FLAG = ("K8sCluster",)


def detected_launcher(include_opt_in: bool = False) -> str | None:
    """The name of the JAX cluster environment this process runs in (None: no cluster).
    Opt-in environments (mpi4py) are left out, as `jax.distributed.initialize()` does, and
    those of `NEEDS_MULTIHOST_FLAG` unless `include_opt_in`."""
    from jax._src.clusters import ClusterEnv

    for env in ClusterEnv._cluster_types:
        if env.opt_in_only_method or (env.__name__ in NEEDS_MULTIHOST_FLAG and not include_opt_in):
            continue
        if env.is_env_present():
            return env.__name__
    return None


def _tasks_on_this_node(environ: Mapping[str, str]) -> int | None:
    """SLURM's task count on this node, from `SLURM_STEP_TASKS_PER_NODE` (or the job's
    `SLURM_TASKS_PER_NODE`): a list like "2(x3),1" indexed by `SLURM_NODEID`."""
    spec = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    if not spec:
        return None
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            return None
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    node = int(environ.get("SLURM_NODEID", "0"))
    return counts[node] if node < len(counts) else None


def slurm_visible_gpus(environ: Mapping[str, str]) -> str:
    """The GPUs (indices among those CUDA shows this process, or "all") that this SLURM task
    trains on:

    - one task on the node: all of them (`srun --ntasks-per-node=1`);
    - SLURM bound each task to its own GPUs (`--gpus-per-task`, or `CUDA_VISIBLE_DEVICES`
      naming fewer GPUs than there are tasks on the node): all it sees;
    - several tasks that each see every GPU: an equal block each, by `SLURM_LOCALID`
      (JAX's own choice, generalised past one GPU per task).

    Where the node's GPUs are not named (no `CUDA_VISIBLE_DEVICES`) and several tasks share
    it, the task's own GPU by local id, as JAX would."""
    tasks = _tasks_on_this_node(environ)
    if tasks is None or tasks <= 1 or environ.get("SLURM_GPUS_PER_TASK"):
        return "all"
    local_id = int(environ.get("SLURM_LOCALID", "0"))
    visible = [g for g in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    if not visible:
        return str(local_id)
    if len(visible) < tasks:
        return "all"
    if len(visible) % tasks:
        raise ValueError(
            f"SLURM: {tasks} tasks on this node share {len(visible)} GPUs "
            f"(CUDA_VISIBLE_DEVICES={','.join(visible)}), which do not divide evenly; launch "
            "one task per node (--ntasks-per-node=1) or one per GPU (--ntasks-per-node=<GPUs "
            "per node>)"
        )
    share = len(visible) // tasks
    return ",".join(str(local_id * share + i) for i in range(share))


def start(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    require_cluster: bool = False,
) -> str:
    """Start distributed JAX if this process is one of several, before the backend is
    touched; log one line saying how it was launched. Returns that line.

    An explicit coordinator (arguments or `JAX_COORDINATOR_ADDRESS`) wins; else the launcher
    JAX detects; else one process. `require_cluster` makes "no cluster found" an error
    (`--multihost`: better than each worker training alone; it also admits a plain
    Kubernetes launch, `NEEDS_MULTIHOST_FLAG`)."""
    explicit = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    # Detected even with a coordinator given: JAX fills the rest from the launcher (and
    # picks SLURM tasks' GPUs), so its GPU choice must be corrected then too.
    launcher = detected_launcher(include_opt_in=require_cluster)
    if explicit or launcher:
        # CPU processes need a collectives library to talk to each other (tests, CPU
        # clusters); GPU and TPU backends ignore this setting.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
        if launcher == "SlurmCluster" and not os.environ.get("JAX_LOCAL_DEVICE_IDS"):
            # After initialize(), which set the task's local id; the backend is not up yet.
            gpus = slurm_visible_gpus(os.environ)
            jax.config.update("jax_cuda_visible_devices", gpus)
            jax.config.update("jax_rocm_visible_devices", gpus)
    elif require_cluster:
        raise SystemExit(
            "error: --multihost, but no cluster was found (JAX looks for a TPU VM slice, GKE, "
            "SLURM, Open MPI or JAX_COORDINATOR_ADDRESS); a single machine needs no flag"
        )
    how = "explicit coordinator" if explicit else LAUNCHERS.get(launcher, launcher or "")
    line = (
        f"process {jax.process_index()} of {jax.process_count()}, "
        f"{jax.local_device_count()} local devices, {jax.device_count()} in all"
        + (f" (distributed JAX via {how})" if how else " (single process)")
    )
    logging.info(line)
    return line
