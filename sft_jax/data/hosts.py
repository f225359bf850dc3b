"""Building the data once across processes, instead of once on every host.

Each of P processes tokenizes its share of the rows (chunk k of `build.CHUNK_ROWS` rows
goes to process k % P) and writes it as a part file to a scratch folder beside the cache
entry; after a barrier, process 0 joins the parts back into source order (the same arrays
one process would have built), packs and writes the cache entry; after a second barrier,
the others memory-map it. So the result is the single-process build's, byte for byte, and
the total work does not grow with P. The cache directory must be one that every process
reads (a bucket or a shared file system): a process that cannot see another's part says
so, on every process, instead of waiting forever. An error on one process (a bad row in
its share) is written beside the parts and raised on every process.
"""

from __future__ import annotations

import dataclasses
import io
import json
import traceback
from collections.abc import Callable

import numpy as np
from etils import epath

from sft_jax.data import cache, examples

_ARRAYS = ("ids", "trainable", "starts", "status", "flags", "examples_per_row", "reasoning_tokens")


@dataclasses.dataclass(frozen=True)
class Processes:
    """The processes that build the data together. `sync(value)` returns the least of the
    values every process passed, once all of them have called it (a barrier that agrees)."""

    index: int = 0
    count: int = 1
    sync: Callable[[int], int] = lambda value: value


def jax_processes() -> Processes:
    """The processes of this JAX run (jax.distributed), synchronised by a collective."""
    import jax
    from jax.experimental import multihost_utils

    def sync(value: int) -> int:
        return int(np.min(multihost_utils.process_allgather(np.int32(value))))

    return Processes(jax.process_index(), jax.process_count(), sync)


def part_path(scratch: epath.Path, processes: Processes, index: int | None = None) -> epath.Path:
    i = processes.index if index is None else index
    return scratch / f"part-{i}-of-{processes.count}.npz"


def write_part(scratch: epath.Path, processes: Processes, sources: dict) -> None:
    """This process's share: {source name: (Chunk of its rows, format, the source row of
    each of them [rows] int64)}."""
    arrays, info = {}, {}
    for name, (chunk, fmt, rows) in sources.items():
        arrays.update({f"{name}.{a}": getattr(chunk, a) for a in _ARRAYS})
        arrays[f"{name}.rows"] = rows
        info[name] = {"format": fmt, "problems": {str(k): v for k, v in chunk.problems.items()}}
    arrays["info"] = np.frombuffer(json.dumps(info).encode(), np.uint8)
    cache.write_atomic(part_path(scratch, processes), lambda f: np.savez(f, **arrays))


def _read_part(path: epath.Path) -> dict:
    with np.load(io.BytesIO(path.read_bytes())) as z:
        info = json.loads(z["info"].tobytes())
        out = {}
        for name, meta in info.items():
            chunk = examples.Chunk(
                **{a: z[f"{name}.{a}"] for a in _ARRAYS},
                problems={int(k): v for k, v in meta["problems"].items()},
            )
            out[name] = (chunk, meta["format"], z[f"{name}.rows"])
    return out


def join(parts: list[dict], name: str) -> tuple[examples.Chunk, str]:
    """Source `name`'s rows from every part, back in source order: the Chunk (and format)
    one process would have built."""
    joined = examples.Chunk.concat([p[name][0] for p in parts])
    rows = np.concatenate([p[name][2] for p in parts])  # source row of each joined row
    order = np.argsort(rows, kind="stable")
    if not np.array_equal(rows[order], np.arange(len(rows))):
        raise RuntimeError(f"data: the parts of {name} do not hold every row once")
    # Examples in source-row order (a row split per assistant turn holds several).
    laid = joined.take(np.argsort(rows[joined.example_rows()], kind="stable"))
    chunk = examples.Chunk(
        ids=laid.ids,
        trainable=laid.trainable,
        starts=laid.starts,
        status=joined.status[order],
        flags=joined.flags[order],
        examples_per_row=joined.examples_per_row[order],
        problems={int(rows[i]): p for i, p in joined.problems.items()},
    )
    return chunk, parts[0][name][1]


def _error_path(scratch: epath.Path, stage: str, index: int, count: int) -> epath.Path:
    return scratch / f"error-{stage}-{index}-of-{count}.txt"


def together(scratch: epath.Path, processes: Processes, stage: str, work: Callable | None) -> None:
    """Runs `work` here (if given), then waits for every process; if any failed, raises its
    error on every process (the lowest process index first). Never returns or raises before
    the wait: a process that did would leave the others waiting forever."""
    error = _error_path(scratch, stage, processes.index, processes.count)
    failure = None
    try:
        error.unlink(missing_ok=True)  # A stale one from an earlier attempt.
        if work is not None:
            work()
    except Exception as e:
        failure = e
        traceback.print_exc()
        try:
            message = f"{type(e).__name__}: {e}".encode()
            cache.write_atomic(error, lambda f: f.write(message))
        except OSError:  # The others will say they cannot see this process's part.
            pass
    processes.sync(0)
    for i in range(processes.count):
        path = _error_path(scratch, stage, i, processes.count)
        if path.exists():
            raise ValueError(f"data: process {i} of {processes.count}: {path.read_text()}")
    if failure is not None:
        raise failure


def check_parts(scratch: epath.Path, processes: Processes, cache_key: str) -> None:
    """After `together`: a part this process cannot see means the folder is not shared."""
    for i in range(processes.count):
        if not part_path(scratch, processes, i).exists():
            raise ValueError(not_shared(scratch, processes.index, i, cache_key))


def read_parts(scratch: epath.Path, processes: Processes) -> list[dict]:
    return [_read_part(part_path(scratch, processes, i)) for i in range(processes.count)]


def not_shared(folder: epath.Path, me: int, other: int, cache_key: str) -> str:
    return (
        f"data: process {me} cannot see what process {other} wrote to {folder} (cache key "
        f"{cache_key}): data.cache_dir is not shared between the processes. On several "
        "hosts, set data.cache_dir to one folder every host reads and writes: a bucket "
        "(gs://…, s3://…) or a shared file system (by default it is WORKDIR/data_cache)."
    )
