"""Packing keeps every example whole and recoverable; padding is inert; BFD is dense."""

import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sft_jax.data import formats, load_tokenizer, packing, templates
from sft_jax.data.examples import encode

DEMO = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "alpaca_en_demo.json")


def _example(n, tag, rng):
    """n+1 ids whose first id is a unique tag, random trainable flags."""
    ids = np.concatenate([[tag], rng.integers(1, 50000, n)]).astype(np.int32)
    return ids, rng.random(n + 1) < 0.5


def test_example_fields_golden():
    ids = np.array([5, 6, 7, 8], np.int32)
    trainable = np.array([False, False, True, True])
    f = packing.example_fields((ids, trainable))
    assert f["tokens"].tolist() == [5, 6, 7]
    assert f["targets"].tolist() == [6, 7, 8]
    assert f["loss_mask"].tolist() == [0.0, 1.0, 1.0]
    assert f["positions"].tolist() == [0, 1, 2]


def test_pack_golden_best_fit_decreasing():
    rng = np.random.default_rng(0)
    # Contributed lengths 5, 3, 4, 2, 2 into rows of 8. Longest first: 5 opens row 0 (3 free);
    # 4 does not fit, opens row 1 (4 free); 3 fills row 0 exactly; both 2s go to row 1.
    examples = [_example(n, 100 + i, rng) for i, n in enumerate([5, 3, 4, 2, 2])]
    rows = packing.pack(examples, 8)
    assert rows["segment_ids"].tolist() == [
        [1, 1, 1, 1, 1, 2, 2, 2],
        [1, 1, 1, 1, 2, 2, 3, 3],
    ]
    assert rows["positions"].tolist() == [
        [0, 1, 2, 3, 4, 0, 1, 2],
        [0, 1, 2, 3, 0, 1, 0, 1],
    ]
    # Which example went where: the tag is each segment's first token.
    assert rows["tokens"][0, [0, 5]].tolist() == [100, 101]
    assert rows["tokens"][1, [0, 4, 6]].tolist() == [102, 103, 104]
    assert packing.packing_efficiency(rows) == 1.0


def test_best_fit_prefers_fullest_row_over_first_row():
    rng = np.random.default_rng(0)
    # 8 -> row 0 (2 free); 6 -> row 1 (4 free); 3 -> row 1 (1 free). The 1 fits both rows:
    # first fit would pick row 0, best fit picks row 1, the fuller one.
    examples = [_example(n, 100 + i, rng) for i, n in enumerate([1, 3, 6, 8])]
    rows = packing.pack(examples, 10)
    assert rows["segment_ids"].tolist() == [
        [1] * 8 + [0] * 2,
        [1] * 6 + [2] * 3 + [3],
    ]
    assert rows["tokens"][1, [0, 6, 9]].tolist() == [102, 101, 100]


def _segments(rows):
    """{tag: (row, start, fields)} for every segment, checking contiguity on the way."""
    found = {}
    for r, seg in enumerate(rows["segment_ids"]):
        ids = [s for s in np.unique(seg) if s]
        assert ids == list(range(1, len(ids) + 1)), "segment ids must be 1..k"
        # Non-decreasing until padding, then only padding: segments are contiguous blocks.
        used = seg[seg != 0]
        assert (np.diff(used) >= 0).all() and (seg[len(used) :] == 0).all()
        for s in ids:
            where = np.flatnonzero(seg == s)
            assert (np.diff(where) == 1).all()
            fields = {k: rows[k][r, where] for k in ("tokens", "targets", "loss_mask", "positions")}
            tag = int(fields["tokens"][0])
            assert tag not in found, "an example appears twice"
            found[tag] = (r, int(where[0]), fields)
    return found


