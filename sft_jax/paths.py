"""Paths that may be URLs: a work directory, data, a tokenizer or an export may live in a
bucket (`gs://…`, `s3://…`) as well as on a local disk.

Everything a user names goes through `etils.epath` (what Orbax uses: gcsfs for `gs://`,
s3fs for `s3://`), never `os.path.abspath`, `open` or `os.makedirs`, which would turn
`gs://b/run` into a folder `./gs:/b/run` on each host's own disk.
"""

from __future__ import annotations

import os
import re

import fsspec
from etils import epath

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")

# tensorstore (Orbax's array writer) writes to buckets behind fsspec's back, so a listing
# that gcsfs/s3fs cached would go stale: Orbax would miss new steps and delete only the
# files it had seen of old ones. List afresh every time (fsspec reads this when epath
# first opens the file system).
for _protocol in ("gs", "gcs", "s3", "s3a"):
    fsspec.config.conf.setdefault(_protocol, {}).setdefault("use_listings_cache", False)

# What `download` leaves behind: a model folder's weights are read by sft_jax.hf in slices.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".msgpack", ".h5")


def is_remote(path: str | os.PathLike) -> bool:
    """A URL (`gs://…`, `s3://…`), not a local path."""
    return bool(_URL.match(os.fspath(path)))


def resolve(path: str | os.PathLike) -> str:
    """A path a user gave, usable from any directory: URLs unchanged, local paths with `~`
    expanded and made absolute."""
    path = os.fspath(path)
    return path if is_remote(path) else os.path.abspath(os.path.expanduser(path))


def join(base: str | os.PathLike, *parts: str) -> str:
    """`base/part/…` as a string, a URL staying a URL."""
    return str(epath.Path(base).joinpath(*parts))


def download(folder: str, local_folder: str) -> str:
    """Copy the files (not the weights, not subfolders) of `folder` into `local_folder`,
    for readers that take local paths only (`transformers` tokenizers); returns it."""
    for f in epath.Path(folder).iterdir():
        if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES):
            with open(os.path.join(local_folder, f.name), "wb") as out:
                out.write(f.read_bytes())
    return local_folder


def upload(local_folder: str, folder: str) -> None:
    """Copy everything under `local_folder` into `folder` (a URL or a local path)."""
    for root, _, files in os.walk(local_folder):
        out = epath.Path(folder) / os.path.relpath(root, local_folder)
        out.mkdir(parents=True, exist_ok=True)
        for name in sorted(files):
            with open(os.path.join(root, name), "rb") as data:
                (out / name).write_bytes(data.read())


def under(workdir: str, path: str) -> str:
    """`path` as given when it is a URL or absolute (after `~`), else inside `workdir`."""
    path = path if is_remote(path) else os.path.expanduser(path)
    return path if is_remote(path) or os.path.isabs(path) else join(workdir, path)
