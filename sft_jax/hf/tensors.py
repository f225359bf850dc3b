"""Which HF tensor is which of our parameters, and the reshapes between them: the entries
of a config (from its family's row of `model.FAMILIES`), params read into place block by
block, and params written back out one tensor at a time."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from typing import NamedTuple

import jax
import numpy as np

from sft_jax.hf import sharded as hf_sharded
from sft_jax.model.config import GPTConfig
from sft_jax.sharding import get_path


class Entry(NamedTuple):
    """One tensor: where it is in our params and what HF calls it."""

    path: tuple[str, ...]  # our path within a layer, or from the top
    hf_name: str  # "{i}" stands for the layer index
    layout: str  # "table" | "vector" | "linear" | "conv1d" | "experts" (module docstring)
    in_dims: int = 0  # kernels: how many leading dims of ours are the matmul's input


_HF_LEAVES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def _hf_name(prefix: str, path: tuple[str, ...]) -> str:
    """A parameter path as its HF tensor name: the leaf `kernel`, `scale` or `embedding` is
    `weight`, and a bare parameter (`wpe`) gets one."""
    if path[-1] in _HF_LEAVES:
        path = (*path[:-1], _HF_LEAVES[path[-1]])
    else:
        path = (*path, "weight")
    return prefix + ".".join(path)


def _entries(cfg: GPTConfig) -> tuple[list[Entry], list[Entry]]:
    """(top-level entries, per-layer entries) of `cfg`'s params, in HF's order."""
    names = cfg.names
    top_prefix, layer_prefix = names.hf_prefix, f"{names.hf_prefix}{names.layers}.{{i}}."

    def entry(prefix: str, path: tuple[str, ...], layout: str, in_dims: int = 0) -> Entry:
        return Entry(path, _hf_name(prefix, path), layout, in_dims)

    def norm(prefix: str, *path: str) -> list[Entry]:
        leaves = ("scale", "bias") if cfg.bias else ("scale",)
        return [entry(prefix, (*path, leaf), "vector") for leaf in leaves]

    def dense(*path: str, bias: bool = cfg.bias, in_dims: int = 1) -> list[Entry]:
        kernel = entry(layer_prefix, (*path, "kernel"), names.hf_kernels, in_dims)
        return [kernel, entry(layer_prefix, (*path, "bias"), "vector")] if bias else [kernel]

    top = [entry(top_prefix, (names.embed, "embedding"), "table")]
    if cfg.positions == "learned":
        top.append(entry(top_prefix, ("wpe",), "table"))
    top += norm(top_prefix, names.final_norm)
    if not cfg.tie_embeddings:
        top.append(entry("", ("lm_head", "kernel"), names.hf_kernels, 1))
    layer = norm(layer_prefix, names.norm_1)
    for proj in names.qkv:
        layer += dense(names.attn, proj, bias=cfg.bias or cfg.qkv_bias)
    if cfg.qk_norm:
        layer += norm(layer_prefix, names.attn, names.q_norm)
        layer += norm(layer_prefix, names.attn, names.k_norm)
    layer += dense(names.attn, names.attn_out, bias=cfg.bias or cfg.attn_out_bias, in_dims=2)
    if cfg.attention_sinks:  # gpt-oss: [heads], a bare parameter
        layer.append(Entry((names.attn, "sinks"), f"{layer_prefix}{names.attn}.sinks", "vector"))
    if cfg.sandwich_norms:
        layer += norm(layer_prefix, names.attn_out_norm)
    layer += norm(layer_prefix, names.norm_2)
    layer += _mlp_entries(cfg, dense, layer_prefix)
    if cfg.sandwich_norms:
        layer += norm(layer_prefix, names.mlp_out_norm)
    return top, layer


def _mlp_entries(cfg: GPTConfig, dense, layer_prefix: str) -> list[Entry]:
    """The MLP's entries, or the router's and the experts' (`dense(*path, bias=…)`: a
    dense layer's entries)."""
    names = cfg.names
    if not cfg.n_experts:
        return [e for proj in (*names.mlp_in, names.mlp_out) for e in dense("mlp", proj)]
    router = dense(names.moe, names.router, bias=cfg.router_bias)
    return router + _expert_entries(cfg, layer_prefix)


