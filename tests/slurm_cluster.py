"""A real one-node SLURM cluster on loopback for the tests: munged, slurmctld and slurmd from
Debian's `slurm-wlm` and `munge` (`.ci/run` installs them), each with its own key, socket,
ports, state and logs in a temporary folder, so it neither needs nor touches a system
SLURM. `srun`, `sbatch` and `scontrol` reach it through `SLURM_CONF`.

    with slurm_cluster(tmp_path) as env:   # os.environ + SLURM_CONF
        subprocess.run(["srun", "-N1", "-n2", "hostname"], env=env)

Process tracking is `proctrack/linuxproc` and task binding `task/none`: no cgroups, which a
container may not give. The node offers this machine's cores, and oversubscribes them so a
job may run more tasks than cores (the tests run 2 tasks on 2 cores).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator

DAEMONS = ("munged", "slurmctld", "slurmd", "srun", "sbatch", "scontrol", "sinfo", "squeue")


def available() -> str | None:
    """None if SLURM and munge are installed and this process may run them, else why not."""
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    if missing:
        return f"SLURM is not installed ({', '.join(missing)}): apt-get install slurm-wlm munge"
    if os.geteuid() != 0:
        return "a test SLURM cluster runs its daemons as root"
    return None


def _free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports nothing listens on now (all bound at once, so distinct)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def _config(folder: str, node: str) -> str:
    ctld_port, d_port = _free_ports(2)
    # JAX's SLURM coordinator port comes from the job id (id % 4096 + 61440): a random first
    # id keeps two test clusters on one machine from giving their jobs the same port, whose
    # coordinators gRPC would then both bind (SO_REUSEPORT) and mix up. From the OS, not
    # `random`: a test run seeds that (Hypothesis), and two clusters started in one CI run
    # both had job 31942, and each srun's task 1 reached the other's coordinator.
    first_job = random.SystemRandom().randrange(1000, 60000)
    return f"""\
ClusterName=sftjaxtest
SlurmctldHost={node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
FirstJobId={first_job}
AuthType=auth/munge
AuthInfo=socket={folder}/munge.socket
CredType=cred/munge
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
KillWait=60
MinJobAge=600
NodeName={node} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} State=UNKNOWN
PartitionName=test Nodes={node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
"""


@contextlib.contextmanager
def slurm_cluster(folder: str, timeout: float = 60) -> Iterator[dict[str, str]]:
    """Start the cluster in `folder`; yield the environment its commands need; stop it."""
    folder = os.path.abspath(folder)
    for sub in ("state", "spool"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    node = socket.gethostname().split(".")[0]
    conf = os.path.join(folder, "slurm.conf")
    with open(conf, "w") as f:
        f.write(_config(folder, node))
    key = os.path.join(folder, "munge.key")
    with open(key, "wb") as f:
        f.write(os.urandom(1024))
    os.chmod(key, 0o600)
    env = {**os.environ, "SLURM_CONF": conf}
    for k in [k for k in env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
        del env[k]  # a test run inside a SLURM job must not hand its job to ours
    subprocess.run(
        [
            "munged",
            "--force",
            f"--key-file={key}",
            f"--socket={folder}/munge.socket",
            f"--pid-file={folder}/munged.pid",
            f"--log-file={folder}/munged.log",
            f"--seed-file={folder}/munged.seed",
        ],
        check=True,
    )
    try:
        subprocess.run(["slurmctld", "-f", conf], env=env, check=True)
        subprocess.run(["slurmd", "-f", conf], env=env, check=True)
        _wait_idle(env, folder, timeout)
        yield env
    finally:
        # A job a failed test left running would hold the cores (and its tasks would outlive
        # the daemons): cancel every job, and give slurmd time to kill their steps.
        subprocess.run(["scancel", "--full", "--partition=test"], env=env, capture_output=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _jobs(env):
            time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            _stop(os.path.join(folder, f"{name}.pid"))


def _wait_idle(env: dict[str, str], folder: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        out = subprocess.run(
            ["sinfo", "--noheader", "--format=%T"], env=env, capture_output=True, text=True
        )
        state = out.stdout.strip()
        if state == "idle":
            return
        time.sleep(0.5)
    logs = "".join(
        open(os.path.join(folder, f)).read()[-1500:]
        for f in ("slurmctld.log", "slurmd.log")
        if os.path.exists(os.path.join(folder, f))
    )
    raise RuntimeError(f"the test SLURM node is {state!r}, not idle, after {timeout} s:\n{logs}")


def _stop(pid_file: str, timeout: float = 10) -> None:
    try:
        pid = int(open(pid_file).read().strip())
    except (OSError, ValueError):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)


def _jobs(env: dict[str, str]) -> list[str]:
    """The ids of the jobs still pending, running or being killed."""
    out = subprocess.run(
        ["squeue", "--noheader", "--format=%i"], env=env, capture_output=True, text=True
    )
    return out.stdout.split()


def job_state(env: dict[str, str], job_id: str) -> str:
    """SLURM's state of a job (PENDING, RUNNING, COMPLETED, FAILED …)."""
    out = subprocess.run(
        ["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True
    )
    for field in out.stdout.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    return "UNKNOWN"