@pytest.mark.parametrize("fn", [packing.pack, packing.pad])
def test_every_example_recoverable(fn):
    rng = np.random.default_rng(1)
    seq_len = 64
    lengths = rng.integers(1, seq_len + 1, 300)
    examples = [_example(int(n), 60000 + i, rng) for i, n in enumerate(lengths)]
    rows = fn(examples, seq_len)
    assert {k: v.dtype for k, v in rows.items()} == packing.FIELDS
    assert all(v.shape == rows["tokens"].shape for v in rows.values())
    assert rows["tokens"].shape[1] == seq_len
    found = _segments(rows)
    assert len(found) == len(examples)
    for i, ex in enumerate(examples):
        _, _, got = found[60000 + i]
        want = packing.example_fields(ex)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    pad = rows["segment_ids"] == 0
    for k in ("tokens", "targets", "loss_mask", "positions"):
        assert (rows[k][pad] == 0).all(), k
    total = int(lengths.sum())
    assert int((~pad).sum()) == total
    if fn is packing.pad:
        assert len(rows["tokens"]) == len(examples)
        assert [found[60000 + i][0] for i in range(len(examples))] == list(range(len(examples)))
    else:
        assert len(rows["tokens"]) < len(examples)
        assert packing.packing_efficiency(rows) > 0.9


def test_pack_is_deterministic():
    rng = np.random.default_rng(2)
    examples = [_example(int(n), 1000 + i, rng) for i, n in enumerate(rng.integers(1, 33, 200))]
    a, b = packing.pack(examples, 32), packing.pack(examples, 32)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_too_long_example_is_rejected():
    rng = np.random.default_rng(3)
    with pytest.raises(ValueError, match="example 1"):
        packing.pack([_example(3, 1, rng), _example(9, 2, rng)], 8)


def test_segment_cap():
    rng = np.random.default_rng(4)
    examples = [_example(2, 100 + i, rng) for i in range(10)]  # 2 positions each.
    rows = packing.pack(examples, 16)  # Uncapped: 8 per row.
    assert (rows["segment_ids"].max(axis=1) == [8, 2]).all()
    capped = packing.pack(examples, 16, max_segments=3)
    assert capped["segment_ids"].max(axis=1).tolist() == [3, 3, 3, 1]
    assert len(_segments(capped)) == 10


