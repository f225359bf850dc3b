"""Hugging Face weight files: read any block of a tensor without reading the rest, and
write safetensors shards one file at a time.

Readers share one face, `shape(name)` and `read(name, index)` (a tuple of unit-step slices
in the tensor's own HF layout), so an import reads only the rows its devices hold:

- safetensors: `safe_open(...).get_slice(name)[index]` reads just those bytes;
- GGUF: the file is memory-mapped; quantized blocks run along a row, so whole rows are
  dequantized (the rows of `index[0]`, once per tensor and row range) and columns cut after;
- pytorch_model*.bin: `torch.load(mmap=True)` maps the zip's storages, so a slice pages in
  only its bytes. A legacy (pre-zip, torch < 1.6) file cannot be mapped and is read whole.

GGUF and .bin stay mapped for the whole import, so the pages read stay resident (file
pages the kernel may drop, but counted in RSS) up to the file's size; safetensors files are
mapped per read, so only one tensor's pages are resident at a time. For bounded RSS on a
large model, convert to safetensors.

Paths are `etils.epath` paths, so a folder may be a `gs://` or `s3://` URL: safetensors
there are read by byte range (`RemoteSafetensorsFolder`); GGUF and .bin must be local. The
writer writes each safetensors file locally (a remote destination gets it copied in
chunks), so memory holds one file's tensors, never its bytes twice.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile

import fsspec
import ml_dtypes
import numpy as np
from absl import logging
from etils import epath

from sft_jax.hf import gguf_file

Index = tuple[slice, ...]


def _find(names, name: str, folder) -> str:
    for candidate in (name, name.removeprefix("transformer.")):
        if candidate in names:
            return candidate
    raise ValueError(f"{folder}: tensor {name!r} is missing from the checkpoint")


class SafetensorsFolder:
    """Tensors of model.safetensors or a sharded set with an index. A file is opened (memory
    mapped) for each read and closed after it: pages a read touched would otherwise stay
    in this process's resident memory until the whole model had passed through it."""

    def __init__(self, folder: epath.Path):
        from safetensors import safe_open

        self.folder = folder
        self._file: dict[str, str] = {}
        self._shape: dict[str, tuple[int, ...]] = {}
        for path in sorted(folder.glob("*.safetensors")):
            with safe_open(str(path), framework="numpy") as f:
                for k in f.keys():
                    self._file[k] = str(path)
                    self._shape[k] = tuple(f.get_slice(k).get_shape())

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shape[_find(self._file, name, self.folder)]

    def read(self, name: str, index: Index) -> np.ndarray:
        from safetensors import safe_open

        name = _find(self._file, name, self.folder)
        with safe_open(self._file[name], framework="numpy") as f:
            return f.get_slice(name)[index]


class RemoteSafetensorsFolder:
    """safetensors in a bucket (gs://, s3://), read by byte range. The format is a JSON
    header, then each tensor's bytes in row-major order: a block is one ranged read of the
    rows of its first dimension, the other dimensions cut after. Nothing is copied to local
    disk, and each process fetches only its rows.

    The last rows read are kept (keyed by tensor and row range) until other rows are asked
    for: the column blocks of one row range, which `hf.sharded` reads one after another,
    cost one fetch. That is at most one row range of one tensor in memory (a whole tensor
    when a process holds column blocks of all its rows), besides the blocks cut from it.
    `fetched` counts the bytes received, headers included."""

    fetches_rows = True  # `hf.sharded` reads column-split tensors by rows from here

    def __init__(self, folder: epath.Path):
        self.folder = folder
        self.fetched = 0
        self._where: dict[str, tuple[epath.Path, int, dict]] = {}
        self._rows: tuple = (None, None)  # (key, array): the last rows read
        for path in sorted(folder.glob("*.safetensors")):
            size = int.from_bytes(self._fetch(path, 0, 8), "little")
            header = json.loads(self._fetch(path, 8, size))
            header.pop("__metadata__", None)
            self._where.update({k: (path, 8 + size, v) for k, v in header.items()})

    def _fetch(self, path: epath.Path, start: int, length: int) -> bytes:
        data = _read_range(path, start, length)
        self.fetched += len(data)
        return data

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[_find(self._where, name, self.folder)][2]["shape"])

    def read(self, name: str, index: Index) -> np.ndarray:
        name = _find(self._where, name, self.folder)
        path, data_start, info = self._where[name]
        shape = tuple(info["shape"])
        rows = index[0]
        key = (name, rows.start, rows.stop)
        if self._rows[0] != key:
            self._rows = (None, None)  # the old rows go before the new ones arrive
            dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
            row_bytes = math.prod(shape[1:]) * dtype.itemsize
            start = data_start + info["data_offsets"][0] + rows.start * row_bytes
            data = self._fetch(path, start, (rows.stop - rows.start) * row_bytes)
            self._rows = (
                key,
                np.frombuffer(data, dtype).reshape(rows.stop - rows.start, *shape[1:]),
            )
        block = self._rows[1]
        whole = all((s.start, s.stop) == (0, n) for s, n in zip(index[1:], shape[1:], strict=True))
        # A cut is copied: a view would keep the whole rows alive as long as the block.
        return block if whole else block[(slice(None), *index[1:])].copy()


