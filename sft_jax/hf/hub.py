"""Where a model's files are: a hub id (downloaded: config and tokenizer files, weights
when asked), a local or bucket folder, a GGUF file, an `asset:` name; and its config. And
`stage`: a model copied once to a bucket or shared folder, for every host to read its own
byte ranges there instead of each downloading the whole model."""

from __future__ import annotations

import fnmatch
import json
import os
import tempfile

from absl import logging
from etils import epath

from sft_jax import assets
from sft_jax.hf import gguf_file
from sft_jax.hf.config import config_from_hf
from sft_jax.model.config import GPTConfig


def _hub_download(source: str, key: str = "model.init_from", **kwargs):
    """A hub call whose failure (network, auth, missing repo) reads the same to the user;
    `key` names what the user gave `source` as."""
    import huggingface_hub

    try:
        if "filename" in kwargs:
            return huggingface_hub.hf_hub_download(source, **kwargs)
        return huggingface_hub.snapshot_download(source, **kwargs)
    except Exception as e:
        raise ValueError(
            f"{key}: could not get {source!r} from the Hugging Face hub ({e}). "
            "Give a local folder with config.json and *.safetensors"
            + (", or a GGUF file." if key == "model.init_from" else ".")
        ) from None


# Everything but the weights: config, tokenizer files, chat templates.
_HUB_SMALL_FILES = ["*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
_STAGED_FILES = [*_HUB_SMALL_FILES, "*.safetensors"]


def is_url(source: str) -> bool:
    return "://" in source


def _is_hub_id(source: str) -> bool:
    local = source.startswith((".", "/", "~")) or epath.Path(source).exists()
    return not (is_url(source) or local)


def resolve_folder(source: str, weights: bool = True, key: str = "model.init_from") -> epath.Path:
    """A local or remote (gs://, s3://) folder as is; a hub id downloaded: its config and
    tokenizer files, and its safetensors if `weights`. `key`: what the user gave `source` as."""
    if _is_hub_id(source):
        if weights:
            _warn_every_host_downloads(source)
        patterns = _HUB_SMALL_FILES + (["*.safetensors"] if weights else [])
        return epath.Path(_hub_download(source, key, allow_patterns=patterns))
    path = epath.Path(source).expanduser()
    if not path.is_dir():
        what = "a Hugging Face folder or GGUF file" if key == "model.init_from" else "a folder"
        raise ValueError(f"{key}: {source!r} is not {what}")
    return path


def _warn_every_host_downloads(source: str) -> None:
    import jax

    if jax.process_count() > 1:
        logging.warning(
            "model.init_from=hf:%s: each of the %d hosts downloads the whole model from the "
            "hub. Stage it once and import from there (each host then reads only its "
            "devices' byte ranges): sft-jax-stage hf:%s gs://BUCKET/models/NAME, then "
            "model.init_from=hf:gs://BUCKET/models/NAME",
            source,
            jax.process_count(),
            source,
        )


def stage(source: str, dest: str, revision: str | None = None) -> list[str]:
    """Copy the files an import and the tokenizer use (config, tokenizer files, chat
    templates, safetensors and their index) from `source` (a hub id, optionally `hf:`, or
    a local or bucket folder) to `dest` (a bucket URL or a folder). A hub file is
    downloaded alone into a temporary folder, copied in chunks and deleted: the local disk
    holds one file, memory one chunk. A file already at `dest` with the same size is kept,
    so an interrupted staging resumes. Returns the names of the files at `dest`."""
    from sft_jax.hf.files import copy_file

    source = source.removeprefix("hf:")
    wanted = lambda name: any(fnmatch.fnmatch(name, p) for p in _STAGED_FILES)
    if not _is_hub_id(source):
        if revision:
            raise ValueError(f"--revision {revision}: {source!r} is a folder, not a hub id")
        folder = resolve_folder(source, weights=False, key=STAGE_SOURCE)
        names = sorted(p.name for p in folder.iterdir() if wanted(p.name) and p.is_file())
        _check_weights(source, names)
        out = epath.Path(dest)
        out.mkdir(parents=True, exist_ok=True)
        for name in names:
            if not _same_size(out / name, (folder / name).stat().length):
                copy_file(folder / name, out / name)
            logging.info("staged %s", out / name)
        return names
    files = _hub_files(source, revision)
    names = sorted(n for n in files if wanted(n) and "/" not in n)
    _check_weights(source, names)
    out = epath.Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            if _same_size(out / name, files[name]):
                continue
            local = _hub_download(
                source, STAGE_SOURCE, filename=name, revision=revision, local_dir=tmp
            )
            copy_file(epath.Path(local), out / name)
            os.remove(local)
            logging.info("staged %s", out / name)
    return names


STAGE_SOURCE = "sft-jax-stage SOURCE"


def _check_weights(source: str, names: list[str]) -> None:
    """Before anything is copied: a source without safetensors cannot be imported."""
    if not any(n.endswith(".safetensors") for n in names):
        raise ValueError(
            f"{STAGE_SOURCE}: {source!r} has no *.safetensors: only safetensors are staged "
            "(a bucket import reads their byte ranges); convert the weights first"
        )


def _hub_files(source: str, revision: str | None) -> dict[str, int]:
    """The files of a hub repository, with their sizes."""
    import huggingface_hub

    try:
        entries = huggingface_hub.list_repo_tree(source, recursive=True, revision=revision)
        return {e.path: e.size for e in entries if getattr(e, "size", None) is not None}
    except Exception as e:
        raise ValueError(
            f"could not list {source!r} on the Hugging Face hub ({e}); check the name, "
            "your token (huggingface-cli login) and the network"
        ) from None


def _same_size(path: epath.Path, size: int) -> bool:
    return path.exists() and path.stat().length == size


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
