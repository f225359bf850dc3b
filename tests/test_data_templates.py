"""Golden tests for the Alpaca template and the loss mask it yields with GPT-2."""

import numpy as np
import pytest
from tokenizers import processors

from sft_jax.data import load_tokenizer, templates

EOS = 50256


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("gpt2")


WITH_INPUT = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
NO_INPUT = {"instruction": "Name a colour.", "input": "", "output": "Blue."}

# Written out in full, not built from the module's constants, so a typo there shows here.
GOLDEN_TEXT = [
    (
        WITH_INPUT,
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n5",
    ),
    (
        NO_INPUT,
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nName a colour.\n\n### Response:\nBlue.",
    ),
]


@pytest.mark.parametrize("row,text", GOLDEN_TEXT)
def test_alpaca_golden_text_and_span(row, text):
    r = templates.render(row, "alpaca")
    assert r.text == text
    assert r.spans == [(len(text) - len(row["output"]), len(text))]
    assert r.text[slice(*r.spans[0])] == row["output"]


ROWS = [
    WITH_INPUT,
    NO_INPUT,
    {"instruction": "Write a list.", "input": "", "output": "1. a\n2. b\n\nDone!"},
    {"instruction": "Translate: {x}", "input": "{input} ok", "output": "Übersetzt: 中文 🤖"},
    {"instruction": "Say nothing.", "input": "", "output": ""},
]


@pytest.mark.parametrize("row", ROWS)
def test_mask_covers_exactly_response_and_eos(tok, row):
    ids, trainable = templates.tokenize_rendered(templates.render(row), tok)
    assert ids.dtype == np.int32 and trainable.dtype == np.bool_ and ids.shape == trainable.shape
    assert ids[-1] == EOS and trainable[-1]
    assert EOS not in ids[:-1].tolist()  # No BOS for GPT-2, no EOS elsewhere.
    # Trainable tokens form one contiguous block at the end.
    first = int(np.argmax(trainable))
    assert trainable[first:].all() and not trainable[:first].any()
    assert tok.decode(ids[trainable]) == row["output"] + "<|endoftext|>"
    prompt = templates.render({**row, "output": ""}).text
    assert tok.decode(ids[~trainable]) == prompt
    # The first target after the prompt carries loss: targets = ids[1:], mask = trainable[1:].
    n_prompt = int((~trainable).sum())
    assert trainable[1:][n_prompt - 1]


def test_eos_trainable_even_when_pad_is_eos(tok):
    tok2 = load_tokenizer("gpt2")
    tok2.pad_token = tok2.eos_token
    assert tok2.pad_token_id == EOS
    ids, trainable = templates.tokenize_rendered(templates.render(NO_INPUT), tok2)
    assert ids[-1] == EOS and trainable[-1]


def test_token_straddling_prompt_and_response_is_trainable(tok):
    # The prompt ends in "\n"; GPT-2 splits "\n" + "\n\nYes" as "\n\n", "\n", "Yes".
    row = {"instruction": "Go.", "input": "", "output": "\n\nYes"}
    ids, trainable = templates.tokenize_rendered(templates.render(row), tok)
    first = int(np.argmax(trainable))
    assert ids[first] == 628  # "\n\n", half prompt, half response.
    assert not trainable[first - 1]
    # The whole straddling token trains: one extra prompt "\n", never a lost response char.
    assert tok.decode(ids[trainable]) == "\n" + row["output"] + "<|endoftext|>"


def test_train_on_all(tok):
    ids, trainable = templates.tokenize_rendered(templates.render(WITH_INPUT), tok, "all")
    ids_r, _ = templates.tokenize_rendered(templates.render(WITH_INPUT), tok, "response")
    np.testing.assert_array_equal(ids, ids_r)
    assert trainable.all()
    assert tok.decode(ids[:1]) == "Below"  # No BOS prepended.


def test_literal_eos_text_in_data_is_not_an_eos(tok):
    row = {"instruction": "Quote <|endoftext|> please.", "input": "", "output": "a<|endoftext|>b"}
    ids, trainable = templates.tokenize_rendered(templates.render(row), tok)
    assert ids.tolist().count(EOS) == 1 and ids[-1] == EOS
    assert tok.decode(ids[trainable]) == row["output"] + "<|endoftext|>"


def test_tokenize_many_matches_one_by_one(tok):
    rendered = [templates.render(r) for r in ROWS]
    for (a_ids, a_tr), r in zip(templates.tokenize_many(rendered, tok), rendered, strict=True):
        b_ids, b_tr = templates.tokenize_rendered(r, tok)
        np.testing.assert_array_equal(a_ids, b_ids)
        np.testing.assert_array_equal(a_tr, b_tr)


def test_bos_prepended_untrainable_when_tokenizer_adds_one(tmp_path):
    base = load_tokenizer("gpt2")
    base.add_special_tokens({"bos_token": "<s>"})
    bos = base.convert_tokens_to_ids("<s>")
    base.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)]
    )
    base.save_pretrained(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    assert tok("a")["input_ids"] == [bos, 64]
    ids, trainable = templates.tokenize_rendered(templates.render(NO_INPUT), tok)
    gpt2 = load_tokenizer("gpt2")
    plain, plain_tr = templates.tokenize_rendered(templates.render(NO_INPUT), gpt2)
    assert ids[0] == bos and not trainable[0]
    np.testing.assert_array_equal(ids[1:], plain)
    np.testing.assert_array_equal(trainable[1:], plain_tr)
    _, all_tr = templates.tokenize_rendered(templates.render(NO_INPUT), tok, "all")
    assert not all_tr[0] and all_tr[1:].all()


def test_errors():
    with pytest.raises(ValueError, match=r"data\.template.*alpaca"):
        templates.render(NO_INPUT, "nope")
    tok = load_tokenizer("gpt2")
    with pytest.raises(ValueError, match=r"data\.train_on"):
        templates.tokenize_rendered(templates.render(NO_INPUT), tok, "prompt")
    tok.eos_token = None
    with pytest.raises(ValueError, match="no EOS"):
        templates.tokenize_rendered(templates.render(NO_INPUT), tok)
