"""Launch N cooperating processes on loopback (a JAX job with `jax.distributed`), wait for
all of them, and fail the test with each failed process's own stderr.

    errs = run_processes(lambda i, port: [sys.executable, "worker.py", str(port), str(i)],
                         count=2, env=cpu_env(devices=2))

Output goes to files, not pipes: a process blocked on a full pipe while the test waits on
another one would stall a collective and hang both (the pipes of processes that wait on each
other cannot be drained one after the other). A process that fails or times out stops the
others, so the test fails at once instead of at the timeout. `meanwhile` lets the test act on
the processes while they run (wait for a line in one's stderr, then signal it).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(devices: int | None) -> dict[str, str]:
    """os.environ for a JAX process on the CPU with `devices` faked devices (None: one real
    device, without the test session's faked eight)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def run_processes(
    argv: Callable[[int, int], Sequence[str]],
    count: int = 2,
    *,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    meanwhile: Callable[[list[subprocess.Popen], list[str]], None] | None = None,
) -> list[str]:
    """Start `count` processes, process i running `argv(i, port)` in the repository root with
    one free coordinator `port` for all; wait for every one (at most `timeout` seconds in
    all). Asserts each exited 0, showing the tail of the first failed one's stderr.
    Returns each process's stderr (stdout is kept apart, unread).

    `meanwhile(processes, stderr_paths)`, if given, runs once all are started, within the
    timeout; if it raises, the processes are killed and its error is the test's."""
    port = free_port()
    with tempfile.TemporaryDirectory() as logs:
        paths = [os.path.join(logs, f"process{i}.stderr") for i in range(count)]
        procs = []
        for i, path in enumerate(paths):
            with open(path, "w") as err, open(f"{path}.stdout", "w") as out:
                procs.append(
                    subprocess.Popen(
                        list(argv(i, port)), cwd=ROOT, env=env, stdout=out, stderr=err, text=True
                    )
                )
        deadline = time.monotonic() + timeout
        if meanwhile is not None:
            try:
                meanwhile(procs, paths)
            except BaseException:
                _wait_all(procs, 0)  # kills them all
                raise
        timed_out = not _wait_all(procs, deadline - time.monotonic())
        codes = [p.returncode for p in procs]
        errs = [open(path).read() for path in paths]
    assert not timed_out, f"timed out after {timeout:g} s; process 0's stderr:\n{errs[0][-3000:]}"
    if any(codes):  # the first to fail by itself, not one killed because of it
        own = [i for i, code in enumerate(codes) if code not in (0, -signal.SIGKILL)]
        i = (own or [i for i, code in enumerate(codes) if code])[0]
        raise AssertionError(f"exit codes {codes}; process {i}'s stderr:\n{errs[i][-3000:]}")
    return errs


def _wait_all(procs: list[subprocess.Popen], timeout: float) -> bool:
    """Wait until every process has exited; once one fails or the time is up, kill the rest
    (their return code then says so: -9). False if the time ran out."""
    deadline = time.monotonic() + timeout
    while None in (codes := [p.poll() for p in procs]):  # every one polled, each time
        failed = any(code not in (None, 0) for code in codes)
        in_time = time.monotonic() < deadline
        if failed or not in_time:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
            return in_time
        time.sleep(0.1)
    return True
