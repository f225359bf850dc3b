"""Synthetic tasks: answers are right (checked independently), rows are reproducible."""

import re

import pytest

from sft_jax.data import formats, load_tokenizer, synthetic, templates
from sft_jax.data.examples import encode


def _check(row):
    """Recomputes the answer from the question text alone; returns the task name."""
    ins, inp, out = row["instruction"], row["input"], row["output"]
    if ins == "Reverse the letters of the word.":
        assert re.fullmatch("[a-z]{3,6}", inp) and out == "".join(reversed(inp))
        return "reverse"
    if ins == "Convert the word to uppercase.":
        assert re.fullmatch("[a-z]{3,6}", inp) and out == inp.upper() and out.isupper()
        return "upper"
    if m := re.fullmatch(r"What is (\d\d) \+ (\d\d)\?", ins):
        assert inp == "" and int(out) == int(m[1]) + int(m[2])
        return "add"
    if ins == "Sort the digits in ascending order.":
        digits = inp.split(" ")
        assert 3 <= len(digits) <= 5 and all(len(d) == 1 and d.isdigit() for d in digits)
        assert out.split(" ") == sorted(digits)
        return "sort"
    if m := re.fullmatch(r"Repeat the word ([a-z]+) (\d) times\.", ins):
        assert inp == "" and out.split(" ") == [m[1]] * int(m[2])
        return "repeat"
    if m := re.fullmatch(r"Which number is larger, (\d+) or (\d+)\?", ins):
        a, b = int(m[1]), int(m[2])
        assert inp == "" and a != b and int(out) == (a if a > b else b)
        return "larger"
    raise AssertionError(f"unrecognised row {row}")


@pytest.mark.parametrize("task", sorted(synthetic.TASKS))
def test_each_task_answers_are_correct(task):
    rows = synthetic.generate_rows(task, 200, seed=5)
    assert len(rows) == 200
    assert {_check(r) for r in rows} == {task}
    assert len({r["instruction"] + r["input"] for r in rows}) > 50  # Not one question repeated.


def test_mix_covers_every_task_with_and_without_input():
    rows = synthetic.generate_rows("mix", 600, seed=0)
    kinds = [_check(r) for r in rows]
    assert set(kinds) == set(synthetic.TASKS)
    assert min(kinds.count(k) for k in synthetic.TASKS) > 50
    assert any(r["input"] for r in rows) and any(not r["input"] for r in rows)


def test_deterministic_and_seeded():
    a = synthetic.generate_rows("mix", 100, seed=3)
    assert a == synthetic.generate_rows("mix", 100, seed=3)
    assert a != synthetic.generate_rows("mix", 100, seed=4)
    # A longer run starts with the shorter one: n only extends the stream.
    assert synthetic.generate_rows("mix", 150, seed=3)[:100] == a


def test_short_enough_for_a_tiny_model():
    tok = load_tokenizer("gpt2")
    rows = synthetic.generate_rows("mix", 300, seed=0)
    msgs = [formats.to_messages(r, "alpaca") for r in rows]
    rendered = [templates.render_format(templates.ALPACA, m, tok.eos_token) for m in msgs]
    examples = encode(rendered, tok)
    assert max(len(ids) for ids, _ in examples) <= 80
    assert max(int(tr.sum()) for _, tr in examples) <= 24  # Response tokens + EOS.


@pytest.mark.parametrize(
    "source,want",
    [
        ("synthetic:mix:2000", ("mix", 2000, 0)),
        ("synthetic:add:5:seed=3", ("add", 5, 3)),
    ],
)
def test_parse_source(source, want):
    assert synthetic.parse_source(source) == want


@pytest.mark.parametrize(
    "source", ["synthetic:mix", "synthetic:mix:x", "synthetic:mix:0", "synthetic:mix:5:s=1"]
)
def test_parse_source_errors(source):
    with pytest.raises(ValueError, match="synthetic:<task>:<n>"):
        synthetic.parse_source(source)


def test_unknown_task():
    with pytest.raises(ValueError, match="reverse"):
        synthetic.generate_rows("divide", 3, 0)
