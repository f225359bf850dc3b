"""Read a llama-family GGUF file as a Hugging Face ``LlamaForCausalLM`` config and tensors.

Uses the ``gguf`` package (numpy only): ``GGUFReader`` memory-maps the file and
``gguf.quants.dequantize`` turns each quantized tensor (Q4_1, Q8_0, ...) into float32, one
tensor (or a range of its rows) at a time, read from the memory map on demand.

Layout notes:
- GGUF lists dimensions in ggml ``ne`` order (fastest first); the reader's numpy data is in
  row-major order, i.e. reversed ``ne``, which is already torch's ``[out, in]`` for Linear
  weights. We check every tensor's shape against reversed ``ne``.
- llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` (per head, it interleaves
  the two rotary halves for its RoPE kernel); we undo that so tensors equal the HF originals.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

# Per-layer GGUF tensor suffix -> Hugging Face Llama suffix.
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")


def _open(path: str | os.PathLike) -> Any:
    """Open ``path`` with ``gguf.GGUFReader``, turning low-level failures into clear errors."""
    import gguf  # imported lazily: only GGUF users need it

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as e:  # the reader raises assorted errors on truncated/garbage input
        raise ValueError(f"{path} is not a readable GGUF file: {e}") from e


def _field(reader: Any, key: str, default: Any = None) -> Any:
    """The value of metadata key `key` (a list for arrays), or `default` where it is absent."""
    entry = reader.fields.get(key)
    return default if entry is None else entry.contents()


def _float32_as_written(value: float) -> float:
    """GGUF stores these as float32: 1e-5 comes back as 9.99999974e-06. The shortest decimal
    that rounds to the same float32 is the value the model's authors wrote."""
    return float(np.format_float_positional(np.float32(value), unique=True, trim="-"))


def _config(reader: Any, path: str) -> dict[str, Any]:
    """Hugging Face ``config.json``-style dict for ``LlamaForCausalLM`` from GGUF metadata."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: unsupported GGUF architecture {arch!r}; only 'llama' is read")

    def req(key: str) -> Any:
        value = _field(reader, f"llama.{key}")
        if value is None:
            raise ValueError(f"{path}: GGUF metadata lacks llama.{key}")
        return value

    scaling = _field(reader, "llama.rope.scaling.type")
    if scaling not in (None, "none"):
        # Would need a matching HF rope_scaling entry; refuse rather than load a wrong model.
        raise ValueError(f"{path}: RoPE scaling {scaling!r} is not supported")
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{path}: GGUF has no token_embd.weight tensor")
    hidden = int(req("embedding_length"))
    heads = int(req("attention.head_count"))
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": int(req("feed_forward_length")),
        "num_hidden_layers": int(req("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv", heads)),
        "head_dim": int(_field(reader, "llama.attention.key_length", hidden // heads)),
        "rms_norm_eps": _float32_as_written(req("attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32_as_written(_field(reader, "llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(req("context_length")),
        # The embedding's row count is what the weights need (ne is [hidden, vocab]).
        "vocab_size": int(tensors["token_embd.weight"].shape[-1]),
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    for hf, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown")):
        value = _field(reader, f"tokenizer.ggml.{key}_token_id")
        if value is not None:
            cfg[f"{hf}_token_id"] = int(value)
    return cfg


def _hf_name(name: str, n_layers: int) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _LAYER_RE.fullmatch(name)
    if m and m.group(2) in _LAYER_NAMES and int(m.group(1)) < n_layers:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    # e.g. rope_freqs.weight (llama3 RoPE scaling): silently dropping it would change the model.
    raise ValueError(f"unexpected GGUF tensor {name!r} for a llama model")


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's ``permute`` (rows ``[h, 2, d/2]`` -> ``[h, d/2, 2]``) for Q or K."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def expected_names(config: dict[str, Any]) -> list[str]:
    """The Hugging Face tensor names a llama GGUF with ``config`` must provide."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config["tie_word_embeddings"]:
        names.append("lm_head.weight")
    for i in range(config["num_hidden_layers"]):
        names += [f"model.layers.{i}.{suffix}" for suffix in _LAYER_NAMES.values()]
    return names


def read_gguf_config(path: str | os.PathLike) -> dict[str, Any]:
    """Only the Hugging Face config dict of a llama GGUF file (no tensor data is read)."""
    return _config(_open(path), os.fspath(path))


class GGUFTensors:
    """The tensors of an open GGUF file by Hugging Face name. Rows are dequantized on
    demand from the memory-mapped file: quantized blocks run along a row, so any range of
    rows (of whole heads, for Q and K) is read without the rest of the tensor."""

    def __init__(self, reader: Any, path: str, cfg: dict[str, Any]):
        n_layers = cfg["num_hidden_layers"]
        self._by_name = {_hf_name(t.name, n_layers): t for t in reader.tensors}
        missing = [n for n in expected_names(cfg) if n not in self._by_name]
        if missing:
            raise ValueError(
                f"{path}: GGUF lacks tensors for {missing[:5]} ({len(missing)} missing)"
            )
        # Q rows are permuted per query head, K rows per KV head.
        self._heads = {
            "attn_q.weight": cfg["num_attention_heads"],
            "attn_k.weight": cfg["num_key_value_heads"],
        }

    def names(self) -> list[str]:
        """In file order."""
        return list(self._by_name)

    def shape(self, name: str) -> tuple[int, ...]:
        """Torch's shape: reversed ggml `ne` (Linear weights `[out, in]`)."""
        return tuple(int(d) for d in reversed(self._by_name[name].shape))

    def rows(self, name: str, rows: slice = slice(None)) -> np.ndarray:
        """Rows `rows` of tensor `name`, float32, un-permuted where llama.cpp permuted them."""
        from gguf.quants import dequantize

        t, shape = self._by_name[name], self.shape(name)
        rows = slice(*rows.indices(shape[0])[:2])
        suffix = t.name.split(".", 2)[-1]
        heads = self._heads.get(suffix) if t.name.startswith("blk.") else None
        start, stop = rows.start, rows.stop
        if heads:  # the permutation stays within a head: read whole heads
            per_head = shape[0] // heads
            start, stop = start // per_head * per_head, -(-stop // per_head) * per_head
        # np.array copies: F32 tensors come back as views into the memory-mapped file.
        arr = np.array(dequantize(t.data[start:stop], t.tensor_type), dtype=np.float32)
        arr = arr.reshape(stop - start, *shape[1:])  # fails loudly if sizes differ
        if heads:
            arr = _unpermute(arr, (stop - start) // per_head)
        return arr[rows.start - start : rows.stop - start]


def open_tensors(path: str | os.PathLike) -> tuple[dict[str, Any], GGUFTensors]:
    """(Hugging Face config dict, the file's tensors); no tensor data is read yet."""
    path = os.fspath(path)
    reader = _open(path)  # parsing metadata (the token list) is slow: do it once
    cfg = _config(reader, path)
    return cfg, GGUFTensors(reader, path, cfg)


def read_gguf(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Return ``(hf_config, {hf_name: float32 array})`` for a llama GGUF file.

    Shapes equal the Hugging Face torch state dict (Linear weights ``[out, in]``);
    ``lm_head.weight`` is present only when the file has a separate ``output.weight``.
    """
    cfg, tensors = open_tensors(path)
    return cfg, {name: tensors.rows(name) for name in tensors.names()}
