"""A row -> an example, on real tokenization: text -> ids and masks (one tokenizer call
whose ids are the tokenizer's own, special tokens read as at inference, masks from
character offsets, straddling tokens train); one row end to end (encode_chunk) and the
length policy (fit); generation prompts are the exact tokens training put before each
response; the fields files carry (per-turn train flags, Alpaca history, data.tools, non-text
parts) and the flags for what a chat template leaves out."""

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
    spec = DataSpec(
        train="x", cache=False, template="human_assistant", split_turns="always", max_seq_len=32
    )
    enc = examples.make_encoder(spec, tok, templates.resolve_template(spec, tok), "messages")
    chat = lambda *turns: {
        "messages": [
            {"role": r, "content": c}
            for r, c in zip(["user", "assistant"] * 2, turns, strict=False)
        ]
    }
    rows = [chat("Hi", "Hello!", "2+2?", "4"), chat("Hi", "Yo"), chat("Hi", "A", "word " * 60, "B")]
    a, b = examples.encode_chunk(rows[:2], enc), examples.encode_chunk(rows[2:], enc)
    joined = examples.Chunk.concat([a, b])
    assert joined.status.tolist() == [0, 0, 0]
    assert joined.examples_per_row.tolist() == [2, 1, 1]
    assert joined.example_rows().tolist() == [0, 0, 1, 2]
    split, dropped = examples.SPLIT_TURNS, examples.TURNS_DROPPED
    assert joined.flags.tolist() == [split, 0, split | dropped]
    # (" x" is one GPT-2 token: the space of "Assistant: x" trains with x, as unsplit.)
    trained = [
        tok.decode(joined.ids[s:e][joined.trainable[s:e]])
        for s, e in zip(joined.starts[:-1], joined.starts[1:], strict=True)
    ]
    assert trained == [f" {t}<|endoftext|>" for t in ("Hello!", "4", "Yo", "A")]
    # A chunk read back without its counts (an older part file): one example per kept row.
    old = examples.Chunk(
        ids=b.ids,
        trainable=b.trainable,
        starts=b.starts,
        status=b.status,
        flags=b.flags,
        problems={},
    )
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
    history = {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
        ]
    }
    want = (
        "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n"
        "<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.decode(prompt_ids(history, spec, tok)) == want
    # A final assistant turn is replaced: its response is what gets generated.
    redo = {"messages": history["messages"] + [{"role": "assistant", "content": "old"}]}
    assert prompt_ids(redo, spec, tok) == prompt_ids(history, spec, tok)
    assert tok.decode(prompt_ids("c", spec, tok)) == (
        "<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n"
    )


# ---------------------------------------------------------------- the fields files carry


def _chat_encoder(tok, template="chatml", fmt="messages", **kw):
    spec = DataSpec(train="x", cache=False, template=template, format=fmt, **kw)
    return examples.make_encoder(spec, tok, templates.resolve_template(spec, tok), fmt)


def _trained(chunk, tok) -> list[str]:
    return [
        tok.decode(chunk.ids[s:e][chunk.trainable[s:e]])
        for s, e in zip(chunk.starts[:-1], chunk.starts[1:], strict=True)
    ]


def test_turns_the_row_says_not_to_train_are_context(tok):
    turns = [
        ("user", "Hi", None),
        ("assistant", "Hello!", 0),
        ("user", "2+2?", None),
        ("assistant", "4", 1),
    ]
    row = {"messages": [{"role": r, "content": c, "train": t} for r, c, t in turns]}
    for split in ("auto", "always"):
        chunk = examples.encode_chunk([row], _chat_encoder(tok, split_turns=split))
        assert chunk.status.tolist() == [0] and chunk.examples_per_row.tolist() == [1]
        assert _trained(chunk, tok) == ["4<|im_end|>"]
    # Alpaca's history: earlier turns rendered with the alpaca template, not trained.
    row = {"instruction": "2+2?", "output": "4", "history": [["Hi", "Hello!"]]}
    enc = _chat_encoder(tok, template="alpaca", fmt="alpaca")
    r = enc.render(enc.messages(row))
    assert view.mark_text(r.text, r.spans).endswith(
        "### Instruction:\nHi\n\n### Response:\nHello!<|endoftext|>\n\n"
        "### Instruction:\n2+2?\n\n### Response:\n⟦4<|endoftext|>⟧"
    )


def test_non_text_parts_and_bad_tools_are_bad_rows(tok):
    image = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is it?"},
                    {"type": "image_url", "image_url": {"url": "x.png"}},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        ]
    }
    bad_tools = {"tools": "[{", "messages": image["messages"][1:]}
    chunk = examples.encode_chunk([image, bad_tools], _chat_encoder(tok))
    assert [NAMES[int(s)] for s in chunk.status] == ["non_text_content", "bad_tools"]
    assert "messages[0].content[1]' is a 'image_url' part" in chunk.problems[0]


