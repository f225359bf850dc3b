"""One row end to end (encode_chunk) and the length policy (fit), on real tokenization."""

import numpy as np
import pytest

from sft_jax.data import DataSpec, FormatTemplate, build, examples, load_tokenizer, templates
from sft_jax.data.spec import NAMES, BadRow


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("gpt2")


def _encoder(tok, **kw):
    spec = DataSpec(train="x", cache=False, **kw)
    return build.make_encoder(spec, tok, templates.resolve_template(spec, tok), "alpaca")


def _ex(n_prompt, n_resp, bos=False):
    """ids 100.. (prompt) then 200.. (response, trainable); optional BOS id 1 first."""
    ids = [1] * bos + list(range(100, 100 + n_prompt)) + list(range(200, 200 + n_resp))
    tr = [False] * (bos + n_prompt) + [True] * n_resp
    return np.array(ids, np.int32), np.array(tr)


def test_fit_keeps_short_and_cuts_long_responses(tok):
    enc = _encoder(tok, max_seq_len=8)
    ids, tr = _ex(3, 4)
    assert examples.fit(ids, tr, enc)[2] == 0  # 7 ids fit in 9.
    ids, tr = _ex(3, 10)
    out_ids, out_tr, flags = examples.fit(ids, tr, enc)
    assert flags == examples.RESPONSE_CUT and out_ids.tolist() == ids[:9].tolist()
    assert examples.fit(*_ex(3, 10), _encoder(tok, max_seq_len=8, too_long="drop")) == "too_long"


def test_fit_long_prompt(tok):
    assert examples.fit(*_ex(12, 3), _encoder(tok, max_seq_len=8)) == "prompt_too_long"
    enc = _encoder(tok, max_seq_len=8, long_prompt="truncate_left")
    ids, tr, flags = examples.fit(*_ex(12, 3), enc)  # Room 9: 3 response + 6 prompt.
    assert flags == examples.PROMPT_CUT
    assert ids.tolist() == list(range(106, 112)) + [200, 201, 202] and tr.sum() == 3
    ids, tr, flags = examples.fit(*_ex(12, 30), enc)  # Response gets half the row.
    assert flags == examples.PROMPT_CUT | examples.RESPONSE_CUT
    assert ids.tolist() == list(range(107, 112)) + [200, 201, 202, 203]
    enc_bos = examples.Encoder(**{**enc.__dict__, "bos": 1})
    ids, _, _ = examples.fit(*_ex(12, 3, bos=True), enc_bos)
    assert ids.tolist() == [1] + list(range(107, 112)) + [200, 201, 202]  # BOS kept.


def test_fit_no_loss_tokens(tok):
    ids, tr = _ex(3, 0)
    assert examples.fit(ids, tr, _encoder(tok)) == "no_loss_tokens"


def test_encode_chunk_statuses_and_flags(tok):
    enc = _encoder(tok, max_seq_len=48)
    rows = [
        {"instruction": "Hi.", "output": "Hello."},
        BadRow("malformed_json", "is not valid JSON"),
        {"instruction": "Hi.", "output": " ".join(["word"] * 60)},  # Cut.
        {"instruction": "Hi."},
        {"instruction": " ".join(["word"] * 60), "output": "x"},  # Prompt too long.
    ]
    chunk = examples.encode_chunk(rows, enc)
    names = [NAMES.get(int(s), "kept") for s in chunk.status]
    assert names == ["kept", "malformed_json", "kept", "missing_field", "prompt_too_long"]
    assert chunk.flags.tolist() == [0, 0, examples.RESPONSE_CUT, 0, 0]
    assert chunk.lengths.tolist()[1] == 49 and len(chunk.ids) == chunk.lengths.sum()
    assert set(chunk.problems) == {1, 3, 4} and "field 'output' is missing" in chunk.problems[3]


def test_responses_without_an_end_token_are_flagged(tok):
    no_eos = FormatTemplate(assistant="{content}")
    enc = _encoder(tok, template="format", template_format=no_eos)
    chunk = examples.encode_chunk([{"instruction": "Hi.", "output": "Hello."}], enc)
    assert chunk.flags[0] & examples.NO_END_TOKEN
    chunk = examples.encode_chunk([{"instruction": "Hi.", "output": "Hello."}], _encoder(tok))
    assert not chunk.flags[0] & examples.NO_END_TOKEN
