"""On-disk cache of tokenized, packed splits, keyed by everything they depend on.

The key hashes: the data (file contents, or a data set's fingerprint), every `DataSpec`
field that changes the result (not the cache location, worker count or streaming), the
tokenizer (its full serialisation, chat template and special tokens), the template, and
the source code of this package. Same key, same bytes; so a second run, or another host
with the same files, skips tokenization. Entries are folders of .npy files, loaded
memory-mapped; written to a temporary folder and renamed, so readers never see half an
entry. Delete the folder to reclaim space.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import shutil
import tempfile

import numpy as np
import transformers

from sft_jax import assets
from sft_jax.data.packing import PackedRows
from sft_jax.data.spec import DataSpec

_ARRAYS = ("ids", "trainable", "starts", "row_starts", "source_rows")
_NOT_IN_KEY = ("cache", "cache_dir", "num_workers", "streaming")


def directory(spec: DataSpec) -> pathlib.Path:
    """`data.cache_dir`, or the `data` folder of the sft_jax cache."""
    if spec.cache_dir:
        return pathlib.Path(spec.cache_dir).expanduser()
    return assets.cache_root() / "data"


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Hash of this package's source: a change to how data is built invalidates the cache."""
    h = hashlib.blake2b(digest_size=16)
    for path in sorted(pathlib.Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: transformers.PreTrainedTokenizerBase) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True).encode())
    h.update(str(tokenizer.chat_template).encode())
    h.update(type(tokenizer).__name__.encode())
    return h.hexdigest()


def key(spec: DataSpec, tokenizer, template_id: str, source_ids: list[str]) -> tuple[str, dict]:
    """(hex key, the inputs it hashes) for a build of `spec`."""
    fields = {
        k: v for k, v in dataclasses.asdict(spec).items() if k not in _NOT_IN_KEY
    }  # template_format becomes a dict of its strings.
    inputs = {
        "code": code_version(),
        "spec": fields,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "template": template_id,
        "sources": source_ids,
    }
    blob = json.dumps(inputs, sort_keys=True, default=str).encode()
    return hashlib.blake2b(blob, digest_size=16).hexdigest(), inputs


def load(spec: DataSpec, cache_key: str) -> tuple[dict[str, PackedRows], dict] | None:
    """The splits and stats stored under `cache_key`, or None."""
    folder = directory(spec) / cache_key
    try:
        meta = json.loads((folder / "meta.json").read_text())
        splits = {}
        for name, info in meta["splits"].items():
            arrays = {a: np.load(folder / f"{name}.{a}.npy", mmap_mode="r") for a in _ARRAYS}
            splits[name] = PackedRows(**arrays, **info)
    except FileNotFoundError:
        if (folder / "meta.json").is_file():  # Damaged (a file went missing): drop it.
            shutil.rmtree(folder, ignore_errors=True)
        return None
    except (OSError, ValueError, KeyError):
        shutil.rmtree(folder, ignore_errors=True)  # Unreadable: rebuild it.
        return None
    return splits, meta["stats"]


def save(
    spec: DataSpec, cache_key: str, inputs: dict, splits: dict[str, PackedRows], stats: dict
) -> pathlib.Path:
    """Writes an entry atomically; returns its folder."""
    root = directory(spec)
    root.mkdir(parents=True, exist_ok=True)
    final = root / cache_key
    tmp = pathlib.Path(tempfile.mkdtemp(dir=root, prefix=f".{cache_key}-"))
    try:
        info = {}
        for name, rows in splits.items():
            for a in _ARRAYS:
                value = getattr(rows, a)
                np.save(tmp / f"{name}.{a}.npy", np.zeros(0, np.int64) if value is None else value)
            info[name] = {"seq_len": rows.seq_len, "packed": rows.packed,
                          "pad_multiple": rows.pad_multiple}  # fmt: skip
        meta = {"key": cache_key, "inputs": inputs, "splits": info, "stats": stats}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        if (final / "meta.json").is_file():
            return final  # Another process wrote the same entry meanwhile.
        os.rename(tmp, final)
    except OSError:
        if not (final / "meta.json").is_file():  # Another process winning the race is fine.
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