def test_data_tools_for_rows_without_their_own(tok, tmp_path):
    add = {"name": "add", "parameters": {}}
    path = tmp_path / "tools.json"
    path.write_text(json.dumps([add]), encoding="utf-8")
    plain = {
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    }
    for value in (str(path), json.dumps([add])):
        enc = _chat_encoder(tok, tools=value)
        assert enc.tools == (add,)
        assert (
            '<tools>\n{"name": "add", "parameters": {}}\n</tools>'
            in enc.render(*enc.conversation(plain)).text
        )
        own = {**plain, "tools": [{"name": "mul"}]}  # A row's own tools win.
        assert enc.conversation(own)[1] == ({"name": "mul"},)
    with pytest.raises(ValueError, match=r"data\.tools.*not a list of function definitions"):
        _chat_encoder(tok, tools='{"description": "no name"}')
    with pytest.raises(ValueError, match=r"data\.tools='missing\.json': cannot read it"):
        _chat_encoder(tok, tools="missing.json")


def test_fields_a_chat_template_leaves_out_are_flagged(tok):
    """A template without tools or reasoning (here: one that writes role and content only)
    drops them; the row is kept and flagged, so the build can count and warn."""
    bare = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    t = templates.JinjaTemplate(bare, "bare", {})
    spec = DataSpec(train="x", cache=False, format="messages")
    enc = examples.make_encoder(spec, tok, t, "messages")
    call = {"name": "add", "arguments": {}}
    rows = [
        {
            "tools": [{"name": "add"}],
            "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
        },
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Yo", "tool_calls": [call]},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Yo", "reasoning_content": "Hmm."},
            ]
        },
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
    ]
    chunk = examples.encode_chunk(rows, enc)
    assert chunk.status.tolist() == [0] * 4
    tools_, reasoning = examples.TOOLS_UNRENDERED, examples.REASONING_UNRENDERED
    no_end = examples.NO_END_TOKEN  # The bare template writes no end token either.
    assert chunk.flags.tolist() == [f | no_end for f in (tools_, tools_, reasoning, 0)]


def test_a_cut_inside_a_user_turn_is_not_a_cut_response(tok):
    """Truncation flags RESPONSE_CUT only when the cut falls inside a trained run: a
    multi-turn row cut in its second user turn kept every response it holds whole."""
    enc = _encoder(tok, max_seq_len=7)
    trainable = np.array([0, 0, 1, 1, 0, 0, 0, 0, 0, 1, 1], bool)  # answer, user turn, answer
    ids = np.arange(len(trainable))
    keep, flags = examples.fit_index(ids, trainable, enc)
    assert ids[keep].tolist() == list(range(8)) and flags == 0
    trainable[6:9] = True  # now the cut falls inside a response
    assert examples.fit_index(ids, trainable, enc)[1] == examples.RESPONSE_CUT
