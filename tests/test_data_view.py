"""The views people read: marks come from the batch arrays themselves."""

import numpy as np

from sft_jax.data import load_tokenizer, packing, view


def test_mark_text():
    assert view.mark_text("abcdef", [(4, 6), (1, 2)]) == "a⟦b⟧cd⟦ef⟧"
    assert view.mark_text("abc", []) == "abc"


def test_segments_recover_examples_and_trained_tokens_from_a_batch_row():
    examples = [
        (np.array([5, 6, 7, 8], np.int32), np.array([False, False, True, True])),
        (np.array([9, 10, 11], np.int32), np.array([False, True, True])),
    ]
    row = {k: v[0] for k, v in packing.pack(examples, 8).items()}
    got = view.segments(row)
    assert [(ids.tolist(), tr.tolist()) for ids, tr in got] == [
        ([5, 6, 7, 8], [False, False, True, True]),
        ([9, 10, 11], [False, True, True]),
    ]


def test_runs_terminal_and_html():
    tok = load_tokenizer("gpt2")
    ids = np.array(tok.encode("Q: hi\nA: yes") + [50256], np.int32)
    trained = np.zeros(len(ids), bool)
    trained[-2:] = True
    runs = view.runs(ids, trained, tok)
    assert runs == [("Q: hi\nA:", False), (" yes<|endoftext|>", True)]
    assert view.terminal(runs, color=False) == "Q: hi\nA:⟦ yes<|endoftext|>⟧"
    colored = view.terminal([("a\n", False), ("b\nc", True)])
    assert colored == "\x1b[2ma\n\x1b[0m\x1b[1;32mb↵\nc\x1b[0m"
    page = view.html_page("t<1>", {"train": {"rows": 3, "note": "<x>"}}, [("ex 1", runs)])
    assert '<span class="tr"> yes&lt;|endoftext|&gt;</span>' in page
    assert "<title>t&lt;1&gt;</title>" in page and "<td>&lt;x&gt;</td>" in page
