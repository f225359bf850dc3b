"""The device mesh and the one table that maps logical axis names onto it.

The model names every parameter and activation dimension with a logical axis ("embed",
"heads", "batch" …). Here those names become mesh axes:

- `data`:   pure data parallelism (parameters replicated);
- `fsdp`:   data parallelism whose parameters and optimizer state are sharded (ZeRO-3);
- `expert`: a mixture of experts' experts split across devices (expert parallelism); the
            batch is split over it too, and the other parameters as over fsdp;
- `tensor`: heads, MLP width and vocabulary split across devices (Megatron-style).

The batch is split over (`data`, `fsdp`, `expert`). A dimension that a mesh axis does not divide is
replicated instead of failing (e.g. GPT-2's 50 257-token vocabulary on tensor=4).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")

# logical name -> mesh axis (or axes, or None = replicated)
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", ("fsdp", "expert")),  # experts take `expert` first: their embed is fsdp's
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("qkv", None),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
    ("lora_rank", None),  # a LoRA adapter's rank: small, replicated
    ("expert", "expert"),  # a mixture of experts' experts
    # activations
    ("batch", BATCH_AXES),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def make_mesh(
    data: int = 1,
    fsdp: int = -1,
    tensor: int = 1,
    devices: Sequence[jax.Device] | None = None,
    expert: int = 1,
) -> Mesh:
    """A (data, fsdp, expert, tensor) mesh over all devices; one size may be -1 (= the rest)."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    sizes = {"data": data, "fsdp": fsdp, "expert": expert, "tensor": tensor}
    free = [k for k, v in sizes.items() if v == -1]
    bad = [k for k, v in sizes.items() if v == 0 or v < -1]
    if bad or len(free) > 1:
        raise ValueError(
            f"mesh: sizes {sizes} are invalid; each of mesh.data, mesh.fsdp, mesh.expert, "
            "mesh.tensor must be a positive integer, and at most one may be -1 (= the "
            "remaining devices)"
        )
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if n % fixed:
            raise ValueError(
                f"mesh: {n} devices cannot be split into {sizes}: {fixed} does not divide {n}. "
                f"Choose mesh.* sizes whose product divides {n}."
            )
        sizes[free[0]] = n // fixed
    if math.prod(sizes.values()) != n:
        raise ValueError(
            f"mesh: mesh.data × mesh.fsdp × mesh.expert × mesh.tensor = "
            f"{math.prod(sizes.values())} "
            f"but there are {n} devices; make the product {n} or set one size to -1"
        )
    shape = tuple(sizes[a] for a in MESH_AXES)
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices > 1:
        return _multislice_mesh(shape, slices, devices)
    # Auto axes: the compiler propagates shardings from our annotations (GSPMD), rather than
    # every op carrying an explicit sharding in its type.
    auto = (AxisType.Auto,) * len(MESH_AXES)
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        # jax.make_mesh needs a topology it knows; fall back to device order.
        return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def _multislice_mesh(shape: tuple[int, ...], slices: int, devices) -> Mesh:
    """Several TPU slices joined over the data-centre network (DCN): only the data axis
    crosses slices (one gradient all-reduce per step); fsdp, expert and tensor, which talk
    every layer, stay on the fast links (ICI) inside a slice."""
    data, *inner = shape
    if data % slices:
        raise ValueError(
            f"mesh: {slices} TPU slices need mesh.data to be a multiple of {slices} (it is "
            f"{data}): the data axis is the one that spans slices"
        )
    ici, dcn = (data // slices, *inner), (slices,) + (1,) * len(inner)
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows over (data, fsdp, expert); the sequence dimension whole."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def _mesh_axes_for(logical: str | None, rules) -> tuple[str, ...]:
    if logical is None:
        return ()
    for name, target in rules:
        if name == logical:
            if target is None:
                return ()
            return (target,) if isinstance(target, str) else tuple(target)
    raise KeyError(f"sharding: logical axis {logical!r} has no rule in LOGICAL_RULES")


def logical_to_sharding(
    logical: PartitionSpec, shape: Sequence[int], mesh: Mesh, rules=LOGICAL_RULES
) -> NamedSharding:
    """A NamedSharding for an array of `shape` whose dimensions carry `logical` names.

    A mesh axis is used at most once per array and only where it divides the dimension."""
    used: set[str] = set()
    spec = []
    names = tuple(logical) + (None,) * (len(shape) - len(logical))
    for dim, name in zip(shape, names, strict=True):
        axes = []
        for axis in _mesh_axes_for(name, rules):
            size = mesh.shape.get(axis, 1)  # an axis the mesh lacks splits nothing
            if axis in used or size == 1:
                continue
            if dim % (math.prod(mesh.shape[a] for a in axes) * size):
                logging.debug("sharding: %s of size %d not split over %s", name, dim, axis)
                continue
            axes.append(axis)
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return NamedSharding(mesh, PartitionSpec(*spec))


def get_path(tree, path: Sequence):
    """The subtree of nested dicts at `path` (a sequence of keys), e.g. one leaf's sharding
    in `tree_shardings`' output."""
    for key in path:
        tree = tree[key]
    return tree


def tree_shardings(boxed_abstract_tree, mesh: Mesh, rules=LOGICAL_RULES):
    """Shardings for every leaf of an abstract pytree whose leaves may be flax logical
    partitioning boxes (from `jax.eval_shape` of an init). Unboxed leaves are replicated."""
    logical = nn.get_partition_spec(boxed_abstract_tree)
    shapes = nn.meta.unbox(boxed_abstract_tree)
    return jax.tree.map(
        lambda spec, leaf: logical_to_sharding(spec, leaf.shape, mesh, rules), logical, shapes
    )


def activation_rules(mesh: Mesh, sizes: dict[str, int], rules=LOGICAL_RULES):
    """The rules for `nn.logical_axis_rules` while tracing the model: activation axes whose
    size (e.g. sizes={"act_heads": 9}) the mesh axis does not divide are replicated, because
    a sharding constraint cannot split 9 heads over 4 devices. Mesh axes the mesh lacks are
    left out."""
    out = []
    for name, _ in rules:
        axes = tuple(a for a in _mesh_axes_for(name, rules) if a in mesh.shape)
        if name in sizes and sizes[name] % math.prod(mesh.shape[a] for a in axes):
            axes = ()
        out.append((name, None if not axes else axes[0] if len(axes) == 1 else axes))
    return tuple(out)
