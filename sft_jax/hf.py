"""Hugging Face ⇄ sft_jax: config.json and safetensors in, and back out.

Parameter names already mirror the HF checkpoints, so conversion is a list of entries per
config, built from its family's row of `model.FAMILIES`: (our path, HF name, how the tensor
is laid out, the kernel's input dims). Layouts:

- `table`:  embedding tables, same shape both sides;
- `vector`: norms and biases; ours may keep head structure ([3, heads, head_dim]), HF is 1-D;
- `linear`: torch `nn.Linear` weight [out, in]; ours is [in…, out…] (transpose, reshape);
- `conv1d`: GPT-2's `Conv1D` weight, already [in, out]; ours reshapes only.

Layers are stacked along a leading axis when `scan_layers` is on (`h`, `layers`), else
named `h_0`, `layers_0`, …. No torch here: safetensors are read and written with numpy,
a block or a tensor at a time (`hf_files`), and each process reads or gathers only what
its devices hold (`hf_sharded`): no process holds more than its shards plus one tensor.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable, Iterator
from typing import NamedTuple

import jax
import numpy as np
from etils import epath

from sft_jax import hf_files, hf_sharded
from sft_jax.model import GPTConfig
from sft_jax.sharding import get_path


class Entry(NamedTuple):
    """One tensor: where it is in our params and what HF calls it."""

    path: tuple[str, ...]  # our path within a layer, or from the top
    hf_name: str  # "{i}" stands for the layer index
    layout: str  # "table" | "vector" | "linear" | "conv1d" (the module docstring)
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
    layer += dense(names.attn, names.attn_out, in_dims=2)
    if cfg.sandwich_norms:
        layer += norm(layer_prefix, names.attn_out_norm)
    layer += norm(layer_prefix, names.norm_2)
    for proj in (*names.mlp_in, names.mlp_out):
        layer += dense("mlp", proj)
    if cfg.sandwich_norms:
        layer += norm(layer_prefix, names.mlp_out_norm)
    return top, layer


# --------------------------------------------------------------------------- configs


def config_from_hf(hf: dict, source: str = "config.json") -> GPTConfig:
    """A GPTConfig from a Hugging Face config dict; unsupported options fail by name."""
    model_type = hf.get("model_type")

    def unsupported(what: str) -> ValueError:
        return ValueError(f"{source}: {what} is not supported (model_type={model_type!r})")

    if model_type == "gpt2":
        return _gpt2_config(hf, unsupported)
    if model_type in ("llama", "qwen2", "qwen3", "mistral"):
        return _llama_config(hf, unsupported)
    if model_type == "gemma3":  # the multimodal checkpoint: its language model only
        hf = {"tie_word_embeddings": hf.get("tie_word_embeddings", True)} | (
            hf.get("text_config") or {}
        )
        hf["model_type"] = "gemma3_text"
    if model_type in ("gemma2", "gemma3", "gemma3_text"):
        return _gemma_config(hf, unsupported)
    raise ValueError(
        f"{source}: model_type={model_type!r} is not supported; sft_jax imports gpt2, llama "
        "(Llama 2/3, SmolLM2, TinyLlama), qwen2, qwen3, mistral, gemma2, gemma3_text and "
        "the text part of gemma3"
    )


def _gpt2_config(hf: dict, unsupported: Callable[[str], ValueError]) -> GPTConfig:
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise unsupported(f"activation_function={act!r}")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(flag):
            raise unsupported(f"{flag}=True")
    d = hf["n_embd"]
    return GPTConfig(
        family="gpt2",
        vocab_size=hf["vocab_size"],
        max_seq_len=hf.get("n_positions", 1024),
        d_model=d,
        n_layers=hf["n_layer"],
        n_heads=hf["n_head"],
        n_kv_heads=hf["n_head"],
        d_ff=hf.get("n_inner") or 4 * d,
        positions="learned",
        norm="layernorm",
        mlp="gelu",
        bias=True,
        tie_embeddings=True,
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
    )


def _llama_config(hf: dict, unsupported: Callable[[str], ValueError]) -> GPTConfig:
    """Llama, Qwen2 (Llama with q/k/v biases), Qwen3 (with q/k norms) and Mistral (with a
    sliding window on every layer, or none)."""
    model_type = hf["model_type"]
    if hf.get("hidden_act", "silu") != "silu":
        raise unsupported(f"hidden_act={hf['hidden_act']!r}")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise unsupported("attention_bias/mlp_bias=True")
    if hf.get("use_sliding_window"):
        raise unsupported("use_sliding_window=True")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    return GPTConfig(
        family=model_type,
        head_dim=_head_dim(hf),
        qk_norm=model_type == "qwen3",
        sliding_window=(hf.get("sliding_window") or 0) if model_type == "mistral" else 0,
        vocab_size=hf["vocab_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        d_ff=hf["intermediate_size"],
        positions="rope",
        norm="rmsnorm",
        mlp="swiglu",
        bias=False,
        qkv_bias=model_type == "qwen2",
        tie_embeddings=bool(hf.get("tie_word_embeddings", model_type == "qwen2")),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        rope_llama3_scaling=_rope_scaling(rope, unsupported),
    )


def _head_dim(hf: dict) -> int:
    """GPTConfig.head_dim: 0 where it is d_model / n_heads (configs stay comparable with
    the presets)."""
    head_dim = hf.get("head_dim") or 0
    return 0 if head_dim == hf["hidden_size"] // hf["num_attention_heads"] else head_dim


# transformers' defaults for what a Gemma config.json may leave out (the published Gemma 3
# configs give only the values that differ from these in their text_config).
_GEMMA_DEFAULTS = {
    "gemma2": dict(
        vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256,
        max_position_embeddings=8192, rms_norm_eps=1e-6, query_pre_attn_scalar=256,
        sliding_window=4096, sliding_window_pattern=2, final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0, rope_theta=10000.0, tie_word_embeddings=True,
    ),
    "gemma3_text": dict(
        vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256,
        max_position_embeddings=131072, rms_norm_eps=1e-6, query_pre_attn_scalar=256,
        sliding_window=4096, sliding_window_pattern=6, final_logit_softcapping=None,
        attn_logit_softcapping=None, rope_theta=1_000_000.0, rope_local_base_freq=10000.0,
        tie_word_embeddings=True,
    ),
}  # fmt: skip


def _gemma_config(hf: dict, unsupported: Callable[[str], ValueError]) -> GPTConfig:
    """Gemma 2 and Gemma 3 (text): (1 + w) norms, four per block, GeGLU, scaled
    embeddings, soft caps, local (sliding-window) and global layers."""
    model_type = hf["model_type"]
    hf = _GEMMA_DEFAULTS[model_type] | hf  # a null soft cap or window stays null: none
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act != "gelu_pytorch_tanh":
        raise unsupported(f"hidden_activation={act!r}")
    for flag in ("attention_bias", "use_bidirectional_attention"):
        if hf.get(flag):
            raise unsupported(f"{flag}=True")
    window = hf.get("sliding_window") or 0
    local_theta, global_rope = _gemma_rope(hf, unsupported)
    return GPTConfig(
        family="gemma2" if model_type == "gemma2" else "gemma3",
        vocab_size=hf["vocab_size"],
        max_seq_len=hf["max_position_embeddings"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf["num_key_value_heads"],
        d_ff=hf["intermediate_size"],
        head_dim=_head_dim(hf),
        positions="rope",
        norm="rmsnorm",
        mlp="geglu",
        bias=False,
        tie_embeddings=bool(hf["tie_word_embeddings"]),
        norm_eps=hf["rms_norm_eps"],
        qk_norm=model_type != "gemma2",
        norm_plus_one=True,
        sandwich_norms=True,
        embed_scale=True,
        query_pre_attn_scalar=float(hf["query_pre_attn_scalar"]),
        attn_softcap=float(hf.get("attn_logit_softcapping") or 0.0),
        final_softcap=float(hf.get("final_logit_softcapping") or 0.0),
        sliding_window=window,
        global_every=_global_every(hf, unsupported) if window else 0,
        rope_theta=float(global_rope.get("rope_theta", hf["rope_theta"])),
        rope_local_theta=local_theta,
        rope_linear_factor=_rope_linear_factor(global_rope, unsupported),
    )


def _gemma_rope(hf: dict, unsupported: Callable[[str], ValueError]) -> tuple[float, dict]:
    """(local layers' RoPE base, 0 for Gemma 2's one base; the global layers' rope
    parameters). transformers 5 writes `rope_parameters` per layer type for Gemma 3 (and
    one dict for Gemma 2); older configs `rope_theta`, `rope_local_base_freq`, `rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    if "full_attention" in params:
        local = params.get("sliding_attention") or {}
        if local.get("rope_type", "default") != "default":
            raise unsupported(f"local layers' rope type {local['rope_type']!r}")
        theta = local.get("rope_theta", hf.get("rope_local_base_freq", 10000.0))
        return float(theta), dict(params["full_attention"] or {})
    global_rope = params or dict(hf.get("rope_scaling") or {})
    if hf["model_type"] == "gemma2":
        return 0.0, global_rope
    return float(hf["rope_local_base_freq"]), global_rope


def _rope_linear_factor(rope: dict, unsupported: Callable[[str], ValueError]) -> float:
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear"):
        raise unsupported(f"rope type {rope_type!r}")
    return float(rope["factor"]) if rope_type == "linear" else 1.0


def _global_every(hf: dict, unsupported: Callable[[str], ValueError]) -> int:
    """GPTConfig.global_every from `layer_types` (else `sliding_window_pattern`): every
    N-th layer global, the others local; another pattern is refused by name."""
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types")
    if not types:
        every = int(hf["sliding_window_pattern"])
        types = ["full_attention" if (i + 1) % every == 0 else "sliding_attention"
                 for i in range(n)]  # fmt: skip
    if len(types) != n or set(types) - {"full_attention", "sliding_attention"}:
        raise unsupported(f"layer_types={types}")
    local = [t == "sliding_attention" for t in types]
    every = 0 if all(local) else local.index(False) + 1
    expected = [not (every and (i + 1) % every == 0) for i in range(n)]
    if local != expected:
        raise unsupported(
            f"layer_types={types} (sft_jax takes every N-th layer global, the others local)"
        )
    return every


def _rope_scaling(rope: dict, unsupported: Callable[[str], ValueError]) -> tuple:
    """GPTConfig.rope_llama3_scaling from HF's rope parameters: () for plain RoPE."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return ()
    if rope_type != "llama3":
        raise unsupported(f"rope type {rope_type!r}")
    return (
        float(rope["factor"]),
        float(rope["low_freq_factor"]),
        float(rope["high_freq_factor"]),
        int(rope["original_max_position_embeddings"]),
    )


def _shape_keys(cfg: GPTConfig) -> dict:
    """The config.json keys of a rotary model's shapes, the same in every such family."""
    return {
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.dim_per_head,
    }


def config_to_hf(cfg: GPTConfig) -> dict:
    """The config.json of the equivalent transformers model."""
    if cfg.family == "gpt2":
        return {
            "model_type": "gpt2",
            "architectures": [cfg.names.hf_architecture],
            "vocab_size": cfg.vocab_size,
            "n_positions": cfg.max_seq_len,
            "n_ctx": cfg.max_seq_len,
            "n_embd": cfg.d_model,
            "n_layer": cfg.n_layers,
            "n_head": cfg.n_heads,
            "n_inner": cfg.d_ff,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "tie_word_embeddings": True,
            "torch_dtype": cfg.param_dtype,
        }
    if cfg.qkv_bias and cfg.family != "qwen2":
        raise ValueError(
            f"model: a {cfg.family} model with q/k/v biases has no Hugging Face equivalent; "
            "set family='qwen2'"
        )
    _check_exportable(cfg)
    if cfg.family in ("gemma2", "gemma3"):
        return _gemma_config_to_hf(cfg)
    rope = _rope_to_hf(cfg)
    extra = {}
    if cfg.family == "mistral":
        extra = {"sliding_window": cfg.sliding_window or None}
    elif cfg.family == "qwen3":
        extra = {"use_sliding_window": False, "sliding_window": None}
    return extra | {
        "model_type": cfg.family,
        "architectures": [cfg.names.hf_architecture],
        **_shape_keys(cfg),
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": rope,
        "rope_scaling": rope if cfg.rope_llama3_scaling else None,
        "attention_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": cfg.param_dtype,
    }


def _rope_to_hf(cfg: GPTConfig) -> dict:
    """The global layers' `rope_parameters`."""
    rope: dict = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_llama3_scaling:
        factor, low, high, original = cfg.rope_llama3_scaling
        rope.update(rope_type="llama3", factor=factor, low_freq_factor=low,
                    high_freq_factor=high, original_max_position_embeddings=original)  # fmt: skip
    elif cfg.rope_linear_factor != 1.0:
        rope.update(rope_type="linear", factor=cfg.rope_linear_factor)
    return rope


def _check_exportable(cfg: GPTConfig) -> None:
    """Fields the family's transformers class cannot express fail by name."""
    gemma = cfg.family in ("gemma2", "gemma3")
    fits = {
        "sliding_window": gemma or cfg.family == "mistral" or not cfg.sliding_window,
        "global_every": gemma or not cfg.global_every,
        "rope_local_theta": cfg.family == "gemma3" or not cfg.rope_local_theta,
        "attn_softcap": gemma or not cfg.attn_softcap,
        "final_softcap": gemma or not cfg.final_softcap,
        "query_pre_attn_scalar": gemma or not cfg.query_pre_attn_scalar,
        "mlp": cfg.mlp == ("geglu" if gemma else "swiglu"),
        "norm_plus_one": cfg.norm_plus_one == gemma,
        "embed_scale": cfg.embed_scale == gemma,
    }
    for field, ok in fits.items():
        if not ok:
            raise ValueError(
                f"model: {field}={getattr(cfg, field)!r} has no Hugging Face equivalent in "
                f"the {cfg.family} family"
            )


def _int_if_whole(x: float) -> int | float:
    """transformers' strict config classes take 256, not 256.0, where they declare an int."""
    return int(x) if float(x).is_integer() else x


def _gemma_config_to_hf(cfg: GPTConfig) -> dict:
    """config.json of Gemma2ForCausalLM, or Gemma3ForCausalLM (model_type gemma3_text)."""
    gemma2 = cfg.family == "gemma2"
    types = ["sliding_attention" if local else "full_attention" for local in cfg.local_layers]
    rope = _rope_to_hf(cfg)
    if not gemma2:
        local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta}
        rope = {"sliding_attention": local, "full_attention": rope}
    return {
        "model_type": "gemma2" if gemma2 else "gemma3_text",
        "architectures": [cfg.names.hf_architecture],
        **_shape_keys(cfg),
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": rope,
        "query_pre_attn_scalar": _int_if_whole(cfg.query_pre_attn_scalar or cfg.dim_per_head),
        "attn_logit_softcapping": cfg.attn_softcap or None,
        "final_logit_softcapping": cfg.final_softcap or None,
        # transformers needs a window even with every layer global: it is then unused.
        "sliding_window": cfg.sliding_window or cfg.max_seq_len,
        "layer_types": types if cfg.sliding_window else ["full_attention"] * cfg.n_layers,
        "attention_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": cfg.param_dtype,
    }


# --------------------------------------------------------------------------- tensors


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


def params_from_hf(cfg: GPTConfig, reader, shardings=None, shapes: dict | None = None) -> dict:
    """Our params from HF tensors. `reader` has `shape(name)` and `read(name, index)` (see
    `hf_files`). With `shardings` (our params' tree of `NamedSharding`s), each leaf is a
    global jax.Array of which this process reads only its devices' blocks; without, numpy.
    `shapes`: the abstract params, if the caller has them (else from `eval_shape`, which
    must then run outside a mesh context: flax constrains boxed params under one)."""
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
        else:  # a stacked leaf: one layer's tensor at a time
            readers = [functools.partial(_layer_reader, reader, t, shape[1:]) for t in parts]
            leaf = _stacked(shape, dtype, readers, sharding)
        _set(params, path, leaf)
    return params


def _stacked(shape, dtype, readers, sharding):
    """A `[layers, …]` leaf, one layer's tensor at a time (`readers[i]()` reads layer i)."""
    if sharding is not None:
        return hf_sharded.place_stacked(shape, sharding, dtype, lambda i: readers[i]())
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
        yield t.name, None if ours is None else _to_hf(ours, t.entry.layout, t.entry.in_dims)


def _shard_plan(cfg: GPTConfig, params, itemsize: int, max_shard_bytes: int) -> dict:
    """File name → the HF tensor names it will hold, planned from shapes alone, so that each
    file can be written as soon as its last tensor arrives."""
    files: list[list[str]] = [[]]
    size = 0
    for t in tensors(cfg):
        shape = get_path(params, t.path).shape[(t.layer is not None) :]
        nbytes = math.prod(hf_sharded.hf_shape(t.entry.layout, shape, t.entry.in_dims)) * itemsize
        if size and size + nbytes > max_shard_bytes:
            files.append([])
            size = 0
        files[-1].append(t.name)
        size += nbytes
    if len(files) == 1:
        return {"model.safetensors": files[0]}
    n = len(files)
    return {f"model-{i + 1:05d}-of-{n:05d}.safetensors": names for i, names in enumerate(files)}


# --------------------------------------------------------------------------- files


def _hub_download(source: str, **kwargs):
    """A hub call whose failure (network, auth, missing repo) reads the same to the user."""
    import huggingface_hub

    try:
        if "filename" in kwargs:
            return huggingface_hub.hf_hub_download(source, **kwargs)
        return huggingface_hub.snapshot_download(source, **kwargs)
    except Exception as e:
        raise ValueError(
            f"model.init_from: could not get {source!r} from the Hugging Face hub ({e}). "
            "Give a local folder with config.json and *.safetensors, or a GGUF file."
        ) from None


# Everything but the weights: config, tokenizer files, chat templates.
_HUB_SMALL_FILES = ["*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


def _is_url(source: str) -> bool:
    return "://" in source


def _is_hub_id(source: str) -> bool:
    local = source.startswith((".", "/", "~")) or epath.Path(source).exists()
    return not (_is_url(source) or local)


def resolve_folder(source: str, weights: bool = True) -> epath.Path:
    """A local or remote (gs://, s3://) folder as is; a hub id downloaded: its config and
    tokenizer files, and its safetensors if `weights`."""
    if _is_hub_id(source):
        patterns = _HUB_SMALL_FILES + (["*.safetensors"] if weights else [])
        return epath.Path(_hub_download(source, allow_patterns=patterns))
    path = epath.Path(source).expanduser()
    if not path.is_dir():
        raise ValueError(f"model.init_from: {source!r} is not a Hugging Face folder or GGUF file")
    return path


def load_config(source: str) -> GPTConfig:
    """The architecture of a hub id, HF folder or GGUF file; weights are neither read nor
    downloaded (from the hub only config.json is fetched)."""
    from sft_jax import assets

    source = assets.resolve_source(source)
    if source.endswith(".gguf"):
        from sft_jax import gguf_io

        if _is_url(source):
            raise ValueError(f"model.init_from: {source} must be on local disk: GGUF files are "
                             "memory-mapped; copy it there")  # fmt: skip
        return config_from_hf(gguf_io.read_gguf_config(source), source)
    if _is_hub_id(source):
        path = epath.Path(_hub_download(source, filename="config.json"))
    else:
        path = resolve_folder(source, weights=False) / "config.json"
    if not path.exists():
        raise ValueError(f"model.init_from: {path.parent} has no config.json")
    return config_from_hf(json.loads(path.read_text()), str(path))


def _tensor_reader(source: str, allow_pickle: bool):
    if source.endswith(".gguf"):
        return hf_files.GGUFFile(source)
    folder = resolve_folder(source)
    if list(folder.glob("*.safetensors")):
        remote = _is_url(source)
        return (hf_files.RemoteSafetensorsFolder if remote else hf_files.SafetensorsFolder)(folder)
    if _is_url(source):
        raise ValueError(f"model.init_from: {folder} has no *.safetensors weights; other "
                         "formats are read from local disk: copy the folder there")  # fmt: skip
    if list(folder.glob("pytorch_model*.bin")):
        if not allow_pickle:
            raise ValueError(
                f"model.init_from: {folder} has only pickled .bin weights, which can run code "
                "when loaded; convert them to safetensors, or opt in with "
                "model.allow_pickle=True if you trust the source"
            )
        return hf_files.TorchBinFolder(folder)
    raise ValueError(f"model.init_from: {folder} has no *.safetensors weights")


def load_hf(
    source: str,
    *,
    allow_pickle: bool = False,
    param_dtype: str = "float32",
    scan_layers: bool = True,
    shardings=None,
    shapes: dict | None = None,
) -> tuple[GPTConfig, dict]:
    """(GPTConfig, params) from a hub id, a local or remote HF folder, a GGUF file or
    `asset:<name>`. With `shardings` (the params' tree of NamedShardings), every leaf is a
    global jax.Array and each process reads only the blocks of its own devices; without,
    params are numpy arrays."""
    from sft_jax import assets

    source = assets.resolve_source(source)
    cfg = dataclasses.replace(load_config(source), param_dtype=param_dtype, scan_layers=scan_layers)
    reader = _tensor_reader(source, allow_pickle)
    if cfg.family == "gemma3":
        reader = LanguageModelReader(reader)
    return cfg, params_from_hf(cfg, reader, shardings, shapes)


class LanguageModelReader:
    """A reader that finds Gemma3ForCausalLM's tensor names (`model.layers.0…`) also where
    a multimodal Gemma 3 checkpoint keeps its language model: `model.language_model.…` as
    transformers 5 saves it, `language_model.model.…` as the published checkpoints do."""

    def __init__(self, reader):
        self.reader = reader
        self._names: dict[str, str] = {}

    def _find(self, name: str) -> str:
        if name not in self._names:
            rest = name.removeprefix("model.")
            candidates = (name, f"model.language_model.{rest}", f"language_model.model.{rest}",
                          f"language_model.{name}")  # fmt: skip
            for candidate in candidates:
                try:
                    self.reader.shape(candidate)
                except (KeyError, ValueError):
                    continue
                self._names[name] = candidate
                break
            else:
                raise ValueError(f"tensor {name!r} is missing from the checkpoint (also as "
                                 f"{', '.join(candidates[1:])})")  # fmt: skip
        return self._names[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.reader.shape(self._find(name))

    def read(self, name: str, index):
        return self.reader.read(self._find(name), index)


_EXPORT_DTYPES = ("float32", "bfloat16", "float16")


def export_dtype(cfg: GPTConfig, requested: str = "", key: str = "export.dtype") -> str:
    """The dtype an export writes: `requested`, else bfloat16 for a model computed in
    bfloat16 (what it ran as; half the bytes of float32 master weights), else the params'
    own dtype."""
    dtype = requested or ("bfloat16" if cfg.dtype == "bfloat16" else cfg.param_dtype)
    if dtype not in _EXPORT_DTYPES:
        raise ValueError(f"{key}: {dtype!r} is not one of {', '.join(_EXPORT_DTYPES)}")
    return dtype


def save_hf(
    cfg: GPTConfig,
    params,
    out_dir: str,
    tokenizer=None,
    max_shard_bytes: int = 2 * 1024**3,
    dtype: str | None = None,
) -> str:
    """Write a folder (a local path or a gs:// / s3:// URL) that
    `transformers.AutoModelForCausalLM.from_pretrained` loads: config.json,
    generation_config.json, safetensors (sharded with an index above `max_shard_bytes`) and,
    if given, the tokenizer files with its chat template.

    Every process must call this (gathering sharded params is collective); process 0 writes,
    one tensor at a time, each safetensors file as soon as it is full. All return once the
    folder is complete."""
    out_dtype = np.dtype(jax.numpy.dtype(dtype or cfg.param_dtype))
    out = epath.Path(out_dir)
    writer = None
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        plan = _shard_plan(cfg, params, out_dtype.itemsize, max_shard_bytes)
        writer = hf_files.ShardWriter(out, plan)
    for name, tensor in params_to_hf(cfg, params):
        if writer is not None:
            writer.add(name, tensor.astype(out_dtype, copy=False))
    if writer is not None:
        writer.finish()
        _write_configs(cfg, out, out_dtype, tokenizer)
    if jax.process_count() > 1:  # no process reports an export that is still being written
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"sft_jax.hf.save_hf:{out_dir}")
    return out_dir


def _write_configs(cfg: GPTConfig, out: epath.Path, out_dtype: np.dtype, tokenizer) -> None:
    """config.json, generation_config.json and the tokenizer's files."""
    hf_config = config_to_hf(cfg) | {"torch_dtype": str(out_dtype)}
    generation = {}
    if tokenizer is not None:
        from sft_jax.generate import end_token_ids

        _save_tokenizer(tokenizer, out)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(tokenizer, key, None) is not None:
                hf_config[key] = generation[key] = getattr(tokenizer, key)
        # Every end token the chat template uses (<end_of_turn>, <|im_end|> …), so a served
        # export stops where the fine-tune learned to stop.
        ends = list(end_token_ids(tokenizer))
        if ends:
            generation["eos_token_id"] = ends[0] if len(ends) == 1 else ends
    hf_files.write_json(hf_config, out / "config.json")
    hf_files.write_json(generation, out / "generation_config.json")


def _save_tokenizer(tokenizer, out: epath.Path) -> None:
    """`save_pretrained` writes local files only: a remote folder gets copies."""
    if "://" not in str(out):
        tokenizer.save_pretrained(str(out))
        return
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for f in epath.Path(tmp).iterdir():
            hf_files.copy_file(f, out / f.name)
