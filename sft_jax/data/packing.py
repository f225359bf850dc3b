"""Examples into fixed-shape rows: best-fit decreasing packing, or one example per row.

An example is token ids t0..tn with trainable flags. It contributes n positions:
`tokens = t0..t(n-1)`, `targets = t1..tn`, `loss_mask = trainable[1..n]`,
`positions = 0..n-1`. Rows carry `segment_ids` 1, 2, 3 ... per example and 0 on padding,
so attention never crosses examples and the last token of one example never predicts
the first of the next. Padding has tokens = targets = loss_mask = positions = 0.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

# (ids [n+1] int32, trainable [n+1] bool)
Example = tuple[np.ndarray, np.ndarray]

FIELDS = {
    "tokens": np.int32,
    "targets": np.int32,
    "loss_mask": np.float32,
    "segment_ids": np.int32,
    "positions": np.int32,
}


def example_fields(example: Example) -> dict[str, np.ndarray]:
    """The (tokens, targets, loss_mask, positions) one example contributes, each of length n."""
    ids, trainable = example
    n = len(ids) - 1
    return {
        "tokens": np.asarray(ids[:-1], np.int32),
        "targets": np.asarray(ids[1:], np.int32),
        "loss_mask": np.asarray(trainable[1:], np.float32),
        "positions": np.arange(n, dtype=np.int32),
    }


def empty_rows(num_rows: int, seq_len: int) -> dict[str, np.ndarray]:
    """All-padding rows: every field zero."""
    return {k: np.zeros((num_rows, seq_len), dt) for k, dt in FIELDS.items()}


def _fill(bins: Sequence[Sequence[int]], examples: Sequence[Example], seq_len: int):
    rows = empty_rows(len(bins), seq_len)
    for r, members in enumerate(bins):
        col = 0
        for seg, i in enumerate(members, start=1):
            fields = example_fields(examples[i])
            n = len(fields["tokens"])
            for k, v in fields.items():
                rows[k][r, col : col + n] = v
            rows["segment_ids"][r, col : col + n] = seg
            col += n
    return rows


def _check_lengths(examples: Sequence[Example], seq_len: int) -> list[int]:
    lengths = [len(ids) - 1 for ids, _ in examples]
    for i, n in enumerate(lengths):
        if not 1 <= n <= seq_len:
            raise ValueError(f"example {i} contributes {n} positions; need 1..{seq_len}")
    return lengths


def pack(examples: Sequence[Example], seq_len: int) -> dict[str, np.ndarray]:
    """Best-fit decreasing: longest first, each into the fullest row it still fits.

    Deterministic: ties in length keep input order, ties in free space go to the older row.
    O(E log E) searches plus list inserts; fine for 1e5-1e6 examples.
    """
    lengths = _check_lengths(examples, seq_len)
    order = sorted(range(len(examples)), key=lambda i: -lengths[i])  # sorted() is stable.
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, row index), sorted.
    for i in order:
        n = lengths[i]
        j = bisect.bisect_left(free, (n, -1))  # The row with the least free space >= n.
        if j < len(free):
            space, r = free.pop(j)
        else:
            space, r = seq_len, len(bins)
            bins.append([])
        bins[r].append(i)
        if space - n > 0:
            bisect.insort(free, (space - n, r))
    return _fill(bins, examples, seq_len)


def pad(examples: Sequence[Example], seq_len: int) -> dict[str, np.ndarray]:
    """One example per row, in input order, padded to `seq_len`: the no-packing baseline."""
    _check_lengths(examples, seq_len)
    return _fill([[i] for i in range(len(examples))], examples, seq_len)


def packing_efficiency(rows: dict[str, np.ndarray]) -> float:
    """Fraction of positions that hold a real token (segment id not 0)."""
    seg = rows["segment_ids"]
    return float((seg != 0).sum() / max(seg.size, 1))
