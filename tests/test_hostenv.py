"""The malloc re-exec (sft_jax/hostenv.py): when it applies, and that it really re-executes
the same command line with the tunable set."""

import subprocess
import sys

import pytest

from sft_jax import hostenv


def _policy():
    try:
        with open(hostenv.THP_POLICY, encoding="ascii") as f:
            return f.read()
    except OSError:
        return ""


needs_madvise = pytest.mark.skipif(
    "[madvise]" not in _policy() or sys.platform != "linux",
    reason="the tunable only applies where transparent huge pages are on madvise",
)


@needs_madvise
def test_env_adds_the_tunable_and_keeps_existing_ones():
    assert hostenv.malloc_env({})["GLIBC_TUNABLES"] == hostenv.TUNABLE
    env = hostenv.malloc_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "X": "1"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + hostenv.TUNABLE
    assert env["X"] == "1"


def test_env_unchanged_when_opted_out_or_already_set():
    assert hostenv.malloc_env({hostenv.OPT_OUT: "0"}) is None
    assert hostenv.malloc_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None


@needs_madvise
def test_reexec_runs_the_same_command_line_with_the_tunable(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(
        "import os, sys\n"
        "from sft_jax import hostenv\n"
        "print('start', flush=True)\n"
        "hostenv.reexec_with_malloc_tunables()\n"
        "print(os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run(
        [sys.executable, str(script), "--a", "b c"],
        capture_output=True, text=True, env=env, check=True,
    ).stdout.splitlines()  # fmt: skip
    # Two starts: the original process, then the re-executed one; the second one stays.
    assert out == ["start", "start", f"{hostenv.TUNABLE} ['--a', 'b c']"]
