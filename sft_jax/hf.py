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
tensor by tensor, so peak host memory stays near one copy of the parameters.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
from collections.abc import Callable, Iterator
from typing import NamedTuple

import jax
import numpy as np

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

    def norm(prefix: str, name: str) -> list[Entry]:
        leaves = ("scale", "bias") if cfg.bias else ("scale",)
        return [entry(prefix, (name, leaf), "vector") for leaf in leaves]

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
    layer += dense(names.attn, names.attn_out, in_dims=2)
    layer += norm(layer_prefix, names.norm_2)
    for proj in (*names.mlp_in, names.mlp_out):
        layer += dense("mlp", proj)
    return top, layer


# --------------------------------------------------------------------------- configs


def config_from_hf(hf: dict, source: str = "config.json") -> GPTConfig:
    """A GPTConfig from a Hugging Face config dict; unsupported options fail by name."""
    model_type = hf.get("model_type")

    def unsupported(what: str) -> ValueError:
        return ValueError(f"{source}: {what} is not supported (model_type={model_type!r})")

    if model_type == "gpt2":
        return _gpt2_config(hf, unsupported)
    if model_type in ("llama", "qwen2"):
        return _llama_config(hf, unsupported)
    raise ValueError(
        f"{source}: model_type={model_type!r} is not supported; sft_jax imports gpt2, llama "
        "(Llama 2/3, SmolLM2, TinyLlama) and qwen2"
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
    """Llama and Qwen2 (Llama with q/k/v biases)."""
    model_type = hf["model_type"]
    if hf.get("hidden_act", "silu") != "silu":
        raise unsupported(f"hidden_act={hf['hidden_act']!r}")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise unsupported("attention_bias/mlp_bias=True")
    if hf.get("use_sliding_window"):
        raise unsupported("use_sliding_window=True")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or 0
    if head_dim == hf["hidden_size"] // heads:
        head_dim = 0  # the default: keep configs comparable with the presets
    return GPTConfig(
        family=model_type,
        vocab_size=hf["vocab_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        d_ff=hf["intermediate_size"],
        head_dim=head_dim,
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
    rope: dict = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_llama3_scaling:
        factor, low, high, original = cfg.rope_llama3_scaling
        rope.update(rope_type="llama3", factor=factor, low_freq_factor=low,
                    high_freq_factor=high, original_max_position_embeddings=original)  # fmt: skip
    return {
        "model_type": cfg.family,
        "architectures": [cfg.names.hf_architecture],
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.dim_per_head,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": rope,
        "rope_scaling": rope if cfg.rope_llama3_scaling else None,
        "attention_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": cfg.param_dtype,
    }


# --------------------------------------------------------------------------- tensors


def _to_ours(hf: np.ndarray, layout: str, shape: tuple[int, ...]) -> np.ndarray:
    if layout == "linear":
        hf = hf.T
    if hf.size != math.prod(shape):
        raise ValueError(f"expected {math.prod(shape)} values for shape {shape}, got {hf.shape}")
    return hf.reshape(shape)


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


def params_from_hf(
    cfg: GPTConfig,
    get_tensor: Callable[[str], np.ndarray],
    place: Callable[[tuple[str, ...], np.ndarray], object] | None = None,
    shapes: dict | None = None,
) -> dict:
    """Our params from HF tensors, one leaf at a time. `get_tensor(name)` reads a tensor;
    `place(path, array)` may put each finished leaf on devices (default: keep numpy).
    `shapes`: the abstract params, if the caller has them (else from `eval_shape`, which
    must then run outside a mesh context: flax constrains boxed params under one)."""
    shapes = shapes if shapes is not None else _leaf_shapes(cfg)
    dtype = np.dtype(jax.numpy.dtype(cfg.param_dtype))
    top, layer = _entries(cfg)
    layers = cfg.names.layers
    params: dict = {}

    def finish(path, array):
        array = array.astype(dtype)
        _set(params, path, place(path, array) if place else array)

    def read(entry: Entry, shape, i: int = 0):
        name = entry.hf_name.format(i=i)
        try:
            return _to_ours(np.asarray(get_tensor(name)), entry.layout, shape)
        except ValueError as e:
            raise ValueError(f"{name}: shape mismatch: {e}") from None

    for entry in top:
        finish(entry.path, read(entry, get_path(shapes, entry.path).shape))
    for entry in layer:
        if cfg.scan_layers:
            path = (layers, *entry.path)
            shape = get_path(shapes, path).shape[1:]
            finish(path, np.stack([read(entry, shape, i) for i in range(cfg.n_layers)]))
        else:
            for i in range(cfg.n_layers):
                path = (f"{layers}_{i}", *entry.path)
                finish(path, read(entry, get_path(shapes, path).shape, i))
    return params


def params_to_hf(cfg: GPTConfig, params) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, numpy tensor) pairs, gathered from devices one leaf at a time."""
    top, layer = _entries(cfg)
    for entry in top:
        leaf = _host(get_path(params, entry.path))
        yield entry.hf_name, _to_hf(leaf, entry.layout, entry.in_dims)
    for entry in layer:
        for i, leaf in enumerate(_per_layer(cfg, params, entry.path)):
            yield entry.hf_name.format(i=i), _to_hf(leaf, entry.layout, entry.in_dims)


def _per_layer(cfg: GPTConfig, params, path: tuple[str, ...]) -> Iterator[np.ndarray]:
    """Layer 0, 1, … of the leaf at `path` within a layer, on the host."""
    layers = cfg.names.layers
    if cfg.scan_layers:
        stacked = _host(get_path(params, (layers, *path)))
        yield from stacked
    else:
        for i in range(cfg.n_layers):
            yield _host(get_path(params, (f"{layers}_{i}", *path)))


def _host(x) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


# --------------------------------------------------------------------------- files


class _SafetensorsFolder:
    """Tensors by name from model.safetensors or a sharded set with an index."""

    def __init__(self, folder: str):
        from safetensors import safe_open

        files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
        self._handles = [safe_open(f, framework="numpy") for f in files]
        self._where = {k: h for h in self._handles for k in h.keys()}
        self.folder = folder

    def __call__(self, name: str) -> np.ndarray:
        # GPT-2 checkpoints from the hub name tensors without the "transformer." prefix.
        for candidate in (name, name.removeprefix("transformer.")):
            if candidate in self._where:
                return self._where[candidate].get_tensor(candidate)
        raise ValueError(f"{self.folder}: tensor {name!r} is missing from the checkpoint")


class _TorchBinFolder:
    """Pickled pytorch_model*.bin weights: can run code when loaded, hence opt-in only."""

    def __init__(self, folder: str):
        try:
            import torch
        except ImportError:
            raise ValueError(f"{folder}: reading .bin weights needs torch installed") from None
        state: dict = {}
        for f in sorted(glob.glob(os.path.join(folder, "pytorch_model*.bin"))):
            state.update(torch.load(f, map_location="cpu", weights_only=True))
        self._state = {k: v.float().numpy() for k, v in state.items()}
        self.folder = folder

    def __call__(self, name: str) -> np.ndarray:
        for candidate in (name, name.removeprefix("transformer.")):
            if candidate in self._state:
                return self._state[candidate]
        raise ValueError(f"{self.folder}: tensor {name!r} is missing from the checkpoint")


def resolve_folder(source: str) -> str:
    """A local folder as is; otherwise a hub id downloaded (config, safetensors, tokenizer)."""
    if os.path.isdir(source):
        return source
    if os.path.exists(source) or source.startswith((".", "/", "~")):
        raise ValueError(f"model.init_from: {source!r} is not a Hugging Face folder or GGUF file")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(
            source,
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"],
        )
    except Exception as e:  # network, auth, missing repo: all end the same way for the user
        raise ValueError(
            f"model.init_from: could not get {source!r} from the Hugging Face hub ({e}). "
            "Give a local folder with config.json and *.safetensors, or a GGUF file."
        ) from None


def _config_file(folder: str) -> str:
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"model.init_from: {folder} has no config.json")
    return path


def load_config(source: str) -> GPTConfig:
    """The architecture of a hub id, HF folder or GGUF file, without reading weights."""
    from sft_jax import assets

    source = assets.resolve_source(source)
    if source.endswith(".gguf"):
        from sft_jax import gguf_io

        return config_from_hf(gguf_io.read_gguf_config(source), source)
    path = _config_file(resolve_folder(source))
    with open(path, encoding="utf-8") as f:
        return config_from_hf(json.load(f), path)


def _tensor_reader(source: str, allow_pickle: bool) -> Callable[[str], np.ndarray]:
    if source.endswith(".gguf"):
        from sft_jax import gguf_io

        # GGUF blocks are quantised: dequantising reads the file once, into float32.
        return gguf_io.read_gguf(source)[1].__getitem__
    folder = resolve_folder(source)
    if glob.glob(os.path.join(folder, "*.safetensors")):
        return _SafetensorsFolder(folder)
    if glob.glob(os.path.join(folder, "pytorch_model*.bin")):
        if not allow_pickle:
            raise ValueError(
                f"model.init_from: {folder} has only pickled .bin weights, which can run code "
                "when loaded; convert them to safetensors, or opt in with "
                "model.allow_pickle=True if you trust the source"
            )
        return _TorchBinFolder(folder)
    raise ValueError(f"model.init_from: {folder} has no *.safetensors weights")


def load_hf(
    source: str,
    *,
    allow_pickle: bool = False,
    param_dtype: str = "float32",
    scan_layers: bool = True,
    place: Callable[[tuple[str, ...], np.ndarray], object] | None = None,
    shapes: dict | None = None,
) -> tuple[GPTConfig, dict]:
    """(GPTConfig, params) from a hub id, a local HF folder, a GGUF file or `asset:<name>`.

    `place(path, leaf)` can put each parameter on the mesh as soon as it is built."""
    from sft_jax import assets

    source = assets.resolve_source(source)
    cfg = dataclasses.replace(load_config(source), param_dtype=param_dtype, scan_layers=scan_layers)
    return cfg, params_from_hf(cfg, _tensor_reader(source, allow_pickle), place, shapes)


def save_hf(
    cfg: GPTConfig,
    params,
    out_dir: str,
    tokenizer=None,
    max_shard_bytes: int = 2 * 1024**3,
    dtype: str | None = None,
) -> str:
    """Write a folder that `transformers.AutoModelForCausalLM.from_pretrained` loads:
    config.json, generation_config.json, safetensors (sharded with an index above
    `max_shard_bytes`) and, if given, the tokenizer files with its chat template.

    Every process must call this (gathering sharded params is collective); process 0 writes."""
    from safetensors.numpy import save_file

    out_dtype = np.dtype(jax.numpy.dtype(dtype or cfg.param_dtype))
    tensors = params_to_hf(cfg, params)
    if jax.process_index() != 0:
        for _ in tensors:  # take part in the gathers, write nothing
            pass
        return out_dir
    os.makedirs(out_dir, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, tensor in tensors:
        tensor = tensor.astype(out_dtype)
        if size and size + tensor.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += tensor.nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(out_dir, fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, fname))
        total = sum(t.nbytes for s in shards for t in s.values())
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    hf_config = config_to_hf(cfg) | {"torch_dtype": str(out_dtype)}
    generation = {}
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(tokenizer, key, None) is not None:
                hf_config[key] = generation[key] = getattr(tokenizer, key)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(generation, f, indent=2)
    return out_dir
