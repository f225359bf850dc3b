"""The data build shared by processes (sft_jax/data/hosts.py): shares of the rows join back
into the one-process rows; 2 real processes on loopback (jax.distributed) build the same
cache entry, byte for byte, as one process does, each tokenizing only its share of the
rows; an error in one process's share stops both with its message; a cache folder the
processes do not share stops both with a clear message."""

import json
import os
import sys

import numpy as np
import pytest

from sft_jax.data import DataSpec, build, build_splits, hosts, load_tokenizer, sources, templates
from sft_jax.data.build import CHUNK_ROWS
from tests.processes import ROOT, cpu_env, run_processes

ROWS = 2 * CHUNK_ROWS + 452  # Three chunks: 0 and 2 are process 0's, 1 is process 1's.
BAD = CHUNK_ROWS + 476  # A row of chunk 1.


def _write_rows(path, bad_rows, n=ROWS):
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            row = {"instruction": f"Add {i} and {i % 7}.", "output": f"{i + i % 7}"}
            if i in bad_rows:
                del row["output"]
            f.write(json.dumps(row) + "\n")


def _launch(tmp_path, rows, bad):
    worker = os.path.join(ROOT, "tests", "data_multihost_worker.py")
    run_processes(
        lambda i, port: [
            sys.executable,
            worker,
            str(port),
            str(i),
            "2",
            str(tmp_path / "shared"),
            str(tmp_path / f"own{i}"),
            str(rows),
            str(bad),
            str(tmp_path / f"out{i}.json"),
        ],
        env=cpu_env(devices=None),
        timeout=300,  # one device each
    )
    return [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]


@pytest.mark.parametrize("count", [2, 3, 5])
def test_shares_join_into_the_one_process_rows(tmp_path, monkeypatch, count):
    """Every share of the rows (chunk k to process k % count; 5 processes > 4 chunks, so one
    gets none), joined, is what one process encodes: examples, drops and their rows."""
    monkeypatch.setattr(build, "CHUNK_ROWS", 8)
    rows = tmp_path / "rows.jsonl"
    _write_rows(rows, bad_rows={3, 12, 25}, n=30)
    spec = DataSpec(train=str(rows), on_bad_row="skip", num_workers=0, cache=False)
    tok = load_tokenizer("gpt2")
    template = templates.resolve_template(spec, tok)
    src = sources.Source(str(rows), "data.train", skip_empty=True)
    one, fmt, source_rows = build.encode_source(src, spec, tok, template)
    assert source_rows.tolist() == list(range(30))
    shares = [build.encode_source(src, spec, tok, template, (i, count)) for i in range(count)]
    assert [r.tolist() for _, _, r in shares] == [
        [r for r in range(30) if r // 8 % count == i] for i in range(count)
    ]
    joined, joined_fmt = hosts.join([{"train": s} for s in shares], "train")
    assert joined_fmt == fmt == "alpaca"
    for field in ("ids", "trainable", "starts", "status", "flags"):
        np.testing.assert_array_equal(getattr(joined, field), getattr(one, field))
        assert getattr(joined, field).dtype == getattr(one, field).dtype
    assert joined.problems == one.problems and sorted(one.problems) == [3, 12, 25]


@pytest.mark.slow
def test_two_processes_build_what_one_builds(tmp_path):
    rows, bad = tmp_path / "rows.jsonl", tmp_path / "bad.jsonl"
    _write_rows(rows, bad_rows={5, CHUNK_ROWS + 3, 2 * CHUNK_ROWS + 9})  # Skipped, one per chunk.
    _write_rows(bad, bad_rows={BAD})
    got = _launch(tmp_path, rows, bad)

    # Each process tokenized its chunks only, and loaded the one entry both built.
    assert [g["built"]["tokenized"] for g in got] == [ROWS - CHUNK_ROWS, CHUNK_ROWS]
    assert got[0]["built"]["path"] == got[1]["built"]["path"]
    key = os.path.basename(got[0]["built"]["path"])
    assert not (tmp_path / "shared" / f".build-{key}").exists()  # The parts are cleaned up.
    assert [g["again"] for g in got] == [
        {"hit": True, "tokenized": g["built"]["tokenized"]} for g in got
    ]
    tok = load_tokenizer("gpt2")
    spec = dict(validation="0.1", max_seq_len=64, num_workers=0, max_drop_fraction=0.5)
    shared = build_splits(
        DataSpec(train=str(rows), on_bad_row="skip", cache_dir=str(tmp_path / "shared"), **spec),
        tok,
    )
    assert shared.cache_hit and shared.cache_path == got[0]["built"]["path"]
    one = build_splits(DataSpec(train=str(rows), on_bad_row="skip", cache=False, **spec), tok)
    for name in ("train", "validation"):
        a, b = getattr(shared, name), getattr(one, name)
        for field in ("ids", "trainable", "starts", "row_starts", "source_rows"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
        assert (a.seq_len, a.packed) == (b.seq_len, b.packed)
    stats = shared.stats["train"]
    assert stats.pop("rows_tokenized_by_process") == [ROWS - CHUNK_ROWS, CHUNK_ROWS]
    assert one.stats["train"].pop("rows_tokenized_by_process") == [ROWS]
    assert shared.stats == one.stats  # Drops by reason and the rows they name, too.
    assert shared.stats["train"]["dropped"] or shared.stats["validation"]["dropped"]

    # A bad row in process 1's share stops both, with the one-process message.
    with pytest.raises(ValueError) as alone:
        build_splits(DataSpec(train=str(bad), cache=False, **spec), tok)
    assert f"line {BAD + 1}" in str(alone.value)
    for g in got:
        assert g["bad_row"] == f"data: process 1 of 2: ValueError: {alone.value}"
    # Each process writes to its own folder: both stop and say what to set.
    assert "cannot see what process 1 wrote" in got[0]["not_shared"]
    assert "cannot see what process 0 wrote" in got[1]["not_shared"]
    assert all("data.cache_dir is not shared" in g["not_shared"] for g in got)
