"""Parameters in and out of devices a block at a time, so that no process ever holds more
than its own shards plus one tensor (the rule for scale in docs/design.md).

Import: each process asks, per parameter, which blocks its devices hold
(`addressable_devices_indices_map`), reads only those rows of the HF tensor
(`files` readers), casts them to the parameter dtype and builds the global array with
`jax.make_array_from_callback`. A stacked (scanned) leaf is filled one layer at a time into
an array already laid out on the mesh (an in-place update of a donated buffer), so the host
never holds more than one layer's blocks.

Export: one tensor (one layer of a stacked leaf) at a time is resharded so that every
process holds it once, split over its own devices, and process 0 copies its pieces to the
host. Other processes hold that one tensor on their devices for a moment and nothing on the
host.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Index = tuple[slice, ...]
ReadBlock = Callable[[Index], np.ndarray]  # our (per-layer) index → that block, numpy


def hf_shape(layout: str, shape: tuple[int, ...], in_dims: int) -> tuple[int, ...]:
    """The HF tensor's shape for our leaf `shape` (one layer of it), by layout (`hf.tensors`)."""
    if layout == "table":
        return tuple(shape)
    if layout == "vector":
        return (math.prod(shape),)
    n_in, n_out = math.prod(shape[:in_dims]), math.prod(shape[in_dims:])
    return (n_out, n_in) if layout == "linear" else (n_in, n_out)


def _hf_groups(layout: str, ndim: int, in_dims: int) -> list[tuple[int, ...]]:
    """Which of our dims make up each HF dim, in HF order."""
    if layout == "table":
        return [(d,) for d in range(ndim)]
    if layout == "vector":
        return [tuple(range(ndim))]
    ins, outs = tuple(range(in_dims)), tuple(range(in_dims, ndim))
    return [outs, ins] if layout == "linear" else [ins, outs]


def block_reader(
    read: Callable[[Index], np.ndarray], layout: str, shape: tuple[int, ...], in_dims: int
) -> ReadBlock:
    """A function from a block of our leaf (slices over `shape`) to its values, reading from
    the HF tensor (`read(hf_index)`) only the rows that hold it. Each HF dim is several of
    ours flattened; the block's range along the first of them is one contiguous HF range,
    and the others are cut after reading. Our rules leave those others whole (head_dim
    under heads), except in GPT-2's fused [embed, 3, heads, head_dim] kernel, where a
    tensor-parallel block reads all heads of its rows and keeps its own."""
    groups = _hf_groups(layout, len(shape), in_dims)
    leads = {g[0] for g in groups if g}

    def read_block(index: Index) -> np.ndarray:
        index = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape, strict=True))
        hf_index = []
        for group in groups:
            inner = math.prod(shape[d] for d in group[1:])
            lead = index[group[0]]
            hf_index.append(slice(lead.start * inner, lead.stop * inner))
        block = np.asarray(read(tuple(hf_index)))
        if layout == "linear":
            block = block.T  # [out, in] → [in, out], our dims' order
        rows = [index[d].stop - index[d].start if d in leads else n for d, n in enumerate(shape)]
        inner_index = tuple(slice(None) if d in leads else index[d] for d in range(len(shape)))
        return block.reshape(rows)[inner_index]

    return read_block


def _cached(read_block: ReadBlock, dtype: np.dtype) -> ReadBlock:
    """Devices that hold the same block (replicas) get one read, cast once."""
    seen: dict = {}

    def read(index: Index) -> np.ndarray:
        key = tuple((s.start, s.stop) for s in index)
        if key not in seen:
            seen[key] = np.asarray(read_block(index), dtype=dtype)
        return seen[key]

    return read


def place(shape, sharding: NamedSharding, dtype, read_block: ReadBlock) -> jax.Array:
    """A global array of `shape` whose blocks this process's devices hold are read now."""
    return jax.make_array_from_callback(shape, sharding, _cached(read_block, dtype), dtype=dtype)


def place_stacked(
    shape, sharding: NamedSharding, dtype, read_layer: Callable[[int], ReadBlock]
) -> jax.Array:
    """A stacked leaf `[layers, …]` built one layer at a time on the mesh:
    `read_layer(i)` reads blocks of layer i."""
    spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    if spec[0] is not None:
        raise ValueError(
            f"sharding: a stacked leaf split over layers ({sharding.spec}) is not "
            "supported by the import; keep the 'layers' rule unsharded"
        )
    layer_sharding = NamedSharding(sharding.mesh, PartitionSpec(*spec[1:]))
    stacked = _zeros(tuple(shape), jnp.dtype(dtype), sharding)()
    for i in range(shape[0]):
        layer = place(shape[1:], layer_sharding, dtype, read_layer(i))
        stacked = _set_layer(stacked, layer, i)
    return stacked


@functools.lru_cache
def _zeros(shape, dtype, sharding: NamedSharding) -> Callable[[], jax.Array]:
    return jax.jit(functools.partial(jnp.zeros, shape, dtype), out_shardings=sharding)


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stacked: jax.Array, layer: jax.Array, i) -> jax.Array:
    # The donated buffer is updated in place: no second copy of the stacked leaf.
    return jax.lax.dynamic_update_index_in_dim(stacked, layer.astype(stacked.dtype), i, 0)


# --------------------------------------------------------------------------- export


def to_host(x, layer: int | None = None) -> np.ndarray | None:
    """`x` (or its layer `layer`) as numpy on process 0; None on the others. An array
    spanning processes is gathered one tensor at a time (collective: every process calls)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x if layer is None else x[layer])
    shape = x.shape if layer is None else x.shape[1:]
    out_sharding = _once_per_process(x.sharding.device_set, shape)
    one = _take(x, -1 if layer is None else layer, out_sharding)
    if jax.process_index() != 0:
        return None
    host = np.empty(one.shape, one.dtype)
    for shard in one.addressable_shards:
        host[shard.index] = np.asarray(shard.data)
    return host


def _once_per_process(devices, shape) -> NamedSharding:
    """Every process holds the whole tensor once, split over its own devices (along the
    first dimension they divide; small tensors whole on each)."""
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    processes = len({d.process_index for d in devices})
    grid = np.asarray(devices).reshape(processes, len(devices) // processes)
    mesh = Mesh(grid, ("process", "local"))
    local = grid.shape[1]
    spec = [None] * len(shape)
    for d, n in enumerate(shape):
        if n % local == 0:
            spec[d] = "local"
            break
    return NamedSharding(mesh, PartitionSpec(*spec))


def _take(x: jax.Array, layer: int, out_sharding: NamedSharding) -> jax.Array:
    """`x` (layer < 0) or `x[layer]`, resharded to `out_sharding`."""
    if layer < 0:
        return _resharder(out_sharding)(x)
    return _layer_taker(out_sharding)(x, layer)


@functools.lru_cache
def _resharder(out_sharding: NamedSharding) -> Callable:
    return jax.jit(lambda x: x, out_shardings=out_sharding)


@functools.lru_cache
def _layer_taker(out_sharding: NamedSharding) -> Callable:
    take = lambda x, i: jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False)
    return jax.jit(take, out_shardings=out_sharding)
