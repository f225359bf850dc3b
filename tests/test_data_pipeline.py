"""build_splits end to end on real tokenization; batch_at / eval_batches on known rows."""

import collections
import json
import logging

import numpy as np
import pytest

from sft_jax.data import (
    DataSpec,
    batch_at,
    build_splits,
    eval_batches,
    load_tokenizer,
    num_batches_per_epoch,
    packing,
    pipeline,
    sources,
    templates,
)

EOS = 50256


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("gpt2")


def _examples_in(rows):
    """Multiset of the examples in packed rows, each as its full id sequence t0..tn."""
    out = collections.Counter()
    for r, seg in enumerate(rows["segment_ids"]):
        for s in set(seg.tolist()) - {0}:
            where = seg == s
            ids = rows["tokens"][r, where].tolist() + rows["targets"][r, where][-1:].tolist()
            out[tuple(ids)] += 1
    return out


def _tokenized(rows, tok):
    examples = templates.tokenize_many([templates.render(r) for r in rows], tok)
    return collections.Counter(tuple(ids.tolist()) for ids, _ in examples)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _unique_rows(n, long_every=0):
    rows = [
        {"instruction": f"Echo number {i}.", "input": "", "output": f"{i} is the number."}
        for i in range(n)
    ]
    for i in range(0, n, long_every) if long_every else ():
        rows[i]["output"] = " ".join(["word"] * 200)  # ~200 tokens.
    return rows


def test_build_splits_end_to_end(tok):
    spec = DataSpec(train="synthetic:mix:300", max_seq_len=128)
    splits = build_splits(spec, tok)
    train = splits.train
    assert splits.validation is None and set(splits.stats) == {"train"}
    assert {k: v.dtype for k, v in train.items()} == packing.FIELDS
    assert all(v.shape == (len(train["tokens"]), 128) for v in train.values())
    # Exactly the examples one gets by tokenizing the source rows, each once.
    want = _tokenized(sources.read_rows(spec.train), tok)
    assert _examples_in(train) == want
    stats = splits.stats["train"]
    assert stats["rows_read"] == stats["examples_kept"] == 300
    assert stats["dropped"] == {"too_long": 0, "no_loss_tokens": 0}
    assert stats["tokens"] == sum(len(ids) - 1 for ids in want.elements())
    assert stats["loss_tokens"] == int(train["loss_mask"].sum()) > 300  # EOS + answer each.
    assert stats["packed_rows"] == len(train["tokens"]) < 300
    assert stats["packing_efficiency"] == packing.packing_efficiency(train)
    # Every example ends with a trainable EOS target.
    ends = np.flatnonzero((train["targets"] == EOS).ravel())
    assert len(ends) == 300 and (train["loss_mask"].ravel()[ends] == 1).all()


def test_seed_shuffles_rows_but_keeps_examples(tok):
    a = build_splits(DataSpec(train="synthetic:mix:200", max_seq_len=64, seed=0), tok).train
    b = build_splits(DataSpec(train="synthetic:mix:200", max_seq_len=64, seed=1), tok).train
    c = build_splits(DataSpec(train="synthetic:mix:200", max_seq_len=64, seed=0), tok).train
    assert _examples_in(a) == _examples_in(b)
    assert not np.array_equal(a["tokens"], b["tokens"])
    assert all(np.array_equal(a[k], c[k]) for k in a)


def test_validation_fraction_is_disjoint_from_train(tok, tmp_path):
    rows = _unique_rows(200)
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    splits = build_splits(DataSpec(train=path, validation="0.1", max_seq_len=64), tok)
    train, val = _examples_in(splits.train), _examples_in(splits.validation)
    assert sum(val.values()) == 20 and sum(train.values()) == 180
    assert not set(train) & set(val)
    assert train + val == _tokenized(rows, tok)
    assert splits.stats["validation"]["rows_read"] == 20
    # Row level: the split is a seeded partition.
    tr, va = pipeline.split_rows(rows, 0.1, seed=0)
    assert sorted(r["instruction"] for r in tr + va) == sorted(r["instruction"] for r in rows)
    assert pipeline.split_rows(rows, 0.1, seed=0) == (tr, va)
    assert pipeline.split_rows(rows, 0.1, seed=1)[1] != va


