"""TPU slices by the names Cloud TPU sells them (`v5p-128`, `v5e-16`, `v6e-64`, `v4-32`), as
the devices of that slice for compiling ahead of time on a machine without TPUs.

libtpu (`pip install -e '.[tpu]'`, or the test extras) compiles for a topology it is told
about, on any x86 machine: `jax.experimental.topologies.get_topology_desc` gives the
slice's devices, and `jit(...).lower(...).compile()` over a mesh of them runs the real TPU
compiler (SPMD partitioning, Mosaic kernels such as splash attention, memory assignment).

Naming: v4 and v5p slices count TensorCores (two per chip, one "megacore" device per chip:
v5p-128 is 64 chips, a 4x4x4 torus); v5e and v6e slices count chips (one core each, a 2D
grid: v5e-16 is 4x4). HBM per chip from Google's data sheets.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re


@dataclasses.dataclass(frozen=True)
class Generation:
    topology_prefix: str  # libtpu's name for the chip in a topology string
    cores_per_chip: int  # how the slice name counts: TensorCores (2) or chips (1)
    dims: int  # 3: a torus of chips (v4, v5p); 2: a grid (v5e, v6e)
    hbm_bytes: int  # per chip
    memory_name: str  # sft_jax.memory_plan.DEVICES key for the same chip


GENERATIONS = {
    "v4": Generation("v4", 2, 3, 32 * 2**30, "v4"),
    "v5p": Generation("v5", 2, 3, 95 * 2**30, "v5p"),
    "v5e": Generation("v5e", 1, 2, 16 * 2**30, "v5e"),
    "v6e": Generation("v6e", 1, 2, 32 * 2**30, "v6e"),
}


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str  # as sold: "v5p-128"
    generation: Generation
    chips: int
    shape: tuple[int, ...]  # chips along each dimension of the torus / grid

    @property
    def topology_name(self) -> str:
        return f"{self.generation.topology_prefix}:{'x'.join(map(str, self.shape))}"

    @property
    def hbm_bytes(self) -> int:
        return self.generation.hbm_bytes


def _shape(chips: int, dims: int) -> tuple[int, ...]:
    """Cloud TPU's default layout for `chips` chips: powers of two, as even as can be, the
    smaller sides first (8 → 2x2x2, 32 → 2x4x4; 2D: 8 → 2x4, 128 → 8x16); a single host's
    four chips are 2x2x1 in 3D."""
    if chips == 1:
        return (1,) * dims
    exponent = int(math.log2(chips))
    if 2**exponent != chips:
        raise ValueError(f"{chips} chips: slices have a power-of-two number of chips")
    sides = [1] * dims
    for _ in range(exponent):
        # Grow the smallest side; among equals, the first — then sort ascending.
        sides[min(range(dims), key=lambda d: (sides[d], d))] *= 2
    if dims == 3 and chips == 4:
        return (2, 2, 1)
    return tuple(sorted(sides))


def parse(name: str) -> Slice:
    """`v5p-128` → the slice. Raises ValueError naming the accepted forms."""
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name.strip().lower())
    if not m:
        raise ValueError(
            f"--topology {name!r}: expected a Cloud TPU slice name such as v5p-128, v4-32, "
            "v5e-16 or v6e-64"
        )
    generation = GENERATIONS["v5e" if m.group(1) == "v5litepod" else m.group(1)]
    count = int(m.group(2))
    if count % generation.cores_per_chip:
        raise ValueError(f"--topology {name!r}: {m.group(1)} slices count TensorCores (even)")
    chips = count // generation.cores_per_chip
    try:
        shape = _shape(chips, generation.dims)
    except ValueError as e:
        raise ValueError(f"--topology {name!r}: {e}") from None
    return Slice(name, generation, chips, shape)


def devices(s: Slice) -> list:
    """The slice's devices, from libtpu (no TPU needed). Raises ImportError with the install
    command when libtpu is missing."""
    try:
        import libtpu  # noqa: F401  (only to say what is missing)
    except ImportError:
        raise ImportError(
            "--topology needs libtpu, the TPU compiler: pip install -e '.[tpu]' (it installs "
            "and runs on machines without TPUs)"
        ) from None
    from jax.experimental import topologies

    # libtpu reads the slice it runs on from these at start-up (a TPU VM sets them); on a
    # machine without TPUs, unset, it logs errors about them. A real TPU VM keeps its own.
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", s.name)
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    # Compiling only: several may run at once (tests); no chip is opened to guard.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    desc = topologies.get_topology_desc(
        platform="tpu",
        topology_name=s.topology_name,
        chip_config_name="megacore" if s.generation.cores_per_chip == 2 else "default",
        chips_per_host_bounds=(2, 2, 1),
        num_slices=1,
    )
    return list(desc.devices)