def test_rows_subset_equals_dense_and_padding_width():
    rng = np.random.default_rng(5)
    examples = [_example(int(n), 100 + i, rng) for i, n in enumerate(rng.integers(1, 30, 40))]
    rows = packing.PackedRows.from_examples(examples, 32, max_segments=4)
    dense = rows.dense()
    idx = np.array([5, 0, 3, 3])
    got = rows.rows(idx)
    for k in dense:
        np.testing.assert_array_equal(got[k], dense[k][idx], err_msg=k)
    assert rows.row_lengths.tolist() == (dense["segment_ids"] != 0).sum(axis=1).tolist()
    assert rows.efficiency() == packing.packing_efficiency(dense)
    # Padding mode: one example per row, a batch as wide as its longest row, rounded up.
    padded = packing.PackedRows.from_examples(examples, 32, packed=False, pad_multiple=8)
    assert len(padded) == 40 and padded.row_lengths.tolist() == [len(e[0]) - 1 for e in examples]
    idx = np.array([0, 1, 2])
    longest = max(len(examples[i][0]) - 1 for i in idx)
    assert padded.width(idx) == min(32, -(-longest // 8) * 8)
    batch = padded.rows(idx)
    assert batch["tokens"].shape == (3, padded.width(idx))
    np.testing.assert_array_equal(
        batch["tokens"], padded.dense()["tokens"][idx, : padded.width(idx)]
    )


TAG = 100_000  # First id of every example: tag + index. Other ids stay below TAG.


@st.composite
def _packing_case(draw):
    seq_len = draw(st.integers(2, 48))
    cap = draw(st.integers(0, 5))
    lengths = draw(st.lists(st.integers(1, seq_len), min_size=1, max_size=60))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    examples = []
    for i, n in enumerate(lengths):
        ids = np.concatenate([[TAG + i], rng.integers(0, TAG, n)]).astype(np.int32)
        examples.append((ids, rng.random(n + 1) < 0.5))
    return seq_len, cap, draw(st.booleans()), examples


@settings(max_examples=150, deadline=None)
@given(_packing_case())
def test_packing_properties(case):
    seq_len, cap, packed, examples = case
    rows = packing.PackedRows.from_examples(examples, seq_len, packed=packed, max_segments=cap)
    dense = rows.dense()
    # No row exceeds max_seq_len; segments per row respect the cap.
    assert dense["tokens"].shape[1] == seq_len
    if packed and cap:
        assert dense["segment_ids"].max() <= cap
    # Every kept example appears exactly once, intact, with positions 0..n-1; segment ids
    # are 1..k in contiguous blocks (checked in _segments).
    found = _segments(dense)
    assert sorted(found) == [TAG + i for i in range(len(examples))]
    for i, ex in enumerate(examples):
        _, _, got = found[TAG + i]
        for k, v in packing.example_fields(ex).items():
            np.testing.assert_array_equal(got[k], v, err_msg=k)
    real = dense["segment_ids"] != 0
    # Targets never cross a segment boundary: no target is the first token of an example.
    assert (dense["targets"][real] < TAG).all()
    # Loss-token count equals the unpacked sum; padding is inert.
    assert dense["loss_mask"].sum() == sum(int(tr[1:].sum()) for _, tr in examples)
    for k in ("tokens", "targets", "loss_mask", "positions"):
        assert (dense[k][~real] == 0).all(), k


@pytest.mark.skipif(not os.path.exists(DEMO), reason="needs ../shared/data/alpaca_en_demo.json")
def test_packing_efficiency_on_alpaca_demo():
    tok = load_tokenizer("gpt2")
    rows = [formats.to_messages(r, "alpaca") for r in json.load(open(DEMO, encoding="utf-8"))]
    rendered = [templates.render_format(templates.ALPACA, r, tok.eos_token) for r in rows]
    examples = encode(rendered, tok)
    fitting = [e for e in examples if len(e[0]) <= 513]
    assert len(rows) == 999 and 0.95 < len(fitting) / len(rows) < 1.0
    packed = packing.pack(fitting, 512)
    padded = packing.pad(fitting, 512)
    assert packing.packing_efficiency(packed) > 0.98
    assert packing.packing_efficiency(padded) < 0.5  # Why packing exists.
    assert packed["loss_mask"].sum() == padded["loss_mask"].sum()


def test_take_and_pack_in_an_order_lay_out_the_same_examples(monkeypatch):
    rng = np.random.default_rng(1)
    pairs = [
        (rng.integers(0, 99, k).astype(np.int32), rng.random(k) < 0.5)
        for k in rng.integers(2, 30, 200)
    ]
    ex = packing.Examples.of(pairs)
    order = rng.permutation(len(pairs))[:150]
    monkeypatch.setattr(packing, "_GATHER_TOKENS", 7)  # Many small gather steps.
    taken = ex.take(order)
    assert taken.lengths.tolist() == [len(pairs[k][0]) for k in order]
    for j, k in enumerate(order):
        span = slice(taken.starts[j], taken.starts[j + 1])
        np.testing.assert_array_equal(taken.ids[span], pairs[k][0])
        np.testing.assert_array_equal(taken.trainable[span], pairs[k][1])
    source_rows = np.arange(len(pairs)) + 1000
    for packed in (True, False):
        got = packing.PackedRows.pack(ex, 32, packed, 4, source_rows=source_rows, order=order)
        want = packing.PackedRows.from_examples(
            [pairs[k] for k in order], 32, packed, 4, source_rows=source_rows[order]
        )
        for f in ("ids", "trainable", "starts", "row_starts", "source_rows"):
            np.testing.assert_array_equal(getattr(got, f), getattr(want, f), err_msg=f)