@pytest.mark.parametrize("validation", ["", "0", "0.0"])
def test_no_validation(tok, validation):
    splits = build_splits(DataSpec(train="synthetic:add:20", validation=validation), tok)
    assert splits.validation is None and set(splits.stats) == {"train"}
    assert splits.stats["train"]["rows_read"] == 20


def test_validation_from_its_own_source(tok, tmp_path):
    train = _write_jsonl(tmp_path / "t.jsonl", _unique_rows(30))
    val_rows = [{"instruction": "Other.", "input": "x", "output": "y"}] * 3
    val = _write_jsonl(tmp_path / "v.jsonl", val_rows)
    splits = build_splits(DataSpec(train=train, validation=val, max_seq_len=64), tok)
    assert _examples_in(splits.validation) == _tokenized(val_rows, tok)
    assert splits.stats["train"]["rows_read"] == 30


def test_too_long_dropped_counted_and_logged(tok, tmp_path, caplog):
    path = _write_jsonl(tmp_path / "d.jsonl", _unique_rows(12, long_every=4))  # 3 long rows.
    with caplog.at_level(logging.WARNING):
        splits = build_splits(DataSpec(train=path, max_seq_len=64), tok)
    stats = splits.stats["train"]
    assert stats["dropped"] == {"too_long": 3, "no_loss_tokens": 0}
    assert stats["examples_kept"] == 9 and sum(_examples_in(splits.train).values()) == 9
    assert "3 of 12 examples dropped" in caplog.text and "too_long" in caplog.text


def test_too_long_truncate_keeps_first_tokens(tok, tmp_path):
    rows = _unique_rows(12, long_every=4)
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    splits = build_splits(DataSpec(train=path, max_seq_len=64, too_long="truncate"), tok)
    assert splits.stats["train"]["truncated"] == 3
    got = _examples_in(splits.train)
    full = _tokenized(rows, tok)
    want = collections.Counter({ids[:65]: n for ids, n in full.items()})
    assert got == want
    # A truncated example fills its row and ends without an EOS target.
    assert sum(1 for ids in got if len(ids) == 65 and ids[-1] != EOS) == 3


def test_truncated_inside_prompt_is_dropped_as_no_loss(tok, tmp_path):
    rows = _unique_rows(4)
    rows[0]["instruction"] = " ".join(["long"] * 100)
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    splits = build_splits(DataSpec(train=path, max_seq_len=64, too_long="truncate"), tok)
    assert splits.stats["train"]["dropped"] == {"too_long": 0, "no_loss_tokens": 1}
    assert splits.stats["train"]["examples_kept"] == 3