def _expert_entries(cfg: GPTConfig, layer_prefix: str) -> list[Entry]:
    """A mixture of experts' stacked expert weights: one HF tensor per expert, `{e}` in the
    name standing for the expert's index (`hf.experts`); gpt-oss's, stacked and fused as
    transformers holds and saves them, as they are ("table")."""
    names = cfg.names
    if cfg.expert_mlp == "gpt_oss":
        stacked = f"{layer_prefix}{names.moe}.{names.experts}."
        parts = [p + bias for p in (*names.expert_in, names.expert_out) for bias in ("", "_bias")]
        return [Entry((names.moe, names.experts, p), stacked + p, "table") for p in parts]
    experts = f"{layer_prefix}{names.moe}.{names.experts}.{{{{e}}}}"
    return [
        Entry((names.moe, names.experts, proj), f"{experts}.{proj}.weight", "experts", 1)
        for proj in (*names.expert_in, names.expert_out)
    ]


class Tensor(NamedTuple):
    """One HF tensor: its entry, its name, where our leaf is, and which layer of a stacked
    leaf it is (None: the whole leaf)."""

    entry: Entry
    name: str
    path: tuple[str, ...]
    layer: int | None


def tensors(cfg: GPTConfig) -> Iterator[Tensor]:
    """Every HF tensor of `cfg`'s model: the top-level ones, then each per-layer tensor for
    layers 0, 1, … (the order of import, export and the safetensors files)."""
    top, layer = _entries(cfg)
    layers = cfg.names.layers
    for entry in top:
        yield Tensor(entry, entry.hf_name, entry.path, None)
    for entry in layer:
        for i in range(cfg.n_layers):
            name = entry.hf_name.format(i=i)
            if cfg.scan_layers:
                yield Tensor(entry, name, (layers, *entry.path), i)
            else:
                yield Tensor(entry, name, (f"{layers}_{i}", *entry.path), None)


def _to_hf(ours: np.ndarray, layout: str, in_dims: int) -> np.ndarray:
    if layout == "table":
        return ours
    if layout == "vector":
        return ours.reshape(-1)
    if layout == "experts":
        return np.stack([_to_hf(expert, "linear", in_dims) for expert in ours])
    two_d = ours.reshape(math.prod(ours.shape[:in_dims]), -1)  # [in, out]
    return np.ascontiguousarray(two_d.T if layout == "linear" else two_d)


def _leaf_shapes(cfg: GPTConfig) -> dict:
    import flax.linen as nn

    from sft_jax.model import GPT

    abstract = jax.eval_shape(
        GPT(cfg).init, jax.random.key(0), jax.numpy.zeros((1, 1), jax.numpy.int32)
    )["params"]
    return nn.meta.unbox(abstract)


