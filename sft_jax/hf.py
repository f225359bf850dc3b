"""Hugging Face ⇄ sft_jax: config.json and safetensors in, and back out.

Parameter names already mirror the HF checkpoints, so conversion is a table per family:
(our path, HF name, how the tensor is laid out). Layouts:

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

import jax
import numpy as np

from sft_jax.model import GPTConfig

# (our path within a layer or at the top, HF name, layout, input dims of our kernel)
Entry = tuple[tuple[str, ...], str, str, int]

GPT2_TOP: list[Entry] = [
    (("wte", "embedding"), "transformer.wte.weight", "table", 0),
    (("wpe",), "transformer.wpe.weight", "table", 0),
    (("ln_f", "scale"), "transformer.ln_f.weight", "vector", 0),
    (("ln_f", "bias"), "transformer.ln_f.bias", "vector", 0),
]
GPT2_LAYER: list[Entry] = [
    (("ln_1", "scale"), "transformer.h.{i}.ln_1.weight", "vector", 0),
    (("ln_1", "bias"), "transformer.h.{i}.ln_1.bias", "vector", 0),
    (("attn", "c_attn", "kernel"), "transformer.h.{i}.attn.c_attn.weight", "conv1d", 1),
    (("attn", "c_attn", "bias"), "transformer.h.{i}.attn.c_attn.bias", "vector", 0),
    (("attn", "c_proj", "kernel"), "transformer.h.{i}.attn.c_proj.weight", "conv1d", 2),
    (("attn", "c_proj", "bias"), "transformer.h.{i}.attn.c_proj.bias", "vector", 0),
    (("ln_2", "scale"), "transformer.h.{i}.ln_2.weight", "vector", 0),
    (("ln_2", "bias"), "transformer.h.{i}.ln_2.bias", "vector", 0),
    (("mlp", "c_fc", "kernel"), "transformer.h.{i}.mlp.c_fc.weight", "conv1d", 1),
    (("mlp", "c_fc", "bias"), "transformer.h.{i}.mlp.c_fc.bias", "vector", 0),
    (("mlp", "c_proj", "kernel"), "transformer.h.{i}.mlp.c_proj.weight", "conv1d", 1),
    (("mlp", "c_proj", "bias"), "transformer.h.{i}.mlp.c_proj.bias", "vector", 0),
]
LLAMA_TOP: list[Entry] = [
    (("embed_tokens", "embedding"), "model.embed_tokens.weight", "table", 0),
    (("norm", "scale"), "model.norm.weight", "vector", 0),
    (("lm_head", "kernel"), "lm_head.weight", "linear", 1),  # untied heads only
]
LLAMA_LAYER: list[Entry] = [
    (("input_layernorm", "scale"), "model.layers.{i}.input_layernorm.weight", "vector", 0),
    *[
        entry
        for p in ("q", "k", "v")
        for entry in (
            (("self_attn", f"{p}_proj", "kernel"), f"model.layers.{{i}}.self_attn.{p}_proj.weight",
             "linear", 1),
            (("self_attn", f"{p}_proj", "bias"), f"model.layers.{{i}}.self_attn.{p}_proj.bias",
             "vector", 0),  # Qwen2 only
        )
    ],
    (("self_attn", "o_proj", "kernel"), "model.layers.{i}.self_attn.o_proj.weight", "linear", 2),
    (("post_attention_layernorm", "scale"), "model.layers.{i}.post_attention_layernorm.weight",
     "vector", 0),
    (("mlp", "gate_proj", "kernel"), "model.layers.{i}.mlp.gate_proj.weight", "linear", 1),
    (("mlp", "up_proj", "kernel"), "model.layers.{i}.mlp.up_proj.weight", "linear", 1),
    (("mlp", "down_proj", "kernel"), "model.layers.{i}.mlp.down_proj.weight", "linear", 1),
]  # fmt: skip


# --------------------------------------------------------------------------- configs


def config_from_hf(hf: dict, source: str = "config.json") -> GPTConfig:
    """A GPTConfig from a Hugging Face config dict; unsupported options fail by name."""
    model_type = hf.get("model_type")

    def unsupported(what: str) -> ValueError:
        return ValueError(f"{source}: {what} is not supported (model_type={model_type!r})")

    if model_type == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise unsupported(f"activation_function={act!r}")
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if hf.get(flag):
                raise unsupported(f"{flag}=True")
        d = hf["n_embd"]
        return GPTConfig(
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
    if model_type in ("llama", "qwen2"):
        if hf.get("hidden_act", "silu") != "silu":
            raise unsupported(f"hidden_act={hf['hidden_act']!r}")
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise unsupported("attention_bias/mlp_bias=True")
        if hf.get("use_sliding_window"):
            raise unsupported("use_sliding_window=True")
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling: tuple = ()
        if rope_type == "llama3":
            scaling = (
                float(rope["factor"]),
                float(rope["low_freq_factor"]),
                float(rope["high_freq_factor"]),
                int(rope["original_max_position_embeddings"]),
            )
        elif rope_type != "default":
            raise unsupported(f"rope type {rope_type!r}")
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or 0
        if head_dim == hf["hidden_size"] // heads:
            head_dim = 0  # the default: keep configs comparable with the presets
        return GPTConfig(
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
            rope_llama3_scaling=scaling,
        )
    raise ValueError(
        f"{source}: model_type={model_type!r} is not supported; sft_jax imports gpt2, llama "
        "(Llama 2/3, SmolLM2, TinyLlama) and qwen2"
    )


def config_to_hf(cfg: GPTConfig) -> dict:
    """The config.json of the equivalent transformers model."""
    if cfg.family == "gpt2":
        return {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
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
    qwen2 = cfg.qkv_bias
    rope: dict = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_llama3_scaling:
        factor, low, high, original = cfg.rope_llama3_scaling
        rope.update(rope_type="llama3", factor=factor, low_freq_factor=low,
                    high_freq_factor=high, original_max_position_embeddings=original)  # fmt: skip
    return {
        "model_type": "qwen2" if qwen2 else "llama",
        "architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
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


def _entries(cfg: GPTConfig) -> tuple[list[Entry], list[Entry]]:
    if cfg.family == "gpt2":
        return GPT2_TOP, GPT2_LAYER
    top = [e for e in LLAMA_TOP if e[0][0] != "lm_head" or not cfg.tie_embeddings]
    layer = [e for e in LLAMA_LAYER if e[0][-1] != "bias" or cfg.qkv_bias]
    return top, layer


def _to_ours(hf: np.ndarray, layout: str, in_dims: int, shape: tuple[int, ...]) -> np.ndarray:
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


def _layers_key(cfg: GPTConfig) -> str:
    return "h" if cfg.family == "gpt2" else "layers"


def _leaf_shapes(cfg: GPTConfig) -> dict:
    import flax.linen as nn

    from sft_jax.model import GPT

    abstract = jax.eval_shape(
        GPT(cfg).init, jax.random.key(0), jax.numpy.zeros((1, 1), jax.numpy.int32)
    )["params"]
    return nn.meta.unbox(abstract)


def get_path(tree, path):
    for key in path:
        tree = tree[key]
    return tree


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
    layers = _layers_key(cfg)
    params: dict = {}

    def finish(path, array):
        array = array.astype(dtype)
        _set(params, path, place(path, array) if place else array)

    def read(name, layout, in_dims, shape):
        try:
            return _to_ours(np.asarray(get_tensor(name)), layout, in_dims, shape)
        except ValueError as e:
            raise ValueError(f"{name}: shape mismatch: {e}") from None

    for path, name, layout, in_dims in top:
        finish(path, read(name, layout, in_dims, get_path(shapes, path).shape))
    for path, name, layout, in_dims in layer:
        if cfg.scan_layers:
            shape = get_path(shapes, (layers, *path)).shape[1:]
            stacked = np.stack(
                [read(name.format(i=i), layout, in_dims, shape) for i in range(cfg.n_layers)]
            )
            finish((layers, *path), stacked)
        else:
            for i in range(cfg.n_layers):
                full = (f"{layers}_{i}", *path)
                finish(full, read(name.format(i=i), layout, in_dims, get_path(shapes, full).shape))
    return params


def params_to_hf(cfg: GPTConfig, params) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, numpy tensor) pairs, gathered from devices one leaf at a time."""
    top, layer = _entries(cfg)
    layers = _layers_key(cfg)
    for path, name, layout, in_dims in top:
        yield name, _to_hf(_host(get_path(params, path)), layout, in_dims)
    for path, name, layout, in_dims in layer:
        if cfg.scan_layers:
            stacked = _host(get_path(params, (layers, *path)))
            for i in range(cfg.n_layers):
                yield name.format(i=i), _to_hf(stacked[i], layout, in_dims)
        else:
            for i in range(cfg.n_layers):
                leaf = _host(get_path(params, (f"{layers}_{i}", *path)))
                yield name.format(i=i), _to_hf(leaf, layout, in_dims)


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

    def names(self) -> set[str]:
        return set(self._where)

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