def test_too_long_error(tok, tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", _unique_rows(4, long_every=4))
    with pytest.raises(ValueError, match=r"data\.max_seq_len.*Echo number 0"):
        build_splits(DataSpec(train=path, max_seq_len=64, too_long="error"), tok)


def test_no_packing_pads_one_example_per_row(tok):
    splits = build_splits(DataSpec(train="synthetic:mix:50", max_seq_len=64, packing=False), tok)
    assert len(splits.train["tokens"]) == 50
    assert splits.train["segment_ids"].max() == 1 and (splits.train["segment_ids"][:, 0] == 1).all()
    assert splits.stats["train"]["packing_efficiency"] < 0.8


def test_bad_row_error_names_row_and_field(tok, tmp_path):
    rows = _unique_rows(4)
    del rows[2]["output"]
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(
        ValueError, match=r"data\.train.*d\.jsonl, line 3: field 'output' is missing"
    ):
        build_splits(DataSpec(train=path), tok)


@pytest.mark.parametrize(
    "change,key",
    [
        ({"format": "sharegpt"}, "data.format"),
        ({"template": "vicuna"}, "data.template"),
        ({"train_on": "prompt"}, "data.train_on"),
        ({"too_long": "skip"}, "data.too_long"),
        ({"validation": "1.5"}, "data.validation"),
        ({"validation": "-0.1"}, "data.validation"),
        ({"validation": "0.001"}, "data.validation"),
        ({"validation": "nope.jsonl"}, "data.validation"),
        ({"train": "nope.jsonl"}, "data.train"),
    ],
)
def test_config_errors_name_the_key(tok, change, key):
    spec = DataSpec(**{"train": "synthetic:add:20", **change})
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build_splits(spec, tok)


def _indexed_rows(n, seq_len=4):
    """Rows whose first token is the row index, so batches say which rows they hold."""
    rows = packing.empty_rows(n, seq_len)
    rows["tokens"][:, 0] = np.arange(n)
    rows["segment_ids"][:, 0] = 1
    return rows


def _ids(batch):
    return batch["tokens"][:, 0].tolist()


def test_batch_at_is_deterministic():
    rows = _indexed_rows(26)
    first = [_ids(batch_at(rows, s, 4, seed=7)) for s in range(20)]
    pipeline._epoch_permutation.cache_clear()  # Not a cache artefact.
    assert [_ids(batch_at(rows, s, 4, seed=7)) for s in range(20)] == first
    assert [_ids(batch_at(rows, s, 4, seed=8)) for s in range(20)] != first
    b = batch_at(rows, 3, 4, seed=7)
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
        k: ((4, 4), np.dtype(dt)) for k, dt in packing.FIELDS.items()
    }


def test_epochs_cover_rows_once_in_new_orders():
    rows = _indexed_rows(26)  # 6 batches of 4 per epoch; 2 rows sit out each epoch.
    assert num_batches_per_epoch(rows, 4) == 6
    epochs = [sum((_ids(batch_at(rows, e * 6 + i, 4, 0)) for i in range(6)), []) for e in range(3)]
    for order in epochs:
        assert len(set(order)) == 24 and set(order) <= set(range(26))
    assert epochs[0] != epochs[1] != epochs[2]
    assert all(order != sorted(order) for order in epochs)  # Shuffled, not file order.


@pytest.mark.parametrize("count", [1, 2, 4, 8])
def test_process_slices_concatenate_to_global_batch(count):
    rows = _indexed_rows(40)
    for step in (0, 5, 11):
        whole = batch_at(rows, step, 8, seed=3)
        parts = [batch_at(rows, step, 8, 3, i, count) for i in range(count)]
        for k in whole:
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])


def test_batch_errors():
    rows = _indexed_rows(24)
    with pytest.raises(ValueError, match="divide evenly over 3 processes"):
        batch_at(rows, 0, 8, 0, 0, 3)
    with pytest.raises(ValueError, match="process_index=2"):
        batch_at(rows, 0, 8, 0, 2, 2)
    with pytest.raises(ValueError, match=r"train\.batch_size=25 .* 24 training rows"):
        num_batches_per_epoch(rows, 25)
    with pytest.raises(ValueError, match=r"train\.batch_size"):
        batch_at(rows, 0, 32, 0)


def test_eval_batches_every_row_once_then_padding():
    rows = _indexed_rows(10)
    rows["loss_mask"][:] = 1.0
    batches = list(eval_batches(rows, 4))
    assert len(batches) == 3
    assert all(v.shape == (4, 4) for b in batches for v in b.values())
    assert sum((_ids(b) for b in batches), [])[:10] == list(range(10))
    tail = {k: v[2:] for k, v in batches[-1].items()}
    assert all((v == 0).all() for v in tail.values())  # segment_ids 0, loss_mask 0.
    assert (batches[-1]["loss_mask"][:2] == 1).all()
    for count in (2, 4):
        parts = [list(eval_batches(rows, 4, i, count)) for i in range(count)]
        for j, whole in enumerate(batches):
            for k in whole:
                got = np.concatenate([p[j][k] for p in parts])
                np.testing.assert_array_equal(got, whole[k])
