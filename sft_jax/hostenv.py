"""Process settings that only take effect when the process starts, applied by the entry
points (`main`, the benchmark tools) through `setup()` before JAX is imported: XLA flags
(`XLA_DEFAULTS`), and glibc's malloc tunables, applied by re-executing the command line
once with them set.

XLA flags: `--xla_gpu_enable_triton_gemm=false` sends GPU matmul fusions to cuBLAS instead
of Triton's autotuned GEMMs: faster steps and much shorter compiles on H100s (figures in the
README's benchmark section). XLA:CPU accepts and ignores it (tested); other backends were
not checked. A flag that `XLA_FLAGS` already names (either value) is left as the user set it.

Malloc: XLA on CPU allocates its temporary buffers afresh for every executable run, and
glibc hands buffers that large out as new `mmap` regions and returns them on free, so every
step touches gigabytes of fresh 4 KiB pages (page faults, kernel time). `glibc.malloc.hugetlb=1`
makes malloc ask for transparent huge pages (`madvise`), the kernel's default policy on most
distributions. Memory use is unchanged; where the kernel has no huge page to give, it falls
back to small pages, as before. The re-exec keeps the PID and logs one line to stderr, so
a profiler or debugger that sees the process start twice knows why.

An entry point may ask for more tunables (`setup(tunables=...)`): `sft-jax-export` sets
`STREAMING` (`glibc.malloc.mmap_threshold`, 1 MiB). It allocates and frees one tensor after
another; glibc's dynamic threshold rises to the size of the first large block freed, after
which tensors of that size come from the heap and stay there when freed (exporting a
385 MiB model of 16 MiB tensors peaked 211 MiB above the start instead of 176 MiB,
tests/test_stream_export.py). A fixed threshold
keeps every block over 1 MiB an `mmap` of its own, returned to the system on free.

`SFT_JAX_MALLOC_TUNING=0` turns this off; a tunable that `GLIBC_TUNABLES` already names
(any value) is left as it is set.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
STREAMING = "glibc.malloc.mmap_threshold=1048576"
OPT_OUT = "SFT_JAX_MALLOC_TUNING"
THP_POLICY = "/sys/kernel/mm/transparent_hugepage/enabled"


XLA_DEFAULTS = ("--xla_gpu_enable_triton_gemm=false",)


def xla_flags(current: str) -> str:
    """`current` XLA_FLAGS with each of `XLA_DEFAULTS` added unless its name is there."""
    flags = current.split()
    for default in XLA_DEFAULTS:
        name = default.split("=")[0]
        if not any(f.split("=")[0] == name for f in flags):
            flags.append(default)
    return " ".join(flags)


def setup(tunables: tuple[str, ...] = ()) -> None:
    """Call first thing in a `__main__`: sets the XLA defaults, then (Linux, glibc) re-execs
    with the malloc tunables (huge pages, and `tunables`); the re-executed process inherits
    both."""
    os.environ["XLA_FLAGS"] = xla_flags(os.environ.get("XLA_FLAGS", ""))
    reexec_with_malloc_tunables(tunables)


def malloc_env(environ: dict[str, str], tunables: tuple[str, ...] = ()) -> dict[str, str] | None:
    """The environment to re-execute with (huge pages where they apply, and `tunables`), or
    None when nothing would change."""
    if environ.get(OPT_OUT, "1") == "0" or sys.platform != "linux":
        return None
    if platform.libc_ver()[0] != "glibc":  # musl and others ignore GLIBC_TUNABLES
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    named = {t.split("=")[0] for t in current.split(":")}
    wanted = [t for t in (TUNABLE, *tunables) if t.split("=")[0] not in named]
    if TUNABLE in wanted and not _huge_pages_on_madvise():
        wanted.remove(TUNABLE)
    if not wanted:
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(t for t in (current, *wanted) if t)}


def _huge_pages_on_madvise() -> bool:
    try:
        with open(THP_POLICY, encoding="ascii") as f:
            policy = f.read()
    except OSError:
        return False
    return "[madvise]" in policy  # "always": huge pages already; "never": none to be had


def reexec_with_malloc_tunables(tunables: tuple[str, ...] = ()) -> None:
    """Replace this process by the same command line with the tunables set (same PID, so
    launchers and signal handling see no difference). Call it first thing in a `__main__`."""
    env = malloc_env(dict(os.environ), tunables)
    if env is None:
        return
    argv = list(sys.orig_argv)
    print(
        f"sft_jax: re-executing with GLIBC_TUNABLES={env['GLIBC_TUNABLES']} (malloc settings, "
        f"sft_jax/hostenv.py; {OPT_OUT}=0 turns this off)",
        file=sys.stderr,
        flush=True,
    )
    try:
        os.execve(sys.executable, argv, env)
    except OSError:
        return  # carry on without: slower, never wrong
