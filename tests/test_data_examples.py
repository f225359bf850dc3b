"""A row -> an example, on real tokenization: text -> ids and masks (one tokenizer call
whose ids are the tokenizer's own, special tokens read as at inference, masks from
character offsets, straddling tokens train); one row end to end (encode_chunk) and the
length policy (fit); generation prompts are the exact tokens training put before each
response."""

import json

import numpy as np
import pytest
from tokenizers import processors

from sft_jax.data import (
    DataSpec,
    FormatTemplate,
    build_splits,
    examples,
    load_tokenizer,
    templates,
    view,
)
from sft_jax.data.examples import encode, prompt_ids
from sft_jax.data.spec import NAMES, BadRow
from sft_jax.data.templates import Rendered


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("gpt2")


def _encoder(tok, **kw):
    spec = DataSpec(train="x", cache=False, **kw)
    return examples.make_encoder(spec, tok, templates.resolve_template(spec, tok), "alpaca")


# ---------------------------------------------------------------- text -> ids and masks

TEXTS = [
    Rendered("Q: hi\nA: Hello!<|endoftext|>", ((9, 28),)),
    Rendered("Übersetzt: 中文 🤖<|endoftext|>", ((11, 29),)),
    Rendered("no spans", ()),
]


def test_ids_are_the_tokenizers_own(tok):
    out = encode(TEXTS, tok)
    for r, (ids, mask) in zip(TEXTS, out, strict=True):
        assert ids.dtype == np.int32 and mask.dtype == np.bool_ and ids.shape == mask.shape
        assert ids.tolist() == tok(r.text, add_special_tokens=False)["input_ids"]
    assert out[0][0][-1] == 50256  # The template's EOS text is the EOS token.
    assert not out[2][1].any()


def test_special_tokens_read_even_after_a_split_call(tok):
    tok("a<|endoftext|>", split_special_tokens=True)  # Leaves the backend flag set, maybe.
    ((ids, _),) = encode([TEXTS[0]], tok)
    assert ids[-1] == 50256
    saved = tok.backend_tokenizer.encode_special_tokens
    tok.backend_tokenizer.encode_special_tokens = True
    ((ids, _),) = encode([TEXTS[0]], tok)
    assert ids[-1] == 50256 and tok.backend_tokenizer.encode_special_tokens  # Restored.
    tok.backend_tokenizer.encode_special_tokens = saved


def test_mask_from_offsets_multibyte_and_straddling(tok):
    ((ids, mask),) = encode([TEXTS[1]], tok)
    assert tok.decode(ids[mask]) == "中文 🤖<|endoftext|>"
    # "Assistant:" + " Blue" -> the token " Blue" starts in the template's space: it trains.
    r = Rendered("Assistant: Blue.", ((11, 16),))
    ((ids, mask),) = encode([r], tok)
    assert [tok.decode([i]) for i in ids[mask]] == [" Blue", "."]


def test_bos_prepended_only_where_the_tokenizer_adds_one(tmp_path, tok):
    assert examples.bos_to_prepend(tok) is None  # GPT-2: BOS == EOS, never prepended.
    base = load_tokenizer("gpt2")
    base.add_special_tokens({"bos_token": "<s>"})
    bos = base.convert_tokens_to_ids("<s>")
    base.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)]
    )
    base.save_pretrained(tmp_path)
    with_bos = load_tokenizer(str(tmp_path))
    assert examples.bos_to_prepend(with_bos) == bos
    ((ids, mask),) = encode([TEXTS[0]], with_bos, bos=bos)
    ((plain, plain_mask),) = encode([TEXTS[0]], tok)
    assert ids[0] == bos and not mask[0]
    np.testing.assert_array_equal(ids[1:], plain)
    np.testing.assert_array_equal(mask[1:], plain_mask)


def test_special_token_pattern(tok):
    pattern = examples.special_token_pattern(tok)
    assert pattern.search("a <|endoftext|> b")[0] == "<|endoftext|>"
    assert pattern.search("<|endoftext|") is None


