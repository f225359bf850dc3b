"""Step-indexed batches: deterministic, epoch-shuffled, built per process (each process
building only the rows its devices hold, the same rows where processes share them),
padding mode widths agreed by all processes, eval batches."""

import numpy as np
import pytest

from sft_jax.data import batch_at, eval_batches, num_batches_per_epoch, packing, pipeline


def _indexed_rows(n, seq_len=8, packed=True, lengths=None):
    """One example per row whose first id is the row index, so batches say which rows they
    hold; `lengths` (positions) vary the width of rows in padding mode."""
    lengths = lengths if lengths is not None else [3] * n
    examples = [
        (np.array([i] + [7] * k, np.int32), np.array([False] + [True] * k))
        for i, k in enumerate(lengths)
    ]
    # A single example per row even when "packed": seq_len < 2 * min length keeps them apart.
    return packing.PackedRows.from_examples(examples, seq_len, packed=packed, max_segments=1)


def _ids(batch):
    return batch["tokens"][:, 0].tolist()


def test_batch_at_is_deterministic():
    rows = _indexed_rows(26)
    first = [_ids(batch_at(rows, s, 4, seed=7)) for s in range(20)]
    pipeline.epoch_permutation.cache_clear()  # Not a cache artefact.
    assert [_ids(batch_at(rows, s, 4, seed=7)) for s in range(20)] == first
    assert [_ids(batch_at(rows, s, 4, seed=8)) for s in range(20)] != first
    b = batch_at(rows, 3, 4, seed=7)
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
        k: ((4, 8), np.dtype(dt)) for k, dt in packing.FIELDS.items()
    }


def test_epochs_cover_rows_once_in_new_orders():
    rows = _indexed_rows(26)  # 6 batches of 4 per epoch; 2 rows sit out each epoch.
    assert num_batches_per_epoch(rows, 4) == 6
    epochs = [sum((_ids(batch_at(rows, e * 6 + i, 4, 0)) for i in range(6)), []) for e in range(3)]
    for order in epochs:
        assert len(set(order)) == 24 and set(order) <= set(range(26))
    assert epochs[0] != epochs[1] != epochs[2]
    assert all(order != sorted(order) for order in epochs)  # Shuffled, not file order.


def _slices(batch_size, count):
    """Positions of `count` processes that split a batch evenly, in order."""
    return np.split(np.arange(batch_size), count)


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("count", [1, 2, 4, 8])
def test_process_slices_concatenate_to_global_batch(count, packed):
    lengths = [1 + (i * 5) % 7 for i in range(40)]
    rows = _indexed_rows(40, seq_len=8, packed=packed, lengths=lengths)
    for step in (0, 5, 11):
        whole = batch_at(rows, step, 8, seed=3)
        parts = [batch_at(rows, step, 8, 3, mine) for mine in _slices(8, count)]
        for k in whole:  # Same width on every process, even padded per batch.
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])


@pytest.mark.parametrize("packed", [True, False])
def test_processes_get_the_rows_at_their_positions(packed):
    """A TPU pod's process may hold rows that are not one block (positions 0, 1, 4, 5), and
    processes that share shards (tensor across hosts) hold the same rows."""
    rows = _indexed_rows(40, packed=packed, lengths=[1 + (i * 3) % 7 for i in range(40)])
    whole = batch_at(rows, 2, 8, seed=1)
    for mine in ([0, 1, 4, 5], [2, 3, 6, 7], list(range(8))):
        got = batch_at(rows, 2, 8, 1, np.array(mine))
        for k in whole:  # The global batch's width, even in padding mode.
            np.testing.assert_array_equal(got[k], whole[k][mine])


def test_padding_mode_pads_each_batch_to_its_longest_row():
    lengths = [2, 3, 9, 4, 5, 1, 17, 6] * 4
    rows = _indexed_rows(32, seq_len=20, packed=False, lengths=lengths)
    rows = packing.PackedRows(**{**rows.__dict__, "pad_multiple": 4})
    widths = set()
    for step in range(4):
        b = batch_at(rows, step, 8, seed=0)
        longest = max(lengths[i] for i in _ids(b))
        assert b["tokens"].shape[1] == min(20, -(-longest // 4) * 4)
        assert (b["segment_ids"] != 0).sum(axis=1).tolist() == [lengths[i] for i in _ids(b)]
        widths.add(b["tokens"].shape[1])
    assert pipeline.padding_share(rows, 8, 0) > 0
    packed = _indexed_rows(32, seq_len=20, packed=True, lengths=lengths)
    assert {batch_at(packed, s, 8, 0)["tokens"].shape[1] for s in range(4)} == {20}


def test_batch_errors():
    rows = _indexed_rows(24)
    with pytest.raises(ValueError, match=r"not positions in a batch of 8 rows \(train\.batch"):
        batch_at(rows, 0, 8, 0, np.array([6, 7, 8]))
    with pytest.raises(ValueError, match=r"train\.batch_size=25 .* 24 training rows"):
        num_batches_per_epoch(rows, 25)
    with pytest.raises(ValueError, match=r"train\.batch_size"):
        batch_at(rows, 0, 32, 0)
    with pytest.raises(ValueError, match="step must be >= 0"):
        batch_at(rows, -1, 8, 0)


@pytest.mark.parametrize("packed", [True, False])
def test_eval_batches_every_row_once_then_padding(packed):
    rows = _indexed_rows(10, lengths=[3, 5, 2, 7, 1, 4, 6, 2, 3, 5], packed=packed)
    batches = list(eval_batches(rows, 4))
    assert len(batches) == 3
    assert all(v.shape == b["tokens"].shape for b in batches for v in b.values())
    in_order = rows.dense()["tokens"][:, 0].tolist()  # Packing sorted rows by length.
    assert sorted(in_order) == list(range(10))
    assert sum((_ids(b) for b in batches), [])[:10] == in_order
    tail = {k: v[2:] for k, v in batches[-1].items()}
    assert all((v == 0).all() for v in tail.values())  # segment_ids 0, loss_mask 0.
    assert (batches[-1]["loss_mask"][:2].sum(axis=1) > 0).all()
    for count in (2, 4):
        parts = [list(eval_batches(rows, 4, mine)) for mine in _slices(4, count)]
        for j, whole in enumerate(batches):
            for k in whole:
                got = np.concatenate([p[j][k] for p in parts])
                np.testing.assert_array_equal(got, whole[k])


@pytest.mark.parametrize("packed", [True, False])
def test_each_process_builds_only_its_own_rows(monkeypatch, packed):
    rows = _indexed_rows(40, packed=packed, lengths=[1 + i % 7 for i in range(40)])
    built = []
    real = packing.PackedRows.rows

    def spy(self, idx, width=None):
        built.append(list(idx))
        return real(self, idx, width)

    monkeypatch.setattr(packing.PackedRows, "rows", spy)
    whole = pipeline.batch_rows(rows, 3, 8, 0)
    batch_at(rows, 3, 8, 0, process_rows=np.array([2, 3]))
    assert built == [whole[2:4].tolist()]  # Two rows of eight, and only those.
    list(eval_batches(rows, 8, process_rows=np.array([6, 7])))
    assert built[1:] == [[6 + s, 7 + s] for s in range(0, 40, 8)]