def _set(tree: dict, path, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _layer_reader(reader, t: Tensor, shape: tuple[int, ...]) -> hf_sharded.ReadBlock:
    """Blocks of one HF tensor in our layout (`shape`: one layer of our leaf)."""
    entry = t.entry
    want = hf_sharded.hf_shape(entry.layout, shape, entry.in_dims)
    got = tuple(reader.shape(t.name))
    if got != want:
        raise ValueError(f"{t.name}: shape mismatch: expected {want} for our {shape}, got {got}")
    read = functools.partial(reader.read, t.name)
    return hf_sharded.block_reader(read, entry.layout, shape, entry.in_dims)


def params_from_hf(
    cfg: GPTConfig, reader, shardings=None, shapes: dict | None = None, transform=None
) -> dict:
    """Our params from HF tensors. `reader` has `shape(name)` and `read(name, index)` (see
    `files`). With `shardings` (our params' tree of `NamedSharding`s), each leaf is a
    global jax.Array of which this process reads only its devices' blocks; without, numpy.
    `shapes`: the abstract params, if the caller has them (else from `eval_shape`, which
    must then run outside a mesh context: flax constrains boxed params under one).
    `transform(path, array)` (with `shardings` only): what to keep of each leaf, applied as
    it is placed, to one layer at a time of a stacked leaf (`sharded.place_stacked`)."""
    if transform is not None and shardings is None:
        raise ValueError("params_from_hf: a transform needs shardings (it runs on devices)")
    shapes = shapes if shapes is not None else _leaf_shapes(cfg)
    dtype = np.dtype(jax.numpy.dtype(cfg.param_dtype))
    by_leaf: dict[tuple[str, ...], list[Tensor]] = {}
    for t in tensors(cfg):
        by_leaf.setdefault(t.path, []).append(t)
    params: dict = {}
    for path, parts in by_leaf.items():
        shape = tuple(get_path(shapes, path).shape)
        sharding = None if shardings is None else get_path(shardings, path)
        if parts[0].layer is None:
            read = _layer_reader(reader, parts[0], shape)
            if sharding is None:
                leaf = read(tuple(slice(0, n) for n in shape)).astype(dtype)
            else:
                leaf = hf_sharded.place(shape, sharding, dtype, read)
                leaf = leaf if transform is None else transform(path, leaf)
        else:  # a stacked leaf: one layer's tensor at a time
            readers = [functools.partial(_layer_reader, reader, t, shape[1:]) for t in parts]
            each = None if transform is None else functools.partial(transform, path)
            leaf = _stacked(shape, dtype, readers, sharding, each)
        _set(params, path, leaf)
    return params


def leaf_from_hf(cfg: GPTConfig, reader, path: tuple[str, ...], shape, layer: int | None = None):
    """One leaf of our params (`shape`), or with `layer` that layer of a stacked leaf, read
    alone from HF tensors in `cfg.param_dtype`: what `params_from_hf` gives for it."""
    dtype = np.dtype(jax.numpy.dtype(cfg.param_dtype))
    t = next(t for t in tensors(cfg) if t.path == tuple(path) and t.layer == layer)
    shape = tuple(shape[1:] if layer is not None else shape)
    whole = tuple(slice(0, n) for n in shape)
    return _layer_reader(reader, t, shape)(whole).astype(dtype)


def _stacked(shape, dtype, readers, sharding, transform=None):
    """A `[layers, …]` leaf, one layer's tensor at a time (`readers[i]()` reads layer i)."""
    if sharding is not None:
        read_layer = lambda i: readers[i]()
        return hf_sharded.place_stacked(shape, sharding, dtype, read_layer, transform)
    out = np.empty(shape, dtype)
    whole = tuple(slice(0, n) for n in shape[1:])
    for i, make in enumerate(readers):
        out[i] = make()(whole)
    return out


def params_to_hf(cfg: GPTConfig, params) -> Iterator[tuple[str, np.ndarray | None]]:
    """(HF name, numpy tensor) pairs, gathered from devices one tensor (one layer of a
    stacked leaf) at a time. Collective across processes: every process must iterate to
    the end; the tensors are on process 0, None on the others."""
    for t in tensors(cfg):
        ours = hf_sharded.to_host(get_path(params, t.path), t.layer)
        hf = None if ours is None else _to_hf(ours, t.entry.layout, t.entry.in_dims)
        if t.entry.layout != "experts":
            yield t.name, hf
            continue
        for e in range(get_path(params, t.path).shape[t.layer is not None]):
            yield t.name.format(e=e), None if hf is None else hf[e]


def shard_plan(cfg: GPTConfig, params, itemsize: int, max_shard_bytes: int) -> dict:
    """File name → the HF tensor names it will hold, planned from shapes alone, so that each
    file can be written as soon as its last tensor arrives."""
    files: list[list[str]] = [[]]
    size = 0
    for t in tensors(cfg):
        shape = get_path(params, t.path).shape[(t.layer is not None) :]
        nbytes = math.prod(hf_sharded.hf_shape(t.entry.layout, shape, t.entry.in_dims)) * itemsize
        names = [t.name]
        if t.entry.layout == "experts":  # one HF tensor per expert
            names, nbytes = [t.name.format(e=e) for e in range(shape[0])], nbytes // shape[0]
        for name in names:
            if size and size + nbytes > max_shard_bytes:
                files.append([])
                size = 0
            files[-1].append(name)
            size += nbytes
    if len(files) == 1:
        return {"model.safetensors": files[0]}
    n = len(files)
    return {f"model-{i + 1:05d}-of-{n:05d}.safetensors": names for i, names in enumerate(files)}