def _read_range(path: epath.Path, start: int, length: int) -> bytes:
    """Bytes [start, start + length) of a file in a bucket, as one ranged GET. Not through
    `path.open()`: its file object reads a block ahead of every read (50 MiB in s3fs, 5 MiB
    in gcsfs; 1 000 bytes of a 20 MiB S3 object fetched all 20 MiB), which would add a
    block per tensor to each process's share."""
    if length == 0:
        return b""
    fs, location = fsspec.core.url_to_fs(str(path))
    return fs.cat_file(location, start=start, end=start + length)


_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": ml_dtypes.bfloat16,
    "I64": "int64",
    "I32": "int32",
    "U8": "uint8",  # MXFP4 blocks and scales (gpt-oss)
}


class TorchBinFolder:
    """Pickled pytorch_model*.bin weights: loading can run code, hence opt-in only."""

    def __init__(self, folder: epath.Path):
        try:
            import torch
        except ImportError:
            raise ValueError(
                f"{folder}: its weights are pickled pytorch_model*.bin files, which only torch "
                "reads, and torch is not part of sft_jax's runtime install. Install it "
                "(pip install torch) or convert the folder to safetensors."
            ) from None
        self.folder = folder
        self._state: dict = {}
        for f in sorted(folder.glob("pytorch_model*.bin")):
            try:
                part = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # the legacy format has no storages to map
                logging.warning("%s is a legacy torch file: read whole, not mapped", f)
                part = torch.load(str(f), map_location="cpu", weights_only=True)
            self._state.update(part)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._state[_find(self._state, name, self.folder)].shape)

    def read(self, name: str, index: Index) -> np.ndarray:
        # float(): numpy has no bfloat16 for torch to hand over; only the slice is converted.
        return self._state[_find(self._state, name, self.folder)][index].float().numpy()


class GGUFFile:
    """A llama GGUF file's tensors under their HF names (see `hf.gguf_file`)."""

    def __init__(self, path: str):
        _, self._tensors = gguf_file.open_tensors(path)
        self._rows: tuple = (None, None)  # (key, array): the last rows dequantized

    def shape(self, name: str) -> tuple[int, ...]:
        return self._tensors.shape(name)

    def read(self, name: str, index: Index) -> np.ndarray:
        key = (name, index[0].start, index[0].stop)
        if self._rows[0] != key:  # every device of a row range reads the same rows
            self._rows = (key, self._tensors.rows(name, index[0]))
        return self._rows[1][(slice(None), *index[1:])]


def write_safetensors(tensors: dict[str, np.ndarray], path: epath.Path) -> None:
    """One safetensors file, written where it belongs without a second copy in memory."""
    from safetensors.numpy import save_file

    metadata = {"format": "pt"}  # transformers wants to know the tensors are torch's layout
    if _is_local(path):
        save_file(tensors, str(path), metadata=metadata)
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = epath.Path(tmp) / path.name
        save_file(tensors, str(local), metadata=metadata)
        copy_file(local, path)


def copy_file(src: epath.Path, dst: epath.Path) -> None:
    """Stream `src` to `dst` (either may be a URL) in chunks."""
    with src.open("rb") as f, dst.open("wb") as g:
        shutil.copyfileobj(f, g, 64 * 1024**2)


def write_json(obj, path: epath.Path) -> None:
    path.write_text(json.dumps(obj, indent=2))


def _is_local(path: epath.Path) -> bool:
    return "://" not in str(path)


class ShardWriter:
    """Safetensors shards written as soon as each one holds its planned tensors, then the
    index. `plan`: file name → the tensor names it holds, in the order they will come."""

    def __init__(self, out_dir: epath.Path, plan: dict[str, list[str]]):
        self.out_dir, self._plan = out_dir, plan
        self._files = iter(plan.items())
        self._file, self._names = next(self._files)
        self._pending: dict[str, np.ndarray] = {}
        self.total_bytes = 0

    def add(self, name: str, tensor: np.ndarray) -> None:
        if name != self._names[len(self._pending)]:
            raise AssertionError(f"export: {name} came out of the planned order")
        self._pending[name] = tensor
        self.total_bytes += tensor.nbytes
        if len(self._pending) == len(self._names):
            write_safetensors(self._pending, self.out_dir / self._file)
            self._pending = {}
            self._file, self._names = next(self._files, (None, None))

    def finish(self) -> None:
        if self._file is not None:
            raise AssertionError(f"export: {self._file} never received all its tensors")
        if len(self._plan) > 1:
            weight_map = {n: f for f, names in self._plan.items() for n in names}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            write_json(index, self.out_dir / "model.safetensors.index.json")
