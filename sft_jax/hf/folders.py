"""A whole model in and out of a Hugging Face folder: `load_hf` (config and params, each
process reading only its own blocks), `hf_leaves` (one leaf at a time) and `save_hf` (a
folder transformers loads)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from etils import epath

from sft_jax import assets
from sft_jax.hf import files as hf_files
from sft_jax.hf.config import config_to_hf
from sft_jax.hf.experts import ExpertsReader
from sft_jax.hf.hub import is_url, load_config, resolve_folder
from sft_jax.hf.tensors import leaf_from_hf, params_from_hf, params_to_hf, shard_plan
from sft_jax.model.config import GPTConfig


def _tensor_reader(source: str, allow_pickle: bool):
    if source.endswith(".gguf"):
        return hf_files.GGUFFile(source)
    folder = resolve_folder(source)
    if list(folder.glob("*.safetensors")):
        remote = is_url(source)
        return (hf_files.RemoteSafetensorsFolder if remote else hf_files.SafetensorsFolder)(folder)
    if is_url(source):
        raise ValueError(
            f"model.init_from: {folder} has no *.safetensors weights; other "
            "formats are read from local disk: copy the folder there"
        )
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
    transform=None,
) -> tuple[GPTConfig, dict]:
    """(GPTConfig, params) from a hub id, a local or remote HF folder, a GGUF file or
    `asset:<name>`. With `shardings` (the params' tree of NamedShardings), every leaf is a
    global jax.Array and each process reads only the blocks of its own devices; without,
    params are numpy arrays. `transform(path, array)` (with `shardings`): what to keep of
    each leaf, applied as it is placed, one layer of a stacked leaf at a time (QLoRA's
    quantized base: `lora.load_transform`)."""
    source = assets.resolve_source(source)
    cfg = dataclasses.replace(load_config(source), param_dtype=param_dtype, scan_layers=scan_layers)
    reader = _family_reader(_tensor_reader(source, allow_pickle), cfg)
    return cfg, params_from_hf(cfg, reader, shardings, shapes, transform)


def hf_leaves(source: str, cfg: GPTConfig, allow_pickle: bool = False):
    """f(path, shape, layer=None) → one leaf of `cfg`'s params (or one layer of a stacked
    leaf) as `load_hf(source)` gives it, read alone: a model too big to load at once, one
    tensor at a time."""
    source = assets.resolve_source(source)
    reader = _family_reader(_tensor_reader(source, allow_pickle), cfg)
    return lambda path, shape, layer=None: leaf_from_hf(cfg, reader, path, shape, layer)


def _family_reader(reader, cfg: GPTConfig):
    """`reader` with what the family's checkpoints need: Gemma 3's language model inside a
    multimodal checkpoint, experts stored one tensor each (or fused)."""
    if cfg.family == "gemma3":
        reader = LanguageModelReader(reader)
    if cfg.n_experts:
        reader = ExpertsReader(reader, cfg)
    return reader


class LanguageModelReader:
    """A reader that finds Gemma3ForCausalLM's tensor names (`model.layers.0…`) also where
    a multimodal Gemma 3 checkpoint keeps its language model: `model.language_model.…` as
    transformers 5 saves it, `language_model.model.…` as the published checkpoints do."""

    def __init__(self, reader):
        self.reader = reader
        self.fetches_rows = getattr(reader, "fetches_rows", False)  # see `hf.sharded`
        self._names: dict[str, str] = {}

    def _find(self, name: str) -> str:
        if name not in self._names:
            rest = name.removeprefix("model.")
            candidates = (
                name,
                f"model.language_model.{rest}",
                f"language_model.model.{rest}",
                f"language_model.{name}",
            )
            for candidate in candidates:
                try:
                    self.reader.shape(candidate)
                except (KeyError, ValueError):
                    continue
                self._names[name] = candidate
                break
            else:
                raise ValueError(
                    f"tensor {name!r} is missing from the checkpoint (also as "
                    f"{', '.join(candidates[1:])})"
                )
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
        plan = shard_plan(cfg, params, out_dtype.itemsize, max_shard_bytes)
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