# ---------------------------------------------------------------- length policy and chunks


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


def test_split_rows_examples_through_concat(tok):
    # split_turns=always on a built-in template: one example per assistant turn, fitted
    # alone: the second turn's prompt fills max_seq_len, so only the first stays (the row
    # kept, flagged). Chunks joined keep each row's examples with it, in order.
    spec = DataSpec(train="x", cache=False, template="human_assistant", split_turns="always",
                    max_seq_len=32)  # fmt: skip
    enc = examples.make_encoder(spec, tok, templates.resolve_template(spec, tok), "messages")
    chat = lambda *turns: {"messages": [
        {"role": r, "content": c} for r, c in zip(["user", "assistant"] * 2, turns, strict=False)
    ]}  # fmt: skip
    rows = [chat("Hi", "Hello!", "2+2?", "4"), chat("Hi", "Yo"), chat("Hi", "A", "word " * 60, "B")]
    a, b = examples.encode_chunk(rows[:2], enc), examples.encode_chunk(rows[2:], enc)
    joined = examples.Chunk.concat([a, b])
    assert joined.status.tolist() == [0, 0, 0]
    assert joined.examples_per_row.tolist() == [2, 1, 1]
    assert joined.example_rows().tolist() == [0, 0, 1, 2]
    split, dropped = examples.SPLIT_TURNS, examples.TURNS_DROPPED
    assert joined.flags.tolist() == [split, 0, split | dropped]
    # (" x" is one GPT-2 token: the space of "Assistant: x" trains with x, as unsplit.)
    trained = [tok.decode(joined.ids[s:e][joined.trainable[s:e]])
               for s, e in zip(joined.starts[:-1], joined.starts[1:], strict=True)]  # fmt: skip
    assert trained == [f" {t}<|endoftext|>" for t in ("Hello!", "4", "Yo", "A")]
    # A chunk read back without its counts (an older part file): one example per kept row.
    old = examples.Chunk(ids=b.ids, trainable=b.trainable, starts=b.starts, status=b.status,
                         flags=b.flags, problems={})  # fmt: skip
    assert old.examples_per_row.tolist() == [1]


# ---------------------------------------------------------------- generation prompts


@pytest.mark.parametrize("template", ["alpaca", "human_assistant", "chatml"])
def test_prompt_is_the_untrained_prefix_of_training(tok, template, tmp_path):
    row = {"instruction": "Name a colour.", "input": "", "output": "Blue."}
    spec = DataSpec(train="synthetic:add:1", template=template, cache=False)
    got = prompt_ids({"instruction": "Name a colour."}, spec, tok)
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(row) + "\n")
    splits = build_splits(DataSpec(train=str(path), template=template, cache=False), tok)
    ((ids, trained),) = view.segments({k: v[0] for k, v in splits.train.dense().items()})
    assert got == ids[: int(trained.argmax())].tolist()


def test_human_assistant_prompt_ends_before_the_space(tok):
    spec = DataSpec(train="x", template="human_assistant", format="prompt_completion")
    ids = prompt_ids({"prompt": "Hi"}, spec, tok)
    assert tok.decode(ids) == "Human: Hi\n\nAssistant:"  # " Hello" is the response's token.


def test_conversations_and_strings(tok):
    spec = DataSpec(train="x", template="chatml")
    history = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                            {"role": "user", "content": "c"}]}  # fmt: skip
    want = "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n" \
           "<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n"  # fmt: skip
    assert tok.decode(prompt_ids(history, spec, tok)) == want
    # A final assistant turn is replaced: its response is what gets generated.
    redo = {"messages": history["messages"] + [{"role": "assistant", "content": "old"}]}
    assert prompt_ids(redo, spec, tok) == prompt_ids(history, spec, tok)
    assert tok.decode(prompt_ids("c", spec, tok)) == (
        "<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n"
    )
