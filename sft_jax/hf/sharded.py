"""Parameters in and out of devices a block at a time, so that no process ever holds more
than its own shards plus one tensor (the rule for scale in docs/design.md).

Import: each process asks, per parameter, which blocks its devices hold
(`addressable_devices_indices_map`), reads only those rows of the HF tensor
(`files` readers), casts them to the parameter dtype and builds the global array with
`jax.make_array_from_single_device_arrays`. Blocks that share HF rows are read one after
another (a bucket reader keeps the last rows it fetched), replicas once. Where our blocks
split HF columns across processes (fsdp on q, k, v, gate, up, embedding, lm_head), a bucket
would serve each process whole rows, many times its share: those tensors are read by HF
rows and resharded (`_by_rows`). A stacked (scanned) leaf is filled one layer at a time into
an array already laid out on the mesh (an in-place update of a donated buffer), so the host
never holds more than one layer's blocks. A `transform` (QLoRA's quantization,
`lora.load_transform`) is applied to each layer of a stacked leaf as soon as it is placed
(and by `tensors.params_from_hf` to each other leaf), so the devices hold one float layer at
a time beside what is kept.

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
# A placed leaf (or one layer of a stacked leaf) → what is kept of it: an array or a pytree
# of arrays (a quantized tensor), each laid out by a NamedSharding.
Transform = Callable[[jax.Array], object]


def hf_shape(layout: str, shape: tuple[int, ...], in_dims: int) -> tuple[int, ...]:
    """The HF tensor's shape for our leaf `shape` (one layer of it), by layout (`hf.tensors`)."""
    if layout == "table":
        return tuple(shape)
    if layout == "vector":
        return (math.prod(shape),)
    if layout == "experts":  # [experts, in…, out…] → [experts, out, in]
        return (shape[0], *hf_shape("linear", shape[1:], in_dims))
    n_in, n_out = math.prod(shape[:in_dims]), math.prod(shape[in_dims:])
    return (n_out, n_in) if layout == "linear" else (n_in, n_out)


def _hf_groups(layout: str, ndim: int, in_dims: int) -> list[tuple[int, ...]]:
    """Which of our dims make up each HF dim, in HF order."""
    if layout == "table":
        return [(d,) for d in range(ndim)]
    if layout == "vector":
        return [tuple(range(ndim))]
    if layout == "experts":
        ins, outs = tuple(range(1, 1 + in_dims)), tuple(range(1 + in_dims, ndim))
        return [(0,), outs, ins]
    ins, outs = tuple(range(in_dims)), tuple(range(in_dims, ndim))
    return [outs, ins] if layout == "linear" else [ins, outs]


class BlockReader:
    """Blocks of our leaf (slices over `shape`) read from the HF tensor (`read(hf_index)`),
    only the HF rows that hold them. Each HF dim is several of ours flattened; the block's
    range along the first of them is one contiguous HF range, and the others are cut after
    reading. Our rules leave those others whole (head_dim under heads), except in GPT-2's
    fused [embed, 3, heads, head_dim] kernel, where a tensor-parallel block reads all heads
    of its rows and keeps its own.

    A block split along HF columns (fsdp on q, k, v, gate, up, embed, lm_head) still reads
    whole rows: `place` orders the reads so that a reader's cache of the last rows serves
    every local block of them, or reads the tensor by rows instead (`_by_rows`)."""

    def __init__(self, read: Callable[[Index], np.ndarray], layout: str, shape, in_dims: int):
        self.read_hf, self.layout, self.shape = read, layout, tuple(shape)
        # A bucket reader fetches whole rows; a local file is mapped, a cut touches its pages.
        owner = getattr(getattr(read, "func", read), "__self__", None)
        self.fetches_rows = getattr(owner, "fetches_rows", False)
        self.hf_shape = hf_shape(layout, self.shape, in_dims)
        self._groups = _hf_groups(layout, len(self.shape), in_dims)
        self._leads = {g[0] for g in self._groups if g}

    def _norm(self, index: Index) -> Index:
        return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, self.shape, strict=True))

    def hf_index(self, index: Index) -> Index:
        """The HF slices that hold our block `index`: whole units of each HF dim's lead."""
        index = self._norm(index)
        hf_index = []
        for group in self._groups:
            inner = math.prod(self.shape[d] for d in group[1:])
            lead = index[group[0]]
            hf_index.append(slice(lead.start * inner, lead.stop * inner))
        return tuple(hf_index)

    def rows(self, index: Index) -> tuple[int, int]:
        """The HF rows (first-dim range) a read of block `index` fetches, whole."""
        first = self.hf_index(index)[0]
        return first.start, first.stop

    def __call__(self, index: Index) -> np.ndarray:
        index = self._norm(index)
        block = np.asarray(self.read_hf(self.hf_index(index)))
        if self.layout == "linear":
            block = block.T  # [out, in] → [in, out], our dims' order
        elif self.layout == "experts":
            block = block.transpose(0, 2, 1)  # [experts, out, in] → [experts, in, out]
        leads, shape = self._leads, self.shape
        rows = [index[d].stop - index[d].start if d in leads else n for d, n in enumerate(shape)]
        inner_index = tuple(slice(None) if d in leads else index[d] for d in range(len(shape)))
        return block.reshape(rows)[inner_index]


