"""Examples into rows: best-fit decreasing packing (or one example per row), built lazily.

An example is token ids t0..tn with trainable flags. It contributes n positions:
`tokens = t0..t(n-1)`, `targets = t1..tn`, `loss_mask = trainable[1..n]`,
`positions = 0..n-1`. Rows carry `segment_ids` 1, 2, 3 ... per example and 0 on padding,
so attention never crosses examples and the last token of one example never predicts
the first of the next. Padding has tokens = targets = loss_mask = positions = 0.

`PackedRows` stores the examples back to back plus the plan (which examples form each
row), about 5 bytes per token instead of the 20 of five dense int32 fields. Rows are
materialised on demand: each process builds only the rows of its own slice of a batch.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
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


def _checked(lengths: Sequence[int], seq_len: int) -> list[int]:
    lengths = [int(n) for n in lengths]
    for i, n in enumerate(lengths):
        if not 1 <= n <= seq_len:
            raise ValueError(f"example {i} contributes {n} positions; need 1..{seq_len}")
    return lengths


def plan_pack(lengths: Sequence[int], seq_len: int, max_segments: int = 0) -> list[list[int]]:
    """Best-fit decreasing: longest first, each into the fullest row it still fits that has
    fewer than `max_segments` examples (0 = no cap). `lengths` are positions (ids - 1).

    Deterministic: ties in length keep input order, ties in free space go to the older row.
    O(E log E) searches plus list inserts; about a second for 1e6 examples.
    """
    lengths = _checked(lengths, seq_len)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # sorted() is stable.
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, row index), sorted; rows that can take more.
    for i in order:
        n = lengths[i]
        j = bisect.bisect_left(free, (n, -1))  # The row with the least free space >= n.
        if j < len(free):
            space, r = free.pop(j)
        else:
            space, r = seq_len, len(bins)
            bins.append([])
        bins[r].append(i)
        if space - n > 0 and (max_segments <= 0 or len(bins[r]) < max_segments):
            bisect.insort(free, (space - n, r))
    return bins


@dataclasses.dataclass(frozen=True, eq=False)
class PackedRows:
    """Rows of examples; `rows(idx)` builds the batch fields of the rows `idx`."""

    ids: np.ndarray  # [total] int32: every example's ids, back to back, in row order
    trainable: np.ndarray  # [total] bool
    starts: np.ndarray  # [examples + 1] int64: example k is ids[starts[k]:starts[k + 1]]
    row_starts: np.ndarray  # [rows + 1] int64: row r holds examples row_starts[r]:row_starts[r + 1]
    seq_len: int
    packed: bool = True  # False: one example per row, each batch padded to its longest row
    pad_multiple: int = 1  # Padding mode: batch widths rounded up to this (fewer compiles)
    source_rows: np.ndarray | None = None  # [examples] int64: source row of each example

    @classmethod
    def from_examples(
        cls,
        examples: Sequence[Example],
        seq_len: int,
        packed: bool = True,
        max_segments: int = 0,
        pad_multiple: int = 1,
        source_rows: Sequence[int] | None = None,
    ) -> PackedRows:
        """Plans rows (BFD if `packed`, else one example per row in input order)."""
        lengths = [len(ids) - 1 for ids, _ in examples]
        if packed:
            bins = plan_pack(lengths, seq_len, max_segments)
        else:
            bins = [[i] for i in range(len(_checked(lengths, seq_len)))]
        order = [i for b in bins for i in b]  # Examples in row order.
        ids = [np.zeros(0, np.int32)] + [examples[i][0] for i in order]
        trainable = [np.zeros(0, np.bool_)] + [examples[i][1] for i in order]
        sizes = [len(x) for x in ids]
        return cls(
            ids=np.concatenate(ids).astype(np.int32),
            trainable=np.concatenate(trainable).astype(np.bool_),
            starts=np.cumsum(sizes, dtype=np.int64),  # The leading empty array gives the 0.
            row_starts=np.cumsum([0] + [len(b) for b in bins], dtype=np.int64),
            seq_len=seq_len,
            packed=packed,
            pad_multiple=pad_multiple,
            source_rows=None if source_rows is None else np.asarray(source_rows, np.int64)[order],
        )

    def __len__(self) -> int:
        return len(self.row_starts) - 1

    @property
    def num_examples(self) -> int:
        return len(self.starts) - 1

    @functools.cached_property
    def row_lengths(self) -> np.ndarray:
        """[rows] int64: real positions per row."""
        positions = np.cumsum(np.diff(self.starts) - 1)
        ends = np.concatenate([[0], positions])[self.row_starts]
        return np.diff(ends)

    def width(self, idx: np.ndarray) -> int:
        """Columns of a batch of rows `idx`: seq_len when packed, else the longest row of the
        batch rounded up to pad_multiple (the classic collate, capped at seq_len)."""
        if self.packed or len(idx) == 0:
            return self.seq_len
        longest = int(self.row_lengths[idx].max())
        m = max(self.pad_multiple, 1)
        return min(self.seq_len, -(-longest // m) * m)

    def rows(self, idx, width: int | None = None) -> dict[str, np.ndarray]:
        """Batch fields [len(idx), width] of rows `idx`, built from the examples (vectorised)."""
        idx = np.asarray(idx, np.int64)
        width = self.width(idx) if width is None else width
        out = empty_rows(len(idx), width)
        k0 = self.row_starts[idx]
        counts = self.row_starts[idx + 1] - k0  # Examples per row.
        first = np.cumsum(counts) - counts  # Index of each row's first example in `ex`.
        ex = np.arange(counts.sum()) + np.repeat(k0 - first, counts)  # Example ids, row by row.
        seg = np.arange(len(ex)) - np.repeat(first, counts) + 1
        n = self.starts[ex + 1] - self.starts[ex] - 1  # Positions per example.
        before = np.cumsum(n) - n  # Positions before each example, over all rows.
        col0 = before - np.repeat(before[first], counts)  # Every row has >= 1 example.
        pos = np.arange(n.sum()) - np.repeat(before, n)
        src = np.repeat(self.starts[ex], n) + pos
        r = np.repeat(np.repeat(np.arange(len(idx)), counts), n)
        c = np.repeat(col0, n) + pos
        out["tokens"][r, c] = self.ids[src]
        out["targets"][r, c] = self.ids[src + 1]
        out["loss_mask"][r, c] = self.trainable[src + 1]
        out["segment_ids"][r, c] = np.repeat(seg, n)
        out["positions"][r, c] = pos
        return out

    def dense(self) -> dict[str, np.ndarray]:
        """Every row at width seq_len (tests, inspection; training builds batches lazily)."""
        return self.rows(np.arange(len(self)), self.seq_len)

    def efficiency(self) -> float:
        """Real positions / (rows × seq_len): the packing efficiency (padding to seq_len)."""
        return float(self.row_lengths.sum() / max(len(self) * self.seq_len, 1))


def pack(examples: Sequence[Example], seq_len: int, max_segments: int = 0) -> dict:
    """Dense packed rows of `examples` (see PackedRows.from_examples)."""
    return PackedRows.from_examples(examples, seq_len, True, max_segments).dense()


def pad(examples: Sequence[Example], seq_len: int) -> dict[str, np.ndarray]:
    """One example per row, in input order, padded to `seq_len`: the no-packing baseline."""
    return PackedRows.from_examples(examples, seq_len, packed=False).dense()


def packing_efficiency(rows: dict[str, np.ndarray]) -> float:
    """Fraction of positions that hold a real token (segment id not 0)."""
    seg = rows["segment_ids"]
    return float((seg != 0).sum() / max(seg.size, 1))
