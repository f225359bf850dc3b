"""Packed rows -> deterministic, step-indexed batches, each process building only its rows.

`batch_at`: the global batch of a step depends on (rows, step, batch size, seed) alone,
so resuming at step s replays exactly the data an uninterrupted run would have seen; the
checkpoint needs no iterator state. Each process materialises only the rows of the batch
its devices hold (`process_rows`: positions in the global batch, from the batch
sharding, see `train.process_rows`); two processes hold the same rows when a mesh axis
that does not split the batch (tensor) spans them. In padding mode (packing=False) the
width is the longest row of the *global* batch (rounded up to `pad_multiple`), so every
process agrees on the shape.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np

from sft_jax.data import packing
from sft_jax.data.packing import PackedRows


def num_batches_per_epoch(rows: PackedRows, batch_size: int) -> int:
    """Full global batches per epoch; the remainder rows sit out (different ones each epoch)."""
    n = len(rows)
    if batch_size < 1 or n // batch_size == 0:
        raise ValueError(
            f"train.batch_size={batch_size} does not fit the {n} training rows "
            f"(max_seq_len {rows.seq_len}); lower train.batch_size or add data"
        )
    return n // batch_size


def _positions(batch_size: int, process_rows: np.ndarray | None) -> np.ndarray:
    """The positions in a global batch this process builds (all of them by default)."""
    if process_rows is None:
        return np.arange(batch_size)
    positions = np.asarray(process_rows, np.int64)
    if positions.ndim != 1 or not ((0 <= positions) & (positions < batch_size)).all():
        raise ValueError(
            f"process_rows {positions.tolist()} are not positions in a batch of {batch_size} "
            "rows (train.batch_size / train.eval_batch_size)"
        )
    return positions


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    # Cached: every step of an epoch needs it, and permuting 1e6 rows costs ~10 ms.
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    perm.setflags(write=False)
    return perm


def batch_rows(rows: PackedRows, step: int, batch_size: int, seed: int) -> np.ndarray:
    """The indices of the rows in the global batch of `step`."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    epoch, i = divmod(step, num_batches_per_epoch(rows, batch_size))
    return epoch_permutation(seed, epoch, len(rows))[i * batch_size : (i + 1) * batch_size]


def batch_at(
    rows: PackedRows,
    step: int,
    batch_size: int,
    seed: int,
    process_rows: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The rows at `process_rows` (default: all) of the global batch at `step`:
    [len(process_rows), width]."""
    local = _positions(batch_size, process_rows)
    idx = batch_rows(rows, step, batch_size, seed)
    return rows.rows(idx[local], rows.width(idx))


def eval_batches(
    rows: PackedRows,
    batch_size: int,
    process_rows: np.ndarray | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Every row once, in order, in global batches of `batch_size` of which this process
    builds the rows at `process_rows` (default: all); the last batch is topped up with
    all-padding rows."""
    local = _positions(batch_size, process_rows)
    for start in range(0, len(rows), batch_size):
        idx = np.arange(start, min(start + batch_size, len(rows)))
        width = rows.width(idx)
        mine = np.arange(start, start + batch_size)[local]  # May run past the end.
        real = mine[mine < len(rows)]
        batch = rows.rows(real, width)
        short = len(mine) - len(real)
        if short:  # Constant shapes: one compiled eval step.
            fill = packing.empty_rows(short, width)
            batch = {k: np.concatenate([v, fill[k]]) for k, v in batch.items()}
        yield batch


def padding_share(rows: PackedRows, batch_size: int, seed: int, epoch: int = 0) -> float:
    """Share of the positions in one epoch's batches that are padding (no example)."""
    n = num_batches_per_epoch(rows, batch_size)
    real = total = 0
    for i in range(n):
        idx = batch_rows(rows, epoch * n + i, batch_size, seed)
        real += int(rows.row_lengths[idx].sum())
        total += len(idx) * rows.width(idx)
    return 1.0 - real / max(total, 1)


def source_shares(
    rows: PackedRows, first_rows: list[int], steps: range, batch_size: int, seed: int
) -> np.ndarray:
    """A mixture's realized shares: the fraction of the examples in the batches of `steps`
    that came from each source (`first_rows`: the first source row of each, as the build's
    stats give them under sources.<name>.first_row)."""
    if rows.source_rows is None:
        raise ValueError("these rows do not record their source rows (an old cache entry?)")
    counts = np.zeros(len(first_rows), np.int64)
    for step in steps:
        idx = batch_rows(rows, step, batch_size, seed)
        ex = np.concatenate([np.arange(rows.row_starts[r], rows.row_starts[r + 1]) for r in idx])
        source = np.searchsorted(first_rows, rows.source_rows[ex], side="right") - 1
        counts += np.bincount(source, minlength=len(first_rows))
    return counts / max(counts.sum(), 1)