def block_reader(
    read: Callable[[Index], np.ndarray], layout: str, shape: tuple[int, ...], in_dims: int
) -> BlockReader:
    """A function from a block of our leaf to its values (`BlockReader`)."""
    return BlockReader(read, layout, shape, in_dims)


def place(shape, sharding: NamedSharding, dtype, read_block: ReadBlock) -> jax.Array:
    """A global array of `shape` whose blocks this process's devices hold are read now. On
    several processes, a leaf whose blocks are HF column blocks is read by HF rows instead
    and resharded on the devices (`_by_rows`), so each process fetches about its share."""
    rows = _by_rows(tuple(shape), sharding, read_block)
    if rows is None:
        return _place_blocks(tuple(shape), sharding, dtype, read_block)
    assert isinstance(read_block, BlockReader)
    by_rows = _place_blocks(read_block.hf_shape, rows, dtype, read_block.read_hf)
    return _from_hf(read_block.layout, tuple(shape), sharding)(by_rows)


def _place_blocks(shape, sharding: NamedSharding, dtype, read_block: ReadBlock) -> jax.Array:
    """The blocks of this process's devices, read in the order of their HF rows, so the
    blocks that share rows are read one after another (a remote reader fetches the rows
    once and keeps them until other rows are asked for) and replicas once (cast once)."""
    by_device = sharding.addressable_devices_indices_map(shape)
    rows = getattr(read_block, "rows", None)

    def order(item):
        index = tuple(slice(*s.indices(n)[:2]) for s, n in zip(item[1], shape, strict=True))
        key = tuple((s.start, s.stop) for s in index)
        return (rows(index) if rows else (), key)

    arrays, last = [], (None, None)
    for device, index in sorted(by_device.items(), key=order):
        key = order((device, index))
        if last[0] != key:
            last = (None, None)  # the previous block is on its devices: let it go first
            last = (key, np.asarray(read_block(index), dtype=dtype))
        arrays.append(jax.device_put(last[1], device))
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


# A process may fetch this much more than its share before a leaf is read by rows instead.
_READ_SLACK = 1.25


def _by_rows(shape, sharding: NamedSharding, read_block) -> NamedSharding | None:
    """The sharding of the HF tensor by rows over all processes (`_rows_sharding`) if a
    reader that fetches whole rows (a bucket's) would fetch more than `_READ_SLACK` × its
    share on some process reading our blocks directly, else None. Decided from the global
    device map, so every process decides the same (the reshard that follows is
    collective). The reshard's cost is on the devices: XLA may gather the whole tensor on
    each device for a moment (one layer of one leaf at a time)."""
    if jax.process_count() == 1 or not getattr(read_block, "fetches_rows", False):
        return None
    processes = {d.process_index for d in sharding.device_set}
    if len(processes) == 1:
        return None
    row_size = math.prod(read_block.hf_shape[1:])
    fetched: dict[int, set] = {p: set() for p in processes}
    held: dict[int, set] = {p: set() for p in processes}
    for device, index in sharding.devices_indices_map(shape).items():
        index = read_block._norm(index)
        fetched[device.process_index].add(read_block.rows(index))
        held[device.process_index].add(tuple((s.start, s.stop) for s in index))
    if all(
        sum((b - a) * row_size for a, b in fetched[p])
        <= _READ_SLACK * sum(math.prod(b - a for a, b in block) for block in held[p])
        for p in processes
    ):
        return None
    return _rows_sharding(sharding.device_set, read_block.hf_shape)


