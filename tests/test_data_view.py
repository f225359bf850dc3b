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


def test_cut_responses_marked_and_shares_as_percentages():
    tok = load_tokenizer("gpt2")
    ids = np.array(tok.encode("Q: hi\nA: yes yes"), np.int32)  # 8 ids: a row of 7 positions.
    trained = np.zeros(len(ids), bool)
    trained[-3:] = True
    assert view.response_cut(ids, trained, tok, seq_len=len(ids) - 1)  # Fills the row, no EOS.
    assert not view.response_cut(ids, trained, tok, seq_len=len(ids))  # Ended before the limit.
    with_eos = np.append(ids[1:], tok.eos_token_id)
    assert not view.response_cut(with_eos, trained, tok, seq_len=len(ids) - 1)  # Its EOS kept.
    stats = {"train": {"packing_efficiency": 0.87654, "padding_share": 0.5, "rows": 3}}
    runs = view.runs(ids, trained, tok)
    page = view.html_page("t", stats, [("ex 1", runs), ("ex 2", runs)], cut=[True, False])
    assert "<td>87.7%</td>" in page and "<td>50.0%</td>" in page and "<td>3</td>" in page
    assert page.count(view.CUT_LABEL) == 1
    assert page.index(view.CUT_LABEL) < page.index("ex 2")
