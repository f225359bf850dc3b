"""encode_chunk over a stream of row chunks, in order, in worker processes.

spawn, not fork: the parent may run JAX's threads, and forking those can deadlock. Spawned
workers re-import the main module, so a script that builds data with workers needs the
`if __name__ == "__main__":` guard; if the workers cannot start, the rest runs in this
process, with a warning. At most 2 chunks per worker are in flight: a huge stream never
piles up in memory.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import multiprocessing
import os
import pickle
import tempfile
from collections.abc import Iterator

from sft_jax.data import examples

log = logging.getLogger(__name__)

_WORKER_ENCODER: examples.Encoder | None = None


def _init_worker(encoder_path: str) -> None:
    global _WORKER_ENCODER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # One process per core already.
    with open(encoder_path, "rb") as f:
        _WORKER_ENCODER = pickle.load(f)


def _work(rows: list) -> examples.Chunk:
    return examples.encode_chunk(rows, _WORKER_ENCODER)


def encode_chunks(chunks: Iterator[list], encoder, workers: int) -> Iterator[examples.Chunk]:
    """encode_chunk over `chunks`, in order; in `workers` processes if > 0. If the processes
    cannot start (e.g. the main script cannot be re-imported), the rest runs here."""
    if workers <= 0:
        for rows in chunks:
            yield examples.encode_chunk(rows, encoder)
        return
    # The encoder (tokenizer included, megabytes) goes through a file: start-up data that
    # a dying child does not read would block the parent's write to it forever.
    with tempfile.NamedTemporaryFile(prefix="sft_jax_encoder_", delete=False) as f:
        pickle.dump(encoder, f)
    # spawn, not fork: the parent may run JAX's threads, and forking those can deadlock.
    pool = concurrent.futures.ProcessPoolExecutor(
        workers, multiprocessing.get_context("spawn"), _init_worker, (f.name,)
    )
    pending: collections.deque = collections.deque()  # (rows, future or None), in order
    broken = False

    def result(rows, future) -> examples.Chunk:
        nonlocal broken
        if future is not None and not broken:
            try:
                return future.result()
            except concurrent.futures.process.BrokenProcessPool as e:
                broken = True
                log.warning("data: worker processes failed (%s); tokenizing in this one", e)
        return examples.encode_chunk(rows, encoder)

    try:
        for rows in chunks:
            future = None
            if not broken:
                try:
                    future = pool.submit(_work, rows)
                except concurrent.futures.process.BrokenProcessPool:
                    broken = True
            pending.append((rows, future))
            while len(pending) >= (1 if broken else 2 * workers):  # Bounded read-ahead.
                yield result(*pending.popleft())
        while pending:
            yield result(*pending.popleft())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        os.remove(f.name)


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