def _rows_sharding(devices, shape) -> NamedSharding | None:
    """The HF tensor split by rows: over all devices, processes first, when its rows divide
    evenly; else over the processes (each process's devices share its rows, read once)."""
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    processes = len({d.process_index for d in devices})
    if len(devices) % processes:
        return None
    grid = np.asarray(devices).reshape(processes, len(devices) // processes)
    mesh = Mesh(grid, ("process", "local"))
    if shape[0] % grid.size == 0:
        return NamedSharding(mesh, PartitionSpec(("process", "local")))
    if shape[0] % processes == 0:
        return NamedSharding(mesh, PartitionSpec("process"))
    return None


@functools.lru_cache
def _from_hf(layout: str, shape, sharding: NamedSharding) -> Callable:
    """The HF tensor (split by rows) as our leaf, on `sharding`: a reshard on the devices."""

    def ours(x):
        if layout == "linear":
            x = x.T  # [out, in] → [in, out]
        elif layout == "experts":
            x = x.transpose(0, 2, 1)
        return x.reshape(shape)

    return jax.jit(ours, out_shardings=sharding)


def place_stacked(
    shape,
    sharding: NamedSharding,
    dtype,
    read_layer: Callable[[int], ReadBlock],
    transform: Transform | None = None,
):
    """A stacked leaf `[layers, …]` built one layer at a time on the mesh:
    `read_layer(i)` reads blocks of layer i. With `transform`, each layer is transformed as
    soon as it is placed and the results are stacked the same way (each leaf of the result
    gains a leading, unsharded layers axis): one float layer is held at a time."""
    spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    if spec[0] is not None:
        raise ValueError(
            f"sharding: a stacked leaf split over layers ({sharding.spec}) is not "
            "supported by the import; keep the 'layers' rule unsharded"
        )
    layer_sharding = NamedSharding(sharding.mesh, PartitionSpec(*spec[1:]))
    stacked = None if transform else _zeros(tuple(shape), jnp.dtype(dtype), sharding)()
    for i in range(shape[0]):
        layer = place(shape[1:], layer_sharding, dtype, read_layer(i))
        layer = layer if transform is None else transform(layer)
        if stacked is None:  # laid out as the transform lays out one layer
            stacked = _zeros_stacked(layer, shape[0])
        stacked = _set_layer(stacked, layer, i)
    return stacked


def _zeros_stacked(layer, n: int):
    """Zeros for `n` layers like `layer` (a tree of arrays), each leaf's sharding with an
    unsharded layers axis in front."""
    shapes = [((n, *x.shape), x.dtype) for x in jax.tree.leaves(layer)]
    shardings = jax.tree.map(
        lambda x: NamedSharding(x.sharding.mesh, PartitionSpec(None, *x.sharding.spec)), layer
    )
    zeros = lambda: jax.tree.unflatten(
        jax.tree.structure(layer), [jnp.zeros(s, d) for s, d in shapes]
    )
    return jax.jit(zeros, out_shardings=shardings)()


@functools.lru_cache
def _zeros(shape, dtype, sharding: NamedSharding) -> Callable[[], jax.Array]:
    return jax.jit(functools.partial(jnp.zeros, shape, dtype), out_shardings=sharding)


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stacked, layer, i):
    # The donated buffers are updated in place: no second copy of the stacked leaf. (Trees
    # of arrays too: a transformed layer.)
    return jax.tree.map(
        lambda s, x: jax.lax.dynamic_update_index_in_dim(s, x.astype(s.dtype), i, 0),
        stacked,
        layer,
    )


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
