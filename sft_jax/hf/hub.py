"""Where a model's files are: a hub id (downloaded: config and tokenizer files, weights
when asked), a local or bucket folder, a GGUF file, an `asset:` name; and its config."""

from __future__ import annotations

import json

from etils import epath

from sft_jax import assets
from sft_jax.hf import gguf_file
from sft_jax.hf.config import config_from_hf
from sft_jax.model.config import GPTConfig


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


def is_url(source: str) -> bool:
    return "://" in source


def _is_hub_id(source: str) -> bool:
    local = source.startswith((".", "/", "~")) or epath.Path(source).exists()
    return not (is_url(source) or local)


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
    source = assets.resolve_source(source)
    if source.endswith(".gguf"):
        if is_url(source):
            raise ValueError(
                f"model.init_from: {source} must be on local disk: GGUF files are "
                "memory-mapped; copy it there"
            )
        return config_from_hf(gguf_file.read_gguf_config(source), source)
    if _is_hub_id(source):
        path = epath.Path(_hub_download(source, filename="config.json"))
    else:
        path = resolve_folder(source, weights=False) / "config.json"
    if not path.exists():
        raise ValueError(f"model.init_from: {path.parent} has no config.json")
    return config_from_hf(json.loads(path.read_text()), str(path))
