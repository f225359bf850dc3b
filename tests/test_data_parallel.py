"""Worker processes give the in-process result, in order; if they cannot start, the build
carries on in this process instead of hanging."""

import dataclasses
import logging

import numpy as np
import pytest

from sft_jax.data import DataSpec, examples, load_tokenizer, parallel, templates


def _fail():
    raise RuntimeError("cannot unpickle in a worker")


class _ParentOnly:
    """A regex that works here but whose unpickling fails in a worker process."""

    def __init__(self, pattern):
        self._p = pattern
        self.pattern = pattern.pattern

    def search(self, *args):
        return self._p.search(*args)

    def __reduce__(self):
        return (_fail, ())  # This test module cannot be imported by a spawned worker.


@pytest.fixture(scope="module")
def encoder():
    tok = load_tokenizer("gpt2")
    spec = DataSpec(train="x", max_seq_len=64)
    return examples.make_encoder(spec, tok, templates.resolve_template(spec, tok), "alpaca")


def _chunks(n_chunks, size=50):
    return [
        [{"instruction": f"Say {c}-{i}.", "output": f"{c}-{i}" * (1 + i % 5)} for i in range(size)]
        for c in range(n_chunks)
    ]


def _same(a, b):
    for x, y in zip(a, b, strict=True):
        for f in ("status", "flags", "lengths", "ids", "trainable"):
            np.testing.assert_array_equal(getattr(x, f), getattr(y, f), err_msg=f)


def test_workers_keep_order_and_results(encoder):
    chunks = _chunks(7)
    _same(parallel.encode_chunks(iter(chunks), encoder, 2),
          parallel.encode_chunks(iter(chunks), encoder, 0))  # fmt: skip


def test_workers_that_cannot_start_fall_back(encoder, caplog):
    broken = dataclasses.replace(encoder, special=_ParentOnly(encoder.special))
    chunks = _chunks(3)
    with caplog.at_level(logging.WARNING):
        got = list(parallel.encode_chunks(iter(chunks), broken, 2))
    assert "worker processes failed" in caplog.text
    _same(got, parallel.encode_chunks(iter(chunks), encoder, 0))
