"""sft_jax/hostenv.py: the malloc re-exec (when it applies, and that it really re-executes
the same command line with the tunable set) and the XLA flag defaults."""

import os
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


def test_env_adds_an_entry_points_tunables_unless_named():
    # sft-jax-export's: every freed tensor back to the system (README, "Several hosts").
    env = hostenv.malloc_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, (hostenv.STREAMING,))
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=0:" + hostenv.STREAMING
    named = "glibc.malloc.hugetlb=0:glibc.malloc.mmap_threshold=4096"
    assert hostenv.malloc_env({"GLIBC_TUNABLES": named}, (hostenv.STREAMING,)) is None
    assert hostenv.malloc_env({hostenv.OPT_OUT: "0"}, (hostenv.STREAMING,)) is None


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
    run = subprocess.run(
        [sys.executable, str(script), "--a", "b c"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    # Two starts: the original process, then the re-executed one; the second one stays.
    assert run.stdout.splitlines() == ["start", "start", f"{hostenv.TUNABLE} ['--a', 'b c']"]
    # One line says why the process started twice, and how to turn it off.
    said = [line for line in run.stderr.splitlines() if "re-executing" in line]
    assert len(said) == 1 and hostenv.TUNABLE in said[0] and hostenv.OPT_OUT in said[0]


def test_xla_defaults_added_unless_named():
    flag = hostenv.XLA_DEFAULTS[0]
    name = flag.split("=")[0]
    assert hostenv.xla_flags("") == flag
    assert hostenv.xla_flags("--xla_force_host_platform_device_count=8").split() == [
        "--xla_force_host_platform_device_count=8",
        flag,
    ]
    # The user's own value wins, whichever it is; nothing is added twice.
    assert hostenv.xla_flags(f"{name}=true") == f"{name}=true"
    assert hostenv.xla_flags(hostenv.xla_flags("")) == flag


def test_setup_sets_xla_flags_for_the_process(tmp_path):
    # A real child process: the flags are in its environment before jax loads, and jax
    # starts with them (an unknown flag would abort it).
    script = tmp_path / "entry.py"
    script.write_text(
        "import os\n"
        "from sft_jax import hostenv\n"
        "hostenv.setup()\n"
        "import jax\n"
        "jax.numpy.ones(2).block_until_ready()\n"
        "print(os.environ['XLA_FLAGS'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env[hostenv.OPT_OUT] = "0"
    out = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split("\n")[-2] == hostenv.XLA_DEFAULTS[0]
