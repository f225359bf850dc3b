"""On-disk cache of tokenized, packed splits, keyed by everything they depend on.

The key hashes: the data (file contents, or a data set's fingerprint), every `DataSpec`
field that changes the result (not the cache location, worker count or streaming), the
tokenizer (its full serialisation, chat template and special tokens), the template, and
the source code of this package. Same key, same bytes; so a second run, or another host
with the same files, skips tokenization. Entries are folders of .npy files, loaded
memory-mapped. The folder may be a bucket (gs://…, s3://…; every path is an
`etils.epath.Path`): a remote entry is copied to the local cache folder first, then
mapped. Each file is written under a temporary name and renamed, and meta.json last, so a
reader that finds meta.json finds a whole entry. Delete the folder to reclaim space.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import pathlib
import shutil
import uuid

import numpy as np
import transformers
from etils import epath

from sft_jax import assets
from sft_jax.data.packing import PackedRows
from sft_jax.data.spec import DataSpec

_ARRAYS = ("ids", "trainable", "starts", "row_starts", "source_rows")
_NOT_IN_KEY = ("cache", "cache_dir", "num_workers", "streaming")


def directory(spec: DataSpec) -> epath.Path:
    """`data.cache_dir` (a local folder or a bucket URL), or the `data` folder of the
    sft_jax cache."""
    if spec.cache_dir:
        return epath.Path(spec.cache_dir).expanduser()
    return epath.Path(assets.cache_root() / "data")


def _local(folder: epath.Path, names: list[str]) -> epath.Path:
    """`folder` itself if it is on this machine, else a copy of its `names` in the local
    cache (numpy maps only local files)."""
    if not _remote(folder):
        return folder
    local = epath.Path(assets.cache_root() / "data" / "remote" / folder.name)
    local.mkdir(parents=True, exist_ok=True)
    for name in names:
        if not (local / name).exists():
            tmp = local / f".{name}.{uuid.uuid4().hex}"
            with (folder / name).open("rb") as src, tmp.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 24)
            tmp.replace(local / name)
    return local


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
        names = [f"{name}.{a}.npy" for name in meta["splits"] for a in _ARRAYS]
        local = _local(folder, names)
        splits = {}
        for name, info in meta["splits"].items():
            arrays = {a: np.load(local / f"{name}.{a}.npy", mmap_mode="r") for a in _ARRAYS}
            splits[name] = PackedRows(**arrays, **info)
    except FileNotFoundError:
        if (folder / "meta.json").is_file():  # Damaged (a file went missing): drop it.
            folder.rmtree(missing_ok=True)
        return None
    except (OSError, ValueError, KeyError):
        folder.rmtree(missing_ok=True)  # Unreadable: rebuild it.
        return None
    return splits, meta["stats"]


def _remote(path: epath.Path) -> bool:
    return "://" in str(path)


def write_atomic(path: epath.Path, write) -> None:
    """`write(file)` so that readers see all of it or none: to a temporary name beside a local
    `path`, then renamed. A bucket's object appears only once its upload completes, and a
    rename there is a copy (tens of seconds through gcsfs's fallback), so there it is
    written in place."""
    if _remote(path):
        with path.open("wb") as f:
            write(f)
        return
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}"
    try:
        with tmp.open("wb") as f:
            write(f)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def save(
    spec: DataSpec, cache_key: str, inputs: dict, splits: dict[str, PackedRows], stats: dict
) -> epath.Path:
    """Writes an entry, meta.json last; returns its folder."""
    final = directory(spec) / cache_key
    if (final / "meta.json").is_file():
        return final  # Another process wrote the same entry (the same bytes) meanwhile.
    final.mkdir(parents=True, exist_ok=True)
    info = {}
    for name, rows in splits.items():
        for a in _ARRAYS:
            value = getattr(rows, a)
            value = np.zeros(0, np.int64) if value is None else np.asarray(value)
            write_atomic(final / f"{name}.{a}.npy", lambda f, v=value: np.save(f, v))
        info[name] = {
            "seq_len": rows.seq_len,
            "packed": rows.packed,
            "pad_multiple": rows.pad_multiple,
        }
    meta = {"key": cache_key, "inputs": inputs, "splits": info, "stats": stats}
    text = json.dumps(meta, indent=1, default=str).encode()
    write_atomic(final / "meta.json", lambda f: f.write(text))
    return final
