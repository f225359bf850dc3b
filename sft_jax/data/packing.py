"""Examples into rows: best-fit decreasing packing (or one example per row), built lazily.

An example is token ids t0..tn with trainable flags. It contributes n positions:
`tokens = t0..t(n-1)`, `targets = t1..tn`, `loss_mask = trainable[1..n]`,
`positions = 0..n-1`. Rows carry `segment_ids` 1, 2, 3 ... per example and 0 on padding,
so attention never crosses examples and the last token of one example never predicts
the first of the next. Padding has tokens = targets = loss_mask = positions = 0. (The
batch fields and what the loss makes of them: docs/design.md, "The batch", "The loss".)

`Examples` is the one container of tokenized data: every example's ids and flags back to
back, plus the offsets where each starts. The examples of a chunk of rows
(`examples.Chunk`), of a whole source, and of packed rows (`PackedRows`, which adds the
plan: which examples form each row) are all `Examples`; moving examples between them is
one vectorised gather (`take`), never a list of per-example slices. About 5 bytes per token
instead of the 20 of five dense int32 fields; rows are materialised on demand, so each
process builds only the rows of its own slice of a batch.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import itertools
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


def _checked(lengths: Sequence[int] | np.ndarray, seq_len: int) -> np.ndarray:
    lengths = np.asarray(lengths, np.int64)
    bad = np.flatnonzero((lengths < 1) | (lengths > seq_len))
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"example {i} contributes {lengths[i]} positions; need 1..{seq_len}")
    return lengths


def offsets(lengths: Sequence[int] | np.ndarray) -> np.ndarray:
    """[n + 1] int64: where each of n pieces of these lengths starts when laid back to back,
    and the total."""
    out = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def plan_pack(lengths: Sequence[int], seq_len: int, max_segments: int = 0) -> list[list[int]]:
    """Best-fit decreasing: longest first, each into the fullest row it still fits that has
    fewer than `max_segments` examples (0 = no cap). `lengths` are positions (ids - 1).

    Deterministic: ties in length keep input order, ties in free space go to the older row.
    O(E log E) searches plus list inserts; about a second for 1e6 examples.
    """
    checked = _checked(lengths, seq_len)
    order = np.argsort(-checked, kind="stable").tolist()  # Stable: ties keep input order.
    lengths = checked.tolist()
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


_GATHER_TOKENS = 1 << 22  # Tokens per step of a gather: bounds its index arrays' memory.


@dataclasses.dataclass(frozen=True, eq=False)
class Examples:
    """Examples back to back: example k is `ids[starts[k]:starts[k + 1]]`, with its
    trainable flags at the same places."""

    ids: np.ndarray  # [total] int32: every example's ids, back to back
    trainable: np.ndarray  # [total] bool
    starts: np.ndarray  # [examples + 1] int64: example k is ids[starts[k]:starts[k + 1]]

    @classmethod
    def of(cls, examples: Sequence[Example]) -> Examples:
        """(ids, trainable) pairs laid back to back."""
        ids = [np.zeros(0, np.int32)] + [ids for ids, _ in examples]
        trainable = [np.zeros(0, np.bool_)] + [tr for _, tr in examples]
        return Examples(
            ids=np.concatenate(ids).astype(np.int32),
            trainable=np.concatenate(trainable).astype(np.bool_),
            starts=offsets([len(x) for x in ids[1:]]),
        )

    @property
    def lengths(self) -> np.ndarray:
        """[examples] int64: ids per example."""
        return np.diff(self.starts)

    def take(self, idx: Sequence[int] | np.ndarray) -> Examples:
        """The examples at `idx`, back to back in that order: one vectorised gather, in steps
        of about `_GATHER_TOKENS` tokens."""
        idx = np.asarray(idx, np.int64)
        first = self.starts[idx]
        lengths = self.starts[idx + 1] - first
        starts = offsets(lengths)
        ids = np.empty(starts[-1], self.ids.dtype)
        trainable = np.empty(starts[-1], self.trainable.dtype)
        marks = np.arange(_GATHER_TOKENS, starts[-1], _GATHER_TOKENS)
        edges = np.unique(np.r_[0, np.searchsorted(starts[:-1], marks), len(idx)])
        for a, b in itertools.pairwise(edges.tolist()):
            t0, t1 = starts[a], starts[b]
            src = np.repeat(first[a:b] - starts[a:b], lengths[a:b]) + np.arange(t0, t1)
            ids[t0:t1] = self.ids[src]
            trainable[t0:t1] = self.trainable[src]
        return Examples(ids, trainable, starts)


@dataclasses.dataclass(frozen=True, eq=False)
class PackedRows(Examples):
    """Examples in row order plus the plan of rows; `rows(idx)` builds the batch fields of
    the rows `idx`."""

    row_starts: np.ndarray  # [rows + 1] int64: row r holds examples row_starts[r]:row_starts[r + 1]
    seq_len: int
    packed: bool = True  # False: one example per row, each batch padded to its longest row
    pad_multiple: int = 1  # Padding mode: batch widths rounded up to this (fewer compiles)
    source_rows: np.ndarray | None = None  # [examples] int64: source row of each example

    @classmethod
    def pack(
        cls,
        examples: Examples,
        seq_len: int,
        packed: bool = True,
        max_segments: int = 0,
        pad_multiple: int = 1,
        source_rows: np.ndarray | None = None,
        order: np.ndarray | None = None,
    ) -> PackedRows:
        """Plans rows of the examples at `order` (default: all, in turn) — BFD if `packed`,
        else one example per row in that order — and lays them out in row order.
        `source_rows` holds the source row of each of `examples`."""
        order = np.arange(len(examples.starts) - 1) if order is None else np.asarray(order)
        positions = examples.lengths[order] - 1
        if packed:
            bins = plan_pack(positions, seq_len, max_segments)
            in_rows = np.fromiter(itertools.chain.from_iterable(bins), np.int64, len(order))
            row_starts = offsets([len(b) for b in bins])
        else:
            _checked(positions, seq_len)
            in_rows = np.arange(len(order))
            row_starts = np.arange(len(order) + 1, dtype=np.int64)
        chosen = order[in_rows].astype(np.int64)  # Examples in row order.
        laid = examples.take(chosen)
        return cls(
            ids=laid.ids.astype(np.int32, copy=False),
            trainable=laid.trainable.astype(np.bool_, copy=False),
            starts=laid.starts,
            row_starts=row_starts,
            seq_len=seq_len,
            packed=packed,
            pad_multiple=pad_multiple,
            source_rows=None if source_rows is None else np.asarray(source_rows, np.int64)[chosen],
        )

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
        """`pack` of (ids, trainable) pairs."""
        return cls.pack(
            Examples.of(examples),
            seq_len,
            packed,
            max_segments,
            pad_multiple,
            None if source_rows is None else np.asarray(source_rows, np.int64),
        )

    def __len__(self) -> int:
        return len(self.row_starts) - 1

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
